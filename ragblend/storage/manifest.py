"""What a store's contents depend on (model, prompt, embedder, chunking), and the error for a mismatch.

Below the store and every record family in it (documents, chunk KV, session turns), which all check it.
"""
from __future__ import annotations

from dataclasses import dataclass

FORMAT_VERSION = 1


class StoreMismatchError(ValueError):
    """The store was built with another model, prompt, embedder or chunk size than the one asked for."""


@dataclass(frozen=True)
class Manifest:
    """What a store's contents depend on; fixed when the first document is ingested."""

    kv_fingerprint: str
    model: str
    embedder_fingerprint: str
    embedder: str
    embedding_dim: int
    chunk_tokens: int
    index_kind: str
    format_version: int = FORMAT_VERSION
    kv_dtype: str = "float16"  # how chunk KV records are encoded (kvchunks.codecs)
