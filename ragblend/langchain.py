"""LangChain retriever over a RagBlend store (install the `langchain` extra).

Returned Documents carry `chunk_id`, `doc_id` and `score` in metadata, so passing them back as
`rb.query(q, contexts=docs)` reuses their stored KV without re-embedding or re-tokenising.
"""
from __future__ import annotations

import asyncio
from typing import Any

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ragblend.langchain needs langchain-core: pip install 'ragblend[langchain]'") from exc

from pydantic import ConfigDict, Field


class RagBlendRetriever(BaseRetriever):
    ragblend: Any = Field(description="a ragblend.RagBlend instance")
    k: int = Field(default=4, ge=1)
    namespace: str = Field(default="", description="the tenant namespace to retrieve from")

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [
            Document(page_content=hit.text, metadata={**hit.metadata, "chunk_id": hit.chunk_id, "doc_id": hit.doc_id,
                                                      "score": hit.score, "position": hit.position})
            for hit in self.ragblend.search(query, top_k=self.k, namespace=self.namespace)
        ]

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun) -> list[Document]:
        # Embedding and FAISS search are CPU-bound: run them off the event loop.
        return await asyncio.to_thread(self._get_relevant_documents, query, run_manager=run_manager.get_sync())
