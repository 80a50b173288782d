"""One byte budget over the chunk KV records and the exact-path tree's nodes (kvchunks.paths).

Only KV is evicted. A chunk's text, tokens and embedding stay, so a query that retrieves an evicted
chunk recomputes its KV (a miss) and stores it again: nothing the index can return is lost. Uses are
noted in memory and written with the counters in one transaction per flush, never one per hit.

What goes first (`policy`): "pgdsf" (default), RAGCache's prefix-aware Greedy-Dual-Size-Frequency: an
entry's priority is the eviction clock at its last use plus (hits + 1) x the compute it saves / its bytes,
so frequently used spans that are dear to recompute (deep in the prompt) stay; the clock rises to each
evicted priority, so entries unused for long age out. "lru": least recently used first. Under both, a
path node never goes before its children (a node is loadable only behind its parent).
"""
from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterable

import lmdb

from kvchunks.kvstore import KVStore
from kvchunks.paths import PathTree, recompute_cost

COUNTERS = ("kv_hits", "kv_misses", "evictions", "path_hits", "path_hit_tokens")
POLICIES = ("pgdsf", "lru")
USE = struct.Struct("<dQd")  # a chunk's last use, hits, priority (records of 8 bytes: last use alone)
LOW_WATER = 0.9  # an eviction frees down to this share of the budget, so the next misses need none


class PinnedOverBudgetError(ValueError):
    """Pinned chunks alone need more bytes than the KV budget allows."""


