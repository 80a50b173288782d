"""Specification of the store: LMDB round trips, reopening from other processes, idempotent and
incremental ingest, deletes, model/chunk-size checks, and crash safety (tiny model, real MiniLM)."""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import lmdb
import pytest
import torch

from index.docstore import vector_id
from kvchunks.backends.lmdb_env import LmdbEnv
from kvchunks.kvstore import KVStore
from kvchunks.chunk_kv import ChunkKV
from ragblend.api import RagBlend
from ragblend.storage.documents import coerce_document
from ragblend.storage.store import Store, StoreMismatchError

REPO = Path(__file__).resolve().parents[1]
CHUNK_TOKENS = 32

RIVER = ("The Amazon river carries more water than any other river on Earth. "
         "Its basin covers much of Brazil and Peru, and its mouth is wide enough to hold islands. "
         "River dolphins, piranhas and giant otters live in its muddy brown water.")
VOLCANO = ("Mount Etna on Sicily is one of the most active volcanoes in Europe. "
           "Its eruptions have sent lava towards the town of Catania many times since antiquity. "
           "Farmers grow pistachios and grapes in the fertile ash on its lower slopes.")
CHESS = ("In chess, castling moves the king two squares towards a rook and places the rook beside it. "
         "A player may not castle out of check or through a square attacked by an enemy piece. "
         "The en passant rule lets a pawn capture another pawn that has just advanced two squares.")
DOCS = [{"id": "river", "text": RIVER, "metadata": {"topic": "geography"}},
        {"id": "volcano", "text": VOLCANO, "metadata": {"topic": "geology"}},
        {"id": "chess", "text": CHESS, "metadata": {"topic": "games"}}]


# --- helpers ------------------------------------------------------------------------------------


def open_store(path: Path, model, embedder, **kwargs) -> RagBlend:
    return RagBlend(path, model=model, embedder=embedder, chunk_tokens=kwargs.pop("chunk_tokens", CHUNK_TOKENS), **kwargs)


def close(rb: RagBlend) -> None:
    """Release the store: LMDB allows one open environment per path and process."""
    rb.close()


def store_contents(path: Path) -> dict:
    """Every key/value of every LMDB database, plus the derived index files."""
    env = Store(path, readonly=True).env.env  # the process's one LMDB environment for this folder
    contents = {}
    with env.begin() as txn:
        names = [bytes(key) for key, _ in txn.cursor()]
    for name in names:
        db = env.open_db(name, create=False)
        with env.begin(db=db) as txn:
            contents[name] = {bytes(k): bytes(v) for k, v in txn.cursor()}
    for file in sorted(path.glob("index-*.faiss")):
        contents[file.name] = file.read_bytes()
    return contents


def chunk_ids_of(rb: RagBlend, doc_id: str) -> list[str]:
    with rb.store.env.begin() as txn:
        return list(rb.store.docs.get_doc(txn, doc_id).chunk_ids)


def is_stored_anywhere(rb: RagBlend, cid: str) -> dict[str, bool]:
    with rb.store.env.begin() as txn:
        where = {"docstore": rb.store.docs.get_chunk(txn, cid) is not None,
                 "embedding": rb.store.docs.get_embedding(txn, cid) is not None,
                 "kv": rb.store.kv.contains(txn, cid)}
    where["faiss"] = vector_id(cid) in set(rb.store.index.ids().tolist())
    return where


def kv_digest(kv: ChunkKV) -> int:
    return zlib.crc32(kv.keys.numpy().tobytes() + kv.values.numpy().tobytes())


