"""The server's scheduler: a bounded queue, one worker in arrival order, cancellation, and prefetch of
queued jobs whose protection is released once they have run."""
from __future__ import annotations

import threading
import time

import pytest

from ragblend.serve.scheduler import Cancelled, Job, Overloaded, Scheduler


def blocker() -> tuple[Job, threading.Event]:
    gate = threading.Event()
    return Job(lambda job: gate.wait(10)), gate


def test_beyond_max_queue_a_request_is_refused_not_queued():
    scheduler = Scheduler(max_queue=2)
    running, gate = blocker()
    scheduler.submit(running)
    scheduler.submit(Job(lambda job: "second"))
    with pytest.raises(Overloaded):
        scheduler.submit(Job(lambda job: "third"))
    gate.set()
    scheduler.close()
    assert running.future.result() is True


def test_a_job_cancelled_while_queued_never_runs_and_one_running_sees_it():
    scheduler = Scheduler(max_queue=4)
    ran = []
    started = threading.Event()

    def long_running(job: Job) -> str:
        started.set()
        while not job.cancelled.is_set():
            time.sleep(0.01)
        return "stopped"

    running = scheduler.submit(Job(long_running))
    queued = scheduler.submit(Job(lambda job: ran.append("queued")))
    started.wait(5)
    queued.cancel()
    running.cancel()
    assert running.future.result(5) == "stopped"
    with pytest.raises(Cancelled):
        queued.future.result(5)
    scheduler.close()
    assert ran == []


def test_queued_jobs_are_prefetched_while_an_earlier_one_runs_and_released_after():
    scheduler = Scheduler(max_queue=4)
    events = []
    running, gate = blocker()
    prefetched = threading.Event()

    def prefetch():
        events.append("prefetch")
        prefetched.set()
        return lambda: events.append("release")

    scheduler.submit(running)
    queued = scheduler.submit(Job(lambda job: events.append("run"), prefetch))
    assert prefetched.wait(5)  # before the running job finished
    gate.set()
    queued.future.result(5)
    scheduler.close()
    assert events == ["prefetch", "run", "release"]


def test_close_finishes_every_accepted_job():
    scheduler = Scheduler(max_queue=8)
    jobs = [scheduler.submit(Job(lambda job, i=i: i)) for i in range(5)]
    scheduler.close()
    assert [job.future.result(0) for job in jobs] == list(range(5))
    with pytest.raises(Overloaded):
        scheduler.submit(Job(lambda job: None))