class KVBudget:
    def __init__(self, env: lmdb.Environment, kv: KVStore, meta_db, paths: PathTree | None = None,
                 policy: str = "pgdsf"):
        if policy not in POLICIES:
            raise ValueError(f"kv_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.env, self.kv, self.meta_db, self.paths, self.policy = env, kv, meta_db, paths, policy
        try:
            self.lru_db = env.open_db(b"kvlru")
        except lmdb.Error:  # a read-only open of a store that never recorded a use
            self.lru_db = None
        self._uses: dict[str, tuple[float, int]] = {}  # chunk id -> (last use, uses since the last flush)
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
                self._use(chunk_id, now)
                self._counts["kv_hits"] += 1
            for chunk_id in misses:
                self._use(chunk_id, now)
                self._counts["kv_misses"] += 1

    def path_used(self, tokens: int) -> None:
        """Note a request that loaded `tokens` tokens of exact path (depth >= 2) from the tree."""
        with self._lock:
            self._counts["path_hits"] += 1
            self._counts["path_hit_tokens"] += tokens

    def _use(self, chunk_id: str, now: float) -> None:
        self._uses[chunk_id] = (now, self._uses.get(chunk_id, (now, 0))[1] + 1)

    @property
    def pending(self) -> int:
        return len(self._uses) + (self.paths.pending if self.paths else 0)

    def flush(self, txn: lmdb.Transaction) -> None:
        with self._lock:
            uses, counts = self._uses, self._counts
            self._uses, self._counts = {}, dict.fromkeys(COUNTERS, 0)
        clock = self.clock(txn)
        for chunk_id, (when, count) in uses.items():
            meta = self.kv.meta(txn, chunk_id)
            if meta is None:
                continue
            hits = self._record(txn, chunk_id)[1] + count
            priority = clock + hits * recompute_cost(meta.tokens, 0) / meta.payload_bytes
            txn.put(chunk_id.encode(), USE.pack(when, hits, priority), db=self.lru_db)
        if self.paths is not None:
            self.paths.flush(txn, clock)
        for name, delta in counts.items():
            self._add(txn, name, delta)

    def clock(self, txn: lmdb.Transaction) -> float:
        raw = txn.get(b"kv_clock", db=self.meta_db)
        return 0.0 if raw is None else float(raw)

    def _add(self, txn: lmdb.Transaction, name: str, delta: int) -> None:
        if delta:
            total = int(txn.get(name.encode(), db=self.meta_db) or 0) + delta
            txn.put(name.encode(), str(total).encode(), db=self.meta_db)

    def _record(self, txn: lmdb.Transaction, chunk_id: str) -> tuple[float, int, float]:
        """(last use, hits, priority) of a chunk; (0, 0, 0) for one never used."""
        raw = None if self.lru_db is None else txn.get(chunk_id.encode(), db=self.lru_db)
        if raw is None:
            return 0.0, 0, 0.0
        if len(raw) == 8:  # written before hits were counted
            return struct.unpack("<d", bytes(raw))[0], 0, 0.0
        return USE.unpack(bytes(raw))

    def last_used(self, txn: lmdb.Transaction, chunk_id: str) -> float:
        return self._record(txn, chunk_id)[0]

    def forget(self, txn: lmdb.Transaction, chunk_id: str) -> None:
        if self.lru_db is not None:
            txn.delete(chunk_id.encode(), db=self.lru_db)

    # ---- eviction -------------------------------------------------------------------------------

    def used_bytes(self, txn: lmdb.Transaction) -> int:
        return self.kv.payload_bytes(txn) + (self.paths.kv.payload_bytes(txn) if self.paths else 0)

    def _rank(self, last_used: float, priority: float) -> float:
        return last_used if self.policy == "lru" else priority

    def enforce(self, txn: lmdb.Transaction, pinned_chunks: Callable[[], set[str]],
                protect: set[str] = frozenset()) -> list[str]:
        """Flush uses; over budget, evict the lowest-ranked KV (never pinned chunks, never `protect`ed chunk
        ids or path keys, never a node before its children) down to LOW_WATER of it; the evicted chunk ids
        and path keys. Within budget this reads two counters."""
        self.flush(txn)
        limit = self.max_bytes(txn)
        if limit is None or self.used_bytes(txn) <= limit:
            return []
        sizes = {chunk_id: self.kv.meta(txn, chunk_id).payload_bytes for chunk_id in self.kv.chunk_ids(txn)}
        pinned = pinned_chunks()
        pinned_bytes = sum(b for c, b in sizes.items() if c in pinned)
        if pinned_bytes > limit:
            raise PinnedOverBudgetError(f"pinned chunks hold {pinned_bytes:,} bytes of KV, over the budget of "
                                        f"{limit:,}; raise kv_max_bytes or unpin documents")
        total = self.used_bytes(txn)
        victims = self._chunk_victims(txn, sizes, pinned | set(protect)) + self._node_victims(txn, protect)
        evicted, clock = [], self.clock(txn)
        for rank, _depth, key, size, node in sorted(victims, key=lambda v: (v[0], -v[1])):
            if total <= limit * LOW_WATER:
                break
            if node is None:
                self.kv.delete(txn, key)
                self.forget(txn, key)
            else:
                self.paths.delete(txn, node)
            total -= size
            evicted.append(key)
            clock = max(clock, rank)
        if self.policy == "pgdsf":
            txn.put(b"kv_clock", repr(clock).encode(), db=self.meta_db)
        self._add(txn, "evictions", len(evicted))
        return evicted

    def _chunk_victims(self, txn: lmdb.Transaction, sizes: dict[str, int], keep: set[str]) -> list[tuple]:
        victims = []
        for chunk_id, size in sizes.items():
            if chunk_id not in keep:
                last_used, _, priority = self._record(txn, chunk_id)
                victims.append((self._rank(last_used, priority), 1, chunk_id, size, None))
        return victims

    def _node_victims(self, txn: lmdb.Transaction, protect: set[str]) -> list[tuple]:
        """Nodes ranked no higher than any descendant, so sorting by (rank, -depth) evicts children first;
        a node with a protected descendant is not a candidate."""
        if self.paths is None:
            return []
        nodes = {n.key: n for n in self.paths.nodes(txn)}
        rank = {k: self._rank(n.last_used, n.priority) for k, n in nodes.items()}
        blocked = set(protect) & set(nodes)
        for node in sorted(nodes.values(), key=lambda n: -len(n.chunks)):  # deepest first: children before parents
            parent = node.parent
            if parent in nodes:
                rank[parent] = max(rank[parent], rank[node.key])
                if node.key in blocked:
                    blocked.add(parent)
        return [(rank[k], len(n.chunks), k, n.bytes, n) for k, n in nodes.items() if k not in blocked]
