"""The server's online audit: idle-only full-prefill re-answers of sampled blend requests, and what it reports."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from conftest import make_tiny_model_dir
from ragblend.api import RagBlend
from ragblend.serve.audit import Audit
from ragblend.serve.launch import ServerProcess
from ragblend.serve.admission import AdmissionQueue, Job
from ragblend.storage.calibration import Calibration, write_calibration

DOCS = ["The lighthouse of Varn was built in 1821 by the engineer Oda Pell.",
        "Oda Pell later designed three bridges over the river Am in Kessel."]
QUESTION = "Who built the lighthouse of Varn?"


@pytest.fixture(scope="module")
def rb(tiny_model, embedder, tmp_path_factory) -> RagBlend:
    rb = RagBlend(tmp_path_factory.mktemp("audit") / "store", model=tiny_model, embedder=embedder)
    rb.add_documents(DOCS)
    yield rb
    rb.close()


@pytest.fixture
def admission():
    admission = AdmissionQueue(max_queue=4, prefetch=False)
    yield admission
    admission.close()


def offer(audit: Audit, answer, **changes) -> bool:
    request = dict(question=QUESTION, contexts=None, namespace="", max_new_tokens=4, stop=[], temperature=0.0,
                   one_shot=True, answer=answer) | changes
    return audit.offer(**request)


def wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_audit_never_runs_while_a_request_waits_or_runs(rb, admission):
    audit = Audit(rb, 1.0, lambda: admission.depth, CollectorRegistry())
    try:
        release = threading.Event()
        running = admission.submit(Job(lambda job: release.wait(30)))
        waiting = admission.submit(Job(lambda job: time.sleep(0.3)))
        assert offer(audit, rb.query(QUESTION, max_new_tokens=4))
        time.sleep(0.5)
        assert audit.view()["audited"] == 0 and audit.view()["pending"] == 1  # held back behind both requests
        release.set()
        running.future.result(30)
        assert audit.view()["audited"] == 0  # the second request still runs
        waiting.future.result(30)
        wait_for(lambda: audit.view()["audited"] == 1)
        view = audit.view()
        assert view["total"]["identical"] == 1.0 and view["total"]["first_token"] == 1.0
        assert view["total"]["kl_mean"] >= 0.0
        assert view["window"]["size"] == 1 and view["pending"] == 0
    finally:
        audit.close()


def test_exactly_the_sampled_share_of_greedy_one_shot_blend_requests_is_audited(rb):
    audit = Audit(rb, 0.25, lambda: 1, CollectorRegistry())  # never idle: nothing runs, only sampling
    try:
        answer = rb.query(QUESTION, max_new_tokens=2)
        assert [offer(audit, answer) for _ in range(8)] == [False, False, False, True] * 2
        full = rb.query(QUESTION, mode="full", max_new_tokens=2)
        for _ in range(4):
            assert not offer(audit, full)
            assert not offer(audit, answer, temperature=0.7)
            assert not offer(audit, answer, one_shot=False)
        assert audit.view()["sampled"] == 2 and audit.view()["pending"] == 2
    finally:
        audit.close()


def calibrate_to(rb, target: float) -> None:
    write_calibration(rb.store, rb.store.manifest.kv_fingerprint, Calibration(
        ratio=0.15, selection="hkvd", target=target, metric="identical", questions=10, agreement=target,
        ttft_vs_full=0.5, date="2026-01-01T00:00:00+00:00", met=True))


def test_below_the_calibrated_target_it_warns_once_per_window_and_exports_metrics(rb, admission, caplog):
    calibrate_to(rb, 0.9)
    registry = CollectorRegistry()
    audit = Audit(rb, 1.0, lambda: admission.depth, registry, window=2)
    different = replace(rb.query(QUESTION, max_new_tokens=4), text="an answer full prefill did not give")
    try:
        with caplog.at_level(logging.WARNING, logger="ragblend.audit"):
            for _ in range(5):
                offer(audit, different)
            wait_for(lambda: audit.view()["audited"] == 5)
        warnings = [r for r in caplog.records if "below the calibrated target" in r.getMessage()]
        assert len(warnings) == 2  # after audits 2 and 4: once per window of 2
        assert audit.view()["window"]["identical"] == 0.0 and audit.view()["total"]["first_token"] == 1.0
        assert audit.target() == {"metric": "identical", "measure": "identical", "target": 0.9, "ratio": 0.15}
        text = generate_latest(registry).decode()
        assert 'ragblend_audit_window{measure="identical"} 0.0' in text
        assert 'ragblend_audit_agreements_total{measure="first_token"} 5.0' in text
    finally:
        audit.close()


def test_served_blend_requests_are_audited_and_reported(rb, smollm_dir, tmp_path):
    calibrate_to(rb, 0.8)
    model = make_tiny_model_dir(tmp_path, "llama", smollm_dir)  # the same weights as the store's tiny model
    with ServerProcess(rb.store.path, "--model", str(model), "--audit-rate", "1") as server, server.client() as http:
        for _ in range(2):
            reply = http.post("/v1/completions", json={"prompt": QUESTION, "max_tokens": 3})
            assert reply.status_code == 200
        http.post("/v1/completions", json={"prompt": QUESTION, "max_tokens": 3, "mode": "full"})
        wait_for(lambda: http.get("/v1/audit").json()["audited"] == 2)
        view = http.get("/v1/audit").json()
        assert view["rate"] == 1.0 and view["sampled"] == 2 and view["window"]["identical"] == 1.0
        assert view["calibration"]["target"] == 0.8
        assert 'ragblend_audit_requests_total{outcome="audited"} 2.0' in http.get("/metrics").text
