"""One decode step of several requests in one forward, through the model's one layer definition
(engine/transformer.py) with its Linear weights laid out for decode.

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

from functools import partial
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from ragblend.engine.decode_attention import decode_attention
from ragblend.engine.exact_head import ExactGreedyHead
from ragblend.engine.transformer import Layer, Linears, Projection, separate_linears
from ragblend.engine.weight_only import quantize

if TYPE_CHECKING:
    from ragblend.engine.model import LoadedModel

PACK_ROWS = 4  # the batch size oneDNN lays the packed weights out for (measured flat from 1 to 8 rows)


def packs(module: torch.nn.Module) -> bool:
    """Whether fused_linear prepacks this layer for oneDNN (a float Linear on the CPU)."""
    return isinstance(module, torch.nn.Linear) and module.weight.device.type == "cpu" and torch.backends.mkldnn.is_available()


def fused_linear(modules: list[torch.nn.Linear], weights: str = "float32") -> Linears:
    """One callable for Linear layers sharing an input: their outputs side by side, with float32 or
    int8 / int4 (weight-only) decode weights. Packed float layers take at least two rows (oneDNN takes
    another kernel for a single row, whose sums differ in the last bits)."""
    first = modules[0]
    if weights == "float32" and not packs(first):  # on an accelerator: the modules as they are
        return separate_linears(modules)
    weight = torch.cat([m.weight for m in modules])
    bias = torch.cat([m.bias for m in modules]) if first.bias is not None else None
    if weights != "float32":
        return quantize(weight, weights, bias)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class DecodeStep:
    """A LoadedModel's weights laid out for batched steps, in its `decode_weights` (float32 shares the
    embeddings and norms and adds a packed copy of the Linear weights; int8 / int4 add only theirs and
    an int8 copy of the LM head)."""

    def __init__(self, loaded: LoadedModel):
        decoder, weights = loaded.decoder, loaded.decode_weights
        self.decoder = decoder
        layout = partial(fused_linear, weights=weights)
        self.layers = [Layer(layer, decoder.family, index, loaded.head_dim, layout)
                       for index, layer in enumerate(loaded.model.base_model.layers)]
        head, quantized = decoder.lm_head, weights != "float32"
        self.lm_head = ExactGreedyHead(head.weight, head.bias) if quantized else fused_linear([head])
        self.min_rows = 2 if packs(head) and not quantized else 1

    @torch.inference_mode()
    def __call__(self, tokens: list[int], positions: list[int], caches: list[DynamicCache]) -> torch.Tensor:
        """Feed token i at positions[i] over caches[i] (each grows by it): next-token logits [len, vocab]."""
        logits = self.lm_head(self.hidden(tokens, positions, caches))[:len(tokens)].float()
        return self.decoder.capped(logits)

    @torch.inference_mode()
    def hidden(self, tokens: list[int], positions: list[int], caches: list[DynamicCache]) -> torch.Tensor:
        """What the LM head reads: the final norm's output, [len, hidden] padded to `min_rows` rows."""
        padding = max(0, self.min_rows - len(tokens))
        device = self.decoder.embed_tokens.weight.device
        hidden = self.decoder.embed(torch.tensor(tokens + tokens[:1] * padding, device=device))
        cos, sin = self.decoder.rope(torch.tensor(positions + positions[:1] * padding, device=device))
        target = DecodeCaches(caches)
        for layer in self.layers:
            hidden = layer(hidden, cos[layer.rope], sin[layer.rope], target)
        return self.decoder.final_norm(hidden)


class DecodeCaches:
    """Attention target of a decode step: row i (a request's new token) appends its K/V to caches[i] and
    attends over that cache alone (its last `window` keys on a sliding layer); rows past the caches are
    padding and repeat row 0's result."""

    def __init__(self, caches: list[DynamicCache]):
        self.caches = caches

    def __call__(self, layer: Layer, p: Projection) -> torch.Tensor:
        out = [self._attend(layer, p.q[i], p.k[i], p.v[i], cache) for i, cache in enumerate(self.caches)]
        return torch.cat(out + out[:1] * (len(p.q) - len(out)))

    @staticmethod
    def _attend(layer: Layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """One request's new token over its cache; query heads of a group fold into rows of their kv head."""
        keys, values = cache.layers[layer.index].update(k[None, :, None], v[None, :, None])
        if layer.window is not None:
            keys, values = keys[:, :, -layer.window:], values[:, :, -layer.window:]
        folded = q.reshape(1, k.shape[0], -1, layer.head_dim)
        return decode_attention(folded, keys, values, layer.scale).reshape(1, -1)
