"""`ragblend serve` against careless and hostile clients (issue 25): each test is one way a client broke
the server before, tried on a real server process.

Long answers come from the real model sampled at temperature 2 (it almost never picks end-of-text),
about 0.1 s a token on a shared 2-core machine: a 1000-token answer left to run would hold its worker
for minutes, so a freed worker within seconds means the request was cancelled.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from ragblend import RagBlend
from ragblend.serve.launch import ServerProcess

KEY = "admin-key"
TENANT_KEY = "tenant-key"  # bound to namespace tenant-a
DOCS = [{"id": "lighthouse", "text": "The lighthouse of Varn was built in 1821 by the engineer Oda Pell."},
        {"id": "bridges", "text": "Oda Pell later designed three bridges over the river Am in Kessel."}]
QUESTION = "Who built the lighthouse of Varn?"
LONG = {"max_tokens": 1000, "temperature": 2.0, "seed": 7, "mode": "reuse"}  # minutes if left to run
CANCEL_WITHIN_S = 15  # a cancelled request stops at its next token; generous for a loaded machine


def ask(question: str = QUESTION, **fields) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": 4, **fields}


@pytest.fixture(scope="module")
def store(tmp_path_factory, smollm_dir, embedder):
    folder = tmp_path_factory.mktemp("faults") / "store"
    with RagBlend(folder, model=smollm_dir, embedder=embedder) as rb:
        rb.add_documents(DOCS)
    return folder


@pytest.fixture(scope="module")
def server(store, smollm_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({TENANT_KEY: "tenant-a"}))
    server = ServerProcess(store, "--model", str(smollm_dir), "--max-queue", "8", "--api-keys", str(keys),
                           api_key=KEY)
    yield server
    server.kill()


def start_session(http: httpx.Client) -> str:
    reply = http.post("/v1/chat/completions", json=ask(session_id=None))
    assert reply.status_code == 200, reply.text
    return reply.json()["session_id"]


def test_an_abandoned_streamed_session_turn_frees_its_session(server):
    """Closing the connection after the first chunk used to leave the session locked for good: the next
    request on it never returned, and each one after it held another worker."""
    with server.client() as http:
        session = start_session(http)
        with http.stream("POST", "/v1/chat/completions", json=ask(stream=True, session_id=session, **LONG)) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the stream has started; now hang up
        server.wait_idle(CANCEL_WITHIN_S)
        follow_up = http.post("/v1/chat/completions", json=ask("And the bridges?", session_id=session), timeout=60)
    assert follow_up.status_code == 200, follow_up.text
    assert follow_up.json()["session_id"] == session


def test_a_turn_on_a_busy_session_is_refused_with_retry_after(server):
    """A second turn sent while one runs waits a bounded time, then gets a 409 it may retry, rather
    than holding a worker for as long as the first answer takes."""
    with server.client() as http:
        session = start_session(http)
        started, done = threading.Event(), threading.Event()

        def long_turn():
            with server.client() as other, other.stream(
                    "POST", "/v1/chat/completions", json=ask(stream=True, session_id=session, **LONG)) as r:
                for _ in r.iter_lines():
                    started.set()
                    if done.is_set():
                        return

        runner = threading.Thread(target=long_turn)
        runner.start()
        try:
            assert started.wait(60)
            began = time.monotonic()
            busy = http.post("/v1/chat/completions", json=ask("Anything else?", session_id=session), timeout=60)
            waited = time.monotonic() - began
        finally:
            done.set()
            runner.join(60)
    assert busy.status_code == 409 and busy.headers["retry-after"] == "1", busy.text
    assert "answering another turn" in busy.json()["error"]["message"]
    assert waited < 30
    server.wait_idle(CANCEL_WITHIN_S)


def chunked(data: bytes, piece: int = 64 << 10):
    """A body without Content-Length (httpx sends a generator with chunked transfer encoding)."""
    for start in range(0, len(data), piece):
        yield data[start:start + piece]


def test_body_caps_hold_for_chunked_bodies(server):
    """Caps used to be checked only against Content-Length: a chunked 2 MiB chat body was parsed and
    tokenised, a chunked 40 MiB upload accepted."""
    chat = json.dumps(ask("lighthouse " * (200 << 10))).encode()  # ~2.2 MB
    with server.client() as http:
        response = http.post("/v1/chat/completions", content=chunked(chat),
                             headers={"content-type": "application/json"})
        assert response.status_code == 413, response.text
        assert "over 1,048,576 bytes" in response.json()["error"]["message"]
        upload = (b"--cut\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.txt\"\r\n"
                  b"Content-Type: text/plain\r\n\r\n" + b"harbour tide " * ((33 << 20) // 13 + 1) + b"\r\n--cut--\r\n")
        response = http.post("/v1/documents", content=chunked(upload),
                             headers={"content-type": "multipart/form-data; boundary=cut"})
        assert response.status_code == 413, response.text
        assert http.post("/v1/search", json={"query": "harbour tide"}).json()["data"][0]["doc_id"] != "big.txt"


def test_a_non_streamed_request_is_cancelled_when_its_client_leaves(server):
    """Its client gave up after 2 s, but the answer ran to its last token (~20 s for 300 tokens) and
    was counted as a 200."""
    cancelled = 'ragblend_requests_total{endpoint="/v1/chat/completions",status="499"}'
    before = server.metric(cancelled)
    with server.client() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=ask(**LONG), timeout=2)
    server.wait_idle(CANCEL_WITHIN_S)
    deadline = time.monotonic() + 5
    while server.metric(cancelled) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric(cancelled) == before + 1


def raw_json(http: httpx.Client, path: str, body) -> httpx.Response:
    """`body` as JSON with non-ASCII escaped, as a client may send a lone surrogate ("\\ud800")."""
    return http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", ask("Who built it\ud800?")),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief \udfff"},
                                           {"role": "user", "content": QUESTION}], "max_tokens": 4}),
    ("/v1/chat/completions", ask(contexts=["The lighthouse \ud800 of Varn."])),
    ("/v1/chat/completions", ask(stop=["\ud800"])),
    ("/v1/completions", {"prompt": "Varn \ud800", "max_tokens": 4}),
    ("/v1/search", {"query": "lighthouse \ud800"}),
    ("/v1/documents", [{"text": "A harbour \ud800 note."}]),
    ("/v1/documents", [{"text": "A harbour note.", "metadata": {"tag": ["\ud800"]}}]),
])
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(server, path, body):
    """Lone surrogates in chat, system messages or contexts used to reach the tokenizer: a 500."""
    with server.client() as http:
        response = raw_json(http, path, body)
    assert response.status_code == 400, response.text
    assert "not valid Unicode" in response.json()["error"]["message"]


def test_two_uploaded_files_with_one_name_are_refused(server):
    """Two parts named alike used to keep only the last, silently (202 with `documents: 1`)."""
    with server.client() as http:
        response = http.post("/v1/documents", files=[("files", ("notes.txt", b"The ferry leaves at dawn.")),
                                                     ("files", ("notes.txt", b"The ferry returns at dusk."))])
        assert response.status_code == 400
        assert "both named 'notes.txt'" in response.json()["error"]["message"]
        assert http.post("/v1/search", json={"query": "ferry dawn dusk"}).json()["data"][0]["doc_id"] != "notes.txt"


def test_the_key_needs_the_bearer_scheme_and_guards_the_schema(server):
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": KEY}).status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert httpx.get(server.url + "/openapi.json").status_code == 401
    schema = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    assert httpx.get(server.url + "/docs").status_code == 404  # a browser page could not send the key


def test_refusals_name_no_server_path_and_an_empty_stop_is_refused(server):
    with server.client() as http:
        unsupported = http.post("/v1/documents", files={"files": ("notes.exe", b"MZ\x00\x00")})
        assert unsupported.status_code == 400 and "/tmp" not in unsupported.text
        assert "'notes.exe'" in unsupported.json()["error"]["message"]
        empty_stop = http.post("/v1/chat/completions", json=ask(stop=""))
        assert empty_stop.status_code == 400 and "stop sequence must not be empty" in empty_stop.text
