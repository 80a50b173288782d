"""One decode step of several requests in one forward, over the model's own Llama-family modules.

Norms, projections, MLP and LM head run once over the batch's new tokens (their weight reads are most
of a decode step on the CPU); attention runs per request over its own cache, which grows in place, so
caches of different lengths are never padded or copied into a batch.

On the CPU the float Linear weights are prepacked for oneDNN's small-batch kernel: 2x faster than
torch's default matmul for 1-8 rows here, and each row's result does not depend on the other rows, so
a request decodes the same tokens alone or in any batch. int8 (dynamic-quantized) layers quantize
their input per tensor, so they run one row at a time for the same reason.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvchunks.rope import rotate_half

if TYPE_CHECKING:
    from ragblend.engine.model import LoadedModel

PACK_ROWS = 4  # the batch size oneDNN lays the packed weights out for (measured flat from 1 to 8 rows)
Linear = Callable[[torch.Tensor], torch.Tensor]


def fused_linear(modules: list[torch.nn.Module]) -> Linear:
    """One callable for Linear layers sharing an input: their outputs side by side."""
    first = modules[0]
    if isinstance(first, torch.nn.Linear) and first.weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
        weight = torch.cat([m.weight for m in modules])
        bias = torch.cat([m.bias for m in modules]) if first.bias is not None else None
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)

        def packed_linear(x: torch.Tensor) -> torch.Tensor:
            # oneDNN takes another kernel for a single row (its sums differ in the last bits): run it as two
            rows = x if len(x) > 1 else x.expand(2, -1)
            return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")[:len(x)]

        return packed_linear
    if isinstance(first, torch.nn.Linear):  # on an accelerator: the modules as they are
        return lambda x: torch.cat([m(x) for m in modules], dim=-1)
    return lambda x: torch.cat([torch.cat([m(row) for m in modules], dim=-1) for row in x.split(1)])


class DecodeStep:
    """The decode weights of a LoadedModel (`decode_model` if set), laid out for batched steps."""

    def __init__(self, loaded: LoadedModel):
        source = loaded.decode_model or loaded.model
        body = source.model
        self.embed, self.norm, self.rotary = body.embed_tokens, body.norm, body.rotary_emb
        self.layers = [_Layer(layer, loaded.head_dim) for layer in body.layers]
        self.lm_head = fused_linear([source.lm_head])

    @torch.inference_mode()
    def __call__(self, tokens: list[int], positions: list[int], caches: list[DynamicCache]) -> torch.Tensor:
        """Feed token i at positions[i] over caches[i] (each grows by it): next-token logits [len, vocab]."""
        device = self.embed.weight.device
        hidden = self.embed(torch.tensor(tokens, device=device))
        cos, sin = self.rotary(hidden, torch.tensor(positions, device=device)[:, None])  # [n, 1, head_dim]
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, caches, index)
        return self.lm_head(self.norm(hidden)).float()


class _Layer:
    def __init__(self, layer: torch.nn.Module, head_dim: int):
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        self.qkv = fused_linear([attention.q_proj, attention.k_proj, attention.v_proj])
        self.o_proj, self.down = fused_linear([attention.o_proj]), fused_linear([mlp.down_proj])
        self.gate_up = fused_linear([mlp.gate_proj, mlp.up_proj])
        self.act, self.scaling, self.head_dim = mlp.act_fn, attention.scaling, head_dim
        self.sizes = [attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features]

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[DynamicCache],
                 index: int) -> torch.Tensor:
        q, k, v = self.qkv(self.input_norm(hidden)).split(self.sizes, dim=-1)
        q, k, v = (t.view(len(hidden), -1, self.head_dim) for t in (q, k, v))  # [n, heads, head_dim]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = torch.cat([self._attend(q[i], k[i], v[i], cache, index) for i, cache in enumerate(caches)])
        hidden = hidden + self.o_proj(out)
        gate, up = self.gate_up(self.post_norm(hidden)).chunk(2, dim=-1)
        return hidden + self.down(self.act(gate) * up)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: DynamicCache,
                index: int) -> torch.Tensor:
        """One request's new token over its cache; query heads of a group fold into rows of their kv head."""
        keys, values = cache.layers[index].update(k[None, :, None], v[None, :, None])
        kv_heads = k.shape[0]
        folded = q.reshape(1, kv_heads, -1, self.head_dim)
        return F.scaled_dot_product_attention(folded, keys, values, scale=self.scaling).reshape(1, -1)
