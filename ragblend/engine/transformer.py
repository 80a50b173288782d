"""The decoder, defined once over a Hugging Face model's weights: every path runs these layers.

A layer's forward takes hidden rows, their positions' cos/sin (the table of the layer's type) and an
attention target, which decides which keys the rows see:
- RowsOverCache: the rows' fresh K/V are scattered into a full per-layer cache and the rows attend over
  it causally on their original positions (engine/attention.py). Fused prefill (stored KV in the other
  rows), full prefill (every row computed) and precompute (spans behind a stored prompt prefix, which
  also records the rows' pre-RoPE K and V) are all this target.
- Appended: rows right after a decode cache's end grow it and attend over it (a conversation's answer
  fed back into its cache).
- DecodeCaches (engine/decode_step.py): one new token per request over that request's growing cache.
The family (engine/family.py) is data: norms, q/k norm, scales, activation, sliding windows, RoPE per
layer type. Hugging Face's own forward stays only as the reference the tests compare against.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.activations import ACT2FN

from kvchunks.rope import apply_rope, rotary_cos_sin
from ragblend.engine.attention import RowPlan, rows_attention
from ragblend.engine.family import Family

# Linear layers sharing an input, as one callable: their outputs apart, or side by side in one tensor
Linears = Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]
LinearLayout = Callable[[list[nn.Linear]], Linears]  # how a layer lays out its Linear weights


def separate_linears(modules: list[nn.Linear]) -> Linears:
    """Each module run as it is: prefill's layout (many rows: torch's matmul, no output copied into a joint
    tensor; measured 5% of a batched precompute when gate/up and q/k/v outputs were concatenated)."""
    if len(modules) == 1:
        return modules[0]
    return lambda x: tuple(m(x) for m in modules)


def split(outputs: torch.Tensor | tuple[torch.Tensor, ...], sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Outputs of Linears sharing an input: apart as they are, or side by side (decode's fused weights) as views."""
    return outputs if isinstance(outputs, tuple) else outputs.split(sizes, dim=-1)


