"""The RAM tier: a byte-bounded, least-recently-used map of KV spans held above their disk records.

Entries are only ever copies of what disk (or the caller) already holds, so evicting one writes nothing.
Entries a queued request will need can be protected: eviction passes over them until released.
"""
from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable

from kvchunks.chunk_kv import ChunkKV


def kv_bytes(kv: ChunkKV) -> int:
    return kv.keys.numel() * kv.keys.element_size() + kv.values.numel() * kv.values.element_size()


class RamTier:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"RAM tier budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict[str, ChunkKV] = OrderedDict()
        self._protected: Counter[str] = Counter()  # key -> queued requests that need it
        self._lock = threading.Lock()

    def get(self, key: str) -> ChunkKV | None:
        with self._lock:
            kv = self._entries.get(key)
            if kv is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return kv

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def put(self, key: str, kv: ChunkKV) -> None:
        """Keep `kv` as the most recent entry, evicting the least recent unprotected ones to stay in
        budget; an entry that does not fit beside the protected ones is not kept."""
        size = kv_bytes(kv)
        with self._lock:
            self._pop(key)
            protected = sum(kv_bytes(self._entries[k]) for k in self._protected if k in self._entries)
            if size + protected > self.max_bytes:
                return  # evicting everything evictable would still not make room: evict nothing
            if self.bytes + size > self.max_bytes:
                for victim in [k for k in self._entries if k not in self._protected]:
                    self._pop(victim)
                    self.evictions += 1
                    if self.bytes + size <= self.max_bytes:
                        break
            self._entries[key] = kv
            self.bytes += size

    def protect(self, keys: Iterable[str]) -> None:
        """Exempt `keys` from eviction until as many `release` calls (a queued request needs them)."""
        with self._lock:
            self._protected.update(keys)

    def release(self, keys: Iterable[str]) -> None:
        with self._lock:
            self._protected.subtract(keys)
            self._protected = +self._protected  # drop keys no request needs any more

    def drop(self, key: str) -> None:
        with self._lock:
            self._pop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def _pop(self, key: str) -> None:
        kv = self._entries.pop(key, None)
        if kv is not None:
            self.bytes -= kv_bytes(kv)
