"""Layer-wise prefill over a mix of stored and fresh KV: the one engine behind prefix, reuse and blend.

Each layer computes only some rows of the prompt (`rows`, sorted prompt positions). Their fresh K/V
are scattered into that layer's full cache, whose other rows hold stored KV, and they attend over
the whole cache causally on original positions (ragblend.engine.attention). CacheBlend (`blend`) computes
every row up to the check layer, then keeps the chunk tokens that score highest on the configured
signal (ragblend.engine.selection; HKVD by default) plus the question suffix.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from kvchunks.rope import apply_rope, rotary_cos_sin
from ragblend.engine.attention import RowPlan
from ragblend.engine.layout import PromptLayout
from ragblend.engine.decode_cache import decode_cache
from ragblend.engine.loader import LayerLoader
from ragblend.engine.model import LoadedModel
from ragblend.engine.selection import (AUTO, BlendConfig, attended_chunks, auto_share, budget_groups, chunk_starts,
                                deviation, keep_count, question_attention, select_top)

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
        return decode_cache(self.layers)


class FusionEngine:
    def __init__(self, model: LoadedModel):
        self.model = model
        self.decoder = model.decoder

    def rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every prompt position, computed once per query and shared with the loader."""
        return rotary_cos_sin(self.decoder.rotary_emb, torch.arange(length, device=self.model.device), self.model.dtype)

    def _layer(self, index: int, hidden: torch.Tensor, plan: RowPlan, length: int, cache: RowScatterCache,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        layer = self.decoder.layers[index]
        rows = cache.rows = plan.rows
        if len(rows) == length:  # every row: sdpa's own causal kernel, no mask
            return layer(hidden, position_embeddings=(cos, sin), cache=cache)
        return layer(hidden, position_embeddings=(cos[:, rows], sin[:, rows]), cache=cache, rows=plan)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.lm_head(self.decoder.norm(hidden[:, -1:]))[0, -1].float()

    @torch.inference_mode()
    def prefill(self, layout: PromptLayout, loader: LayerLoader, first_computed: int, cos: torch.Tensor,
                sin: torch.Tensor, blend: BlendConfig | None = None) -> Prefill:
        """Stored KV for positions < `first_computed` (from `loader`), fresh for the rest; `blend` selects
        which chunk tokens stay computed after its check layer (and, if gradual, the layer after)."""
        length = len(layout)
        device = self.model.device
        ids = layout.ids_tensor(device)
        rows = torch.arange(layout.prefix_len if blend else first_computed, length, device=device)
        hidden = self.decoder.embed_tokens(ids[rows])[None]
        cache = RowScatterCache(self.model.num_layers)
        timings = {"check_s": 0.0, "partial_s": 0.0}
        check = blend.check_layer if blend else -1
        share = None
        plan = RowPlan(rows)  # the rows change only where blend narrows them; their masks are reused till then
        for index in range(self.model.num_layers):
            start = time.perf_counter()
            cache.layers[index] = loader.get(index)
            if blend is not None and (index == check or (index == check + 1 and blend.gradual > 1)):
                rows, hidden, share = self._narrow(index, hidden, rows, cache, layout, cos, sin, blend, share)
                plan = RowPlan(rows)
            hidden = self._layer(index, hidden, plan, length, cache, cos, sin)
            timings["check_s" if index <= check else "partial_s"] += time.perf_counter() - start
        if share is not None:
            timings["recompute_ratio"] = share
        return Prefill(self._logits(hidden), cache.to_dynamic(), len(rows), timings)

    def _narrow(self, index: int, hidden: torch.Tensor, rows: torch.Tensor, cache: RowScatterCache,
                layout: PromptLayout, cos: torch.Tensor, sin: torch.Tensor, blend: BlendConfig,
                share: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Keep the question suffix and the top-scoring chunk tokens among `rows`: on the check layer
        (`share` None) the configured ratio, or "auto"'s, times `gradual`; after it, `share`.

        Every row's fresh K/V on this layer is computed for scoring anyway, so it replaces the stored
        K/V of all of them, kept or not: a dropped token's cache is fresh up to the layer it left on."""
        layer = self.decoder.layers[index]
        normed = layer.input_layernorm(hidden)
        keys, values = self._fresh_kv(layer.self_attn, normed, rows, cos, sin)
        scores = self._scores(layer.self_attn, normed, keys, values, rows, cache.layers[index], layout, cos, sin, blend)
        cache.layers[index][0][:, :, rows] = keys
        cache.layers[index][1][:, :, rows] = values
        candidates = (rows >= layout.prefix_len) & (rows < layout.suffix_start)
        positions = rows[candidates]
        scores = scores[candidates]
        keep, checking = share, share is None
        if checking:
            share = auto_share(scores, blend) if blend.recompute_ratio == AUTO else float(blend.recompute_ratio)
            keep = min(1.0, share * blend.gradual)
        forced = chunk_starts(positions, layout, blend.chunk_start_tokens)
        if blend.query_chunks and checking:  # on the check layer: whole chunks the question reads
            paid = self._question_attention(layer.self_attn, normed, keys, rows, cache.layers[index][0], layout,
                                            cos, sin)[candidates]
            budget = int(blend.query_chunks * keep_count(layout.suffix_start - layout.prefix_len, keep))
            forced |= attended_chunks(paid, positions, layout, budget)
        scores = scores.masked_fill(forced, float("inf"))
        chosen = select_top(scores, positions, *budget_groups(positions, layout, blend.budget), keep)
        kept = torch.cat([chosen, rows[rows >= layout.suffix_start]])
        return kept, hidden[:, torch.searchsorted(rows, kept)], share

    def _fresh_kv(self, attention: torch.nn.Module, normed: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K (post-RoPE, at the rows' positions) and V for `rows`, from the normed input."""
        keys = self._heads(attention.k_proj(normed), getattr(attention, "k_norm", None))
        return apply_rope(keys, cos[:, rows], sin[:, rows]), self._heads(attention.v_proj(normed))

    def _scores(self, attention: torch.nn.Module, normed: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                rows: torch.Tensor, stored: tuple[torch.Tensor, torch.Tensor], layout: PromptLayout,
                cos: torch.Tensor, sin: torch.Tensor, blend: BlendConfig) -> torch.Tensor:
        """The selection signal for every row in `rows`, from their fresh K/V against the `stored` ones."""
        if blend.signal == "random":
            return torch.rand(len(rows), generator=torch.Generator().manual_seed(blend.seed)).to(rows.device)
        value_dev = deviation(values, stored[1][:, :, rows])
        if blend.signal == "value":
            return value_dev
        if blend.signal in ("key", "kv"):
            key_dev = deviation(keys, stored[0][:, :, rows])
            if blend.signal == "key":
                return key_dev
            return key_dev / key_dev.mean().clamp_min(1e-12) + value_dev / value_dev.mean().clamp_min(1e-12)
        paid = self._question_attention(attention, normed, keys, rows, stored[0], layout, cos, sin)
        return paid if blend.signal == "attention" else paid * value_dev

    def _question_attention(self, attention: torch.nn.Module, normed: torch.Tensor, keys: torch.Tensor,
                            rows: torch.Tensor, stored_keys: torch.Tensor, layout: PromptLayout, cos: torch.Tensor,
                            sin: torch.Tensor) -> torch.Tensor:
        """Attention the question's rows pay to each row in `rows` on this layer (fresh keys for `rows`)."""
        question = rows >= layout.suffix_start
        queries = apply_rope(self._heads(attention.q_proj(normed[:, question]), getattr(attention, "q_norm", None)),
                             cos[:, rows[question]], sin[:, rows[question]])
        all_keys = stored_keys.clone()
        all_keys[:, :, rows] = keys
        return question_attention(queries, all_keys, rows[question])[rows]

    def _heads(self, projected: torch.Tensor, norm: torch.nn.Module | None = None) -> torch.Tensor:
        """[1, n, heads*head_dim] -> [1, heads, n, head_dim], with the per-head norm some families apply."""
        split = projected.view(1, projected.shape[1], -1, self.model.head_dim)
        return (norm(split) if norm is not None else split).transpose(1, 2)

    @torch.inference_mode()
    def full_prefill(self, layout: PromptLayout) -> Prefill:
        """Ordinary prefill of the whole prompt with the model's own forward: the reference."""
        out = self.model.model(layout.ids_tensor(self.model.device)[None], use_cache=True, logits_to_keep=1)
        cache = decode_cache([(layer.keys, layer.values) for layer in out.cache.layers])
        return Prefill(out.logits[0, -1].float(), cache, len(layout))
