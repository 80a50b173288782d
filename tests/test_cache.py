"""The KV store as a cache: a byte budget with LRU eviction that never loses what the index returns,
pins, counters in stats, and gc."""
from __future__ import annotations

import json
import time

import pytest

from kvchunks.budget import LOW_WATER, PinnedOverBudgetError
from kvchunks.kvstore import KVStore
from ragblend import RagBlend
from ragblend.cli import main
from ragblend.storage.maintenance import collect_garbage

TOPICS = ["volcanoes", "glaciers", "coral reefs", "deserts", "rainforests", "tundra"]
DOCS = [{"id": t, "text": f"This is a note about {t}. " * 6 + f"The key fact about {t} is number {i}."}
        for i, t in enumerate(TOPICS)]


@pytest.fixture
def make_rb(tiny_model_factory, embedder, tmp_path):
    made = []

    def make(**kwargs) -> RagBlend:
        rb = RagBlend(tmp_path / "store", model=tiny_model_factory("llama"), embedder=embedder, **kwargs)
        made.append(rb)
        return rb

    yield make
    for rb in made:
        rb.close()


def per_doc_bytes(rb: RagBlend) -> int:
    return rb.stats().kv_bytes // rb.stats().documents


def room_for(rb: RagBlend, documents: int) -> int:
    """A budget that holds exactly `documents` documents' KV once an eviction has freed down to LOW_WATER."""
    return int(documents * per_doc_bytes(rb) / LOW_WATER) + 1


def test_budget_evicts_kv_but_every_document_stays_searchable_and_answerable(make_rb):
    rb = make_rb()
    rb.add_documents(DOCS)
    budget = room_for(rb, 3)
    rb.store.set_kv_max_bytes(budget)
    stats = rb.stats()
    assert stats.kv_bytes <= budget and stats.evictions >= 3 and stats.evicted_chunks >= 3
    assert stats.documents == len(DOCS) and stats.chunks == len(DOCS)
    for doc in DOCS:
        answer = rb.query(f"What is the key fact about {doc['id']}?", top_k=1, mode="reuse", max_new_tokens=2)
        assert answer.chunks[0].doc_id == doc["id"]
        assert answer.timings["kv_hits"] + answer.timings["kv_misses"] == 1
        assert rb.stats().kv_bytes <= budget
    assert rb.store.check() == []


def test_an_evicted_chunk_is_recomputed_once_then_hit(make_rb):
    rb = make_rb()
    rb.add_documents(DOCS)
    rb.store.set_kv_max_bytes(room_for(rb, 2))
    question = "What is the key fact about volcanoes?"
    first = rb.query(question, top_k=1, mode="reuse", max_new_tokens=2)
    again = rb.query(question, top_k=1, mode="reuse", max_new_tokens=2)
    assert (first.timings["kv_misses"], again.timings["kv_hits"]) == (1, 1)
    assert again.token_ids == first.token_ids


def test_least_recently_used_kv_goes_first(make_rb):
    rb = make_rb()
    rb.add_documents(DOCS[:3])
    for doc in ("volcanoes", "glaciers"):  # coral reefs is now the least recently used
        rb.query(f"What is the key fact about {doc}?", top_k=1, mode="reuse", max_new_tokens=1)
    rb.store.set_kv_max_bytes(room_for(rb, 2))
    with rb.store.env.begin() as txn:
        held = {rb.store.docs.get_chunk(txn, c).doc_id for c in rb.store.kv.chunk_ids(txn)}
    assert held == {"volcanoes", "glaciers"}


def test_pinned_documents_are_never_evicted(make_rb):
    rb = make_rb()
    rb.add_documents(DOCS)
    rb.pin(["tundra"])
    rb.store.set_kv_max_bytes(room_for(rb, 2))
    for doc in DOCS[:5]:
        rb.query(f"What is the key fact about {doc['id']}?", top_k=1, mode="reuse", max_new_tokens=1)
    answer = rb.query("What is the key fact about tundra?", top_k=1, mode="reuse", max_new_tokens=1)
    assert answer.timings["kv_misses"] == 0
    assert rb.stats().pinned_bytes > 0


