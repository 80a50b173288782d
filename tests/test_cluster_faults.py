"""Specification of the Redis Cluster backend under node faults, with real `redis-server` nodes killed and
restarted as in production: a query answers while a node dies (recomputing the KV it cannot load), a
restarted node serves its records again, the server answers 503 only while the global slot is down, a
primary's replica takes over with nothing lost, and a writer killed mid-commit leaves no half-applied
transaction. Placement: a chunk's records share one slot."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

pytest.importorskip("redis", reason="the redis extra is not installed")

from conftest import chunk_records, make_tiny_model_dir  # noqa: E402
from kvchunks.backends import open_env, release_env  # noqa: E402
from kvchunks.backends.redis_cluster import JOURNAL  # noqa: E402
from kvchunks.backends.redis_process import RedisClusterProcess, redis_server_binary  # noqa: E402
from ragblend.api import RagBlend  # noqa: E402
from test_store import DOCS  # noqa: E402

if redis_server_binary() is None:
    pytest.skip("redis-server is not installed (apt-get install -y redis-server; .ci/run installs it)",
                allow_module_level=True)

QUESTION = "Which river carries more water than any other?"
TOP_K = 5  # chunks on more than one node


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm_dir):
    return make_tiny_model_dir(tmp_path_factory.mktemp("models"), "llama", smollm_dir)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RedisClusterProcess(tmp_path_factory.mktemp("cluster"), masters=3) as process:
        yield process


@pytest.fixture
def rb(cluster, model_dir, embedder, tmp_path):
    cluster.flush()
    with RagBlend(tmp_path / "replica", model=model_dir, embedder=embedder, kv_backend=cluster.url,
                  chunk_tokens=32) as rb:
        rb.add_documents(DOCS)
        yield rb


def kv_keys(rb: RagBlend, chunk_id: str) -> list[bytes]:
    """The cluster keys of a chunk's KV metadata and every layer record."""
    env, fingerprint = rb.store.env, rb.store.kv.fingerprint
    meta_key = f"{fingerprint}/{chunk_id}".encode()
    with env.begin() as txn:
        layers = rb.store.kv.meta(txn, chunk_id).layers
    return [env.data_key(b"kvmeta", meta_key)] + [env.data_key(b"kv", meta_key + b"/%04d" % i) for i in range(layers)]


class Asker(threading.Thread):
    """Asks QUESTION again and again on its own thread until `stop` is set, keeping every answer and every
    error."""

    def __init__(self, rb: RagBlend):
        super().__init__()
        self.rb, self.stop = rb, threading.Event()
        self.answers, self.errors = [], []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.answers.append(self.rb.query(QUESTION, top_k=TOP_K, max_new_tokens=6))
            except Exception as exc:  # noqa: BLE001 - collected for the test's assertions
                self.errors.append(exc)


