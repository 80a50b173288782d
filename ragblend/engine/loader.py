"""Background layer loader: while layer l is computed, layer l+1's KV is read from LMDB and made ready.

"Ready" means converted to the compute dtype, placed at its prompt position and rotated with the
model's RoPE for that position, in one [1, kv_heads, N, head_dim] tensor per K and V (suffix rows
left for the engine to fill).
"""
from __future__ import annotations

import queue
import threading
import time
import warnings
from dataclasses import dataclass

import lmdb
import torch

from kvchunks.kvstore import KVStore
from kvchunks.precompute import ChunkKV
from kvchunks.rope import rotate_in_place
from ragblend.engine.layout import PromptLayout

# Stored KV is read through zero-copy views of LMDB's read-only pages; it is only ever copied from.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass
class LoadStats:
    busy_s: float = 0.0  # time the loader spent reading and converting (off the critical path if hidden)
    exposed_s: float = 0.0  # time the engine waited for a layer (on the critical path)


class LayerLoader:
    def __init__(self, kv: KVStore, layout: PromptLayout, prefix: ChunkKV, cos: torch.Tensor, sin: torch.Tensor,
                 num_layers: int, dtype: torch.dtype, device: torch.device, depth: int = 2,
                 stored_spans: int | None = None):
        """`stored_spans`: how many spans (prefix first) to load; the rest of the prompt is computed."""
        self.kv, self.layout, self.prefix = kv, layout, prefix
        self.spans = layout.spans[: stored_spans if stored_spans is not None else len(layout.spans)]
        self.cos, self.sin = cos, sin
        self.num_layers, self.dtype, self.device = num_layers, dtype, device
        self.stats = LoadStats()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._thread = threading.Thread(target=self._run, name="ragblend-kv-loader", daemon=True)
        self._thread.start()

    @property
    def stored_len(self) -> int:
        return self.spans[-1].end

    def _run(self) -> None:
        try:
            with self.kv.env.begin(buffers=True) as txn:
                metas = {s.key: self.kv.meta(txn, s.key) for s in self.spans[1:]}
                missing = [key for key, meta in metas.items() if meta is None]
                if missing:
                    raise KeyError(f"no KV stored for chunks {missing}")
                for layer in range(self.num_layers):
                    start = time.perf_counter()
                    item = self._load_layer(txn, layer, metas)
                    self.stats.busy_s += time.perf_counter() - start
                    self._queue.put(item)
        except BaseException as exc:  # surfaced to the engine thread by get()
            self._queue.put(exc)

    def _load_layer(self, txn: lmdb.Transaction, layer: int, metas: dict) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.prefix.keys.shape[1], len(self.layout), self.prefix.keys.shape[3])
        keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        values = torch.empty(shape, dtype=self.dtype, device=self.device)
        keys[:, :, self.stored_len:] = 0  # rows the engine computes; every stored row is written below
        values[:, :, self.stored_len:] = 0
        prefix = self.spans[0]
        keys[0, :, : prefix.length] = self.prefix.keys[layer]
        values[0, :, : prefix.length] = self.prefix.values[layer]
        for span in self.spans[1:]:
            k, v = self.kv.read_layer(txn, span.key, layer, metas[span.key])
            keys[0, :, span.start : span.end] = torch.from_numpy(k).to(self.device)
            values[0, :, span.start : span.end] = torch.from_numpy(v).to(self.device)
        stored = keys[:, :, : self.stored_len]
        rotate_in_place(stored, self.cos[:, : self.stored_len], self.sin[:, : self.stored_len])
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
