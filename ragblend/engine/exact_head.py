"""The LM head for quantized decode weights: the vocabulary scored with the weight-only kernel, then every
token that could be the float32 head's argmax recomputed in float32, so greedy decoding picks exactly
the float32 head's token (for the hidden state the decode weights computed).

The bound: for hidden state h and vocabulary row w (quantized: q), the float32 head's logit and the
kernel's differ by at most
    |h| * (|w - q| + 2**-8 * (|w| + |q|))   weights' error; h rounded to bfloat16 (2**-9 |h|) and float32
                                            sums over the hidden size (< 2**-15 for 576) in both products
    + OUTPUT_ERROR * |kernel logit|         the kernel's bfloat16 output
(Cauchy-Schwarz, |.| the 2-norm; the per-row norms are computed once). Every token whose kernel logit
plus its bound reaches the best kernel logit minus its bound is recomputed; all others are below the
float32 argmax's logit, so the argmax of the returned logits is the float32 head's, first index on
ties. Sampling sees the kernel's logits everywhere else.

The recomputed logits are oneDNN's float32 product of the candidate rows, bit for bit the values of the
float32 decode head's packed product for 2+ rows and 2+ columns (a single row or column takes another
kernel, whose sums differ in the last bits; checked in tests/test_exact_head.py).
"""
from __future__ import annotations

import torch

from ragblend.engine.weight_only import OUTPUT_ERROR, dequantized, quantize

INPUT_ERROR = 2 ** -8  # bfloat16 rounding of the hidden state and float32 sums, relative to |h| |row|


class ExactGreedyHead:
    """`hidden [rows, hidden] -> logits [rows, vocab]` whose argmax is the float32 head's."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kind: str):
        self.weight = weight.detach()  # float32, not copied: the tied embedding for most models
        self.bias = None if bias is None else bias.detach().float()
        self.scores = quantize(weight, kind, bias)
        rounded = dequantized(weight, kind)
        self.reach = (weight - rounded).norm(dim=1) + INPUT_ERROR * (weight.norm(dim=1) + rounded.norm(dim=1))
        self.rows = self.recomputed = 0  # rows scored, logits recomputed in float32 (for benchmarks)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.scores(hidden)
        bound = hidden.norm(dim=1, keepdim=True) * self.reach + OUTPUT_ERROR * logits.abs()
        floor = (logits - bound).amax(dim=1, keepdim=True)
        columns = ((logits + bound) >= floor).any(dim=0).nonzero().squeeze(1)
        columns = columns if len(columns) > 1 else columns.repeat(2)  # oneDNN takes another kernel for one column
        rows = hidden if len(hidden) > 1 else hidden.expand(2, -1)  # and for one row: as the float32 head, 2+
        bias = None if self.bias is None else self.bias[columns]
        exact = torch.ops.mkldnn._linear_pointwise(rows, self.weight[columns], bias, "none", [], "")
        logits[:, columns] = exact[:len(hidden)]
        self.rows += len(hidden)
        self.recomputed += len(hidden) * len(columns)
        return logits
