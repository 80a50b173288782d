"""The public entry point: `RagBlend(store_dir, model=..., embedder=...)`."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from index.embedder import Embedder
from kvchunks.chunking import validate_chunk_tokens
from ragblend.documents import Document, coerce_document
from ragblend.ingest import Ingestor, IngestReport
from ragblend.model import LoadedModel, load_model
from ragblend.prompt import PromptTemplate
from ragblend.store import Manifest, Store

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: every model is local

DEFAULT_CHUNK_TOKENS = 256


@dataclass
class SearchHit:
    chunk_id: str
    doc_id: str
    score: float
    text: str
    token_ids: list[int] = field(repr=False)
    position: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


class RagBlend:
    """A store of documents with precomputed per-chunk KV, and a model to answer questions over it."""

    def __init__(self, store_dir: str | Path, model: str | Path | LoadedModel | None = None,
                 embedder: str | Path | Embedder | None = None, *, chunk_tokens: int | None = None,
                 index_kind: str | None = None, device: str | None = None):
        self.store = Store(store_dir)
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device=device)
        self.embedder = embedder if isinstance(embedder, Embedder) else Embedder(embedder)
        self.template = PromptTemplate.for_tokenizer(self.model.tokenizer)
        existing = self.store.manifest
        chunk_tokens = chunk_tokens or (existing.chunk_tokens if existing else DEFAULT_CHUNK_TOKENS)
        validate_chunk_tokens(chunk_tokens, self.model.max_positions)
        self.store.bind(Manifest(
            kv_fingerprint=self.template.fingerprint(self.model.fingerprint), model=self.model.name,
            embedder_fingerprint=self.embedder.fingerprint, embedder=self.embedder.name,
            embedding_dim=self.embedder.dim, chunk_tokens=chunk_tokens,
            index_kind=index_kind or (existing.index_kind if existing else "flat"),
        ))
        self.ingestor = Ingestor(self.store, self.model, self.template, self.embedder, chunk_tokens)

    def add_documents(self, docs: Iterable[str | dict | Document], progress: bool = False) -> list[str]:
        """Ingest documents (strings, dicts with `text` and optional `id`/`metadata`); returns their ids."""
        documents = [coerce_document(d, f"document {i}") for i, d in enumerate(docs)]
        self.ingest(documents, progress=progress)
        return [d.id for d in documents]

    def ingest(self, documents: list[Document], progress: bool = True) -> IngestReport:
        return self.ingestor.ingest(documents, progress=progress)

    def delete_documents(self, ids: Iterable[str]) -> None:
        self.ingestor.delete(list(ids))

    def search(self, question: str, top_k: int = 4) -> list[SearchHit]:
        """The `top_k` chunks most similar to `question` (cosine), best first."""
        if not question or not question.strip():
            raise ValueError("question must be a non-empty string")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        found = self.store.index.search(self.embedder.embed([question])[0], top_k)
        hits = []
        with self.store.env.begin() as txn:
            for vid, score in found:
                record = self.store.docs.chunk_for_vector(txn, vid)
                if record is None or not record.refs:
                    continue
                doc = self.store.docs.get_doc(txn, record.doc_id)
                hits.append(SearchHit(record.chunk_id, record.doc_id, score, record.text, record.token_ids,
                                      record.position, doc.metadata if doc else {}))
        return hits

    def stats(self):
        return self.store.stats()
