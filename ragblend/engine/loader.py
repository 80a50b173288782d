"""Background layer loader: while layer l is computed, layer l+1's KV is read from the store and made ready.

"Ready" means converted to the compute dtype, placed at its prompt position and rotated with the
layer's RoPE (its type's table) for that position, in one [1, kv_heads, N, head_dim] tensor per K and V (suffix rows
left for the engine to fill).
"""
from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import lmdb
import torch

from kvchunks.chunk_kv import ChunkKV
from kvchunks.kvstore import StoredKV
from kvchunks.rope import rotate_in_place
from ragblend.engine.decode_cache import with_spare_rows

WARM_LAYERS = 4  # layers of every stored source asked for at once (round trips to a shared backend)

# Stored KV is read through zero-copy views (of LMDB's read-only pages, or Redis replies); only ever copied from.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass
class LoadStats:
    busy_s: float = 0.0  # time the loader spent reading and converting (off the critical path if hidden)
    exposed_s: float = 0.0  # time the engine waited for a layer (on the critical path)


KVSource = ChunkKV | StoredKV  # in memory (the prompt prefix, a RAM-tier turn) or on disk


class LayerLoader:
    def __init__(self, env: lmdb.Environment, sources: list[tuple[int, KVSource]], length: int, cos: torch.Tensor,
                 sin: torch.Tensor, num_layers: int, dtype: torch.dtype, device: torch.device, depth: int = 2,
                 rope_of_layer: Sequence[int] = ()):
        """`sources`: (prompt position, KV) pairs that tile [0, stored_len) in order; rows from
        stored_len to `length` are left for the engine to compute. cos/sin: [tables, length, head_dim]
        (FusionEngine.rotary); `rope_of_layer` gives each layer's table where there is more than one."""
        if cos.shape[0] > 1 and len(rope_of_layer) != num_layers:
            raise ValueError("a model with a RoPE per layer type needs rope_of_layer (FusionEngine.rope_of_layer)")
        self.env, self.sources, self.length = env, sources, length
        self.cos, self.sin = cos, sin
        self.rope_of_layer = tuple(rope_of_layer) or (0,) * num_layers
        self.num_layers, self.dtype, self.device = num_layers, dtype, device
        self.stats = LoadStats()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._thread = threading.Thread(target=self._run, name="ragblend-kv-loader", daemon=True)
        self._thread.start()

    def _stored_len(self) -> int:
        start, source = self.sources[-1]
        return start + (source.num_tokens if isinstance(source, ChunkKV) else self._metas[source].tokens)

    def _run(self) -> None:
        try:
            with self.env.begin(buffers=True) as txn:
                self._metas = {s: s.store.meta(txn, s.key) for _, s in self.sources if isinstance(s, StoredKV)}
                missing = [s.key for s, meta in self._metas.items() if meta is None]
                if missing:
                    raise KeyError(f"no KV stored for {missing}")
                by_store: dict[int, tuple] = {}  # stored chunks grouped by the store that holds them
                for source in self._metas:
                    by_store.setdefault(id(source.store), (source.store, []))[1].append(source.key)
                for layer in range(self.num_layers):
                    start = time.perf_counter()
                    if layer % WARM_LAYERS == 0:
                        for store, keys in by_store.values():
                            store.warm(txn, keys, range(layer, min(layer + WARM_LAYERS, self.num_layers)))
                    item = self._load_layer(txn, layer)
                    self.stats.busy_s += time.perf_counter() - start
                    self._queue.put(item)
        except BaseException as exc:  # surfaced to the engine thread by get()
            self._queue.put(exc)

    def _layer_of(self, txn: lmdb.Transaction, source: KVSource, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(source, ChunkKV):
            return source.keys[layer], source.values[layer]
        k, v = source.store.read_layer(txn, source.key, layer, self._metas[source])
        return torch.from_numpy(k), torch.from_numpy(v)

    def _load_layer(self, txn: lmdb.Transaction, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        first_k, _ = self._layer_of(txn, self.sources[0][1], layer)
        shape = (1, first_k.shape[0], self.length, first_k.shape[2])
        keys = with_spare_rows(shape, self.dtype, self.device)  # decode grows into the spare rows
        values = with_spare_rows(shape, self.dtype, self.device)
        stored = self._stored_len()
        keys[:, :, stored:] = 0  # rows the engine computes; every stored row is written below
        values[:, :, stored:] = 0
        for start, source in self.sources:
            k, v = self._layer_of(txn, source, layer)
            keys[0, :, start : start + k.shape[1]] = k.to(self.device)
            values[0, :, start : start + v.shape[1]] = v.to(self.device)
        table = self.rope_of_layer[layer]
        rotate_in_place(keys[:, :, :stored], self.cos[table:table + 1, :stored], self.sin[table:table + 1, :stored])
        return keys, values

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K (post-RoPE) and V; layers must be taken in order."""
        start = time.perf_counter()
        item = self._queue.get()
        self.stats.exposed_s += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Drain so the thread can finish (a query that failed mid-way must not leave it blocked)."""
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()