@dataclass(frozen=True)
class Norm:
    """An RMSNorm module's arithmetic without its per-call dtype round trips. Llama scales in the input's
    dtype; Gemma scales by (1 + weight) in float32 first (transformers PR 29402): equal in float32."""

    weight: torch.Tensor
    eps: float
    offset: float

    @classmethod
    def of(cls, module: nn.Module, offset: float) -> Norm:
        eps = getattr(module, "variance_epsilon", None)
        return cls(module.weight, module.eps if eps is None else eps, offset)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (y * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * y.to(x.dtype)


@dataclass
class Projection:
    """A layer's queries, keys (post-RoPE and, for stored KV, pre-RoPE) and values: [..., n, heads, head_dim]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_pre: torch.Tensor


class Layer:
    """One decoder layer. `linear` lays out its Linear weights: as they are for prefill, packed or
    quantised for decode (engine/decode_step.py), so the arithmetic around them is written once."""

    def __init__(self, layer: nn.Module, family: Family, index: int, head_dim: int, linear: LinearLayout):
        attention, mlp, offset = layer.self_attn, layer.mlp, family.norm_offset
        self.index, self.head_dim, self.window = index, head_dim, family.window(index)
        self.rope, self.scale = family.rope_of_layer[index], family.attention_scale
        self.input_norm = Norm.of(layer.input_layernorm, offset)
        if family.sandwich:
            self.attention_out_norm = Norm.of(layer.post_attention_layernorm, offset)
            self.mlp_norm = Norm.of(layer.pre_feedforward_layernorm, offset)
            self.mlp_out_norm = Norm.of(layer.post_feedforward_layernorm, offset)
        else:
            self.attention_out_norm = self.mlp_out_norm = None
            self.mlp_norm = Norm.of(layer.post_attention_layernorm, offset)
        self.q_norm = Norm.of(attention.q_norm, offset) if family.qk_norm else None
        self.k_norm = Norm.of(attention.k_norm, offset) if family.qk_norm else None
        self.qkv = linear([attention.q_proj, attention.k_proj, attention.v_proj])
        self.o_proj, self.down = linear([attention.o_proj]), linear([mlp.down_proj])
        self.gate_up = linear([mlp.gate_proj, mlp.up_proj])
        self.act = ACT2FN[family.activation]
        self.kv_heads = attention.k_proj.out_features // head_dim
        self.qkv_sizes = tuple(m.out_features for m in (attention.q_proj, attention.k_proj, attention.v_proj))
        self.gate_up_sizes = (mlp.gate_proj.out_features, mlp.up_proj.out_features)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                target: Callable[[Layer, Projection], torch.Tensor]) -> torch.Tensor:
        """hidden [..., n, hidden]; cos/sin [..., n, head_dim] of this layer's RoPE; `target` attends."""
        attended = target(self, self.project(self.input_norm(hidden), cos, sin))
        return self.finish(hidden, attended)

    __call__ = forward

    def project(self, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Projection:
        q, k, v = (x.unflatten(-1, (-1, self.head_dim)) for x in split(self.qkv(normed), self.qkv_sizes))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return Projection(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, k)

    def finish(self, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The residual stream after attention's output [..., n, heads * head_dim] and the MLP."""
        out = self.o_proj(attended)
        if self.attention_out_norm is not None:
            out = self.attention_out_norm(out)
        hidden = hidden + out
        gate, up = split(self.gate_up(self.mlp_norm(hidden)), self.gate_up_sizes)
        out = self.down(self.act(gate) * up)
        if self.mlp_out_norm is not None:
            out = self.mlp_out_norm(out)
        return hidden + out


class RowsOverCache:
    """Attention target: the plan's rows write their fresh K/V into `caches[layer]` (full [batch, kv_heads,
    >= last row + 1, head_dim] tensors, stored KV in the other rows) and attend over it causally on their
    positions. With `captured`, each layer's pre-RoPE K and V of the rows are appended (precompute)."""

    def __init__(self, plan: RowPlan, caches: list, captured: list | None = None):
        self.plan, self.caches, self.captured = plan, caches, captured

    def __call__(self, layer: Layer, p: Projection) -> torch.Tensor:
        keys, values = self.caches[layer.index]
        rows, end = self.plan.rows, int(self.plan.rows[-1]) + 1
        if self.plan.contiguous:  # a slice, not an index: written in place without an index kernel
            rows = slice(int(rows[0]), end)
        keys[:, :, rows] = p.k.transpose(-3, -2)
        values[:, :, rows] = p.v.transpose(-3, -2)
        if self.captured is not None:
            self.captured.append((p.k_pre.transpose(-3, -2), p.v.transpose(-3, -2)))
        out = rows_attention(p.q.transpose(-3, -2), keys[:, :, :end], values[:, :, :end], self.plan, layer.scale,
                             layer.window)
        return out.flatten(-2)


class Appended:
    """Attention target: rows right after a cache's last position are appended to it (it grows by
    them) and attend over it causally."""

    def __init__(self, cache: DynamicCache, plan: RowPlan):
        self.cache, self.plan = cache, plan

    def __call__(self, layer: Layer, p: Projection) -> torch.Tensor:
        keys, values = self.cache.update(p.k.transpose(-3, -2), p.v.transpose(-3, -2), layer.index)
        return rows_attention(p.q.transpose(-3, -2), keys, values, self.plan, layer.scale, layer.window).flatten(-2)


class Transformer(nn.Module):
    """A LoadedModel's decoder over the HF model's own parameters (nothing is copied). Calling it runs
    every layer over one attention target: precompute, full prefill and `extend` do; fused prefill steps
    the layers itself (a layer's stored KV arrives while the one before runs)."""

    def __init__(self, model: PreTrainedModel, family: Family, head_dim: int):
        super().__init__()
        body = model.base_model
        self.family, self.head_dim = family, head_dim
        self.embed_tokens, self.rotary_emb, self.lm_head = body.embed_tokens, body.rotary_emb, model.lm_head
        self.final_norm = Norm.of(body.norm, family.norm_offset)
        self.layers = [Layer(layer, family, index, head_dim, separate_linears) for index, layer in enumerate(body.layers)]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight
        hidden = F.embedding(ids, weight)
        if self.family.embed_scale is None:
            return hidden
        return hidden * torch.tensor(self.family.embed_scale, dtype=weight.dtype, device=weight.device)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of 1-D `positions` for every RoPE table: [tables, n, head_dim] (a layer reads
        table `family.rope_of_layer[layer]`); computed by the model's own rotary module, so scaled
        variants stay exact."""
        dtype, family = self.embed_tokens.weight.dtype, self.family
        if not family.per_type_rope:
            return rotary_cos_sin(self.rotary_emb, positions, dtype)
        tables = [rotary_cos_sin(self.rotary_emb, positions, dtype, layer_type) for layer_type in family.rope_types]
        return torch.cat([cos for cos, _ in tables]), torch.cat([sin for _, sin in tables])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits of the rows of `hidden` (after the final norm): [..., vocab] in float32."""
        return self.capped(self.lm_head(self.final_norm(hidden)).float())

    def capped(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.family.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def forward(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                target: Callable[[Layer, Projection], torch.Tensor]) -> torch.Tensor:
        """input_ids [batch, n]; cos/sin as `rope` gives them for the ids' positions. Returns the last
        hidden state [batch, n, hidden] (before the final norm)."""
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, cos[layer.rope:layer.rope + 1], sin[layer.rope:layer.rope + 1], target)
        return hidden

    @torch.inference_mode()
    def extend(self, cache: DynamicCache, token_ids: list[int], start: int) -> torch.Tensor:
        """Run `token_ids` at positions start.. over `cache` (holding positions < start; it grows by them):
        the last one's next-token logits [vocab]."""
        positions = torch.arange(start, start + len(token_ids), device=self.embed_tokens.weight.device)
        cos, sin = self.rope(positions)
        hidden = self(positions.new_tensor(token_ids)[None], cos, sin, Appended(cache, RowPlan(positions)))
        return self.logits(hidden[0, -1])