class ForwardCounter:
    """Counts decoder forward calls and the sequences (batch rows) they prefill, via a real forward hook."""

    def __init__(self, model):
        self.calls = self.rows = 0
        self.handle = model.decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.rows += input_ids.shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run_python(code: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def result_of(proc: subprocess.CompletedProcess) -> dict:
    [line] = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


@pytest.fixture
def tiny_dir(tiny_model) -> str:
    """The tiny model's folder, for subprocesses."""
    return tiny_model.model.config._name_or_path


@pytest.fixture
def rb(tmp_path, tiny_model, embedder):
    store = open_store(tmp_path / "store", tiny_model, embedder)
    store.add_documents(DOCS)
    yield store
    close(store)


# --- LMDB records ---------------------------------------------------------------------------------


def test_kv_round_trips_through_lmdb_as_fp16(tmp_path):
    env = LmdbEnv(tmp_path, readonly=False)  # the engine a store folder uses
    store = KVStore(env, "fingerprint")
    torch.manual_seed(0)
    kv = ChunkKV(torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8))
    with env.begin(write=True) as txn:
        written = store.put(txn, "chunk", kv)
    loaded = store.load("chunk")
    assert written == 2 * kv.keys.numel() * 2  # K and V, 2 bytes each
    assert torch.equal(loaded.keys, kv.keys.half()) and torch.equal(loaded.values, kv.values.half())


def test_each_layer_is_one_record_of_raw_fp16_keys_then_values_with_a_checksum(tmp_path):
    env = LmdbEnv(tmp_path, readonly=False)  # the engine a store folder uses
    store = KVStore(env, "fingerprint")
    kv = ChunkKV(torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8))
    with env.begin(write=True) as txn:
        store.put(txn, "chunk", kv)
    with env.begin() as txn:
        meta = store.meta(txn, "chunk")
        for layer in range(2):
            raw = bytes(txn.get(f"fingerprint/chunk/{layer:04d}".encode(), db=store.kv_db))
            assert raw == kv.keys[layer].half().numpy().tobytes() + kv.values[layer].half().numpy().tobytes()
            assert meta.crc32[layer] == zlib.crc32(raw)
        assert store.verify(txn, "chunk") == []


def test_check_reports_a_corrupted_kv_record(rb):
    cid = chunk_ids_of(rb, "river")[0]
    key = f"{rb.store.kv.fingerprint}/{cid}/0001".encode()
    with rb.store.env.begin(write=True) as txn:
        raw = bytearray(txn.get(key, db=rb.store.kv.kv_db))
        raw[10] ^= 0xFF
        txn.put(key, bytes(raw), db=rb.store.kv.kv_db)
    problems = rb.store.check()
    assert any(cid in p and "layer 1" in p for p in problems)


def test_a_fresh_store_passes_its_consistency_check(rb):
    assert rb.store.check() == []


# --- search and stats -----------------------------------------------------------------------------


def test_search_hits_name_their_document_position_text_and_metadata(rb):
    [hit] = rb.search("Which volcano threatens Catania?", top_k=1)
    assert hit.doc_id == "volcano" and hit.metadata == {"topic": "geology"}
    assert hit.chunk_id in chunk_ids_of(rb, "volcano")
    assert hit.position == chunk_ids_of(rb, "volcano").index(hit.chunk_id)
    assert hit.text in VOLCANO and hit.token_ids == rb.template.chunk_ids(hit.text)


def test_stats_count_documents_chunks_tokens_and_kv_bytes(rb, tiny_model):
    stats = rb.stats()
    ids = [cid for d in DOCS for cid in chunk_ids_of(rb, d["id"])]
    with rb.store.env.begin() as txn:
        tokens = sum(len(rb.store.docs.get_chunk(txn, cid).token_ids) for cid in ids)
    m = tiny_model
    assert (stats.documents, stats.chunks, stats.tokens) == (3, len(ids), tokens)
    assert stats.kv_bytes == tokens * m.num_layers * 2 * m.num_kv_heads * m.head_dim * 2
    assert stats.orphan_chunks == 0


# --- reopening ------------------------------------------------------------------------------------


