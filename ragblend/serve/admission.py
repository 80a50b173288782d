"""One model, many clients: a bounded queue in front of `workers` worker threads, and a prefetcher that
readies what queued requests will need while the workers run earlier ones (CachedAttention's
scheduler-aware prefetch).

A worker takes a job, submits its request to the RagBlend's engine (ragblend.engine.loop) and relays
the answer's pieces; the engine batches the decodes of every running request into one forward per step
and runs prefills between steps (at most one between two steps while decodes run, so a running
answer's next token waits at most one prefill plus one step). The server makes `workers` the engine's
`max_batch`: every running request has a worker relaying it, and the batching is the engine's.

A job's `prefetch` runs on the prefetch thread while the job waits: it retrieves the request's chunks
and warms their KV pages, and loads its session's turns into the RAM tier, protected from eviction
until the job has run (`release`). Workers take jobs in arrival order; a job cancelled while queued
(its client went away) is skipped, one cancelled while running is dropped by the engine at its next step.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class Overloaded(RuntimeError):
    """The queue is full: the client should retry later."""


class Cancelled(RuntimeError):
    """The job's client went away."""


@dataclass(eq=False)
class Job:
    run: Callable[[Job], Any]  # on the worker thread; its return value resolves `future`
    prefetch: Callable[[], Callable[[], None] | None] | None = None  # returns the matching release
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    release: Callable[[], None] | None = None
    prefetched: bool = False

    def cancel(self) -> None:
        self.cancelled.set()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("the client went away")


class AdmissionQueue:
    def __init__(self, max_queue: int, prefetch: bool = True, workers: int = 1):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.max_queue, self.prefetch_enabled = max_queue, prefetch
        self._queue: deque[Job] = deque()
        self._running: set[Job] = set()
        self._cond = threading.Condition()
        self._closing = False
        self._threads = [threading.Thread(target=self._work, name=f"ragblend-worker-{i}", daemon=True)
                         for i in range(workers)]
        if prefetch:
            self._threads.append(threading.Thread(target=self._prefetch, name="ragblend-prefetch", daemon=True))
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        with self._cond:
            return len(self._queue) + len(self._running)

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closing:
                raise Overloaded("the server is shutting down")
            if len(self._queue) + len(self._running) >= self.max_queue:
                raise Overloaded(f"{self.max_queue} requests are already queued or running")
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def close(self) -> None:
        """Take no more jobs, finish the queued ones, stop the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def _next(self) -> Job | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            job = self._queue.popleft()
            self._running.add(job)
            self._cond.notify_all()
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                job.check()
                job.future.set_result(job.run(job))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                job.future.set_exception(exc)
            finally:
                with self._cond:
                    release, job.release = job.release, None
                    self._running.discard(job)
                    self._cond.notify_all()
                if release is not None:
                    release()

    def _prefetch(self) -> None:
        """Prefetch queued jobs in order, while the workers are busy with earlier ones."""
        while True:
            with self._cond:
                while not self._closing and not any(not j.prefetched for j in self._queue):
                    self._cond.wait()
                pending = [j for j in self._queue if not j.prefetched]
                if self._closing and not pending:
                    return
                job = pending[0]
                job.prefetched = True
            if job.prefetch is None or job.cancelled.is_set():
                continue
            try:
                release = job.prefetch()
            except Exception:  # noqa: BLE001 - a failed prefetch only costs the job its head start
                continue
            with self._cond:
                finished = job.future.done()  # the worker got there first: release here
                if not finished:
                    job.release = release
            if finished and release is not None:
                release()
