"""Specification of the shared backend: replicas pointed at one real `redis-server`, or at a real 3-primary
Redis Cluster, share one corpus and its KV, follow each other's commits, survive the server restarting,
and refuse what would lose data (tiny model, real MiniLM, a real redis-server per test and one cluster per
module, emptied between tests; never a fake). Node faults of a cluster: test_cluster_faults.py."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

pytest.importorskip("redis", reason="the redis extra is not installed")

from conftest import chunk_records, make_tiny_model_dir  # noqa: E402
from kvchunks.backends import BackendUnavailableError, StoreClosedError  # noqa: E402
from kvchunks.backends.redis_process import RedisClusterProcess, RedisProcess, redis_server_binary  # noqa: E402
from kvchunks.budget import LOW_WATER  # noqa: E402
from ragblend.api import RagBlend  # noqa: E402
from ragblend.cli import main  # noqa: E402
from ragblend.storage.maintenance import collect_garbage  # noqa: E402
from ragblend.storage.store import StoreMismatchError  # noqa: E402
from test_store import DOCS  # noqa: E402

if redis_server_binary() is None:
    pytest.skip("redis-server is not installed (apt-get install -y redis-server; .ci/run installs it)",
                allow_module_level=True)

QUESTION = "Which river carries more water than any other?"
PASSAGES = [DOCS[0]["text"], DOCS[1]["text"]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm_dir):
    return make_tiny_model_dir(tmp_path_factory.mktemp("models"), "llama", smollm_dir)


@pytest.fixture
def server(tmp_path):
    with RedisProcess(tmp_path / "redis") as process:
        yield process


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RedisClusterProcess(tmp_path_factory.mktemp("cluster"), masters=3) as process:
        yield process


@pytest.fixture(params=["server", "cluster"])
def backend(request, tmp_path):
    """An empty shared backend: a redis-server of the test's own, or the module's cluster emptied."""
    if request.param == "server":
        with RedisProcess(tmp_path / "redis") as process:
            yield process
    else:
        cluster = request.getfixturevalue("cluster")
        cluster.flush()
        yield cluster


def replica(folder, model_dir, embedder, backend, **kwargs) -> RagBlend:
    return RagBlend(folder, model=model_dir, embedder=embedder, kv_backend=backend.url, chunk_tokens=32, **kwargs)


def ingest_in_another_process(model_dir, folder, url: str, docs: list[dict]) -> None:
    script = f"""
        from ragblend.api import RagBlend
        with RagBlend({str(folder)!r}, model={str(model_dir)!r}, kv_backend={url!r}, chunk_tokens=32) as rb:
            rb.add_documents({docs!r})
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, timeout=300)


def test_a_replica_with_an_empty_folder_answers_from_another_processs_ingest_with_no_recompute(
        model_dir, embedder, backend, tmp_path):
    ingest_in_another_process(model_dir, tmp_path / "writer", backend.url, DOCS)
    with replica(tmp_path / "reader", model_dir, embedder, backend) as rb:
        answer = rb.query(QUESTION, top_k=3, max_new_tokens=6)
        assert answer.timings["kv_hits"] == 3 and answer.timings["kv_misses"] == 0
        assert answer.chunks[0].doc_id == "river"
        with RagBlend(tmp_path / "lmdb", model=model_dir, embedder=embedder, chunk_tokens=32) as local:
            local.add_documents(DOCS)
            assert chunk_records(rb) == chunk_records(local)  # one record format on both engines
            assert rb.query(QUESTION, top_k=3, max_new_tokens=6).text == local.query(QUESTION, top_k=3,
                                                                                      max_new_tokens=6).text
        assert rb.store.check() == []
        report = "\n".join(rb.store.stats().lines())
        assert "in Redis" in report and "on disk" not in report  # the size is the backend's memory, not a file's
    assert not any((tmp_path / "reader").iterdir())  # nothing of the corpus is kept locally


def test_a_replica_searches_what_another_process_ingests_after_it_opened(model_dir, embedder, backend, tmp_path):
    with replica(tmp_path / "a", model_dir, embedder, backend) as rb:
        rb.add_documents(DOCS[:2])
        assert {h.doc_id for h in rb.search("castling rules of chess", 3)} == {"river", "volcano"}
        ingest_in_another_process(model_dir, tmp_path / "b", backend.url, DOCS[2:])
        deadline = time.monotonic() + 5
        while "chess" not in {h.doc_id for h in rb.search("castling rules of chess", 3)}:
            assert time.monotonic() < deadline, "the other process's ingest never became searchable"
            time.sleep(0.1)


