"""The RAM tier: a byte-bounded, least-recently-used map of KV spans held above their disk records.

Entries are only ever copies of what disk (or the caller) already holds, so evicting one writes nothing.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from kvchunks.precompute import ChunkKV


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
        """Keep `kv` as the most recent entry, evicting the least recent ones to stay in budget;
        an entry larger than the whole budget is not kept."""
        size = kv_bytes(kv)
        with self._lock:
            self._pop(key)
            if size > self.max_bytes:
                return
            while self.bytes + size > self.max_bytes:
                self._pop(next(iter(self._entries)))
                self.evictions += 1
            self._entries[key] = kv
            self.bytes += size

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
