"""`ragblend serve` as a user meets it: a real server process on a free port, talked to with the stock
`openai` client and httpx. Answers equal the Python API's, sessions reuse their KV over HTTP, bad
requests get OpenAI-format errors, and a SIGTERM loses nothing that was acknowledged."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from ragblend import RagBlend
from ragblend.serve.launch import ServerProcess

KEY = "test-key"
TENANT_KEY = "tenant-a-key"  # bound to namespace tenant-a
DOCS = [{"id": "lighthouse", "text": "The lighthouse of Varn was built in 1821 by the engineer Oda Pell."},
        {"id": "bridges", "text": "Oda Pell later designed three bridges over the river Am in Kessel."},
        {"id": "glass", "text": "Kessel is famous for its glass markets and its mayor Tomas Reh."}]
QUESTION = "Who built the lighthouse of Varn?"


class Server(ServerProcess):
    def __init__(self, store: Path, model: Path, *extra: str):
        super().__init__(store, "--model", str(model), *extra, api_key=KEY)

    def http(self, **kwargs) -> httpx.Client:
        return self.client(**kwargs)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model_dir(smollm_dir):
    """The real model: a tiny random one answers with nothing to compare."""
    return smollm_dir


@pytest.fixture(scope="module")
def expected(tmp_path_factory, model_dir, embedder):
    """A store with DOCS, and what the Python API answers over it (computed before any server runs)."""
    store = tmp_path_factory.mktemp("served") / "store"
    with RagBlend(store, model=model_dir, embedder=embedder) as rb:
        rb.add_documents(DOCS)
        # full first: it leaves the exact path blend then loads, as the server's blend requests will
        answers = {mode: rb.query(QUESTION, mode=mode, max_new_tokens=8).text for mode in ("full", "blend")}
        answers["contexts"] = rb.query(QUESTION, contexts=[DOCS[2]["text"]], max_new_tokens=8).text
    assert all(answers.values())
    return store, answers


@pytest.fixture(scope="module")
def server(expected, model_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({TENANT_KEY: "tenant-a"}))
    server = Server(expected[0], model_dir, "--max-queue", "2", "--api-keys", str(keys))
    yield server
    if server.process.poll() is None:
        server.stop()


def test_chat_answers_equal_the_python_api(server, expected):
    client = server.openai()
    for mode in ("blend", "full"):
        reply = client.chat.completions.create(model="any", messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=8, extra_body={"mode": mode})
        assert reply.choices[0].message.content == expected[1][mode]
        assert reply.usage.prompt_tokens > 0 and reply.usage.model_extra["recomputed_tokens"] >= 0
        assert {c["doc_id"] for c in reply.model_extra["ragblend"]["chunks"]} <= {d["id"] for d in DOCS}
    reply = client.chat.completions.create(model="any", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=8, extra_body={"contexts": [DOCS[2]["text"]]})
    assert reply.choices[0].message.content == expected[1]["contexts"]


def test_cache_order_over_http_loads_the_exact_path_an_earlier_full_request_computed(server):
    client = server.openai()

    def ask(mode: str, order: str, contexts: list[str]):
        return client.chat.completions.create(model="any", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=4, extra_body={"mode": mode, "order": order,
                                                                        "contexts": contexts})
    passages = [d["text"] for d in DOCS[:3]]
    full = ask("full", "retrieval", passages)
    reply = ask("prefix", "cache", passages[::-1])
    cached = reply.model_extra["ragblend"]
    assert cached["order"] == "cache"
    assert [c["chunk_id"] for c in cached["chunks"]] == [c["chunk_id"] for c in full.model_extra["ragblend"]["chunks"]]
    assert cached["timings"]["exact_hit_tokens"] > 0 and reply.usage.model_extra["recomputed_tokens"] < \
        full.usage.model_extra["recomputed_tokens"]
    assert reply.choices[0].message.content == full.choices[0].message.content


def test_streamed_chat_sends_the_same_text_then_usage_and_done(server, expected):
    chunks = list(server.openai().chat.completions.create(
        model="any", messages=[{"role": "user", "content": QUESTION}], max_tokens=8, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == expected[1]["blend"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens > 0
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_answers_decoded_together_equal_the_python_api(server, expected):
    replies = {}

    def ask(mode: str) -> None:
        reply = server.openai().chat.completions.create(
            model="any", messages=[{"role": "user", "content": QUESTION}], max_tokens=8, extra_body={"mode": mode})
        replies[mode] = reply.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(mode,)) for mode in ("blend", "full")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert replies == {mode: expected[1][mode] for mode in ("blend", "full")}
    with server.http() as http:
        assert "ragblend_decode_batch_mean" in http.get("/metrics").text


def test_a_session_continued_over_http_reuses_its_kv(server):
    client = server.openai()
    first = client.chat.completions.create(model="any", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=6, extra_body={"session_id": None, "mode": "reuse"})
    session_id = first.model_extra["session_id"]
    answer = first.choices[0].message.content
    follow_up = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer},
                 {"role": "user", "content": "Which river did Oda Pell bridge?"}]
    second = client.chat.completions.create(model="any", messages=follow_up, max_tokens=6,
                                            extra_body={"session_id": session_id, "mode": "reuse"})
    timings = second.model_extra["ragblend"]["timings"]
    assert second.model_extra["session_id"] == session_id
    assert timings["history_tokens"] > first.usage.prompt_tokens  # the first turn, answer included, is reused
    new_turn = second.usage.prompt_tokens - timings["history_tokens"]
    assert second.usage.model_extra["recomputed_tokens"] <= new_turn
    third = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "And the mayor?"}],
                                           max_tokens=4, extra_body={"session_id": session_id})
    assert third.model_extra["ragblend"]["timings"]["history_tokens"] > timings["history_tokens"]


def test_a_conversation_that_differs_from_its_session_is_a_409(server):
    client = server.openai()
    first = client.chat.completions.create(model="any", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=4, extra_body={"session_id": None})
    wrong = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Someone else entirely."},
             {"role": "user", "content": "Are you sure?"}]
    with pytest.raises(openai.ConflictError, match="do not match"):
        client.chat.completions.create(model="any", messages=wrong, max_tokens=4,
                                       extra_body={"session_id": first.model_extra["session_id"]})
    with pytest.raises(openai.NotFoundError, match="no session"):
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"session_id": "never-made"})


def test_without_the_key_every_endpoint_but_healthz_is_401(server):
    assert httpx.get(server.url + "/healthz").status_code == 200
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/metrics"),
                         ("POST", "/v1/search"), ("GET", "/readyz")):
        response = httpx.request(method, server.url + path, headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]


def test_bad_requests_are_400_in_openai_format(server):
    with server.http() as http:
        before = http.post("/v1/search", json={"query": "lighthouse", "top_k": 32}).json()["data"]
        bad = [{"messages": [{"role": "user", "content": "hi"}], "mode": "turbo"},
               {"messages": [{"role": "user", "content": "hi"}], "order": "best"},
               {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6},
               {"messages": [{"role": "user", "content": "hi"}], "top_k": 0},
               {"messages": []},
               {"messages": [{"role": "assistant", "content": "hi"}]},
               {"messages": [{"role": "user", "content": 5}]}]
        for body in bad:
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, body
            assert response.json()["error"]["type"] == "invalid_request_error"
        assert http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
        assert http.post("/v1/documents", json=[{"text": ""}]).status_code == 400
        assert http.post("/v1/documents", files={"files": ("x.exe", b"MZ\x00\x00")}).status_code == 400
        assert http.post("/v1/chat/completions", content=b"x" * (2 << 20)).status_code == 413
        after = http.post("/v1/search", json={"query": "lighthouse", "top_k": 32}).json()["data"]
        assert after == before  # nothing rejected was written


def test_a_full_queue_answers_429_with_retry_after(server):
    statuses, lock = [], threading.Lock()

    def ask():
        with server.http() as http:
            response = http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64, "mode": "full"})
        with lock:
            statuses.append((response.status_code, response.headers.get("retry-after")))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {s for s, _ in statuses} <= {200, 429} and (200, None) in statuses
    assert (429, "1") in statuses


def test_documents_are_added_in_the_background_searched_and_deleted(server):
    with server.http() as http:
        job = http.post("/v1/documents", json={"documents": [
            {"id": "ferry", "text": "The ferry to Varn leaves at dawn from the north pier."}]}).json()
        upload = http.post("/v1/documents", files=[
            ("files", ("notes.txt", b"The north pier was rebuilt in 1990 after a storm.")),
            ("files", ("more.jsonl", b'{"id": "storm", "text": "The storm of 1989 closed the port for a month."}\n'))]).json()
        for submitted in (job, upload):
            for _ in range(200):
                status = http.get(f"/v1/jobs/{submitted['job_id']}").json()
                if status["status"] in ("done", "failed"):
                    break
                time.sleep(0.1)
            assert status["status"] == "done" and status["done"] == submitted["documents"]
        found = {h["doc_id"] for h in http.post("/v1/search", json={"query": "ferry pier storm", "top_k": 8}).json()["data"]}
        assert {"ferry", "notes.txt", "storm"} <= found
        assert http.delete("/v1/documents/ferry").status_code == 200
        assert http.delete("/v1/documents/ferry").status_code == 404
        hidden = http.post("/v1/search", json={"query": "ferry", "top_k": 8},
                           headers={"X-Ragblend-Namespace": "tenant-b"}).json()["data"]
        assert hidden == []  # another namespace sees none of it


def test_models_completions_metrics_and_readiness(server):
    client = server.openai()
    assert [m.id for m in client.models.list()] != []
    completion = client.completions.create(model="any", prompt=QUESTION, max_tokens=4)
    assert completion.choices[0].text is not None and completion.usage.completion_tokens > 0
    with server.http() as http:
        assert http.get("/readyz").json()["status"] == "ready"
        page = http.get("/metrics").text
    for name in ("ragblend_requests_total", "ragblend_ttft_seconds_bucket", "ragblend_tokens_total",
                 "ragblend_kv_chunks_total", "ragblend_queue_depth", "ragblend_tier_bytes",
                 "ragblend_exact_path_tokens_total", "ragblend_exact_path_bytes"):
        assert name in page


def test_sigterm_finishes_what_was_acknowledged(expected, model_dir, embedder, tmp_path):
    server = Server(expected[0], model_dir)
    with server.http() as http:
        job = http.post("/v1/documents", json=[{"id": f"late-{i}", "text": f"Late note number {i} about tides."}
                                               for i in range(20)]).json()
        turn = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}],
                                                       "max_tokens": 4, "session_id": None}).json()
    assert server.stop() == 0
    with RagBlend(expected[0], model=model_dir, embedder=embedder) as rb:
        assert {f"late-{i}" for i in range(20)} <= {h.doc_id for h in rb.search("tides", top_k=40)}
        assert job["documents"] == 20
        assert rb.chat(turn["session_id"]).turns == 1
        saved = {s.id: s.bytes for s in rb.sessions()}
        assert saved[turn["session_id"]] > 0  # the turn's KV was saved, not just its record


def test_a_key_bound_to_a_namespace_reads_and_writes_only_that_namespace(server):
    tenant = {"Authorization": f"Bearer {TENANT_KEY}"}
    with httpx.Client(base_url=server.url, headers=tenant, timeout=60) as http:
        assert http.post("/v1/search", json={"query": QUESTION}).json()["data"] == []  # the default namespace's docs
        job = http.post("/v1/documents", json=[{"id": "own", "text": "Tenant A's harbour opens at nine."}]).json()
        while http.get(f"/v1/jobs/{job['job_id']}").json()["status"] in ("queued", "running"):
            time.sleep(0.1)
        assert [h["doc_id"] for h in http.post("/v1/search", json={"query": "harbour"}).json()["data"]] == ["own"]
        other = http.post("/v1/search", json={"query": "x"}, headers={"X-Ragblend-Namespace": "tenant-b"})
        assert other.status_code == 403
    with server.http() as http:
        assert "own" not in {h["doc_id"] for h in http.post("/v1/search", json={"query": "harbour"}).json()["data"]}


def test_a_client_that_goes_away_frees_its_slot(server):
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1000, "stream": True,
            "mode": "full"}) as response:
        next(response.iter_lines())  # the stream has started; now hang up
    deadline = time.monotonic() + 5  # 1000 tokens would take far longer
    with server.http() as http:
        while "ragblend_queue_depth 0.0" not in http.get("/metrics").text:
            assert time.monotonic() < deadline, "the abandoned request still holds the model"
            time.sleep(0.2)


def test_serving_beyond_loopback_without_a_key_warns(tmp_path):
    from ragblend.serve.server import api_keys, open_warning

    assert "without an API key" in open_warning("0.0.0.0", {})
    assert open_warning("127.0.0.1", {}) is None and open_warning("localhost", {}) is None
    assert open_warning("0.0.0.0", {"k": None}) is None
    keys = tmp_path / "keys.json"
    keys.write_text('{"k1": "tenant-a"}')
    assert api_keys("admin", str(keys)) == {"admin": None, "k1": "tenant-a"}
    keys.write_text('["not", "an", "object"]')
    with pytest.raises(ValueError, match="key -> namespace"):
        api_keys(None, str(keys))
