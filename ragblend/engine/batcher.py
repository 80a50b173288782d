"""One model shared by the threads that answer requests: continuous batching.

Each request decodes on its own thread; when it needs a step, it waits for the model, and whichever
waiting thread gets the model runs one batched step for every request waiting then (DecodeStep), so
requests join and leave the running batch between steps. Prefills take the model between steps.

The bound on how long a prefill stalls decoding: while decodes wait, at most one prefill runs between
two batched steps. A waiting token is therefore delayed by at most the step or prefill running when it
arrived plus one prefill (a reuse or blend prefill is about a TTFT: tens to hundreds of ms; a full
prefill of a long prompt is seconds). A prefill waits for at most one step while others queue.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ragblend.engine.generate import Sequence, step
from ragblend.engine.model import LoadedModel


@dataclass
class BatchStats:
    steps: int = 0
    tokens: int = 0  # tokens fed by those steps: tokens / steps is the mean batch


class Batcher:
    def __init__(self, model: LoadedModel):
        self.model = model
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._waiting: list[Sequence] = []  # decodes waiting for a step
        self._served: dict[Sequence, BaseException | None] = {}  # stepped by another thread: its outcome
        self._busy = False  # a step or a prefill has the model
        self._prefills = 0  # prefills waiting for the model
        self._prefilled = False  # a prefill ran since the last step

    def step(self, sequence: Sequence) -> None:
        """Feed `sequence`'s token in the next batched step; returns once its logits are set."""
        with self._cond:
            self._waiting.append(sequence)
            while sequence not in self._served and (self._busy or (self._prefills and not self._prefilled)):
                self._cond.wait()
            if sequence in self._served:  # another thread's step fed it
                error = self._served.pop(sequence)
                if error is not None:
                    raise error
                return
            batch, self._waiting, self._busy = self._waiting, [], True
        error = None
        try:
            step(self.model, batch)
        except BaseException as exc:
            error = exc
            raise
        finally:
            with self._cond:
                self._busy, self._prefilled = False, False
                self.stats.steps += 1
                self.stats.tokens += len(batch)
                self._served.update((s, error) for s in batch if s is not sequence)
                self._cond.notify_all()

    @contextmanager
    def prefill(self) -> Iterator[None]:
        """Hold the model for one prefill: between steps, and never a second one while decodes wait."""
        with self._cond:
            self._prefills += 1
            while self._busy or (self._waiting and self._prefilled):
                self._cond.wait()
            self._prefills -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy, self._prefilled = False, True
                self._cond.notify_all()
