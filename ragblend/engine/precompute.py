"""Per-chunk KV precompute: each chunk prefilled alone behind the fixed prompt prefix.

Keys are captured at the output of each layer's k_proj, i.e. *before* rotary position embedding,
so the online path can place a chunk at any position (and a conversation can be truncated later)
without invalidating it. Values are position-free already.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache

from kvchunks.chunk_kv import ChunkKV
from kvchunks.rope import apply_rope, rotary_cos_sin


@contextmanager
def capture_kv_projections(layers: torch.nn.ModuleList) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Record every layer's pre-RoPE keys and values during a forward.

    Keys are taken after `k_norm` where the architecture has one (Qwen3, OLMo2: normalised before
    RoPE), else at `k_proj`; values at `v_proj`. Only this thread's forward is recorded: the same
    model may be running another request (or a session save) on another thread meanwhile.
    """
    captured: list[dict[str, torch.Tensor]] = [{} for _ in layers]
    owner = threading.get_ident()
    handles = []
    for store, layer in zip(captured, layers):
        attention = layer.self_attn
        key_module = attention.k_norm if hasattr(attention, "k_norm") else attention.k_proj
        for name, module in (("keys", key_module), ("values", attention.v_proj)):
            def hook(_module, _inputs, output, store=store, name=name):
                if threading.get_ident() == owner:
                    store[name] = output
            handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[batch, seq, heads*head_dim] or [batch, seq, heads, head_dim] -> [batch, heads, seq, head_dim]."""
    return x.reshape(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def prefix_cache(decoder: torch.nn.Module, prefix: ChunkKV, batch: int) -> DynamicCache:
    """The prefix as an HF cache (post-RoPE keys at positions 0..P-1), repeated for a batch."""
    positions = torch.arange(prefix.num_tokens, device=prefix.keys.device)
    cos, sin = rotary_cos_sin(decoder.rotary_emb, positions, prefix.keys.dtype)
    layers = []
    for k, v in zip(prefix.keys, prefix.values):
        rotated = apply_rope(k, cos, sin)
        layers.append((rotated.expand(batch, *rotated.shape).contiguous(), v.expand(batch, *v.shape).contiguous()))
    return DynamicCache(ddp_cache_data=layers)


@torch.inference_mode()
def compute_kv(decoder: torch.nn.Module, token_batches: Sequence[Sequence[int]], prefix: ChunkKV | None, head_dim: int) -> list[ChunkKV]:
    """KV of each token list, prefilled in isolation behind `prefix` (right-padded into one batch)."""
    device = decoder.embed_tokens.weight.device
    lengths = [len(ids) for ids in token_batches]
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
    for row, ids in enumerate(token_batches):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    kwargs = {}
    if prefix is not None:
        kwargs["cache"] = prefix_cache(decoder, prefix, len(lengths))
        mask = torch.cat([torch.ones(len(lengths), prefix.num_tokens, dtype=torch.long, device=device), mask], dim=1)
    with capture_kv_projections(decoder.layers) as captured:
        decoder(input_ids=input_ids, attention_mask=mask, use_cache=prefix is not None, **kwargs)
    keys = torch.stack([_split_heads(c["keys"], head_dim) for c in captured], dim=1)  # [b, L, h, s, d]
    values = torch.stack([_split_heads(c["values"], head_dim) for c in captured], dim=1)
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

    def __init__(self, decoder: torch.nn.Module, head_dim: int, prefix_ids: Sequence[int], max_batch_tokens: int = 4096):
        self.decoder, self.head_dim, self.prefix_ids = decoder, head_dim, list(prefix_ids)
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
            for index, kv in zip(group, compute_kv(self.decoder, [token_lists[i] for i in group], prefix, self.head_dim)):
                results[index] = kv
        return results
