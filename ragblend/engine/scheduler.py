"""Which requests the engine runs: the waiting ones in arrival order, the running ones, and admission
between them (nano-vllm's Scheduler, for decode caches held in RAM).

A waiting request is admitted (its prefill runs, then it decodes with the others) while fewer than
`max_running` run and the decode caches of the running ones plus its own fit `kv_budget_bytes`; a
cache's bytes are reserved whole at admission (prompt + max_new_tokens), so a running request never
runs out. With nothing running the first waiting request is always admitted, so one larger than the
budget is still answered (alone). Admission keeps arrival order: a request that does not fit holds
back those behind it, so a large one is never starved by small ones. A prefill alone (no decode)
takes neither a slot nor bytes: it is admitted at once.
"""
from __future__ import annotations

from collections import deque

from ragblend.engine.submission import Submission


class Scheduler:
    """Not thread-safe: the engine loop holds its lock around every call."""

    def __init__(self, max_running: int, kv_budget_bytes: int | None = None):
        if max_running < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_running}")
        if kv_budget_bytes is not None and kv_budget_bytes < 1:
            raise ValueError(f"the decode KV budget must be >= 1 byte, got {kv_budget_bytes}")
        self.max_running, self.kv_budget_bytes = max_running, kv_budget_bytes
        self.waiting: deque[Submission] = deque()
        self.running: list[Submission] = []

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def running_bytes(self) -> int:
        return sum(s.kv_bytes for s in self.running)

    def add(self, submission: Submission) -> None:
        self.waiting.append(submission)

    def drop_cancelled(self) -> list[Submission]:
        """Remove the requests whose caller went away (their caches are released with them)."""
        gone = [s for s in [*self.waiting, *self.running] if s.cancelled]
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        self.running = [s for s in self.running if not s.cancelled]
        return gone

    def admit(self) -> Submission | None:
        """The next waiting request, moved to running, if it may start now (see the module docstring)."""
        prefill_alone = next((s for s in self.waiting if s.decode is None), None)
        if prefill_alone is not None:
            self.waiting.remove(prefill_alone)
            return prefill_alone
        if not self.waiting or len(self.running) >= self.max_running:
            return None
        candidate = self.waiting[0]
        fits = self.kv_budget_bytes is None or self.running_bytes + candidate.kv_bytes <= self.kv_budget_bytes
        if self.running and not fits:
            return None
        self.running.append(self.waiting.popleft())
        return candidate

    def finish(self, submission: Submission) -> None:
        if submission in self.running:
            self.running.remove(submission)