def test_a_store_reopened_by_a_new_process_serves_every_chunk_under_the_same_ids(rb, tiny_dir):
    expected_ids = {d["id"]: chunk_ids_of(rb, d["id"]) for d in DOCS}
    digests = {cid: kv_digest(rb.store.kv.load(cid)) for ids in expected_ids.values() for cid in ids}
    store_dir = rb.store.path
    close(rb)
    proc = run_python(f"""
        import json, zlib
        from ragblend.api import RagBlend
        from ragblend.storage.documents import Document
        rb = RagBlend({str(store_dir)!r}, model={tiny_dir!r})
        with rb.store.env.begin() as txn:
            ids = {{d.doc_id: d.chunk_ids for d in rb.store.docs.doc_records(txn)}}
        digests = {{}}
        for cid in [c for cs in ids.values() for c in cs]:
            kv = rb.store.kv.load(cid)
            digests[cid] = zlib.crc32(kv.keys.numpy().tobytes() + kv.values.numpy().tobytes())
        top = {{q: rb.search(q, top_k=1)[0].doc_id for q in
               ["Which river has the most water?", "Where do farmers grow pistachios in volcanic ash?",
                "When may a player castle the king?"]}}
        # The same texts under new ids: chunk ids recomputed in this process must find the stored KV.
        report = rb.ingest([Document(id="copy-" + d, text=t) for d, t in
                            [("river", {RIVER!r}), ("chess", {CHESS!r})]], progress=False)
        with rb.store.env.begin() as txn:
            copies = {{d: rb.store.docs.get_doc(txn, "copy-" + d).chunk_ids for d in ("river", "chess")}}
        print("RESULT " + json.dumps(dict(ids=ids, digests=digests, top=top, copies=copies,
                                          computed=report.computed_chunks, problems=rb.store.check())))
    """, PYTHONHASHSEED="12345")
    got = result_of(proc)
    assert got["ids"] == expected_ids
    assert got["digests"] == digests
    assert list(got["top"].values()) == ["river", "volcano", "chess"]
    assert got["copies"] == {"river": expected_ids["river"], "chess": expected_ids["chess"]}
    assert got["computed"] == 0
    assert got["problems"] == []


def test_reingesting_unchanged_documents_does_no_model_work_and_changes_nothing(rb, tiny_model, embedder):
    store_dir = rb.store.path
    close(rb)
    before = store_contents(store_dir)
    again = open_store(store_dir, tiny_model, embedder)
    with ForwardCounter(tiny_model) as forward:
        report = again.ingest([coerce_document(d) for d in DOCS], progress=False)
    close(again)
    assert forward.calls == 0
    assert (report.unchanged, report.computed_chunks, report.computed_tokens) == (3, 0, 0)
    assert store_contents(store_dir) == before


def test_the_same_store_can_be_opened_twice_in_one_process(rb, tiny_model, embedder):
    """Re-running `rb = RagBlend(path, ...)` in a notebook constructs the new one while the old one is alive."""
    second = RagBlend(rb.store.path, model=tiny_model, embedder=embedder)
    assert second.search("Which river has the most water?", top_k=1)[0].doc_id == "river"


# --- updates and deletes --------------------------------------------------------------------------


def test_updating_a_document_replaces_its_chunks_everywhere(rb, tiny_model, embedder):
    old_ids = chunk_ids_of(rb, "river")
    new_text = ("The Danube flows through ten countries, more than any other river in the world. "
                "It rises in the Black Forest and empties into the Black Sea through a wide delta.")
    rb.add_documents([{"id": "river", "text": new_text}])
    new_ids = chunk_ids_of(rb, "river")
    assert not set(old_ids) & set(new_ids)
    for cid in old_ids:
        assert is_stored_anywhere(rb, cid) == {"docstore": False, "embedding": False, "kv": False, "faiss": False}
    for cid in new_ids:
        assert all(is_stored_anywhere(rb, cid).values())
    hits = rb.search("Which river carries the most water, with dolphins and piranhas?", top_k=10)
    assert not any("Amazon" in h.text for h in hits)
    assert [h.doc_id for h in rb.search("Which river rises in the Black Forest?", top_k=1)] == ["river"]
    assert rb.stats().documents == 3 and rb.store.check() == []
    store_dir = rb.store.path
    close(rb)  # the FAISS file on disk agrees too
    reopened = open_store(store_dir, tiny_model, embedder)
    assert not {vector_id(c) for c in old_ids} & set(reopened.store.index.ids().tolist())
    close(reopened)