def test_pinning_more_than_the_budget_is_refused_and_changes_nothing(make_rb):
    rb = make_rb()
    rb.add_documents(DOCS)
    rb.store.set_kv_max_bytes(room_for(rb, 2))
    with pytest.raises(PinnedOverBudgetError, match="kv_max_bytes"):
        rb.pin(["volcanoes", "glaciers", "deserts"])
    assert rb.stats().pinned_bytes == 0


def test_the_budget_is_kept_in_the_store(make_rb):
    rb = make_rb(kv_max_bytes=10_000_000)
    rb.add_documents(DOCS[:1])
    rb.close()
    assert make_rb().stats().kv_max_bytes == 10_000_000


def test_stats_json_reports_budget_counters_and_sessions(make_rb, capsys):
    rb = make_rb(kv_max_bytes=50_000_000)
    rb.add_documents(DOCS[:2])
    rb.query("What is the key fact about glaciers?", top_k=1, mode="reuse", max_new_tokens=1)
    rb.chat().send("Tell me about volcanoes.", top_k=1, max_new_tokens=1)
    rb.close()
    main(["stats", "--store", str(rb.store.path), "--json"])
    stats = json.loads(capsys.readouterr().out)
    for key in ("kv_bytes", "kv_max_bytes", "pinned_bytes", "kv_hits", "kv_misses", "evictions", "documents",
                "chunks", "sessions"):
        assert key in stats, key
    assert stats["kv_max_bytes"] == 50_000_000 and stats["kv_hits"] >= 2 and stats["sessions"] == 1
    assert stats["session_bytes"] > 0 and stats["evictable_bytes"] == stats["kv_bytes"] - stats["pinned_bytes"]


def test_gc_removes_foreign_and_orphan_kv_and_expired_sessions(make_rb):
    rb = make_rb()
    rb.add_documents(DOCS[:2])
    rb.query("Where?", contexts=["A passage nobody ingested."], mode="reuse", max_new_tokens=1)  # KV, no chunk record
    foreign = KVStore(rb.store.env, "f" * 32)
    with rb.store.env.begin(write=True) as txn:
        foreign.put(txn, "old-chunk", rb.store.kv.load(rb.store.kv.chunk_ids(txn)[0]))
    rb.chat(ttl_s=0.01).send("Hello?", contexts=["Hi."], max_new_tokens=1)
    rb.session_manager.wait()
    time.sleep(0.05)
    dry = collect_garbage(rb.store, dry_run=True)
    assert (len(dry.orphan_kv), dry.foreign_records, len(dry.expired_sessions)) == (2, 1, 1)  # two passages
    assert dry.bytes_freed > 0
    done = collect_garbage(rb.store)
    assert done.bytes_freed == dry.bytes_freed
    again = collect_garbage(rb.store, dry_run=True)
    assert (again.orphan_kv, again.foreign_records, again.expired_sessions, again.bytes_freed) == ([], 0, [], 0)
    assert rb.store.check() == [] and rb.stats().documents == 2


def test_ingest_delete_cycles_reuse_lmdb_space(make_rb):
    rb = make_rb()
    sizes = []
    for cycle in range(20):
        rb.add_documents([{"id": d["id"], "text": d["text"] + f" Cycle {cycle}."} for d in DOCS])
        rb.delete_documents([d["id"] for d in DOCS])
        sizes.append((rb.store.path / "data.mdb").stat().st_size)
    # 20 cycles write ~20x the live data; freed pages are reused, so the file stays near its size
    # after the first cycles (a few pages of free-list growth, not the data written)
    assert sizes[-1] < 1.1 * sizes[2], sizes


