"""Tenant namespaces: a namespace's documents, chunks, KV and sessions are invisible to every other,
through every API path, and retrieval filters inside the index so top_k stays top_k."""
from __future__ import annotations

import pytest

from conftest import make_tiny_model_dir
from kvchunks.chunking import chunk_id
from ragblend import RagBlend, SessionNotFoundError
from ragblend.cli import main

SHARED_TEXT = "The vault code of the Harbor office is 4471. Only staff may open it after six."
A_DOCS = [{"id": "vault", "text": SHARED_TEXT},
          {"id": "a-only", "text": "Tenant A keeps its spare keys in the blue cabinet by the window."}]
B_DOCS = [{"id": "vault", "text": SHARED_TEXT},
          {"id": "b-secret", "text": "Tenant B's password for the payroll system is swordfish-93."},
          {"id": "b-more", "text": "Tenant B's payroll runs on the last Friday of every month."}]


@pytest.fixture(params=["flat", "hnsw"])
def rb(request, tiny_model_factory, embedder, tmp_path):
    with RagBlend(tmp_path / "store", model=tiny_model_factory("llama"), embedder=embedder,
                  index_kind=request.param) as rb:
        rb.add_documents(A_DOCS, namespace="a")
        rb.add_documents(B_DOCS, namespace="b")
        yield rb


def test_search_returns_only_the_namespaces_chunks_and_still_fills_top_k(rb):
    hits = rb.search("What is tenant B's payroll password?", top_k=2, namespace="a")
    assert len(hits) == 2  # B's two closer chunks did not take A's places
    assert {h.doc_id for h in hits} == {"vault", "a-only"}
    assert all("swordfish" not in h.text for h in hits)
    assert {h.doc_id for h in rb.search("payroll password", top_k=5, namespace="b")} == {"vault", "b-secret", "b-more"}


def test_the_default_namespace_and_unknown_namespaces_see_nothing_of_others(rb):
    assert rb.search("payroll password", top_k=3) == []
    assert rb.search("payroll password", top_k=3, namespace="c") == []
    with pytest.raises(ValueError, match="no documents"):
        rb.query("What is the payroll password?", namespace="c", max_new_tokens=2)


def test_the_same_text_is_stored_once_per_namespace(rb):
    a = rb.search("vault code", top_k=1, namespace="a")[0]
    b = rb.search("vault code", top_k=1, namespace="b")[0]
    assert a.text == b.text and a.chunk_id != b.chunk_id
    rb.delete_documents(["vault"], namespace="a")
    assert rb.search("vault code", top_k=1, namespace="b")[0].chunk_id == b.chunk_id
    with rb.store.env.begin() as txn:
        assert rb.store.kv.contains(txn, b.chunk_id) and not rb.store.kv.contains(txn, a.chunk_id)


def test_a_query_retrieves_and_loads_only_its_namespaces_kv(rb):
    answer = rb.query("What is the payroll password?", top_k=3, namespace="a", max_new_tokens=2)
    with rb.store.env.begin() as txn:
        owners = {rb.store.docs.get_chunk(txn, ref.chunk_id).namespace for ref in answer.chunks}
    assert owners == {"a"}


def test_a_hit_or_chunk_id_from_another_namespace_is_never_served(rb):
    foreign = rb.search("payroll password", top_k=1, namespace="b")[0]

    class LangChainDoc:  # what a retriever over namespace b returns
        page_content = foreign.text
        metadata = {"chunk_id": foreign.chunk_id, "doc_id": foreign.doc_id}

    fingerprint = rb.store.manifest.kv_fingerprint
    for context in (foreign, LangChainDoc()):
        answer = rb.query("What is the password?", contexts=[context], namespace="a", max_new_tokens=2)
        used = answer.chunks[0].chunk_id
        assert used != foreign.chunk_id  # b's record (its KV) was not read: the text was taken as a's own
        assert used == chunk_id(fingerprint, foreign.token_ids, "a")


def test_document_ids_are_per_namespace(rb):
    with pytest.raises(KeyError):
        rb.delete_documents(["b-secret"], namespace="a")
    with pytest.raises(KeyError):
        rb.pin(["b-secret"], namespace="a")
    rb.delete_documents(["vault"], namespace="b")
    assert "vault" in {h.doc_id for h in rb.search("vault code", top_k=2, namespace="a")}


def test_sessions_are_per_namespace(rb):
    chat = rb.chat("s1", namespace="a", create=True)
    chat.send("Where are the spare keys?", max_new_tokens=2)
    chat.wait()
    with pytest.raises(SessionNotFoundError):
        rb.chat("s1", namespace="b")
    assert rb.sessions(namespace="b") == [] and rb.sessions() == []
    assert not rb.end_session("s1", namespace="b")
    other = rb.chat("s1", namespace="b", create=True)  # the same id in b is another conversation
    assert other.turns == 0 and rb.chat("s1", namespace="a").turns == 1
    assert [s.id for s in rb.sessions(namespace="a")] == ["s1"]
    assert rb.end_session("s1", namespace="a") and rb.chat("s1", namespace="b").turns == 0


def test_a_sessions_turns_retrieve_from_its_namespace(rb):
    answer = rb.chat(namespace="a").send("What is the payroll password?", top_k=2, max_new_tokens=2)
    assert {ref.doc_id for ref in answer.chunks} <= {"vault", "a-only"}


def test_bad_namespaces_and_ids_are_refused(rb):
    for bad in ("a/b", " a", "x" * 65, "a\x1fb"):
        with pytest.raises(ValueError, match="namespace"):
            rb.search("keys", namespace=bad)
    with pytest.raises(ValueError, match="control character"):
        rb.add_documents([{"id": "x\x1fy", "text": "some text here"}], namespace="a")


def test_the_store_stays_consistent_across_namespaces(rb):
    assert rb.store.check() == []


def test_cli_ingests_and_queries_within_a_namespace(smollm_dir, tmp_path, capsys):
    model_dir = make_tiny_model_dir(tmp_path, "llama", smollm_dir)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "note.txt").write_text("Tenant C stores the ledger in the red safe.")
    main(["ingest", str(tmp_path / "docs"), "--store", str(tmp_path / "s"), "--model", str(model_dir),
          "--namespace", "c"])
    main(["query", "Where is the ledger?", "--store", str(tmp_path / "s"), "--model", str(model_dir),
          "--namespace", "c", "--max-new-tokens", "2"])
    printed = capsys.readouterr().out
    assert "note.txt" in printed
    assert "ttft=" in printed and "kv_hits=1 " in printed  # durations in ms, counts as counts
    with pytest.raises(SystemExit):  # the default namespace holds nothing to retrieve
        main(["query", "Where is the ledger?", "--store", str(tmp_path / "s"), "--model", str(model_dir)])
