"""One decode step of several requests in one forward, over the model's own Llama-family modules.

Norms, projections, MLP and LM head run once over the batch's new tokens (their weight reads are most
of a decode step on the CPU); attention runs per request over its own cache, which grows in place, so
caches of different lengths are never padded or copied into a batch.

On the CPU the float Linear weights are prepacked for oneDNN's small-batch kernel: 2x faster than
torch's default matmul for 1-8 rows here, and each row's result does not depend on the other rows, so
a request decodes the same tokens alone or in any batch. int8 and int4 decode weights run torch's
weight-only kernels (weight_only.py), whose rows are independent too, and the exact greedy head
(exact_head.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from ragblend.engine.decode_attention import decode_attention
from ragblend.engine.exact_head import ExactGreedyHead
from ragblend.engine.weight_only import quantize

if TYPE_CHECKING:
    from ragblend.engine.model import LoadedModel

PACK_ROWS = 4  # the batch size oneDNN lays the packed weights out for (measured flat from 1 to 8 rows)
Linear = Callable[[torch.Tensor], torch.Tensor]


def packs(module: torch.nn.Module) -> bool:
    """Whether fused_linear prepacks this layer for oneDNN (a float Linear on the CPU)."""
    return isinstance(module, torch.nn.Linear) and module.weight.device.type == "cpu" and torch.backends.mkldnn.is_available()


def fused_linear(modules: list[torch.nn.Linear], weights: str = "float32") -> Linear:
    """One callable for Linear layers sharing an input: their outputs side by side, with float32 or
    int8 / int4 (weight-only) decode weights. Packed float layers take at least two rows (oneDNN takes
    another kernel for a single row, whose sums differ in the last bits)."""
    first = modules[0]
    if weights == "float32" and not packs(first):  # on an accelerator: the modules as they are
        return lambda x: torch.cat([m(x) for m in modules], dim=-1)
    weight = torch.cat([m.weight for m in modules])
    bias = torch.cat([m.bias for m in modules]) if first.bias is not None else None
    if weights != "float32":
        return quantize(weight, weights, bias)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama-family RMSNorm module's own arithmetic, without its per-call dtype round trips."""
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * y.to(x.dtype)


class DecodeStep:
    """A LoadedModel's weights laid out for batched steps, in its `decode_weights` (float32 shares the
    embeddings and norms and adds a packed copy of the Linear weights; int8 / int4 add only theirs and
    an int8 copy of the LM head)."""

    def __init__(self, loaded: LoadedModel):
        body, head, weights = loaded.model.model, loaded.model.lm_head, loaded.decode_weights
        self.embed, self.norm, self.rotary = body.embed_tokens, body.norm, body.rotary_emb
        self.layers = [_Layer(layer, loaded.head_dim, weights) for layer in body.layers]
        quantized = weights != "float32"
        self.lm_head = ExactGreedyHead(head.weight, head.bias) if quantized else fused_linear([head])
        self.min_rows = 2 if packs(head) and not quantized else 1

    @torch.inference_mode()
    def __call__(self, tokens: list[int], positions: list[int], caches: list[DynamicCache]) -> torch.Tensor:
        """Feed token i at positions[i] over caches[i] (each grows by it): next-token logits [len, vocab]."""
        return self.lm_head(self.hidden(tokens, positions, caches))[:len(tokens)].float()

    @torch.inference_mode()
    def hidden(self, tokens: list[int], positions: list[int], caches: list[DynamicCache]) -> torch.Tensor:
        """What the LM head reads: the final norm's output, [len, hidden] padded to `min_rows` rows."""
        device, padding = self.embed.weight.device, max(0, self.min_rows - len(tokens))
        hidden = self.embed(torch.tensor(tokens + tokens[:1] * padding, device=device))
        cos, sin = self.rotary(hidden, torch.tensor(positions + positions[:1] * padding, device=device)[:, None])
        half = sin.shape[-1] // 2
        signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # rotate_half's signs, once per step
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, signed_sin, caches, index)
        return rms_norm(self.norm, hidden)


class _Layer:
    def __init__(self, layer: torch.nn.Module, head_dim: int, weights: str):
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        self.qkv = fused_linear([attention.q_proj, attention.k_proj, attention.v_proj], weights)
        self.o_proj, self.down = fused_linear([attention.o_proj], weights), fused_linear([mlp.down_proj], weights)
        self.gate_up = fused_linear([mlp.gate_proj, mlp.up_proj], weights)
        self.act, self.scaling, self.head_dim = mlp.act_fn, attention.scaling, head_dim
        self.q_heads = attention.q_proj.out_features // head_dim
        self.qk_width = attention.q_proj.out_features + attention.k_proj.out_features

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                 caches: list[DynamicCache], index: int) -> torch.Tensor:
        rows, qkv = len(hidden), self.qkv(rms_norm(self.input_norm, hidden))
        qk = qkv[:, :self.qk_width].view(rows, -1, self.head_dim)  # query heads, then key heads
        if self.q_norm is not None:
            qk = torch.cat([rms_norm(self.q_norm, qk[:, :self.q_heads]), rms_norm(self.k_norm, qk[:, self.q_heads:])], 1)
        qk = qk * cos + qk.roll(self.head_dim // 2, dims=-1) * signed_sin  # RoPE on queries and keys at once
        q, k, v = qk[:, :self.q_heads], qk[:, self.q_heads:], qkv[:, self.qk_width:].view(rows, -1, self.head_dim)
        out = [self._attend(q[i], k[i], v[i], cache, index) for i, cache in enumerate(caches)]
        hidden = hidden + self.o_proj(torch.cat(out + out[:1] * (rows - len(out))))
        gate, up = self.gate_up(rms_norm(self.post_norm, hidden)).chunk(2, dim=-1)
        return hidden + self.down(self.act(gate) * up)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: DynamicCache,
                index: int) -> torch.Tensor:
        """One request's new token over its cache; query heads of a group fold into rows of their kv head."""
        keys, values = cache.layers[index].update(k[None, :, None], v[None, :, None])
        kv_heads = k.shape[0]
        folded = q.reshape(1, kv_heads, -1, self.head_dim)
        return decode_attention(folded, keys, values, self.scaling).reshape(1, -1)