def test_a_flipped_byte_in_a_kv_record_is_caught_recomputed_and_reported(make_rb):
    rb = make_rb()
    rb.add_documents(DOCS[:2])
    question = "What is the key fact about volcanoes?"
    before = rb.query(question, top_k=1, mode="reuse", max_new_tokens=3)
    kv = rb.store.kv
    key = kv._layer_key(before.chunks[0].chunk_id, 1)
    with rb.store.env.begin(write=True) as txn:
        damaged = bytearray(txn.get(key, db=kv.kv_db))
        damaged[10] ^= 0xFF
        txn.put(key, bytes(damaged), db=kv.kv_db)
    assert any("corrupt" in problem for problem in rb.store.check())
    after = rb.query(question, top_k=1, mode="reuse", max_new_tokens=3)
    assert after.token_ids == before.token_ids and after.timings["kv_misses"] == 1
    assert rb.store.check() == []


def test_closing_one_store_handle_leaves_the_others_working(make_rb):
    from ragblend.storage.store import Store

    rb = make_rb()
    rb.add_documents(DOCS[:1])
    other = Store(rb.store.path)
    other.close()
    assert rb.stats().documents == 1
    assert rb.query("What is the key fact about volcanoes?", top_k=1, mode="reuse", max_new_tokens=1).text is not None


def test_int8_kv_takes_about_half_the_bytes_and_stays_close(tiny_model_factory, embedder, tmp_path):
    model = tiny_model_factory("llama")
    stores = {}
    for dtype in ("float16", "int8"):
        rb = RagBlend(tmp_path / dtype, model=model, embedder=embedder, kv_dtype=dtype)
        rb.add_documents(DOCS[:3])
        stores[dtype] = rb
    fp16, int8 = stores["float16"], stores["int8"]
    assert 0.45 < int8.stats().kv_bytes / fp16.stats().kv_bytes < 0.56
    chunk = fp16.search("volcanoes", top_k=1)[0].chunk_id
    exact, quantized = fp16.store.kv.load(chunk), int8.store.kv.load(chunk)
    for a, b in ((exact.keys, quantized.keys), (exact.values, quantized.values)):
        error = (a.float() - b.float()).norm() / a.float().norm()
        assert error < 0.02, error
    question = "What is the key fact about volcanoes?"
    logits = [rb.query(question, top_k=1, mode="reuse", max_new_tokens=1).first_token_logits for rb in (fp16, int8)]
    assert (logits[0] - logits[1]).abs().max() < 0.05
    for rb in (fp16, int8):
        rb.close()


def test_a_store_keeps_its_kv_dtype(tiny_model_factory, embedder, tmp_path):
    from ragblend import StoreMismatchError

    model = tiny_model_factory("llama")
    RagBlend(tmp_path / "s", model=model, embedder=embedder, kv_dtype="int8").add_documents(DOCS[:1])
    assert RagBlend(tmp_path / "s", model=model, embedder=embedder).store.manifest.kv_dtype == "int8"
    with pytest.raises(StoreMismatchError, match="KV dtype"):
        RagBlend(tmp_path / "s", model=model, embedder=embedder, kv_dtype="float16")
    with pytest.raises(ValueError, match="unknown KV dtype"):
        RagBlend(tmp_path / "t", model=model, embedder=embedder, kv_dtype="int3")
    assert not (tmp_path / "t").exists()


def test_a_document_ttl_drops_its_kv_but_keeps_it_searchable(make_rb):
    rb = make_rb()
    rb.add_documents(DOCS[:2], ttl_s=0.2)
    rb.add_documents(DOCS[2:3])  # no TTL
    time.sleep(0.3)
    assert sorted(rb.expire()) == ["glaciers", "volcanoes"]
    stats = rb.stats()
    assert stats.documents == 3 and stats.evicted_chunks == 2
    answer = rb.query("What is the key fact about volcanoes?", top_k=1, mode="reuse", max_new_tokens=1)
    assert answer.chunks[0].doc_id == "volcanoes" and answer.timings["kv_misses"] == 1
    assert rb.expire() == []  # the recomputed KV stays


def test_a_document_can_ask_to_be_deleted_when_its_ttl_ends(make_rb):
    rb = make_rb()
    rb.add_documents([{**DOCS[0], "ttl_s": 0.2, "expire": "document"}, DOCS[1]])
    time.sleep(0.3)
    assert rb.expire() == ["volcanoes"]
    assert {h.doc_id for h in rb.search("volcanoes", top_k=5)} == {"glaciers"}


