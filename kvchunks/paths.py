"""The exact-path tree: KV of chunk sequences computed in full context (RAGCache's knowledge tree, at
chunk granularity).

A node is an ordered sequence of chunk ids c1..cd (d >= 2) and holds the KV of its last chunk computed in
full context behind the prompt prefix and c1..c(d-1): keys pre-RoPE, in the chunk record format (KVStore
family "path"), so a path loads as history, as a session's earlier turns do. Depth 1 is the chunk's own
record (computed behind the prefix alone, which *is* a first chunk's full context), so the chunk store is
the tree's first level and no node copies it.

Exact: a node's rows are the rows full prefill of the same ordered prompt computes (stored in fp16 like
every chunk), so a request that loads c1..cd and computes the rest in full context answers as full prefill.
Invariant: a node's parent (d >= 3) is stored whenever the node is: eviction takes leaves first and
invalidation drops every node through a chunk, its descendants with it. Chunk ids carry their namespace and
the KV fingerprint, so tenants' paths never meet.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import lmdb

from kvchunks.chunk_kv import ChunkKV
from kvchunks.kvstore import KVStore, StoredKV, entries, family_bytes
from kvchunks.tiers import RamTier

DEFAULT_PATH_RAM_BYTES = 256 << 20
FAMILY = "path"  # the KVStore family of node records
NODES_DB = b"pathnodes"

# A token's recompute cost grows with the positions it attends to: per token, linear layers plus attention
# over `start` earlier tokens. At 6.1k tokens SmolLM2's attention is ~70% of a full layer's time
# (docs/benchmarks.md), i.e. attention equals the linear layers' cost at ~1.3k positions of context.
ATTENTION_TOKENS = 1300
CACHE_ORDER_LOOKUPS = 64  # node look-ups a cache-order walk may make (k <= 6 chunks needs far fewer)


def _scan(txn: lmdb.Transaction, db, prefix: bytes) -> list[tuple[bytes, bytes]]:
    """(key, value) of every record of `db` whose key starts with `prefix`, in key order."""
    found = []
    with txn.cursor(db=db) as cursor:
        if cursor.set_range(prefix):
            for key, raw in cursor:
                if not bytes(key).startswith(prefix):
                    break
                found.append((bytes(key), bytes(raw)))
    return found


def path_key(chunk_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(chunk_ids).encode()).hexdigest()[:40]


def recompute_cost(tokens: int, start: int) -> float:
    """What computing `tokens` tokens at prompt position `start` costs, in linear-layer token units."""
    return tokens * (1 + (start + tokens / 2) / ATTENTION_TOKENS)


@dataclass
class PathNode:
    chunks: list[str]
    start: int  # prompt position of its last chunk
    tokens: int  # tokens of its last chunk
    bytes: int
    hits: int = 0
    last_used: float = 0.0
    priority: float = 0.0  # GDSF: the eviction clock at its last use + (hits + 1) x cost / bytes

    @property
    def key(self) -> str:
        return path_key(self.chunks)

    @property
    def parent(self) -> str | None:
        return path_key(self.chunks[:-1]) if len(self.chunks) > 2 else None

    def value(self) -> float:
        return (self.hits + 1) * recompute_cost(self.tokens, self.start) / max(self.bytes, 1)


def usage(env: lmdb.Environment, txn: lmdb.Transaction) -> tuple[int, int]:
    """Nodes of every fingerprint and their KV bytes (a store's stats; read-only)."""
    return entries(env, txn, NODES_DB), family_bytes(env, txn, FAMILY)


class PathTree:
    def __init__(self, env: lmdb.Environment, fingerprint: str, dtype: str, ram_bytes: int = DEFAULT_PATH_RAM_BYTES):
        self.env, self.fingerprint = env, fingerprint
        self.kv = KVStore(env, fingerprint, family=FAMILY, dtype=dtype)
        self.nodes_db = env.open_db(NODES_DB)
        self.through_db = env.open_db(b"pathchunks")  # "chunk id/node key": which nodes pass through a chunk
        self.ram = RamTier(ram_bytes)
        self._uses: dict[str, float] = {}  # node key -> last use, written at the next flush
        self._hits: dict[str, int] = {}
        self._lock = threading.Lock()

    def _node_key(self, key: str) -> bytes:
        return f"{self.fingerprint}/{key}".encode()

    def node(self, txn: lmdb.Transaction, chunk_ids: Sequence[str]) -> PathNode | None:
        raw = txn.get(self._node_key(path_key(chunk_ids)), db=self.nodes_db)
        return None if raw is None else PathNode(**json.loads(bytes(raw)))

    def nodes(self, txn: lmdb.Transaction) -> list[PathNode]:
        return [PathNode(**json.loads(raw)) for _, raw in _scan(txn, self.nodes_db, f"{self.fingerprint}/".encode())]

    # ---- lookup ---------------------------------------------------------------------------------

    def depth(self, txn: lmdb.Transaction, chunk_ids: Sequence[str]) -> int:
        """How many leading chunks of `chunk_ids` the tree holds in full context: 1 (the first chunk's own
        record) plus every stored node below it."""
        depth = min(1, len(chunk_ids))
        while depth < len(chunk_ids) and self.node(txn, chunk_ids[: depth + 1]) is not None:
            depth += 1
        return depth

    def cache_order(self, txn: lmdb.Transaction, chunk_ids: Sequence[str]) -> list[str]:
        """`chunk_ids` reordered so the longest stored path through them comes first (the first such path in
        retrieval order among equals), the rest after it in their given order (CacheWeaver's greedy walk)."""
        budget = [CACHE_ORDER_LOOKUPS]

        def longest(path: list[str]) -> list[str]:
            best = path
            for chunk in chunk_ids:
                if chunk in path or budget[0] <= 0:
                    continue
                budget[0] -= 1
                if self.node(txn, [*path, chunk]) is not None:
                    found = longest([*path, chunk])
                    if len(found) > len(best):
                        best = found
            return best

        best: list[str] = []
        for first in chunk_ids:
            found = longest([first])
            if len(found) > max(len(best), 1):
                best = found
        head = best or list(chunk_ids[:1])
        return head + [c for c in chunk_ids if c not in head]

    def sources(self, chunk_ids: Sequence[str]) -> list[ChunkKV | StoredKV]:
        """The KV of nodes 2..d of a stored path, RAM tier first; the uses are noted."""
        keys = [path_key(chunk_ids[: d + 1]) for d in range(1, len(chunk_ids))]
        now = time.time()
        with self._lock:
            for key in keys:
                self._uses[key] = now
                self._hits[key] = self._hits.get(key, 0) + 1
        return [self.ram.get(key) or StoredKV(self.kv, key) for key in keys]

    # ---- writing --------------------------------------------------------------------------------

    def put(self, txn: lmdb.Transaction, chunk_ids: Sequence[str], start: int, kv: ChunkKV, clock: float) -> PathNode:
        """Store the node for `chunk_ids` (its parent must be stored, or be depth 1)."""
        node = PathNode(list(chunk_ids), start, kv.num_tokens, 0, last_used=time.time())
        node.bytes = self.kv.put(txn, node.key, kv)
        node.priority = clock + node.value()
        self._write(txn, node)
        for chunk in set(chunk_ids):
            txn.put(f"{chunk}/{node.key}".encode(), b"", db=self.through_db)
        self.ram.put(node.key, kv)
        return node

    def _write(self, txn: lmdb.Transaction, node: PathNode) -> None:
        txn.put(self._node_key(node.key), json.dumps(asdict(node)).encode(), db=self.nodes_db)

    def delete(self, txn: lmdb.Transaction, node: PathNode) -> None:
        self.kv.delete(txn, node.key)
        txn.delete(self._node_key(node.key), db=self.nodes_db)
        for chunk in set(node.chunks):
            txn.delete(f"{chunk}/{node.key}".encode(), db=self.through_db)
        self.ram.drop(node.key)

    def drop_through(self, txn: lmdb.Transaction, chunk_ids: Iterable[str]) -> int:
        """Delete every node whose sequence contains one of `chunk_ids` (a changed, deleted or expired
        chunk): descendants contain it too, so the parent invariant holds. The number deleted."""
        dropped = 0
        for chunk in set(chunk_ids):
            prefix = f"{chunk}/".encode()
            for key in [key[len(prefix):].decode() for key, _ in _scan(txn, self.through_db, prefix)]:
                raw = txn.get(self._node_key(key), db=self.nodes_db)
                if raw is not None:
                    self.delete(txn, PathNode(**json.loads(bytes(raw))))
                    dropped += 1
        return dropped

    # ---- uses -----------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._uses)

    def flush(self, txn: lmdb.Transaction, clock: float) -> int:
        """Write noted uses (hits, last use, GDSF priority at `clock`); the hits written."""
        with self._lock:
            uses, hits = self._uses, self._hits
            self._uses, self._hits = {}, {}
        for key, when in uses.items():
            raw = txn.get(self._node_key(key), db=self.nodes_db)
            if raw is None:  # evicted or invalidated since
                continue
            node = PathNode(**json.loads(bytes(raw)))
            node.hits += hits[key]
            node.last_used = max(node.last_used, when)
            node.priority = clock + node.value()
            self._write(txn, node)
        return sum(hits.values())
