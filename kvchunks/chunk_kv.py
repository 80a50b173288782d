"""The unit every KV store holds: one token span's KV per layer, keys before RoPE (so a span can sit at
any position, and a conversation can be truncated without recompute)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkKV:
    """KV of one token span, per layer: keys pre-RoPE, both [layers, kv_heads, n, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]