def wait_for(ready, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def node_of(rb: RagBlend, cluster: RedisClusterProcess, key: bytes):
    return cluster.node(rb.store.env.client.get_node_from_key(key).port)


def test_a_chunks_records_share_one_slot_and_chunks_spread_over_the_nodes(rb, cluster):
    env = rb.store.env
    with env.begin() as txn:
        chunk_ids = rb.store.kv.chunk_ids(txn)
        doc = rb.store.docs.get_doc(txn, "river")
    slots = [{env.client.keyslot(k) for k in kv_keys(rb, c)} for c in chunk_ids]
    assert all(len(s) == 1 for s in slots)  # one MGET reads a chunk's layers; one script commits them
    assert len({node_of(rb, cluster, kv_keys(rb, c)[0]).port for c in chunk_ids}) == 3
    # the corpus tables and the write lock share the global slot: a generation bump commits with its chunks
    assert env.client.keyslot(env.data_key(b"docs", doc.doc_id.encode())) == env.client.keyslot(env.lock_key)


def test_a_query_answers_while_a_node_is_killed_and_hits_again_once_it_is_restarted(rb, cluster):
    expected = rb.query(QUESTION, top_k=TOP_K, max_new_tokens=6)
    before = chunk_records(rb)
    global_port = rb.store.env.client.get_node_from_key(rb.store.env.lock_key).port
    victim = next(node_of(rb, cluster, kv_keys(rb, c.chunk_id)[0]) for c in expected.chunks
                  if node_of(rb, cluster, kv_keys(rb, c.chunk_id)[0]).port != global_port)
    asker = Asker(rb)
    asker.start()
    wait_for(lambda: len(asker.answers) >= 1)
    victim.kill()  # SIGKILL mid-query: no replica holds its slots
    killed_at = len(asker.answers)
    wait_for(lambda: len(asker.answers) >= killed_at + 3 or asker.errors)
    asker.stop.set()
    asker.join(timeout=300)
    assert asker.errors == [] and {a.text for a in asker.answers} == {expected.text}
    assert asker.answers[-1].timings["kv_misses"] > 0  # the dead node's KV was recomputed, not waited for
    victim.start()
    cluster.wait_until_serving()
    deadline = time.monotonic() + 30
    while (back := rb.query(QUESTION, top_k=TOP_K, max_new_tokens=6)).timings["kv_hits"] < TOP_K:
        assert time.monotonic() < deadline, "the restarted node's KV never hit again"
        time.sleep(0.2)
    assert back.text == expected.text
    assert chunk_records(rb) == before and rb.store.check() == []  # appendonly: the node kept every record


def test_slots_resharded_while_a_replica_serves_lose_nothing_and_cost_no_recompute(rb, cluster):
    """The global slot and every slot the query reads move to another primary, key by key, while queries
    run: the client follows ASK and MOVED, so every answer loads its KV (none recomputed), and afterwards
    every record is where the new owner serves it and writes go on."""
    expected = rb.query(QUESTION, top_k=TOP_K, max_new_tokens=6)
    before = chunk_records(rb)
    client = rb.store.env.client
    slots = sorted({client.keyslot(rb.store.env.lock_key)}
                   | {client.keyslot(kv_keys(rb, c.chunk_id)[0]) for c in expected.chunks})
    asker = Asker(rb)
    asker.start()
    try:
        for slot in slots:
            source = cluster.owner(slot)
            target = next(n for n in cluster.primaries() if n.port != source.port)
            cluster.move_slot(slot, target, keys_per_step=1, pause_s=0.02)
            assert cluster.owner(slot).port == target.port
    finally:
        asker.stop.set()
        asker.join(timeout=300)
    answers = asker.answers
    assert asker.errors == [] and len(answers) >= 2
    assert {a.text for a in answers} == {expected.text}
    assert [a.timings["kv_misses"] for a in answers] == [0] * len(answers)  # loaded, never recomputed
    assert chunk_records(rb) == before and rb.store.check() == []
    rb.add_documents([{"id": "after-reshard", "text": "The Amazon basin spans nine countries."}])
    assert "after-reshard" in {h.doc_id for h in rb.search("Which countries does the Amazon basin span?", 3)}


def test_the_server_answers_503_with_retry_after_only_while_the_global_slot_is_down(rb, cluster, model_dir, tmp_path):
    """A node holding only KV costs recomputes, not errors; the global slot's node holds the corpus tables
    retrieval reads, so while it is down `ragblend serve` says when to retry."""
    from ragblend.serve.launch import ServerProcess

    env = rb.store.env
    global_node = node_of(rb, cluster, env.lock_key)
    kv_node = next(n for n in cluster.nodes if n.port != global_node.port)
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}
    with ServerProcess(tmp_path / "serve", "--model", str(model_dir), "--kv-backend", cluster.url) as server, \
            server.client() as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        kv_node.kill()
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        kv_node.start()
        global_node.kill()
        down = http.post("/v1/chat/completions", json=body)
        assert down.status_code == 503 and down.headers["Retry-After"] == "1"
        global_node.start()
        cluster.wait_until_serving()
        deadline = time.monotonic() + 30
        while (back := http.post("/v1/chat/completions", json=body)).status_code != 200:
            assert back.status_code == 503 and time.monotonic() < deadline
            time.sleep(0.5)