def test_a_query_completes_while_the_backend_is_down_and_hits_again_once_it_is_back(
        model_dir, embedder, server, tmp_path):
    with replica(tmp_path / "a", model_dir, embedder, server) as rb:
        expected = rb.query(QUESTION, contexts=PASSAGES, max_new_tokens=6)  # stores the passages' KV
        server.stop()
        down = rb.query(QUESTION, contexts=PASSAGES, max_new_tokens=6)
        assert down.text == expected.text and down.token_ids == expected.token_ids
        assert down.timings["kv_misses"] == len(expected.chunks)  # recomputed what it could not load
        server.start()
        back = rb.query(QUESTION, contexts=PASSAGES, max_new_tokens=6)
        assert back.timings["kv_hits"] == len(expected.chunks) and back.text == expected.text
        server.stop()
        with pytest.warns(RuntimeWarning, match="not recorded"):
            rb.close()  # closing while the backend is down loses only LRU hints, and says so
        server.start()


def test_restarting_the_backend_while_queries_run_loses_no_answer_and_no_record(
        model_dir, embedder, server, tmp_path):
    with replica(tmp_path / "a", model_dir, embedder, server) as rb:
        rb.add_documents(DOCS)
        before = chunk_records(rb)
        expected = rb.query(QUESTION, max_new_tokens=6).text
        answers, errors = [], []

        def ask():
            for _ in range(12):
                try:
                    answers.append(rb.query(QUESTION, max_new_tokens=6).text)
                except Exception as exc:  # noqa: BLE001 - collected for the assertion below
                    errors.append(exc)

        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(0.2)
        server.restart()
        asker.join()
        assert errors == [] and answers == [expected] * 12
        assert chunk_records(rb) == before and rb.store.check() == []


def test_a_backend_that_is_down_at_start_is_a_clear_error_naming_its_url(model_dir, embedder, server, tmp_path, capsys):
    server.stop()
    with pytest.raises(BackendUnavailableError, match=server.url.replace("/0", "")):
        replica(tmp_path / "a", model_dir, embedder, server)
    with pytest.raises(SystemExit) as exit_info:
        main(["stats", "--store", str(tmp_path / "a"), "--kv-backend", server.url])
    assert exit_info.value.code == 2 and server.url in capsys.readouterr().err


def test_a_closed_replica_says_so_and_leaves_the_backend_to_the_others(model_dir, embedder, backend, tmp_path):
    closed = replica(tmp_path / "a", model_dir, embedder, backend)
    closed.add_documents(DOCS)
    closed.close()
    with pytest.raises(StoreClosedError, match="closed"):
        closed.query(QUESTION, max_new_tokens=4)
    with replica(tmp_path / "b", model_dir, embedder, backend) as other:
        assert other.query(QUESTION, max_new_tokens=4).timings["kv_misses"] == 0


def test_a_replica_with_another_model_is_refused(model_dir, smollm_dir, embedder, backend, tmp_path):
    with replica(tmp_path / "a", model_dir, embedder, backend) as rb:
        rb.add_documents(DOCS[:1])
    other = make_tiny_model_dir(tmp_path, "llama", smollm_dir, seed=3)
    with pytest.raises(StoreMismatchError, match="model"):
        replica(tmp_path / "b", other, embedder, backend)


def test_a_server_that_may_evict_documents_is_refused(model_dir, embedder, tmp_path):
    with RedisProcess(tmp_path / "lru", maxmemory_policy="allkeys-lru") as lru:
        with pytest.raises(ValueError, match="noeviction"):
            replica(tmp_path / "a", model_dir, embedder, lru)


def test_sessions_continue_on_another_replica(model_dir, embedder, backend, tmp_path):
    with replica(tmp_path / "a", model_dir, embedder, backend) as first:
        first.add_documents(DOCS)
        chat = first.chat()
        chat.send("Tell me about Etna.", max_new_tokens=6)
        chat.wait()
        session_id = chat.session_id
    with replica(tmp_path / "b", model_dir, embedder, backend) as second:
        resumed = second.chat(session_id)
        answer = resumed.send("And the river?", max_new_tokens=6)
        assert answer.timings["history_tokens"] > 0 and answer.timings["history_source"] != "recomputed"
        resumed.wait()
        assert [s.turns for s in second.sessions()] == [2]


