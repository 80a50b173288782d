"""One request inside the engine: what the loop runs for it, and what the caller reads back.

The loop thread fills it (the prefill's value, then text pieces, then the end or an error); the
caller's thread reads it (`result()`, then iteration). Pieces are queued without bound, so a caller
that stops reading never blocks the loop: its answer is generated into memory, at most max_new_tokens
pieces. `cancel()` (what closing the caller's stream calls) asks the loop to drop the request at its
next step, which releases its decode cache; the request's answer is then never finished.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from ragblend.engine.generate import Sequence

_END = object()


class Submission:
    def __init__(self, prefill: Callable[[], Any], decode: Callable[[Any], Sequence] | None, kv_bytes: int):
        """`prefill` runs on the loop thread; `decode` makes the Sequence to decode from its value (None:
        a prefill alone, which takes no decode slot). `kv_bytes`: the decode cache it will hold at most."""
        self.prefill, self.decode, self.kv_bytes = prefill, decode, kv_bytes
        self.sequence: Sequence | None = None  # set by the loop once prefilled
        self._value: Any = None
        self._error: BaseException | None = None
        self._started = threading.Event()
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()

    # ---- the loop's side --------------------------------------------------------------------------

    def started(self, value: Any, sequence: Sequence | None) -> None:
        self._value, self.sequence = value, sequence
        self._started.set()

    def emit(self, pieces: list[str]) -> None:
        for piece in pieces:
            self._pieces.put(piece)

    def end(self) -> None:
        self._pieces.put(_END)

    def fail(self, error: BaseException) -> None:
        """The prefill or a decode step failed: the caller sees `error` where it waits."""
        if not self._started.is_set():
            self._error = error
            self._started.set()
        self._pieces.put(error)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # ---- the caller's side ------------------------------------------------------------------------

    def result(self) -> Any:
        """Wait for the prefill; its value (its error is raised here)."""
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self._value

    def __iter__(self) -> Submission:
        return self

    def __next__(self) -> str:
        """The next text piece, waiting for the loop to decode it."""
        item = self._pieces.get()
        if item is _END:
            self._pieces.put(_END)  # iterating again ends again
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self._cancelled.set()

    close = cancel  # what AnswerStream closes: a request nobody reads is dropped