def test_changing_only_metadata_updates_search_results_without_model_work(rb, tiny_model):
    ids = chunk_ids_of(rb, "chess")
    with ForwardCounter(tiny_model) as forward:
        rb.add_documents([{"id": "chess", "text": CHESS, "metadata": {"topic": "board games"}}])
    assert forward.calls == 0
    assert chunk_ids_of(rb, "chess") == ids
    [hit] = rb.search("When may a player castle the king?", top_k=1)
    assert (hit.doc_id, hit.metadata) == ("chess", {"topic": "board games"})


def test_deleting_a_document_removes_its_chunks_but_keeps_chunks_shared_with_another(tmp_path, tiny_model, embedder):
    shared = "The Amazon river carries more water than any other river on Earth, about a fifth of all river flow."
    rb = open_store(tmp_path / "store", tiny_model, embedder)
    rb.add_documents([{"id": "a", "text": shared + "\n\n" + VOLCANO}, {"id": "b", "text": shared + "\n\n" + CHESS}])
    a_ids, b_ids = chunk_ids_of(rb, "a"), chunk_ids_of(rb, "b")
    common = set(a_ids) & set(b_ids)
    assert common, "both documents should start with the same chunk"
    rb.delete_documents(["a"])
    for cid in set(a_ids) - common:
        assert not any(is_stored_anywhere(rb, cid).values())
    for cid in b_ids:
        assert all(is_stored_anywhere(rb, cid).values())
    [hit] = rb.search("Which river carries a fifth of all river flow?", top_k=1)
    assert hit.doc_id == "b" and hit.chunk_id in common
    assert not any(h.doc_id == "a" for h in rb.search("Mount Etna eruptions near Catania", top_k=10))
    assert rb.stats().documents == 1 and rb.store.check() == []
    close(rb)


def test_deleting_an_unknown_id_raises_keyerror_and_deletes_nothing(rb, tiny_model, embedder):
    store_dir = rb.store.path
    close(rb)
    before = store_contents(store_dir)
    reopened = open_store(store_dir, tiny_model, embedder)
    with pytest.raises(KeyError, match="no-such-doc"):
        reopened.delete_documents(["river", "no-such-doc"])
    close(reopened)
    assert store_contents(store_dir) == before


def test_deleting_the_same_id_twice_in_one_call_deletes_it_once(rb):
    rb.delete_documents(["river", "river"])
    assert rb.stats().documents == 2 and rb.store.check() == []


# --- what a store is bound to ---------------------------------------------------------------------


def test_opening_a_store_with_another_model_is_refused_and_leaves_it_untouched(rb, tiny_model_factory, embedder):
    store_dir = rb.store.path
    close(rb)
    before = store_contents(store_dir)
    other = tiny_model_factory("llama", seed=1)
    with pytest.raises(StoreMismatchError) as excinfo:
        RagBlend(store_dir, model=other, embedder=embedder)
    message = str(excinfo.value)
    del excinfo
    assert "tiny-llama-0" in message and "tiny-llama-1" in message and str(store_dir) in message
    assert "another store folder" in message
    assert store_contents(store_dir) == before


def test_opening_a_store_with_another_chunk_size_is_refused(rb, tiny_model, embedder):
    store_dir = rb.store.path
    close(rb)
    with pytest.raises(StoreMismatchError, match="chunk size"):
        RagBlend(store_dir, model=tiny_model, embedder=embedder, chunk_tokens=CHUNK_TOKENS * 2)


def test_a_reopened_store_keeps_its_chunk_size_when_none_is_given(rb, tiny_model, embedder):
    store_dir = rb.store.path
    close(rb)
    reopened = RagBlend(store_dir, model=tiny_model, embedder=embedder)
    assert reopened.store.manifest.chunk_tokens == CHUNK_TOKENS
    close(reopened)