def test_a_killed_primary_fails_over_to_its_replica_with_every_record(model_dir, embedder, tmp_path):
    """Six nodes, one replica per primary; the primary holding the global slot (lock, journal,
    generation, corpus tables) is the one killed."""
    with RedisClusterProcess(tmp_path / "six", masters=3, replicas=1) as six, \
            RagBlend(tmp_path / "replica", model=model_dir, embedder=embedder, kv_backend=six.url,
                     chunk_tokens=32) as rb:
        rb.add_documents(DOCS[:2])
        expected = rb.query(QUESTION, top_k=2, max_new_tokens=6)
        before = chunk_records(rb)
        six.wait_replicated()
        primary = six.node(rb.store.env.client.get_node_from_key(rb.store.env.lock_key).port)
        primary.kill()
        six.wait_until_serving(timeout_s=30)  # its replica was promoted
        after = rb.query(QUESTION, top_k=2, max_new_tokens=6)
        assert after.text == expected.text and after.timings["kv_hits"] == 2
        assert chunk_records(rb) == before
        rb.add_documents(DOCS[2:])  # writes go on: the lock and the generation live on the new primary
        assert {h.doc_id for h in rb.search("castling rules of chess", 3)} >= {"chess"}
        assert rb.store.check() == []
        primary.start()  # comes back as a replica of its successor
        six.wait_until_serving(timeout_s=30)


WRITER = """
    from pathlib import Path
    from kvchunks.backends import open_env
    env = open_env(Path("."), False, {url!r})
    kv, meta = env.open_db(b"kv"), env.open_db(b"meta")
    n = 0
    while True:
        n += 1
        with env.begin(write=True) as txn:  # 200 records over many buckets, and a generation
            for k in range(200):
                txn.put(b"rec/%03d" % k, b"%d:" % n + bytes(2000), db=kv)
            txn.put(b"generation", b"%d" % n, db=meta)
        print(n, flush=True)
"""


def killed_writer_leaves(cluster: RedisClusterProcess, folder, delay_s: float) -> str | None:
    """Kill the writer `delay_s` into a commit, let the next writer take the lock, check that every record
    holds the generation's transaction; the state the dead writer left its journal in."""
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER.format(url=cluster.url))],
                              stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # a few whole commits first
            assert writer.stdout.readline(), "the writer died"
        time.sleep(delay_s)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    env = open_env(folder, False, cluster.url)
    try:
        left = env.client.get(JOURNAL)
        env.client.delete(env.lock_key)  # what the lock's TTL does 30 s after its writer died
        with env.begin(write=True):  # the next writer finishes or undoes what the dead one left
            pass
        assert env.client.get(JOURNAL) is None
        with env.begin() as txn:
            generation = txn.get(b"generation", db=env.open_db(b"meta"))
            values = txn.get_many(env.open_db(b"kv"), [b"rec/%03d" % k for k in range(200)])
        assert {v.split(b":")[0] for v in values} == {generation}
        return None if left is None else json.loads(left)["state"]
    finally:
        release_env(folder, cluster.url)


def test_a_writer_killed_mid_commit_leaves_its_transaction_whole_or_absent(cluster, tmp_path):
    """Killed at delays across a commit (the phases' timing varies with the machine's load): committed
    transactions are rolled forward, staged ones back, and the store never holds half of one."""
    left = set()
    for delay_s in (0.0, 0.01, 0.02, 0.03, 0.04, 0.05):
        cluster.flush()
        left.add(killed_writer_leaves(cluster, tmp_path, delay_s))
    assert left - {None}, "no kill landed inside a commit"
