"""Weight-only int8 and int4 Linear layers for decode on the CPU, on torch's own kernels.

A decode step is bound by the bytes of weights it reads (SmolLM2 in float32: 540 MB a token), so the
decode weights are stored in 8 or 4 bits and expanded inside the matrix product:
`torch.ops.aten._weight_int8pack_mm` (one scale per output channel) and
`torch.ops.aten._weight_int4pack_mm_for_cpu` (asymmetric groups of GROUP_SIZE input channels, what
gpt-fast's and torchao's CPU int4 layouts call). Both kernels are fast only for bfloat16 activations
(measured, 1 thread, the 49k x 576 LM head: float32 input 78 / 144 ms, bfloat16 8.2 / 6.2 ms against
26 ms for oneDNN's packed float32), so a layer rounds its input to bfloat16 and its output comes back
in bfloat16, then float32. Each row's result is independent of the other rows (checked for 1-8 rows),
so a request decodes the same tokens alone or batched.

Scales are rounded up to bfloat16 before the weights are rounded to them, so a weight's error stays
within half a step and `dequantized` is exactly the matrix the kernel multiplies by.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("int8", "int4")
GROUP_SIZE = 32  # int4: input channels per scale and zero (32 and 64 ran alike; 128 does not divide SmolLM2's 576)
INT4_MIDPOINT = 8  # the kernel's int4 values are unsigned 0..15 around this zero point
OUTPUT_ERROR = 2 ** -7  # a kernel output's error relative to itself (bfloat16 output, measured <= 2**-8)


@dataclass(frozen=True)
class QuantizedLinear:
    """`x @ weight.T (+ bias)` with the weight packed for one of torch's weight-only CPU kernels."""

    kind: str
    packed: torch.Tensor  # int8: [out, in] int8; int4: the kernel's packed layout
    scales: torch.Tensor  # int8: [out] bfloat16; int4: [in / GROUP_SIZE, out, 2] bfloat16 scales and zeros
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] float32 -> [rows, out] float32."""
        x = x.to(torch.bfloat16)
        if self.kind == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x, self.packed, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales)
        y = y.float()
        return y if self.bias is None else y + self.bias


def _bf16_up(x: torch.Tensor) -> torch.Tensor:
    """bfloat16 values no smaller than `x` (positive `x`): rounding to nearest from just above."""
    return (x * (1 + 2 ** -8)).to(torch.bfloat16)


def _int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (values [out, in] int8, scales [out] bfloat16)."""
    scales = _bf16_up(weight.abs().amax(dim=1).clamp(min=1e-12) / 127)
    values = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return values, scales


def _int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of GROUP_SIZE inputs: (values [out, in] int32 in 0..15, [groups, out, 2]
    bfloat16 scales and zeros, the kernel's layout: weight = (value - 8) * scale + zero)."""
    out, inputs = weight.shape
    if inputs % GROUP_SIZE or out % 16:
        raise ValueError(f"int4 decode weights need layers of a multiple of {GROUP_SIZE} inputs and of 16 outputs "
                         f"(torch's kernel), got {inputs} inputs and {out} outputs")
    groups = weight.reshape(out, inputs // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = _bf16_up(((high - low) / 15).clamp(min=1e-12))
    zeros = (low + INT4_MIDPOINT * scales.float()).to(torch.bfloat16)
    offset = zeros.float() - INT4_MIDPOINT * scales.float()  # what value 0 stands for, as stored
    values = torch.round((groups - offset[..., None]) / scales.float()[..., None]).clamp(0, 15)
    return values.to(torch.int32).reshape(out, inputs), torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()


def quantize(weight: torch.Tensor, kind: str, bias: torch.Tensor | None = None) -> QuantizedLinear:
    """A float [out, in] weight packed for `kind`'s kernel."""
    weight = weight.detach().float()
    bias = None if bias is None else bias.detach().float()
    if kind == "int8":
        return QuantizedLinear(kind, *_int8(weight), bias)
    if kind == "int4":
        values, scales_zeros = _int4(weight)
        return QuantizedLinear(kind, torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1), scales_zeros, bias)
    raise ValueError(f"weight-only kinds are {', '.join(KINDS)}, got {kind!r}")


def dequantized(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The float32 matrix `quantize(weight, kind)` multiplies by (its error is `weight - dequantized`)."""
    weight = weight.detach().float()
    if kind == "int8":
        values, scales = _int8(weight)
        return values.float() * scales.float()[:, None]
    values, scales_zeros = _int4(weight)
    out, inputs = weight.shape
    scales, zeros = (scales_zeros[..., i].float().T[..., None] for i in (0, 1))  # [out, groups, 1]
    grouped = values.float().reshape(out, -1, GROUP_SIZE)
    return ((grouped - INT4_MIDPOINT) * scales + zeros).reshape(out, inputs)
