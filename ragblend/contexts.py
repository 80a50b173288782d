"""Turning what a caller passes as context (strings, search hits, LangChain Documents) into stored chunks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvchunks.chunking import chunk_id, split_document


@dataclass(frozen=True)
class ContextChunk:
    chunk_id: str
    token_ids: tuple[int, ...]
    text: str
    doc_id: str | None = None
    score: float | None = None


def from_hit(hit: Any) -> ContextChunk:
    """A SearchHit: its stored token ids are fed as they are."""
    return ContextChunk(hit.chunk_id, tuple(hit.token_ids), hit.text, hit.doc_id, hit.score)


def from_text(text: str, encode, kv_fingerprint: str, max_tokens: int, doc_id: str | None = None,
              namespace: str = "") -> list[ContextChunk]:
    """A caller's passage, chunked like a document so its KV can be cached (in the caller's namespace)
    and reused next time."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("every context passage must be a non-empty string")
    chunks = []
    for piece in split_document(text, encode, max_tokens):
        ids = tuple(encode(piece))
        chunks.append(ContextChunk(chunk_id(kv_fingerprint, ids, namespace), ids, piece, doc_id))
    return chunks
