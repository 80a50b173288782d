"""The server's admission queue: bounded, workers taking jobs in arrival order (several at once:
their decodes batch), cancellation, and prefetch of queued jobs whose protection is released once
they have run."""
from __future__ import annotations

import threading
import time

import pytest

from ragblend.serve.admission import AdmissionQueue, Cancelled, Job, Overloaded


def blocker() -> tuple[Job, threading.Event]:
    gate = threading.Event()
    return Job(lambda job: gate.wait(10)), gate


def test_beyond_max_queue_a_request_is_refused_not_queued():
    admission = AdmissionQueue(max_queue=2)
    running, gate = blocker()
    admission.submit(running)
    admission.submit(Job(lambda job: "second"))
    with pytest.raises(Overloaded):
        admission.submit(Job(lambda job: "third"))
    gate.set()
    admission.close()
    assert running.future.result() is True


def test_up_to_workers_jobs_run_at_once_and_a_queued_one_starts_when_one_ends():
    admission = AdmissionQueue(max_queue=4, workers=2)
    (first, first_gate), (second, second_gate) = blocker(), blocker()
    started = threading.Event()
    third = Job(lambda job: started.set())
    for job in (first, second, third):
        admission.submit(job)
    assert not started.wait(0.3) and admission.depth == 3  # both workers busy: the third waits
    second_gate.set()
    assert started.wait(5) and not first.future.done()
    first_gate.set()
    admission.close()


def test_a_job_cancelled_while_queued_never_runs_and_one_running_sees_it():
    admission = AdmissionQueue(max_queue=4)
    ran = []
    started = threading.Event()

    def long_running(job: Job) -> str:
        started.set()
        while not job.cancelled.is_set():
            time.sleep(0.01)
        return "stopped"

    running = admission.submit(Job(long_running))
    queued = admission.submit(Job(lambda job: ran.append("queued")))
    started.wait(5)
    queued.cancel()
    running.cancel()
    assert running.future.result(5) == "stopped"
    with pytest.raises(Cancelled):
        queued.future.result(5)
    admission.close()
    assert ran == []


def test_queued_jobs_are_prefetched_while_an_earlier_one_runs_and_released_after():
    admission = AdmissionQueue(max_queue=4)
    events = []
    running, gate = blocker()
    prefetched = threading.Event()

    def prefetch():
        events.append("prefetch")
        prefetched.set()
        return lambda: events.append("release")

    admission.submit(running)
    queued = admission.submit(Job(lambda job: events.append("run"), prefetch))
    assert prefetched.wait(5)  # before the running job finished
    gate.set()
    queued.future.result(5)
    admission.close()
    assert events == ["prefetch", "run", "release"]


def test_close_finishes_every_accepted_job():
    admission = AdmissionQueue(max_queue=8)
    jobs = [admission.submit(Job(lambda job, i=i: i)) for i in range(5)]
    admission.close()
    assert [job.future.result(0) for job in jobs] == list(range(5))
    with pytest.raises(Overloaded):
        admission.submit(Job(lambda job: None))
