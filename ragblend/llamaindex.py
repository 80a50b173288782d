"""LlamaIndex retriever and query engine over a RagBlend store (install the `llamaindex` extra).

`RagBlendRetriever` returns `NodeWithScore`s whose node id is the chunk id and whose metadata carries
`chunk_id`, `doc_id` and `score` (kept out of the text LlamaIndex shows an LLM or an embedder).
`RagBlendQueryEngine` answers with ragblend itself: it hands the retrieved nodes' text to
`rb.query(contexts=...)`, where the text of a stored chunk is that chunk again (chunk ids are content
hashes), so its stored KV is reused; nodes from any other LlamaIndex retriever work the same way.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

try:
    from llama_index.core.base.base_query_engine import BaseQueryEngine
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.base.response.schema import (
        RESPONSE_TYPE,
        AsyncStreamingResponse,
        Response,
        StreamingResponse,
    )
    from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
    from llama_index.core.schema import (
        MetadataMode,
        NodeRelationship,
        NodeWithScore,
        QueryBundle,
        RelatedNodeInfo,
        TextNode,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ragblend.llamaindex needs llama-index-core: pip install 'ragblend[llamaindex]'") from exc

from index.namespaces import DEFAULT_NAMESPACE
from ragblend.answer import Answer

RAGBLEND_KEYS = ["chunk_id", "doc_id", "score", "position"]
EMPTY_RESPONSE = "Empty Response"  # what LlamaIndex's synthesizers answer when nothing was retrieved


def _node(hit) -> NodeWithScore:
    """A SearchHit as LlamaIndex sees a retrieved chunk: its document is the node's source."""
    node = TextNode(id_=hit.chunk_id, text=hit.text,
                    metadata={**hit.metadata, "chunk_id": hit.chunk_id, "doc_id": hit.doc_id, "score": hit.score,
                              "position": hit.position},
                    excluded_llm_metadata_keys=RAGBLEND_KEYS, excluded_embed_metadata_keys=RAGBLEND_KEYS,
                    relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=hit.doc_id)})
    return NodeWithScore(node=node, score=hit.score)


def node_texts(nodes: list[NodeWithScore]) -> list[str]:
    """The passages to hand `rb.query(contexts=...)`: each node's text without its metadata."""
    return [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]


class RagBlendRetriever(BaseRetriever):
    """The `similarity_top_k` chunks of `namespace` most similar to the query (cosine), best first."""

    def __init__(self, ragblend, similarity_top_k: int = 4, namespace: str = DEFAULT_NAMESPACE,
                 callback_manager: CallbackManager | None = None, verbose: bool = False):
        if similarity_top_k < 1:
            raise ValueError(f"similarity_top_k must be >= 1, got {similarity_top_k}")
        super().__init__(callback_manager=callback_manager, verbose=verbose)
        self.ragblend, self.similarity_top_k, self.namespace = ragblend, similarity_top_k, namespace

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [_node(hit) for hit in self.ragblend.search(query_bundle.query_str, self.similarity_top_k, self.namespace)]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        # Embedding and FAISS search are CPU-bound: run them off the event loop.
        return await asyncio.to_thread(self._retrieve, query_bundle)


class RagBlendQueryEngine(BaseQueryEngine):
    """Retrieve (with `retriever`, by default a RagBlendRetriever over the same store) and answer with
    `rb.query` over the nodes' text. The Response carries the nodes as `source_nodes` and ragblend's
    numbers in `metadata` (mode, ttft_s, prompt_tokens, recomputed_tokens, timings); when streaming, the
    metadata is filled in once the last piece has been read. `query_kwargs` go to `rb.query` as they are
    (recompute_ratio, stop, seed...)."""

    def __init__(self, ragblend, similarity_top_k: int = 4, mode: str = "blend", max_new_tokens: int = 64,
                 temperature: float = 0.0, namespace: str = DEFAULT_NAMESPACE, streaming: bool = False,
                 retriever: BaseRetriever | None = None, callback_manager: CallbackManager | None = None,
                 **query_kwargs: Any):
        super().__init__(callback_manager=callback_manager)
        self.ragblend, self.streaming, self.namespace = ragblend, streaming, namespace
        self.query_kwargs = dict(mode=mode, max_new_tokens=max_new_tokens, temperature=temperature, **query_kwargs)
        self._retriever = retriever or RagBlendRetriever(ragblend, similarity_top_k, namespace, self.callback_manager)

    @property
    def retriever(self) -> BaseRetriever:
        return self._retriever

    def _get_prompt_modules(self) -> dict:
        return {}

    def retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self._retriever.retrieve(query_bundle)

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        with self.callback_manager.event(CBEventType.QUERY,
                                         payload={EventPayload.QUERY_STR: query_bundle.query_str}) as event:
            nodes = self.retrieve(query_bundle)
            response = self._answer(query_bundle.query_str, nodes)
            event.on_end(payload={EventPayload.RESPONSE: response})
        return response

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        with self.callback_manager.event(CBEventType.QUERY,
                                         payload={EventPayload.QUERY_STR: query_bundle.query_str}) as event:
            nodes = await self._retriever.aretrieve(query_bundle)
            response = await asyncio.to_thread(self._answer, query_bundle.query_str, nodes)
            if isinstance(response, StreamingResponse):
                response = AsyncStreamingResponse(_async_pieces(response.response_gen), response.source_nodes,
                                                  response.metadata)
            event.on_end(payload={EventPayload.RESPONSE: response})
        return response

    def _answer(self, question: str, nodes: list[NodeWithScore]) -> Response | StreamingResponse:
        if not nodes:
            return Response(EMPTY_RESPONSE, [], {})
        result = self.ragblend.query(question, contexts=node_texts(nodes), stream=self.streaming,
                                     namespace=self.namespace, **self.query_kwargs)
        if not self.streaming:
            return Response(result.text, nodes, _metadata(result))
        metadata: dict[str, Any] = {}
        return StreamingResponse(_pieces(result, metadata), nodes, metadata)


def _metadata(answer: Answer) -> dict[str, Any]:
    return {"mode": answer.mode, "ttft_s": answer.ttft_s, "prompt_tokens": answer.prompt_tokens,
            "recomputed_tokens": answer.recomputed_tokens, "timings": dict(answer.timings)}


def _pieces(stream, metadata: dict[str, Any]) -> Iterator[str]:
    """The stream's text pieces; at its end the answer's numbers go into `metadata`. Left early, the
    stream is closed with this generator (`yield from` closes it), so its decode slot is given back."""
    yield from stream
    metadata.update(_metadata(stream.answer))


async def _async_pieces(pieces: Iterator[str]) -> AsyncIterator[str]:
    """Each decode step on a worker thread, so the event loop keeps running between tokens. However the
    consumer stops (the end, a break, a cancelled task), the stream is closed once its current step is done
    (a generator cannot be closed while another thread runs it)."""
    done, lock = object(), threading.Lock()

    def step():
        with lock:
            return next(pieces, done)

    def close():
        with lock:
            pieces.close()

    try:
        while (piece := await asyncio.to_thread(step)) is not done:
            yield piece
    finally:
        await asyncio.to_thread(close)
