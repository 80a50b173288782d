"""Rotary position embedding applied through the model's own rotary module, so scaled variants stay exact."""
from __future__ import annotations

import torch


def rotary_cos_sin(rotary_emb: torch.nn.Module, positions: torch.Tensor, dtype: torch.dtype,
                   layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for 1-D `positions`, shaped [1, n, head_dim]; angles are computed in fp32 by the model.
    `layer_type` picks the table of a model with a RoPE per layer type (Gemma 3: local and global bases)."""
    probe = torch.empty(1, dtype=dtype, device=positions.device)
    if layer_type is None:
        return rotary_emb(probe, positions[None, :])
    return rotary_emb(probe, positions[None, :], layer_type)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pre-RoPE keys [..., n, head_dim] by per-position cos/sin [1, n, head_dim]."""
    return keys * cos + rotate_half(keys) * sin


def rotate_in_place(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """apply_rope written into `keys` itself: one temporary instead of four on the loader's hot path."""
    rotated = rotate_half(keys)
    keys.mul_(cos).addcmul_(rotated, sin)


def unrotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo apply_rope (rotate by the negative angle): post-RoPE keys back to position-free ones."""
    return keys * cos - rotate_half(keys) * sin
