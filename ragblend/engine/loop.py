"""The engine: one loop that owns the model and every request on it (nano-vllm's LLMEngine).

Callers `submit` a request (a prefill, and the decode it starts) and read its text pieces from the
Submission; they never touch the model. The loop's `step()` runs at most one prefill (the next request
the Scheduler admits), then picks every running request's next token and feeds them all in ONE batched
forward (`model.decode_step`). So requests join the batch once prefilled, leave it at their last token,
and the bound on how long a prefill stalls decoding holds by construction: while decodes run, at most
one prefill runs between two decode steps, so a running answer's next token waits at most one prefill
(a reuse or blend prefill is about a TTFT: tens to hundreds of ms; a full prefill of a long prompt is
seconds) plus one step.

The loop runs on a thread of its own while there is work and ends when there is none (the next submit
starts another): an engine nobody uses holds no thread, and one that is dropped leaks none.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ragblend.engine.generate import Sequence, step
from ragblend.engine.model import LoadedModel
from ragblend.engine.scheduler import Scheduler
from ragblend.engine.submission import Submission


@dataclass
class EngineStats:
    steps: int = 0  # batched decode forwards
    tokens: int = 0  # tokens fed by those steps
    prefills: int = 0

    @property
    def mean_batch(self) -> float:
        return self.tokens / max(self.steps, 1)


class EngineLoop:
    def __init__(self, model: LoadedModel, max_batch: int = 8, kv_budget_bytes: int | None = None):
        """`max_batch`: requests decoding at once; `kv_budget_bytes`: RAM for their decode caches (None:
        no limit but max_batch). See Scheduler for admission."""
        self.model = model
        self.scheduler = Scheduler(max_batch, kv_budget_bytes)
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def kv_bytes(self, tokens: int) -> int:
        """A decode cache of `tokens` tokens: K and V per layer, kv_heads x head_dim values each."""
        m = self.model
        return 2 * m.num_layers * m.num_kv_heads * m.head_dim * tokens * m.dtype.itemsize

    def submit(self, prefill: Callable[[], Any], decode: Callable[[Any], Sequence] | None = None,
               tokens: int = 0) -> Submission:
        """Queue a request: `prefill` runs in the loop, then (with `decode`) its Sequence decodes with the
        others. `tokens`: prompt + max_new_tokens, what its decode cache holds at most."""
        submission = Submission(prefill, decode, self.kv_bytes(tokens) if decode else 0)
        with self._cond:
            self.scheduler.add(submission)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ragblend-engine", daemon=True)
                self._thread.start()
        return submission

    def step(self) -> None:
        """At most one prefill, then one batched decode forward of every running request."""
        with self._cond:
            for gone in self.scheduler.drop_cancelled():
                gone.end()
            admitted = self.scheduler.admit()
        if admitted is not None:
            self._prefill(admitted)
        with self._cond:
            running = list(self.scheduler.running)
        batch = [s for s in running if self._advance(s)]
        if batch:
            self._decode(batch)

    def _prefill(self, submission: Submission) -> None:
        self.stats.prefills += 1
        try:
            value = submission.prefill()
            sequence = submission.decode(value) if submission.decode else None
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, the loop goes on
            self._release(submission)
            submission.fail(exc)
            return
        submission.started(value, sequence)
        if sequence is None:
            self._release(submission)

    def _advance(self, submission: Submission) -> bool:
        """Pick the request's next token and hand out its text; False once it has ended."""
        sequence = submission.sequence
        try:
            submission.emit(sequence.advance())
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            self._release(submission)
            submission.fail(exc)
            return False
        if sequence.token is None:
            self._release(submission)
            submission.end()
            return False
        return True

    def _decode(self, batch: list[Submission]) -> None:
        self.stats.steps += 1
        self.stats.tokens += len(batch)
        try:
            step(self.model, [s.sequence for s in batch])
        except Exception as exc:  # noqa: BLE001 - every request of the failed step gets the error
            for submission in batch:
                self._release(submission)
                submission.fail(exc)

    def _release(self, submission: Submission) -> None:
        with self._cond:
            self.scheduler.finish(submission)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self.scheduler.busy:
                    self._thread = None
                    self._cond.notify_all()
                    return
            try:
                self.step()
            except BaseException as exc:  # noqa: BLE001 - a fault of the loop itself: fail every request, hang none
                self._fail_all(exc)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            failed = [*self.scheduler.waiting, *self.scheduler.running]
            self.scheduler.waiting.clear()
            self.scheduler.running.clear()
        for submission in failed:
            submission.fail(error)

    def close(self) -> None:
        """Wait until every submitted request has finished or been cancelled."""
        with self._cond:
            while self._thread is not None:
                self._cond.wait()
