"""Chunk KV present in the store: the one owner of "compute what is missing, put it, stay within budget".

Ingest (every new chunk), the request path (a chunk never stored, or evicted since), pin (documents whose KV
was evicted) and repair (a record that failed its checksum) all need chunk KV computed behind the store's
prompt prefix and written as the store writes it; they share this object rather than each repeating the
compute -> put -> budget sequence, so the rounding and eviction rules cannot drift apart between them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvchunks.chunk_kv import ChunkKV
from ragblend.engine.model import LoadedModel
from ragblend.engine.precompute import SpanComputer
from ragblend.storage.store import Store

FLUSH_USES = 256  # chunk uses noted in memory before they are written (one transaction for all of them)


class ChunkTokens(Protocol):
    """What computing a chunk's KV needs: its id and tokens (a ContextChunk, a stored ChunkRecord)."""

    chunk_id: str
    token_ids: Sequence[int]


class KVSupply:
    def __init__(self, store: Store, model: LoadedModel, prefix_ids: Sequence[int], max_batch_tokens: int = 4096):
        self.store = store
        self.spans = SpanComputer(model.decoder, prefix_ids, max_batch_tokens)

    def compute(self, token_lists: Sequence[Sequence[int]]) -> list[ChunkKV]:
        """Chunks' KV behind the prompt prefix, as computed (what is put in the store)."""
        return self.spans.compute([list(t) for t in token_lists]) if token_lists else []

    def as_stored(self, chunks: Sequence[ChunkTokens]) -> list[ChunkKV]:
        """Chunks' KV computed here, rounded as the store's codec would round it: the answer is the one a
        load would have given (when the store cannot be written)."""
        return [self.store.kv.as_stored(kv) for kv in self.compute([c.token_ids for c in chunks])]

    def ensure(self, chunks: Sequence[ChunkTokens]) -> int:
        """Compute and store the KV of chunks the store lacks (never stored, or evicted), so the next
        request reuses it; the number computed. Then keep the store within its budget, sparing these."""
        with self.store.env.begin() as txn:
            missing = {c.chunk_id: c for c in chunks if not self.store.kv.contains(txn, c.chunk_id)}
        budget = self.store.budget
        budget.used([c.chunk_id for c in chunks if c.chunk_id not in missing], missing)
        if not missing:
            if budget.pending >= FLUSH_USES:
                self.store.enforce_budget()
            return 0
        kvs = self.compute([c.token_ids for c in missing.values()])
        with self.store.env.begin(write=True) as txn:
            for chunk_id, kv in zip(missing, kvs):
                self.store.kv.put(txn, chunk_id, kv)
            self.store.enforce_budget({c.chunk_id for c in chunks}, txn)
        return len(missing)

    def repair(self, damaged: str, chunks: Sequence[ChunkTokens]) -> int:
        """Drop a record that failed its check and compute it again (with any other of `chunks` missing);
        the number computed."""
        with self.store.env.begin(write=True) as txn:
            self.store.kv.delete(txn, damaged)
        return self.ensure(chunks)
