"""Chaos, bounded for CI: a real `ragblend serve` under clients that trickle, never read, crowd in, and a
server killed with SIGKILL mid-save and mid-ingest. Every client here is on loopback, every wait has a
deadline, and every server is killed at the end. `benchmarks/chaos.py` runs the long soak variants.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ragblend import RagBlend
from ragblend.serve.launch import ServerProcess

KEY = "chaos-key"
DOCS = [{"id": "lighthouse", "text": "The lighthouse of Varn was built in 1821 by the engineer Oda Pell."},
        {"id": "bridges", "text": "Oda Pell later designed three bridges over the river Am in Kessel."}]
QUESTION = "Who built the lighthouse of Varn?"


def ask(question: str = QUESTION, **fields) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": 4, **fields}


@pytest.fixture(scope="module")
def store(tmp_path_factory, smollm_dir, embedder):
    folder = tmp_path_factory.mktemp("chaos") / "store"
    with RagBlend(folder, model=smollm_dir, embedder=embedder) as rb:
        rb.add_documents(DOCS)
    return folder


@pytest.fixture(scope="module")
def server(store, smollm_dir):
    server = ServerProcess(store, "--model", str(smollm_dir), "--max-queue", "8", api_key=KEY)
    yield server
    server.kill()


def raw_request(server: ServerProcess, path: str, body: bytes, receive_buffer: int | None = None) -> socket.socket:
    """An open connection that has sent a whole request and will read nothing of the answer."""
    sock = socket.socket()
    if receive_buffer:  # small, so the server's writes back up after a few events
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def answered_in(server: ServerProcess, timeout_s: float = 60) -> float:
    """Seconds a plain request takes to be answered (it must be a 200)."""
    start = time.monotonic()
    with server.client() as http:
        reply = http.post("/v1/chat/completions", json=ask(), timeout=timeout_s)
    assert reply.status_code == 200, reply.text
    return time.monotonic() - start


def test_slow_loris_clients_do_not_starve_the_others(server):
    """16 connections trickle their headers or bodies a byte at a time; the server answers others as usual."""
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    data = head + body
    slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(16)]
    sent = [20 if i % 2 else len(head) + 5 for i in range(len(slow))]  # half in their headers, half in bodies
    try:
        for sock, upto in zip(slow, sent):
            sock.sendall(data[:upto])
        baseline = answered_in(server)
        waited = 0.0
        for _ in range(3):  # a byte more from each, then a request from someone else
            for i, sock in enumerate(slow):
                sock.sendall(data[sent[i]:sent[i] + 1])
                sent[i] += 1
            waited = max(waited, answered_in(server))
        assert waited < max(10.0, 5 * baseline)
    finally:
        for sock in slow:
            sock.close()
    server.wait_idle(30)


def test_clients_that_never_read_a_stream_hold_no_worker(server):
    """Streams whose clients read nothing (back-pressure on the socket) finish generating into their
    buffer; the workers go on to other requests, and closing the connections frees everything."""
    body = (b'{"messages": [{"role": "user", "content": "Tell me about Varn."}], "stream": true, '
            b'"max_tokens": 96, "temperature": 2.0, "seed": 3}')
    stuck = [raw_request(server, "/v1/chat/completions", body, receive_buffer=2048) for _ in range(2)]
    try:
        assert answered_in(server) < 60  # answered while the two streams are stuck
        server.wait_idle(90)  # their answers are generated although nothing was read
    finally:
        for sock in stuck:
            sock.close()
    assert answered_in(server) < 60


def test_many_clients_against_a_small_queue_get_200_or_429_with_retry_after(server):
    """64 clients at once against --max-queue 8: each is answered or refused with Retry-After; no 5xx."""
    def one(_):
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            reply = http.post("/v1/chat/completions", json=ask())
        return reply.status_code, reply.headers.get("retry-after")

    with ThreadPoolExecutor(64) as pool:
        outcomes = list(pool.map(one, range(64)))
    statuses = {status for status, _ in outcomes}
    assert statuses <= {200, 429} and 200 in statuses and 429 in statuses, outcomes
    assert all(retry == "1" for status, retry in outcomes if status == 429)
    server.wait_idle(30)


def check_store(store) -> str:
    """`ragblend stats --check` on a store no process has open: its verdict line."""
    done = subprocess.run([sys.executable, "-m", "ragblend.cli", "stats", "--store", str(store), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_kill_9_mid_save_and_mid_ingest_then_restart(store, smollm_dir, tmp_path):
    """SIGKILL while a session turn's KV is being saved and a 40-document upload is being ingested:
    after a restart the store checks clean, the session goes on with its turns, and the upload, sent
    again, completes."""
    crashed = tmp_path / "store"
    shutil.copytree(store, crashed)
    notes = [{"id": f"note-{i}", "text": f"Harbour note {i}: the tide at Varn turned at {i} past noon."}
             for i in range(40)]
    server = ServerProcess(crashed, "--model", str(smollm_dir), api_key=KEY)
    try:
        with server.client() as http:
            first = http.post("/v1/chat/completions", json=ask(session_id=None)).json()
            session = first["session_id"]
            job = http.post("/v1/documents", json=notes).json()
            second = http.post("/v1/chat/completions", json=ask("And the bridges?", session_id=session))
            assert second.status_code == 200 and job["documents"] == 40
    finally:
        server.kill()  # the second turn's KV save and the ingest were under way
    assert check_store(crashed) == "consistency check: ok"
    server = ServerProcess(crashed, "--model", str(smollm_dir), api_key=KEY)
    try:
        with server.client() as http:
            third = http.post("/v1/chat/completions", json=ask("Who designed them?", session_id=session))
            assert third.status_code == 200, third.text
            kept = third.json()["ragblend"]["timings"]["history_tokens"]
            assert kept > second.json()["ragblend"]["timings"]["history_tokens"]  # the second turn survived
            job = http.post("/v1/documents", json=notes).json()
            deadline = time.monotonic() + 240
            while (status := http.get(f"/v1/jobs/{job['job_id']}").json())["status"] in ("queued", "running"):
                assert time.monotonic() < deadline
                time.sleep(0.5)
            assert status["status"] == "done" and status["done"] == 40
            hits = http.post("/v1/search", json={"query": "tide at Varn harbour note", "top_k": 32}).json()["data"]
            assert {h["doc_id"] for h in hits} >= {f"note-{i}" for i in range(8)}
    finally:
        server.kill()
