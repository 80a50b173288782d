"""Row attention: any sorted set of prompt rows attends causally on original positions, exactly as one
masked attention over the whole cache would, with grouped K/V heads, a batch of spans, a sliding window,
and on every path (blocks, tail)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ragblend.engine import attention
from ragblend.engine.attention import RowPlan, causal_rows_mask, rows_attention


def reference(query, key, value, rows, scale, window=None):
    """One masked attention over the whole cache, the definition the fast paths must match."""
    mask = causal_rows_mask(rows, 0, key.shape[2], window)[None, None]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize("rows", [
    torch.tensor([3, 4, 9, 10, 11, 30, 31, 47]),  # scattered chunk tokens plus a question tail
    torch.arange(20, 48),  # a contiguous tail (prefix mode, precompute behind a prefix)
    torch.arange(0, 48),  # every row
    torch.tensor([0, 47]),
], ids=["scattered", "tail", "all", "ends"])
@pytest.mark.parametrize("window", [None, 5, 47, 48], ids=["full", "window-5", "window-47", "window-48"])
@pytest.mark.parametrize("block", [2, 256])
def test_rows_attend_exactly_as_a_causal_mask_on_original_positions(rows, window, block, monkeypatch):
    """A sliding-window row at p sees keys p - window + 1 .. p; a window past the last row changes nothing."""
    monkeypatch.setattr(attention, "ROW_BLOCK", block)
    torch.manual_seed(0)
    query = torch.randn(2, 6, len(rows), 16)  # a batch of two spans, 3 query heads per kv head
    key, value = torch.randn(2, 2, int(rows[-1]) + 1, 16), torch.randn(2, 2, int(rows[-1]) + 1, 16)
    out = rows_attention(query, key, value, RowPlan(rows), 0.25, window)
    assert out.shape == (2, len(rows), 6, 16)
    assert torch.allclose(out, reference(query, key, value, rows, 0.25, window), atol=1e-5)
