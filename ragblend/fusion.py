"""Layer-wise prefill over a mix of stored and fresh KV: the one engine behind prefix, reuse and blend.

Each layer computes only some rows of the prompt (`rows`, sorted prompt positions). Their fresh K/V
are scattered into that layer's full cache, whose other rows hold stored KV, and they attend over
the whole cache with a mask that is causal on original positions. CacheBlend (`blend`) computes
every row up to the check layer, then keeps the chunk tokens whose values deviate most from the
stored ones (HKVD) plus the question suffix.

Computed rows go through each layer in blocks of `ROW_BLOCK`: a block attends only to keys up to
its last position. SDPA's CPU kernel skips no masked-out keys, so one masked call over the whole
cache does about twice the attention work a causal prefill does; blocking recovers most of it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from kvchunks.rope import rotary_cos_sin
from ragblend.layout import PromptLayout
from ragblend.loader import LayerLoader
from ragblend.model import LoadedModel

ROW_BLOCK = 512  # computed rows per attention call


@dataclass(frozen=True)
class BlendConfig:
    recompute_ratio: float = 0.15
    check_layer: int = 1  # layers before it are computed for every token; selection happens on it


@dataclass
class Prefill:
    logits: torch.Tensor  # next-token logits after the prompt, [vocab]
    cache: DynamicCache
    recomputed_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


class RowScatterCache:
    """Per-layer full K/V; `update` writes the computed rows' fresh K/V in place and returns the
    cache up to the last of those rows (later positions are invisible to them)."""

    def __init__(self, num_layers: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.rows: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        full_k, full_v = self.layers[layer_idx]
        full_k[:, :, self.rows] = keys
        full_v[:, :, self.rows] = values
        end = int(self.rows[-1]) + 1
        return full_k[:, :, :end], full_v[:, :, :end]

    def to_dynamic(self) -> DynamicCache:
        return DynamicCache(ddp_cache_data=[(k, v) for k, v in self.layers])


def causal_rows_mask(rows: torch.Tensor, length: int) -> torch.Tensor:
    """[1, 1, rows, length] bool: row at prompt position p sees positions <= p (True = attend)."""
    return (torch.arange(length, device=rows.device)[None, :] <= rows[:, None])[None, None]


def value_deviation(fresh: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Per-token L2 distance between fresh and stored values over heads and dims ([1, h, n, d] -> [n])."""
    return (fresh - stored).float().pow(2).sum(dim=(0, 1, 3)).sqrt()


def select_hkvd(deviation: torch.Tensor, candidates: torch.Tensor, ratio: float) -> torch.Tensor:
    """The `ratio` share of candidate positions with the highest deviation (rounded up), sorted."""
    count = min(len(candidates), math.ceil(ratio * len(candidates) - 1e-9))
    if count == 0:
        return candidates[:0]
    top = torch.topk(deviation[candidates], count).indices
    return candidates[top].sort().values


class FusionEngine:
    def __init__(self, model: LoadedModel):
        self.model = model
        self.decoder = model.decoder

    def rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every prompt position, computed once per query and shared with the loader."""
        return rotary_cos_sin(self.decoder.rotary_emb, torch.arange(length, device=self.model.device), self.model.dtype)

    def _layer(self, index: int, hidden: torch.Tensor, rows: torch.Tensor, length: int, cache: RowScatterCache,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        layer = self.decoder.layers[index]
        if len(rows) == length:  # every row: sdpa's own causal kernel, no mask
            cache.rows = rows
            return layer(hidden, position_embeddings=(cos, sin), past_key_values=cache)
        blocks = []
        for start in range(0, len(rows), ROW_BLOCK):
            block = rows[start:start + ROW_BLOCK]
            cache.rows = block
            mask = causal_rows_mask(block, int(block[-1]) + 1)
            blocks.append(layer(hidden[:, start:start + ROW_BLOCK], attention_mask=mask,
                                position_embeddings=(cos[:, block], sin[:, block]), past_key_values=cache))
        return torch.cat(blocks, dim=1)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.lm_head(self.decoder.norm(hidden[:, -1:]))[0, -1].float()

    @torch.inference_mode()
    def prefill(self, layout: PromptLayout, loader: LayerLoader, first_computed: int, cos: torch.Tensor,
                sin: torch.Tensor, blend: BlendConfig | None = None) -> Prefill:
        """Stored KV for positions < `first_computed` (from `loader`), fresh for the rest; `blend` adds HKVD."""
        length = len(layout)
        device = self.model.device
        ids = layout.ids_tensor(device)
        rows = torch.arange(0 if blend else first_computed, length, device=device)
        hidden = self.decoder.embed_tokens(ids[rows])[None]
        cache = RowScatterCache(self.model.num_layers)
        timings = {"check_s": 0.0, "partial_s": 0.0}
        last_full = blend.check_layer if blend else -1
        for index in range(self.model.num_layers):
            start = time.perf_counter()
            cache.layers[index] = loader.get(index)
            if index == last_full:
                rows, hidden = self._select(index, hidden, cache, layout, blend.recompute_ratio)
            hidden = self._layer(index, hidden, rows, length, cache, cos, sin)
            timings["check_s" if index <= last_full else "partial_s"] += time.perf_counter() - start
        recomputed = len(rows)
        return Prefill(self._logits(hidden), cache.to_dynamic(), recomputed, timings)

    def _select(self, index: int, hidden: torch.Tensor, cache: RowScatterCache, layout: PromptLayout,
                ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """HKVD on the check layer: fresh values for every token vs stored ones; keep the top deviators."""
        layer = self.decoder.layers[index]
        projected = layer.self_attn.v_proj(layer.input_layernorm(hidden))
        fresh = projected.view(1, len(layout), -1, self.model.head_dim).transpose(1, 2)
        stored = cache.layers[index][1]
        stored_end = layout.suffix_start
        deviation = value_deviation(fresh[:, :, :stored_end], stored[:, :, :stored_end])
        candidates = torch.arange(layout.prefix_len, stored_end, device=hidden.device)
        chosen = select_hkvd(deviation, candidates, ratio)
        suffix = torch.arange(stored_end, len(layout), device=hidden.device)
        rows = torch.cat([chosen, suffix])
        return rows, hidden[:, rows]

    @torch.inference_mode()
    def full_prefill(self, layout: PromptLayout) -> Prefill:
        """Ordinary prefill of the whole prompt with the model's own forward: the reference."""
        out = self.model.model(layout.ids_tensor(self.model.device)[None], use_cache=True, logits_to_keep=1)
        return Prefill(out.logits[0, -1].float(), out.past_key_values, len(layout))
