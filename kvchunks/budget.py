"""A byte budget over the chunk KV records: the least recently used unpinned chunks lose their KV first.

Only KV is evicted. A chunk's text, tokens and embedding stay, so a query that retrieves an evicted
chunk recomputes its KV (a miss) and stores it again: nothing the index can return is lost. Uses are
noted in memory and written with the counters in one transaction per flush, never one per hit.
"""
from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterable

import lmdb

from kvchunks.kvstore import KVStore

COUNTERS = ("kv_hits", "kv_misses", "evictions")
LOW_WATER = 0.9  # an eviction frees down to this share of the budget, so the next misses need none


class PinnedOverBudgetError(ValueError):
    """Pinned chunks alone need more bytes than the KV budget allows."""


class KVBudget:
    def __init__(self, env: lmdb.Environment, kv: KVStore, meta_db):
        self.env, self.kv, self.meta_db = env, kv, meta_db
        try:
            self.lru_db = env.open_db(b"kvlru")
        except lmdb.Error:  # a read-only open of a store that never recorded a use
            self.lru_db = None
        self._uses: dict[str, float] = {}
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()

    # ---- settings and counters, kept in the store's meta database --------------------------------

    def max_bytes(self, txn: lmdb.Transaction) -> int | None:
        raw = txn.get(b"kv_max_bytes", db=self.meta_db)
        return None if raw is None else int(raw)

    def set_max_bytes(self, txn: lmdb.Transaction, max_bytes: int | None) -> None:
        if max_bytes is None:
            txn.delete(b"kv_max_bytes", db=self.meta_db)
        elif max_bytes < 0:
            raise ValueError(f"kv_max_bytes must be >= 0, got {max_bytes}")
        else:
            txn.put(b"kv_max_bytes", str(max_bytes).encode(), db=self.meta_db)

    def counters(self, txn: lmdb.Transaction) -> dict[str, int]:
        """Totals over the store's life: what is flushed plus what this process has not flushed yet."""
        with self._lock:
            pending = dict(self._counts)
        return {name: int(txn.get(name.encode(), db=self.meta_db) or 0) + pending[name] for name in COUNTERS}

    # ---- uses -----------------------------------------------------------------------------------

    def used(self, hits: Iterable[str], misses: Iterable[str] = ()) -> None:
        """Note chunks a request loaded (hits) or had to compute (misses); written at the next flush."""
        now = time.time()
        with self._lock:
            for chunk_id in hits:
                self._uses[chunk_id] = now
                self._counts["kv_hits"] += 1
            for chunk_id in misses:
                self._uses[chunk_id] = now
                self._counts["kv_misses"] += 1

    @property
    def pending(self) -> int:
        return len(self._uses)

    def flush(self, txn: lmdb.Transaction) -> None:
        with self._lock:
            uses, counts = self._uses, self._counts
            self._uses, self._counts = {}, dict.fromkeys(COUNTERS, 0)
        for chunk_id, when in uses.items():
            txn.put(chunk_id.encode(), struct.pack("<d", when), db=self.lru_db)
        for name, delta in counts.items():
            self._add(txn, name, delta)

    def _add(self, txn: lmdb.Transaction, name: str, delta: int) -> None:
        if delta:
            total = int(txn.get(name.encode(), db=self.meta_db) or 0) + delta
            txn.put(name.encode(), str(total).encode(), db=self.meta_db)

    def last_used(self, txn: lmdb.Transaction, chunk_id: str) -> float:
        raw = None if self.lru_db is None else txn.get(chunk_id.encode(), db=self.lru_db)
        return 0.0 if raw is None else struct.unpack("<d", bytes(raw))[0]

    def forget(self, txn: lmdb.Transaction, chunk_id: str) -> None:
        if self.lru_db is not None:
            txn.delete(chunk_id.encode(), db=self.lru_db)

    # ---- eviction -------------------------------------------------------------------------------

    def _sizes(self, txn: lmdb.Transaction) -> dict[str, int]:
        return {chunk_id: self.kv.meta(txn, chunk_id).payload_bytes for chunk_id in self.kv.chunk_ids(txn)}

    def enforce(self, txn: lmdb.Transaction, pinned_chunks: Callable[[], set[str]],
                protect: set[str] = frozenset()) -> list[str]:
        """Flush uses; over budget, drop the KV of least recently used chunks (never pinned or `protect`ed
        ones) down to LOW_WATER of it; the evicted chunk ids. Within budget this reads one counter."""
        self.flush(txn)
        limit = self.max_bytes(txn)
        if limit is None or self.kv.payload_bytes(txn) <= limit:
            return []
        sizes, pinned = self._sizes(txn), pinned_chunks()
        total = sum(sizes.values())
        pinned_bytes = sum(b for c, b in sizes.items() if c in pinned)
        if pinned_bytes > limit:
            raise PinnedOverBudgetError(f"pinned chunks hold {pinned_bytes:,} bytes of KV, over the budget of "
                                        f"{limit:,}; raise kv_max_bytes or unpin documents")
        candidates = sorted((self.last_used(txn, c), c) for c in sizes if c not in pinned and c not in protect)
        evicted = []
        for _, chunk_id in candidates:
            if total <= limit * LOW_WATER:
                break
            self.kv.delete(txn, chunk_id)
            self.forget(txn, chunk_id)
            total -= sizes[chunk_id]
            evicted.append(chunk_id)
        self._add(txn, "evictions", len(evicted))
        return evicted
