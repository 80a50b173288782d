"""Row attention: any sorted set of prompt rows attends causally on original positions, exactly as one
masked attention over the whole cache would, with grouped K/V heads and on every path (blocks, tail)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ragblend.engine import attention
from ragblend.engine.attention import RowPlan, causal_rows_mask, rows_attention


class Grouped(torch.nn.Module):
    num_key_value_groups = 3


def reference(query, key, value, rows, scale=None):
    """One masked attention over the whole cache, the definition the fast paths must match."""
    mask = causal_rows_mask(rows, 0, key.shape[2])[None, None]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize("rows", [
    torch.tensor([3, 4, 9, 10, 11, 30, 31, 47]),  # scattered chunk tokens plus a question tail
    torch.arange(20, 48),  # a contiguous tail (prefix mode)
    torch.arange(0, 48),  # every row
    torch.tensor([0, 47]),
], ids=["scattered", "tail", "all", "ends"])
@pytest.mark.parametrize("block", [2, 256])
def test_rows_attend_exactly_as_a_causal_mask_on_original_positions(rows, block, monkeypatch):
    monkeypatch.setattr(attention, "ROW_BLOCK", block)
    torch.manual_seed(0)
    query = torch.randn(1, 6, len(rows), 16)
    key, value = torch.randn(1, 2, int(rows[-1]) + 1, 16), torch.randn(1, 2, int(rows[-1]) + 1, 16)
    out, _ = rows_attention(Grouped(), query, key, value, None, scaling=0.25, rows=RowPlan(rows))
    assert out.shape == (1, len(rows), 6, 16)
    assert torch.allclose(out, reference(query, key, value, rows, scale=0.25), atol=1e-5)


def test_without_rows_it_is_plain_sdpa():
    torch.manual_seed(1)
    query, key, value = torch.randn(1, 6, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    out, _ = rows_attention(Grouped(), query, key, value, None)
    assert torch.allclose(out, reference(query, key, value, torch.arange(5)), atol=1e-6)
