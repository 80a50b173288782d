"""Per-chunk KV precompute: each chunk prefilled alone behind the fixed prompt prefix.

Keys are recorded before rotary position embedding (after the q/k norm where the family has one), so
the online path can place a chunk at any position (and a conversation can be truncated later) without
invalidating it. Values are position-free already. The spans run through the model's one layer
definition (engine/transformer.py) as rows behind the prefix's stored KV, right-padded into one batch:
a row never sees the padding after it, so a span's KV is the same alone or batched.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kvchunks.chunk_kv import ChunkKV
from kvchunks.rope import apply_rope
from ragblend.engine.attention import RowPlan
from ragblend.engine.transformer import RowsOverCache, Transformer


class PrefixCaches:
    """Per-layer caches for a batch of spans behind `prefix`: its keys rotated to positions 0..P-1 with
    the layer's RoPE, the rows after them for the spans. Each layer's is built when the layer asks for it
    and dropped with the next, so a batch holds one layer's cache at a time."""

    def __init__(self, decoder: Transformer, prefix: ChunkKV | None, batch: int, length: int,
                 cos: torch.Tensor, sin: torch.Tensor):
        self.decoder, self.prefix, self.batch, self.length = decoder, prefix, batch, length
        self.cos, self.sin = cos, sin

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight, layer = self.decoder.embed_tokens.weight, self.decoder.layers[index]
        shape = (self.batch, layer.kv_heads, self.length, self.decoder.head_dim)
        keys = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        values = torch.empty_like(keys)
        if self.prefix is not None:
            count, table = self.prefix.num_tokens, layer.rope
            rotated = apply_rope(self.prefix.keys[index].to(keys), self.cos[table, :count], self.sin[table, :count])
            keys[:, :, :count] = rotated
            values[:, :, :count] = self.prefix.values[index].to(values)
        return keys, values


@torch.inference_mode()
def compute_kv(decoder: Transformer, token_batches: Sequence[Sequence[int]], prefix: ChunkKV | None) -> list[ChunkKV]:
    """KV of each token list, prefilled in isolation behind `prefix` (right-padded into one batch)."""
    device = decoder.embed_tokens.weight.device
    lengths = [len(ids) for ids in token_batches]
    width, start = max(lengths), prefix.num_tokens if prefix is not None else 0
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
    for row, ids in enumerate(token_batches):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    positions = torch.arange(start + width, device=device)
    cos, sin = decoder.rope(positions)
    caches = PrefixCaches(decoder, prefix, len(lengths), start + width, cos, sin)
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    decoder(input_ids, cos[:, start:], sin[:, start:], RowsOverCache(RowPlan(positions[start:]), caches, captured))
    keys = torch.stack([k for k, _ in captured], dim=1)  # [b, L, h, s, d]
    values = torch.stack([v for _, v in captured], dim=1)
    return [ChunkKV(keys[row, :, :, :n].clone(), values[row, :, :, :n].clone()) for row, n in enumerate(lengths)]


def batches_by_length(token_lists: Sequence[Sequence[int]], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped so similar lengths share a batch (little padding) and batch*width stays bounded."""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]), reverse=True)
    groups: list[list[int]] = []
    for index in order:
        width = len(token_lists[groups[-1][0]]) if groups else 0
        if groups and (len(groups[-1]) + 1) * width <= max_batch_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


class SpanComputer:
    """The KV of token spans as they sit right behind one prompt prefix, whose own KV is computed once:
    what ingest, missing-KV repair, conversations and reindex-kv all compute."""

    def __init__(self, decoder: Transformer, prefix_ids: Sequence[int], max_batch_tokens: int = 4096):
        self.decoder, self.prefix_ids = decoder, list(prefix_ids)
        self.max_batch_tokens = max_batch_tokens
        self._prefix_kv: ChunkKV | None = None

    @property
    def prefix_kv(self) -> ChunkKV:
        if self._prefix_kv is None:
            self._prefix_kv = self.compute([self.prefix_ids], behind_prefix=False)[0]
        return self._prefix_kv

    def compute(self, token_lists: Sequence[Sequence[int]], behind_prefix: bool = True) -> list[ChunkKV]:
        """One ChunkKV per span (batched by length); `behind_prefix=False` computes spans from position 0."""
        prefix = self.prefix_kv if behind_prefix else None
        results: list[ChunkKV | None] = [None] * len(token_lists)
        for group in batches_by_length(token_lists, self.max_batch_tokens):
            for index, kv in zip(group, compute_kv(self.decoder, [token_lists[i] for i in group], prefix)):
                results[index] = kv
        return results
