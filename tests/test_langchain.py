"""The LangChain adapter is a real BaseRetriever whose Documents feed back into query() without re-work."""
from __future__ import annotations

import asyncio

import pytest

langchain_core = pytest.importorskip("langchain_core")
from langchain_core.retrievers import BaseRetriever  # noqa: E402

from ragblend import RagBlend  # noqa: E402
from ragblend.langchain import RagBlendRetriever  # noqa: E402

DOCS = [
    {"id": "bees", "text": "Honey bees live in hives and make honey from the nectar of flowers."},
    {"id": "tax", "text": "The tax code sets the rules for deductions on business income."},
    {"id": "ships", "text": "Container ships carry goods across the ocean between large ports."},
]


@pytest.fixture(scope="module")
def rb(tiny_model, embedder, tmp_path_factory) -> RagBlend:
    rb = RagBlend(tmp_path_factory.mktemp("lc"), model=tiny_model, embedder=embedder)
    rb.add_documents(DOCS)
    return rb


def test_retriever_is_a_langchain_base_retriever_returning_scored_chunks(rb):
    retriever = RagBlendRetriever(ragblend=rb, k=2)
    assert isinstance(retriever, BaseRetriever)
    docs = retriever.invoke("Where do bees make honey?")
    assert len(docs) == 2
    assert docs[0].metadata["doc_id"] == "bees"
    assert {"chunk_id", "doc_id", "score"} <= set(docs[0].metadata)
    assert docs[0].metadata["score"] >= docs[1].metadata["score"]


def test_async_retrieval_matches_sync(rb):
    retriever = RagBlendRetriever(ragblend=rb, k=2)
    sync_docs = retriever.invoke("container shipping")
    async_docs = asyncio.run(retriever.ainvoke("container shipping"))
    assert [d.metadata["chunk_id"] for d in async_docs] == [d.metadata["chunk_id"] for d in sync_docs]


def test_retrieved_documents_reuse_their_stored_kv_in_query(rb):
    docs = RagBlendRetriever(ragblend=rb, k=2).invoke("Where do bees make honey?")
    hits = rb.search("Where do bees make honey?", top_k=2)
    embeds_before = rb.embedder.model  # same embedder object; count calls through a forward hook
    calls = []
    handle = embeds_before[0].auto_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        via_docs = rb.prefill("Where do bees make honey?", contexts=docs, mode="reuse")
    finally:
        handle.remove()
    assert calls == []  # no re-embedding
    assert [c.chunk_id for c in via_docs.chunks] == [h.chunk_id for h in hits]
    assert [c.token_ids for c in via_docs.chunks] == [tuple(h.token_ids) for h in hits]
