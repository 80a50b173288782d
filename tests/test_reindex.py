"""`reindex-kv`: moving a store to another model recomputes KV only, keeps text, embeddings and chunk ids,
serves the old KV until the switch, and leaves nothing of the old model behind."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import make_tiny_model_dir
from ragblend import RagBlend
from ragblend.cli import main
from ragblend.engine.prompt import PromptTemplate
from ragblend.storage.reindex import ReindexReport, _compute, reindex_kv
from ragblend.storage.store import StoreMismatchError

DOCS = [{"id": "lighthouse", "text": "The lighthouse of Varn was built in 1821 by the engineer Oda Pell."},
        {"id": "bridges", "text": "Oda Pell later designed three bridges over the river Am in Kessel."},
        {"id": "glass", "text": "Kessel is famous for its glass markets and its mayor Tomas Reh."}]


@pytest.fixture
def old(tiny_model_factory, embedder, tmp_path):
    rb = RagBlend(tmp_path / "store", model=tiny_model_factory("llama", seed=0), embedder=embedder)
    rb.add_documents(DOCS)
    yield rb
    rb.close()


def chunk_ids(rb: RagBlend) -> dict[str, list[str]]:
    with rb.store.env.begin() as txn:
        return {d.doc_id: d.chunk_ids for d in rb.store.docs.doc_records(txn)}


def test_the_store_serves_the_new_model_with_its_own_kv_and_the_same_chunks(old, tiny_model_factory, embedder, tmp_path):
    new_model = tiny_model_factory("llama", seed=1)
    before = chunk_ids(old)
    report = reindex_kv(old.store.path, new_model, progress=False)
    assert report.computed_chunks == 3 and report.bytes_freed > 0
    with RagBlend(old.store.path, model=new_model, embedder=embedder) as new:
        assert chunk_ids(new) == before
        assert new.search("Who built the lighthouse?", top_k=1)[0].doc_id == "lighthouse"
        with RagBlend(tmp_path / "fresh", model=new_model, embedder=embedder) as fresh:
            fresh.add_documents(DOCS)
            for doc_id, ids in chunk_ids(fresh).items():
                torch.testing.assert_close(new.store.kv.load(before[doc_id][0]).keys, fresh.store.kv.load(ids[0]).keys)
            question = "Who built the lighthouse?"
            assert new.query(question, mode="reuse", max_new_tokens=4).text == \
                fresh.query(question, mode="reuse", max_new_tokens=4).text
        with new.store.env.begin() as txn:
            assert new.store.kv.foreign(txn) == []  # the old model's records are freed


def test_the_old_kv_serves_until_the_switch_and_then_the_old_process_refuses(old, tiny_model_factory):
    new_model = tiny_model_factory("llama", seed=1)
    template = PromptTemplate.for_tokenizer(new_model.tokenizer)
    target = replace(old.store.manifest, kv_fingerprint=template.fingerprint(new_model.fingerprint))
    _compute(old.store, target, new_model, template, ReindexReport(), progress=False)  # a run cut before its switch
    assert old.query("Who built the lighthouse?", max_new_tokens=2).text is not None
    report = reindex_kv(old.store.path, new_model, progress=False)
    assert report.resumed_chunks == 3 and report.computed_chunks == 0
    with pytest.raises(StoreMismatchError, match="re-indexed"):
        old.search("Who built the lighthouse?")
    with pytest.raises(StoreMismatchError, match="re-indexed"):
        old.add_documents(["A new note written by the old process after the switch."])


def test_conversations_of_the_old_model_end(old, tiny_model_factory, embedder):
    chat = old.chat()
    chat.send("Who built the lighthouse?", max_new_tokens=2)
    chat.wait()
    report = reindex_kv(old.store.path, tiny_model_factory("llama", seed=1), progress=False)
    assert report.ended_sessions == 1
    with RagBlend(old.store.path, model=tiny_model_factory("llama", seed=1), embedder=embedder) as new:
        assert new.sessions() == []


def test_evicted_chunks_get_their_kv_on_first_use(old, tiny_model_factory, embedder):
    lighthouse = chunk_ids(old)["lighthouse"][0]
    with old.store.env.begin(write=True) as txn:
        old.store.kv.delete(txn, lighthouse)
    report = reindex_kv(old.store.path, tiny_model_factory("llama", seed=1), progress=False)
    assert report.chunks_without_kv == 1 and report.computed_chunks == 2
    with RagBlend(old.store.path, model=tiny_model_factory("llama", seed=1), embedder=embedder) as new:
        answer = new.query("Who built the lighthouse?", top_k=1, max_new_tokens=2)
        assert answer.timings["kv_misses"] == 1
        assert new.store.check() == []


def test_cli_reindexes_a_store(smollm_dir, tmp_path, capsys):
    first, second = (make_tiny_model_dir(tmp_path, "llama", smollm_dir, seed) for seed in (0, 1))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "note.txt").write_text("The ledger is kept in the red safe.")
    main(["ingest", str(tmp_path / "docs"), "--store", str(tmp_path / "s"), "--model", str(first)])
    main(["reindex-kv", "--store", str(tmp_path / "s"), "--model", str(second)])
    assert "computed KV for 1 chunks" in capsys.readouterr().out
    main(["query", "Where is the ledger?", "--store", str(tmp_path / "s"), "--model", str(second),
          "--max-new-tokens", "2"])
    with pytest.raises(SystemExit):  # the first model's KV is gone: the store refuses it
        main(["query", "Where is the ledger?", "--store", str(tmp_path / "s"), "--model", str(first)])