@pytest.mark.parametrize("chunk_tokens", [-1, 15, 4097, 100_000])
def test_chunk_size_out_of_range_raises_valueerror(tmp_path, tiny_model, embedder, chunk_tokens):
    with pytest.raises(ValueError, match="out of range"):
        RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder, chunk_tokens=chunk_tokens)


def test_zero_chunk_size_is_rejected_not_replaced_by_the_default(tmp_path, tiny_model, embedder):
    with pytest.raises(ValueError, match="out of range"):
        RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder, chunk_tokens=0)


def test_an_invalid_chunk_size_creates_no_store(tmp_path, tiny_model, embedder):
    with pytest.raises(ValueError):
        RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder, chunk_tokens=8)
    gc.collect()
    assert not (tmp_path / "store").exists()


def test_a_missing_model_folder_creates_no_store(tmp_path, embedder):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        RagBlend(tmp_path / "store", model=tmp_path / "no-such-model", embedder=embedder)
    gc.collect()
    assert not (tmp_path / "store").exists()


# --- crash safety ---------------------------------------------------------------------------------


def many_documents(n: int) -> list[dict]:
    """Distinct documents of several chunks each (every sentence is unique, so no chunk is shared)."""
    words = ["harbour", "granite", "orchard", "lantern", "meadow", "copper", "glacier", "violin", "saffron", "canyon"]
    docs = []
    for i in range(n):
        sentences = [f"Record {i} line {j} mentions the {words[(i + j) % 10]} and the {words[(i * 3 + j) % 10]} "
                     f"near kilometre {i * 37 + j * 11}." for j in range(8)]
        docs.append({"id": f"doc-{i:03d}", "text": " ".join(sentences)})
    return docs


def committed(store_dir: Path) -> tuple[int, int]:
    """(documents, chunks with KV) committed so far, read by a separate reader while the writer runs."""
    try:
        env = lmdb.open(str(store_dir), readonly=True, max_dbs=32)
    except lmdb.Error:  # not created yet
        return 0, 0
    try:
        counts = []
        for name in (b"docs", b"kvmeta"):
            try:
                db = env.open_db(name, create=False)
            except lmdb.Error:
                counts.append(0)
                continue
            with env.begin(db=db) as txn:
                counts.append(txn.stat(db)["entries"])
        return counts[0], counts[1]
    finally:
        env.close()


def test_an_ingest_killed_midway_leaves_a_consistent_store_and_a_rerun_resumes(tmp_path, tiny_model, tiny_dir, embedder):
    docs = many_documents(40)
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    store_dir = tmp_path / "store"
    script = f"""
        import json
        from ragblend.api import RagBlend
        rb = RagBlend({str(store_dir)!r}, model={tiny_dir!r}, chunk_tokens={CHUNK_TOKENS})
        rb.add_documents(json.load(open({str(tmp_path / 'docs.json')!r})))
        print("finished")
    """
    log = tmp_path / "child.log"
    with open(log, "wb") as sink:
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, stdout=sink, stderr=sink,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 240
        while child.poll() is None and committed(store_dir)[1] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, "the ingest finished before it could be interrupted; " \
        f"make it larger (output: {log.read_text()[-2000:]})"
    docs_before, kv_before = committed(store_dir)
    assert kv_before >= 1 and docs_before < len(docs)

    rb = open_store(store_dir, tiny_model, embedder)
    assert rb.store.check() == []
    assert rb.stats().documents == docs_before
    with ForwardCounter(tiny_model) as forward:
        report = rb.ingest([coerce_document(d) for d in docs], progress=False)
    final = rb.stats()
    assert (final.documents, final.orphan_chunks) == (len(docs), 0)
    assert report.unchanged == docs_before
    assert report.computed_chunks == final.chunks - kv_before  # nothing already committed was recomputed
    assert forward.rows - 1 == report.computed_chunks  # one row is the prompt prefix
    assert rb.store.check() == []
    last_sentence = docs[-1]["text"].split(". ")[-1]
    assert rb.search(last_sentence, top_k=1)[0].doc_id == docs[-1]["id"]  # computed by the rerun, now searchable
    close(rb)
