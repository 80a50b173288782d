"""The unit every KV store holds: one token span's KV per layer, keys before RoPE (so a span can sit at
any position, and a conversation can be truncated without recompute)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvchunks.rope import unrotate


@dataclass
class ChunkKV:
    """KV of one token span, per layer: keys pre-RoPE, both [layers, kv_heads, n, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    @classmethod
    def from_rows(cls, layers: list[tuple[torch.Tensor, torch.Tensor]], start: int, end: int, cos: torch.Tensor,
                  sin: torch.Tensor, rope_of_layer: Sequence[int]) -> ChunkKV:
        """Rows [start, end) of per-layer cache tensors (batch 1, keys post-RoPE; `cos`/`sin` those rows'
        angles per RoPE table, [tables, rows, head_dim], and `rope_of_layer` each layer's table) as a stored
        span: keys back to pre-RoPE, fp16 on the CPU. Sessions' turns and the exact-path tree's nodes are cut
        from a prefill's cache by this one function."""
        keys = torch.stack([unrotate(k[0, :, start:end], cos[t:t + 1], sin[t:t + 1])
                            for (k, _), t in zip(layers, rope_of_layer)])
        values = torch.stack([v[0, :, start:end] for _, v in layers])
        return cls(keys.to("cpu", torch.float16), values.to("cpu", torch.float16))


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A decoder cache's (keys, values) per layer as they are now: a cache that grows later (decoding)
    replaces its tensors, so these stay the rows the prefill computed."""
    return [(layer.keys, layer.values) for layer in cache.layers]