def test_gc_drops_the_kv_of_documents_past_their_ttl(make_rb):
    rb = make_rb()
    rb.add_documents(DOCS[:1], ttl_s=0.2)
    time.sleep(0.3)
    report = collect_garbage(rb.store)
    assert report.expired_kv_documents == ["volcanoes"] and report.bytes_freed > 0
    assert rb.stats().documents == 1 and rb.stats().kv_bytes == 0


@pytest.mark.parametrize("bad", [{"ttl_s": 0}, {"ttl_s": "soon"}, {"expire": "never"}])
def test_bad_ttl_settings_are_refused(make_rb, bad):
    from ragblend import DocumentError

    with pytest.raises(DocumentError):
        make_rb().add_documents([{**DOCS[0], **bad}])


def test_a_process_querying_while_another_ingests_sees_only_whole_documents(tmp_path, smollm_dir, embedder):
    import subprocess
    import sys
    import textwrap

    from conftest import make_tiny_model_dir
    from ragblend.engine.model import load_model

    model_dir = make_tiny_model_dir(tmp_path, "llama", smollm_dir)
    docs = [{"id": f"note-{i}", "text": f"Note {i} is about topic {i}. " * 20} for i in range(24)]
    store = tmp_path / "store"
    rb = RagBlend(store, model=load_model(model_dir), embedder=embedder)
    rb.add_documents(docs[:1])
    script = textwrap.dedent(f"""
        from ragblend.api import RagBlend
        rb = RagBlend({str(store)!r}, model={str(model_dir)!r})
        for doc in {docs[1:]!r}:
            rb.add_documents([doc])
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    seen = set()
    while child.poll() is None:
        for hit in rb.search("Which note is about a topic?", top_k=5):
            with rb.store.env.begin() as txn:
                record = rb.store.docs.get_doc(txn, hit.doc_id)
                assert all(rb.store.kv.contains(txn, c) for c in record.chunk_ids)
            seen.add(hit.doc_id)
        rb.query("Which note is about topic 3?", top_k=2, mode="reuse", max_new_tokens=1)
    assert child.returncode == 0, child.stderr.read()
    assert rb.stats().documents == len(docs)
    assert len(rb.search("Which note is about a topic?", top_k=30)) == len(docs)  # the index caught up
    rb.close()


def test_a_full_store_fails_the_ingest_clearly_and_stays_consistent(tiny_model_factory, embedder, tmp_path,
                                                                     monkeypatch):
    from kvchunks.backends import StoreFullError

    monkeypatch.setenv("RAGBLEND_MAX_STORE_BYTES", str(4 << 20))
    rb = RagBlend(tmp_path / "small", model=tiny_model_factory("llama"), embedder=embedder)
    many = [{"id": f"n{i}", "text": f"Note {i}: " + "words about this note " * 20} for i in range(200)]
    with pytest.raises(StoreFullError, match="is full"):
        for start in range(0, len(many), 10):
            rb.add_documents(many[start:start + 10])
    committed = rb.stats().documents
    assert 0 < committed < len(many) and committed % 10 == 0
    assert rb.store.check() == []
    assert rb.search("Note 0", top_k=1)[0].doc_id.startswith("n")
    rb.close()


def test_the_running_kv_byte_total_matches_the_records(make_rb):
    rb = make_rb()
    rb.add_documents(DOCS)
    rb.add_documents([{"id": "volcanoes", "text": "Volcanoes changed: a new text about lava."}])
    rb.delete_documents(["glaciers"])
    rb.store.set_kv_max_bytes(room_for(rb, 2))
    collect_garbage(rb.store)
    with rb.store.env.begin() as txn:
        assert rb.store.kv.payload_bytes(txn) == rb.store.kv._scan_bytes(txn, rb.store.kv.fingerprint) == rb.stats().kv_bytes
