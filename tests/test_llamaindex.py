"""The LlamaIndex adapter: a real BaseRetriever and BaseQueryEngine whose answers are ragblend's own,
reusing the stored KV of the chunks they retrieved, and that LlamaIndex's own engines can build on."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")
from llama_index.core import SummaryIndex  # noqa: E402
from llama_index.core.base.base_query_engine import BaseQueryEngine  # noqa: E402
from llama_index.core.base.base_retriever import BaseRetriever  # noqa: E402
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse  # noqa: E402
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler  # noqa: E402
from llama_index.core.llms.mock import MockLLM  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode  # noqa: E402

from ragblend import RagBlend  # noqa: E402
from ragblend.llamaindex import RagBlendQueryEngine, RagBlendRetriever, node_texts  # noqa: E402

DOCS = [
    {"id": "bees", "text": "Honey bees live in hives and make honey from the nectar of flowers.",
     "metadata": {"source": "nature.txt"}},
    {"id": "tax", "text": "The tax code sets the rules for deductions on business income."},
    {"id": "ships", "text": "Container ships carry goods across the ocean between large ports."},
]
QUESTION = "Where do bees make honey?"
SAMPLE = dict(max_new_tokens=8, temperature=1.0, seed=1)  # the tiny random model answers greedily with blanks only


@pytest.fixture(scope="module")
def rb(tiny_model, embedder, tmp_path_factory) -> RagBlend:
    rb = RagBlend(tmp_path_factory.mktemp("li"), model=tiny_model, embedder=embedder)
    rb.add_documents(DOCS)
    rb.add_documents([{"id": "tenant-doc", "text": "Bees of tenant a nest in old walls."}], namespace="tenant-a")
    return rb


def test_retriever_is_a_llamaindex_base_retriever_returning_scored_chunks(rb):
    retriever = RagBlendRetriever(ragblend=rb, similarity_top_k=2)
    assert isinstance(retriever, BaseRetriever)
    nodes = retriever.retrieve(QUESTION)
    assert len(nodes) == 2 and all(isinstance(n, NodeWithScore) for n in nodes)
    best = nodes[0]
    assert best.node.metadata["doc_id"] == "bees" and best.node.ref_doc_id == "bees"
    assert best.node.node_id == best.node.metadata["chunk_id"]
    assert best.score == best.node.metadata["score"] >= nodes[1].score
    assert best.node.metadata["source"] == "nature.txt"  # the document's own metadata comes along
    # ragblend's bookkeeping stays out of the text an LLM or an embedder is shown
    assert "chunk_id" not in best.node.get_content(metadata_mode=MetadataMode.LLM)
    assert "source: nature.txt" in best.node.get_content(metadata_mode=MetadataMode.LLM)


def test_retriever_keeps_to_its_namespace(rb):
    nodes = RagBlendRetriever(ragblend=rb, similarity_top_k=4, namespace="tenant-a").retrieve(QUESTION)
    assert [n.node.metadata["doc_id"] for n in nodes] == ["tenant-doc"]


def test_async_retrieval_matches_sync_and_reports_to_callbacks(rb):
    debug = LlamaDebugHandler()
    retriever = RagBlendRetriever(ragblend=rb, similarity_top_k=2, callback_manager=CallbackManager([debug]))
    sync_nodes = retriever.retrieve("container shipping")
    async_nodes = asyncio.run(retriever.aretrieve("container shipping"))
    assert [n.node.node_id for n in async_nodes] == [n.node.node_id for n in sync_nodes]
    assert len(debug.get_event_pairs(CBEventType.RETRIEVE)) == 2


def test_query_engine_answers_as_ragblend_does_reusing_stored_kv(rb):
    engine = RagBlendQueryEngine(ragblend=rb, similarity_top_k=2, **SAMPLE)
    assert isinstance(engine, BaseQueryEngine)
    response = engine.query(QUESTION)
    assert isinstance(response, Response)
    assert response.response and response.response == rb.query(QUESTION, top_k=2, **SAMPLE).text
    assert [n.node.metadata["doc_id"] for n in response.source_nodes] == \
        [h.doc_id for h in rb.search(QUESTION, top_k=2)]
    meta = response.metadata
    assert meta["mode"] == "blend" and meta["ttft_s"] > 0 and meta["prompt_tokens"] > 0
    assert meta["timings"]["kv_hits"] == 2 and meta["timings"]["kv_misses"] == 0  # the nodes' text is the chunks


def test_query_engine_streams_and_fills_metadata_at_the_end(rb):
    whole = RagBlendQueryEngine(ragblend=rb, similarity_top_k=2, **SAMPLE, mode="full").query(QUESTION)
    streamed = RagBlendQueryEngine(ragblend=rb, similarity_top_k=2, **SAMPLE, mode="full",
                                   streaming=True).query(QUESTION)
    assert isinstance(streamed, StreamingResponse)
    assert len(streamed.source_nodes) == 2 and streamed.metadata == {}
    pieces = list(streamed.response_gen)
    assert whole.response and len(pieces) > 1 and "".join(pieces).strip() == whole.response  # answers are stripped
    assert streamed.metadata["mode"] == "full" and streamed.metadata["prompt_tokens"] == whole.metadata["prompt_tokens"]


def test_async_query_and_async_streaming(rb):
    engine = RagBlendQueryEngine(ragblend=rb, similarity_top_k=2, **SAMPLE)
    expected = engine.query(QUESTION).response

    async def both():
        answer = await engine.aquery(QUESTION)
        stream = await RagBlendQueryEngine(ragblend=rb, similarity_top_k=2, **SAMPLE,
                                           streaming=True).aquery(QUESTION)
        assert isinstance(stream, AsyncStreamingResponse)
        return answer.response, [piece async for piece in stream.async_response_gen()], stream.metadata

    answer, pieces, metadata = asyncio.run(both())
    assert expected and answer == "".join(pieces).strip() == expected
    assert metadata["timings"]["kv_hits"] == 2


def test_an_async_stream_left_early_leaves_the_engine_answering(rb):
    engine = RagBlendQueryEngine(ragblend=rb, similarity_top_k=2, **SAMPLE, streaming=True)

    async def leave_early():
        stream = await engine.aquery(QUESTION)
        pieces = stream.async_response_gen()
        first = await anext(pieces)
        await pieces.aclose()
        return first, stream.metadata, "".join([p async for p in (await engine.aquery(QUESTION)).async_response_gen()])

    first, metadata, whole = asyncio.run(leave_early())
    assert whole.strip().startswith(first.strip()) and metadata == {}  # never finished, so no numbers


def test_query_engine_reports_query_and_retrieve_events(rb):
    debug = LlamaDebugHandler()
    engine = RagBlendQueryEngine(ragblend=rb, similarity_top_k=2, max_new_tokens=4,
                                 callback_manager=CallbackManager([debug]))
    engine.query(QUESTION)
    assert len(debug.get_event_pairs(CBEventType.QUERY)) == 1
    assert len(debug.get_event_pairs(CBEventType.RETRIEVE)) == 1


def test_nodes_retrieved_elsewhere_are_answered_over_their_text(rb):
    """A LlamaIndex index that is not ragblend's retrieves; ragblend answers over its nodes' text."""
    passage = "The lighthouse of Varn was built in 1821 by the engineer Oda Pell."
    elsewhere = SummaryIndex([TextNode(text=passage, metadata={"file": "varn.md"})]).as_retriever()
    response = RagBlendQueryEngine(ragblend=rb, retriever=elsewhere, **SAMPLE).query("Who built it?")
    assert response.source_nodes[0].node.get_content() == passage
    assert node_texts(response.source_nodes) == [passage]  # no metadata in what is handed over
    assert response.response == rb.query("Who built it?", contexts=[passage], **SAMPLE).text


def test_a_retriever_query_engine_built_from_our_retriever(rb):
    """LlamaIndex's own engine and synthesizer over our nodes (MockLLM echoes the prompt it is given)."""
    engine = RetrieverQueryEngine.from_args(RagBlendRetriever(ragblend=rb, similarity_top_k=1), llm=MockLLM())
    response = engine.query(QUESTION)
    assert response.source_nodes[0].node.metadata["doc_id"] == "bees"
    assert DOCS[0]["text"] in str(response) and "chunk_id" not in str(response)


def test_nothing_retrieved_is_llamaindex_s_empty_response(rb):
    empty = RagBlendQueryEngine(ragblend=rb, namespace="nobody").query(QUESTION)
    assert empty.response == "Empty Response" and empty.source_nodes == []
