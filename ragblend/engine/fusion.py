"""Layer-wise prefill over a mix of stored and fresh KV: the one engine behind prefix, reuse and blend.

Each layer computes only some rows of the prompt (`rows`, sorted prompt positions). Their fresh K/V
are scattered into that layer's full cache, whose other rows hold stored KV, and they attend over
the whole cache causally on original positions (transformer.RowsOverCache). CacheBlend (`blend`)
computes every row up to the check layer, then keeps the chunk tokens that score highest on the
configured signal (ragblend.engine.selection; HKVD by default) plus the question suffix. Full prefill
is the same layers with every row computed and nothing stored.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ragblend.engine.attention import RowPlan
from ragblend.engine.decode_cache import decode_cache, with_spare_rows
from ragblend.engine.layout import PromptLayout
from ragblend.engine.loader import LayerLoader
from ragblend.engine.model import LoadedModel
from ragblend.engine.selection import (AUTO, BlendConfig, attended_chunks, auto_share, budget_groups, chunk_starts,
                                       deviation, keep_count, question_attention, select_top)
from ragblend.engine.transformer import Layer, Projection, RowsOverCache

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Prefill:
    logits: torch.Tensor  # next-token logits after the prompt, [vocab]
    cache: DynamicCache
    recomputed_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


def at_rows(table: torch.Tensor, layer: Layer, plan: RowPlan) -> torch.Tensor:
    """A layer's cos or sin [1, n, head_dim] at the plan's rows, from [tables, length, head_dim]."""
    rows = plan.rows
    if plan.contiguous:
        return table[layer.rope:layer.rope + 1, int(rows[0]):int(rows[-1]) + 1]
    return table[layer.rope:layer.rope + 1, rows]


class FusionEngine:
    def __init__(self, model: LoadedModel):
        self.model = model
        self.decoder = model.decoder

    @property
    def rope_of_layer(self) -> tuple[int, ...]:
        """Each layer's RoPE table in what `rotary` returns."""
        return self.decoder.family.rope_of_layer

    def rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [tables, length, head_dim] for every prompt position and RoPE table (one table but for
        models with a RoPE per layer type), computed once per query and shared with the loader."""
        return self.decoder.rope(torch.arange(length, device=self.model.device))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.logits(hidden[0, -1])

    @torch.inference_mode()
    def prefill(self, layout: PromptLayout, loader: LayerLoader, first_computed: int, cos: torch.Tensor,
                sin: torch.Tensor, blend: BlendConfig | None = None) -> Prefill:
        """Stored KV for positions < `first_computed` (from `loader`), fresh for the rest; `blend` selects
        which chunk tokens stay computed after its check layer (and, if gradual, the layer after)."""
        device = self.model.device
        ids = layout.ids_tensor(device)
        rows = torch.arange(layout.prefix_len if blend else first_computed, len(layout), device=device)
        hidden = self.decoder.embed(ids[rows])[None]
        caches: list[KV | None] = [None] * self.model.num_layers
        timings = {"check_s": 0.0, "partial_s": 0.0}
        check = blend.check_layer if blend else -1
        share = None
        plan = RowPlan(rows)  # the rows change only where blend narrows them; their masks are reused till then
        target = RowsOverCache(plan, caches)
        for layer in self.decoder.layers:
            start = time.perf_counter()
            caches[layer.index] = loader.get(layer.index)
            if blend is not None and (layer.index == check or (layer.index == check + 1 and blend.gradual > 1)):
                rows, hidden, share = self._narrow(layer, hidden, plan, caches[layer.index], layout, cos, sin, blend,
                                                   share)
                plan = RowPlan(rows)
                target = RowsOverCache(plan, caches)
            hidden = layer(hidden, at_rows(cos, layer, plan), at_rows(sin, layer, plan), target)
            timings["check_s" if layer.index <= check else "partial_s"] += time.perf_counter() - start
        if share is not None:
            timings["recompute_ratio"] = share
        return Prefill(self._logits(hidden), decode_cache(caches), len(rows), timings)

    def _narrow(self, layer: Layer, hidden: torch.Tensor, plan: RowPlan, cache: KV, layout: PromptLayout,
                cos: torch.Tensor, sin: torch.Tensor, blend: BlendConfig,
                share: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Keep the question suffix and the top-scoring chunk tokens among the plan's rows: on the check
        layer (`share` None) the configured ratio, or "auto"'s, times `gradual`; after it, `share`.

        Every row's fresh K/V on this layer is computed for scoring anyway, so it replaces the stored
        K/V of all of them, kept or not: a dropped token's cache is fresh up to the layer it left on."""
        rows = plan.rows
        fresh = layer.project(layer.input_norm(hidden), at_rows(cos, layer, plan), at_rows(sin, layer, plan))
        keys, values = fresh.k.transpose(1, 2), fresh.v.transpose(1, 2)
        scores = self._scores(layer, fresh, rows, cache, layout, blend)
        cache[0][:, :, rows] = keys
        cache[1][:, :, rows] = values
        candidates = (rows >= layout.prefix_len) & (rows < layout.suffix_start)
        positions = rows[candidates]
        scores = scores[candidates]
        keep, checking = share, share is None
        if checking:
            share = auto_share(scores, blend) if blend.recompute_ratio == AUTO else float(blend.recompute_ratio)
            keep = min(1.0, share * blend.gradual)
        forced = chunk_starts(positions, layout, blend.chunk_start_tokens)
        if blend.query_chunks and checking:  # on the check layer: whole chunks the question reads
            paid = self._question_attention(layer, fresh, rows, cache[0], layout)[candidates]
            budget = int(blend.query_chunks * keep_count(layout.suffix_start - layout.prefix_len, keep))
            forced |= attended_chunks(paid, positions, layout, budget)
        scores = scores.masked_fill(forced, float("inf"))
        chosen = select_top(scores, positions, *budget_groups(positions, layout, blend.budget), keep)
        kept = torch.cat([chosen, rows[rows >= layout.suffix_start]])
        return kept, hidden[:, torch.searchsorted(rows, kept)], share

    def _scores(self, layer: Layer, fresh: Projection, rows: torch.Tensor, stored: KV, layout: PromptLayout,
                blend: BlendConfig) -> torch.Tensor:
        """The selection signal for every row in `rows`, from their fresh K/V against the `stored` ones."""
        if blend.signal == "random":
            return torch.rand(len(rows), generator=torch.Generator().manual_seed(blend.seed)).to(rows.device)
        value_dev = deviation(fresh.v.transpose(1, 2), stored[1][:, :, rows])
        if blend.signal == "value":
            return value_dev
        if blend.signal in ("key", "kv"):
            key_dev = deviation(fresh.k.transpose(1, 2), stored[0][:, :, rows])
            if blend.signal == "key":
                return key_dev
            return key_dev / key_dev.mean().clamp_min(1e-12) + value_dev / value_dev.mean().clamp_min(1e-12)
        paid = self._question_attention(layer, fresh, rows, stored[0], layout)
        return paid if blend.signal == "attention" else paid * value_dev

    def _question_attention(self, layer: Layer, fresh: Projection, rows: torch.Tensor, stored_keys: torch.Tensor,
                            layout: PromptLayout) -> torch.Tensor:
        """Attention the question's rows pay to each row in `rows` on this layer (fresh keys for `rows`)."""
        question = rows >= layout.suffix_start
        all_keys = stored_keys.clone()
        all_keys[:, :, rows] = fresh.k.transpose(1, 2)
        queries = fresh.q[:, question].transpose(1, 2)
        return question_attention(queries, all_keys, rows[question], layer.scale, layer.window)[rows]

    @torch.inference_mode()
    def full_prefill(self, layout: PromptLayout) -> Prefill:
        """Ordinary prefill of the whole prompt, every row computed: the reference the other modes answer to."""
        length, device, dtype = len(layout), self.model.device, self.model.dtype
        shape = (1, self.model.num_kv_heads, length, self.model.head_dim)
        caches = [(with_spare_rows(shape, dtype, device), with_spare_rows(shape, dtype, device))
                  for _ in range(self.model.num_layers)]
        cos, sin = self.rotary(length)
        target = RowsOverCache(RowPlan(torch.arange(length, device=device)), caches)
        hidden = self.decoder(layout.ids_tensor(device)[None], cos, sin, target)
        return Prefill(self._logits(hidden), decode_cache(caches), length)
