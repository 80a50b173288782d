"""The engine loop owns every request: concurrent requests decode in one forward per step, at most one
prefill runs between two steps, a request whose caller went away leaves at the next step, and a
request whose decode cache does not fit the RAM budget waits until one finishes."""
from __future__ import annotations

import threading
import time

import pytest
from test_batched_decode import alone, prompt

import ragblend.engine.loop as loop_module
from ragblend.engine.generate import SamplingConfig, Sequence
from ragblend.engine.loop import EngineLoop

LENGTH, NEW_TOKENS = 30, 8


def submit(loop: EngineLoop, seed: int, new_tokens: int = NEW_TOKENS, log: list | None = None):
    """A request over a random prompt of LENGTH tokens; `log` notes its prefill."""
    def prefill():
        if log is not None:
            log.append("prefill")
        return prompt(loop.model, LENGTH, seed)

    sampling = SamplingConfig(max_new_tokens=new_tokens)
    return loop.submit(prefill, lambda p: Sequence(loop.model, *p, LENGTH, sampling, []), LENGTH + new_tokens)


def gate(loop: EngineLoop) -> threading.Event:
    """Hold the loop in a prefill until the returned event is set: what is submitted meanwhile waits."""
    opened = threading.Event()
    loop.submit(lambda: opened.wait(10))
    return opened


def test_concurrent_requests_decode_in_one_forward_per_step(tiny_model):
    loop = EngineLoop(tiny_model, max_batch=4)
    opened = gate(loop)
    requests = [submit(loop, seed) for seed in range(4)]
    opened.set()
    pieces = [list(r) for r in requests]
    loop.close()
    assert [(r.sequence.generated, p) for r, p in zip(requests, pieces)] == [
        alone(tiny_model, LENGTH, seed, SamplingConfig(max_new_tokens=NEW_TOKENS)) for seed in range(4)]
    # one prefill joins per step: the last joins at step 4 and needs NEW_TOKENS - 1 forwards
    assert loop.stats.steps == len(requests) + NEW_TOKENS - 2
    assert loop.stats.tokens == len(requests) * (NEW_TOKENS - 1)
    assert loop.stats.mean_batch > 2


def test_a_request_cancelled_by_its_caller_leaves_at_the_next_step(tiny_model):
    loop = EngineLoop(tiny_model, max_batch=4)
    kept, dropped = submit(loop, 0, new_tokens=60), submit(loop, 1, new_tokens=2000)
    next(kept), next(dropped)
    dropped.close()
    assert list(kept) and len(kept.sequence.generated) == 60  # the other runs to its end
    loop.close()  # returns once nothing runs: the dropped one was not left decoding its 2000 tokens
    assert len(dropped.sequence.generated) < 2000 and not loop.scheduler.busy


def test_a_request_beyond_the_ram_budget_waits_until_another_finishes(tiny_model):
    loop = EngineLoop(tiny_model, max_batch=4, kv_budget_bytes=EngineLoop(tiny_model).kv_bytes(LENGTH + 12))
    running_at_prefill = []

    def note(request_prefill):
        def prefill():
            running_at_prefill.append(len(loop.scheduler.running))  # itself included
            return request_prefill()
        return prefill

    opened = gate(loop)
    first = loop.submit(note(lambda: prompt(tiny_model, LENGTH, 0)),
                        lambda p: Sequence(tiny_model, *p, LENGTH, SamplingConfig(max_new_tokens=10), []), LENGTH + 10)
    second = loop.submit(note(lambda: prompt(tiny_model, LENGTH, 1)),
                         lambda p: Sequence(tiny_model, *p, LENGTH, SamplingConfig(max_new_tokens=10), []),
                         LENGTH + 10)
    opened.set()
    list(first), list(second)
    loop.close()
    assert running_at_prefill == [1, 1]  # the second started only once the first had left
    assert loop.stats.steps == loop.stats.tokens  # never two in one step


def test_a_request_larger_than_the_whole_budget_is_still_answered_alone(tiny_model):
    loop = EngineLoop(tiny_model, max_batch=4, kv_budget_bytes=1)
    assert len(list(submit(loop, 0))) > 0
    loop.close()


def test_at_most_max_batch_requests_decode_at_once(tiny_model):
    loop = EngineLoop(tiny_model, max_batch=2)
    opened = gate(loop)
    requests = [submit(loop, seed) for seed in range(3)]
    opened.set()
    for request in requests:
        list(request)
    loop.close()
    assert loop.stats.tokens == 3 * (NEW_TOKENS - 1) and loop.stats.tokens / loop.stats.steps <= 2


def test_while_decodes_run_at_most_one_prefill_runs_between_two_steps(tiny_model, monkeypatch):
    loop, events = EngineLoop(tiny_model), []
    real_step = loop_module.step

    def logged_step(model, sequences):
        events.append("step")
        real_step(model, sequences)

    monkeypatch.setattr(loop_module, "step", logged_step)
    decoding = submit(loop, 0, new_tokens=100)
    next(decoding)

    def prefill_many():
        for _ in range(6):
            loop.submit(lambda: (events.append("prefill"), time.sleep(0.02))).result()

    threads = [threading.Thread(target=prefill_many) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    list(decoding)
    loop.close()
    last_step = len(events) - events[::-1].index("step")
    while_decoding = events[:last_step]
    assert events.count("prefill") == 18 and while_decoding.count("prefill") > 1
    assert all(not (a == b == "prefill") for a, b in zip(while_decoding, while_decoding[1:]))


def test_a_failed_prefill_fails_its_request_alone(tiny_model):
    loop = EngineLoop(tiny_model)
    running = submit(loop, 0)
    failing = loop.submit(lambda: 1 / 0, lambda p: None, 10)
    with pytest.raises(ZeroDivisionError):
        failing.result()
    assert len(list(running)) > 0
    loop.close()


def test_a_fault_of_the_loop_fails_every_request_instead_of_hanging_it(tiny_model, monkeypatch):
    loop = EngineLoop(tiny_model)
    monkeypatch.setattr(loop.scheduler, "admit", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        submit(loop, 0).result()
    loop.close()
