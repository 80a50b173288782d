"""The LM head for quantized decode weights: the vocabulary scored on int8 weights, then every token that
could be the float32 head's argmax recomputed in float32, so greedy decoding picks exactly the float32
head's token (for the hidden state the decode weights computed).

The bound: for hidden state h (rounded to bfloat16 for the kernel: h = b + r) and vocabulary row w
(int8: q), the float32 head's logit and the kernel's differ by at most
    sum over groups g of 32 inputs: |h_g| |w_g - q_g| + |r_g| |q_g|   the weights' and the input's rounding
    + 2**-12 |h| (|w| + |q|)                                         float32 sums in both products
    + OUTPUT_ERROR * |kernel logit|                                  the kernel's bfloat16 output
(Cauchy-Schwarz per group, |.| the 2-norm; the rows' group norms are computed once, a step multiplies
[rows, groups] by [groups, vocab]). Every token whose kernel logit plus its bound reaches the best
kernel logit minus its bound is recomputed; all others are below the float32 argmax's logit, so the
argmax of the returned logits is the float32 head's, first index on ties. Sampling sees the kernel's
logits everywhere else.

Why int8 for both options and per group: on SmolLM2 (one prompt's next token, real text / random tokens)
int8 leaves 4 / 258 candidates of 49,152, where one norm for the whole row leaves 4 / 575 and the
worst-case 2**-9 |h| for the input's rounding 8 / 7,100; int4 weights leave 29,775 / 49,151: its error
bound admits most of the vocabulary, so the int4 option scores its head on int8 too.

The recomputed logits are oneDNN's float32 product of the candidate rows, bit for bit the values of the
float32 decode head's packed product for 2+ rows and 2+ columns (a single row or column takes another
kernel, whose sums differ in the last bits; checked in tests/test_exact_head.py).
"""
from __future__ import annotations

import torch

from ragblend.engine.weight_only import OUTPUT_ERROR, dequantized, quantize

BOUND_GROUP = 32  # inputs per group of the bound (the whole row where the width is not a multiple)
SUM_ERROR = 2 ** -12  # float32 sums over <= 4,096 inputs: n * 2**-24 relative to |h| |row|, with room


def _group_norms(x: torch.Tensor) -> torch.Tensor:
    """[..., width] -> [..., groups]: the 2-norm of each group of BOUND_GROUP inputs."""
    group = BOUND_GROUP if x.shape[-1] % BOUND_GROUP == 0 else x.shape[-1]
    return x.reshape(*x.shape[:-1], -1, group).norm(dim=-1)


class ExactGreedyHead:
    """`hidden [rows, hidden] -> logits [rows, vocab]` whose argmax is the float32 head's."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight.detach()  # float32, not copied: the tied embedding for most models
        self.bias = None if bias is None else bias.detach().float()
        self.scores = quantize(weight, "int8", bias)
        rounded = dequantized(weight, "int8")
        self.error_norms = _group_norms(self.weight - rounded).T.contiguous()  # [groups, vocab]
        self.row_norms = _group_norms(rounded).T.contiguous()
        self.sum_reach = SUM_ERROR * (self.weight.norm(dim=1) + rounded.norm(dim=1))
        self.rows = self.recomputed = 0  # rows scored, logits recomputed in float32 (for benchmarks)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.scores(hidden)
        residual = hidden - hidden.to(torch.bfloat16).float()  # exact in float32
        bound = (_group_norms(hidden) @ self.error_norms + _group_norms(residual) @ self.row_norms
                 + hidden.norm(dim=1, keepdim=True) * self.sum_reach + OUTPUT_ERROR * logits.abs())
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