def test_two_serve_replicas_answer_one_session_alternately(smollm_dir, embedder, backend, tmp_path):
    """Real SmolLM2 behind two `ragblend serve` processes with empty folders, as behind a load balancer."""
    from ragblend.serve.launch import ServerProcess

    with RagBlend(tmp_path / "ingest", model=smollm_dir, embedder=embedder, kv_backend=backend.url) as rb:
        rb.add_documents(DOCS)
    replicas = [ServerProcess(tmp_path / name, "--model", str(smollm_dir), "--kv-backend", backend.url)
                for name in ("a", "b")]
    try:
        messages, session_id, history = [], None, -1
        for turn, question in enumerate(["Which river is the largest?", "Where is Etna?", "How does castling work?"]):
            messages.append({"role": "user", "content": question})
            with replicas[turn % 2].client() as http:
                reply = http.post("/v1/chat/completions", json={
                    "messages": messages, "max_tokens": 6, "session_id": session_id}).json()
            session_id = reply["session_id"]
            timings = reply["ragblend"]["timings"]
            assert timings["history_tokens"] > history  # every earlier turn, whichever replica answered it
            history = timings["history_tokens"]
            messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    finally:
        assert [r.stop() for r in replicas] == [0, 0]


def test_budget_eviction_pins_namespaces_gc_and_stats_work_on_a_shared_backend(model_dir, embedder, backend, tmp_path):
    with replica(tmp_path / "a", model_dir, embedder, backend) as rb:
        rb.add_documents(DOCS)
        rb.add_documents([{"id": "payroll", "text": "Tenant B's payroll password is swordfish-93."}], namespace="b")
        rb.pin(["river"])
        with rb.store.env.begin() as txn:
            river = rb.store.docs.get_doc(txn, "river").chunk_ids
            river_bytes = sum(rb.store.kv.meta(txn, c).payload_bytes for c in river)
        budget = int(river_bytes / LOW_WATER) + 1
        rb.store.set_kv_max_bytes(budget)
        stats = rb.stats()
        assert stats.kv_bytes <= budget and stats.evictions > 0 and stats.pinned_bytes == river_bytes
        assert all(rb.store.kv.load(c) is not None for c in river)  # pinned KV stays
        answer = rb.query("How does castling work?", top_k=1, max_new_tokens=2)
        assert answer.chunks[0].doc_id == "chess" and answer.timings["kv_misses"] == 1  # evicted, recomputed
        assert [h.doc_id for h in rb.search("payroll password", 3, namespace="b")] == ["payroll"]
        assert "payroll" not in {h.doc_id for h in rb.search("payroll password", 3)}
        rb.store.set_kv_max_bytes(None)
        rb.query("Where?", contexts=["A passage nobody ingested."], max_new_tokens=1)  # KV without a chunk
        assert len(collect_garbage(rb.store).orphan_kv) == 1
        assert collect_garbage(rb.store, dry_run=True).orphan_kv == [] and rb.store.check() == []
        assert (rb.stats().documents, rb.stats().kv_max_bytes) == (4, None)


def test_a_cluster_that_cannot_be_reached_is_a_clear_error_naming_it(model_dir, embedder, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"redis+cluster://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(BackendUnavailableError, match=re.escape(url)):
        RagBlend(tmp_path / "a", model=model_dir, embedder=embedder, kv_backend=url)
    with pytest.raises(ValueError, match="HOST:PORT"):
        RagBlend(tmp_path / "b", model=model_dir, embedder=embedder, kv_backend="redis+cluster://nowhere")


def test_an_exact_path_one_replica_computed_is_loaded_by_another(model_dir, embedder, backend, tmp_path):
    with replica(tmp_path / "a", model_dir, embedder, backend) as a, replica(tmp_path / "b", model_dir, embedder,
                                                                             backend) as b:
        full = a.query(QUESTION, contexts=PASSAGES, mode="full", max_new_tokens=6)
        a.requests.wait_paths()
        exact = b.query(QUESTION, contexts=PASSAGES, mode="prefix", max_new_tokens=6)
        assert exact.timings["exact_hit_tokens"] == sum(c.tokens for c in exact.chunks)
        assert exact.token_ids == full.token_ids
        assert b.stats().paths == len(exact.chunks) - 1
