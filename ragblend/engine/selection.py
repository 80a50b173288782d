"""Which chunk tokens blend recomputes: per-token scores on a check layer, then a budget over them.

A score says how much a token's stored KV would hurt if left as it is. The signals, all computed
from the layer's input for the rows being computed:
  value            |V_fresh - V_stored| (CacheBlend's HKVD)
  key              |K_fresh - K_stored| (rotation keeps norms, so pre- and post-RoPE agree)
  kv               both, each scaled by its mean over the candidates
  attention        attention the question's tokens pay to the token (the question is recomputed anyway)
  value_attention  attention x value deviation: the error in what the question reads from the token
  random           a control: a selection that does not beat it is not a selection

Query-aware chunks (`query_chunks`): before the signal picks tokens, part of the budget goes to whole
chunks, the ones the question's tokens pay the most attention on the check layer (a chunk the
question reads is recomputed entirely, so its tokens also see each other fresh).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ragblend.engine.attention import causal_rows_mask
from ragblend.engine.layout import PromptLayout

SIGNALS = ("value", "key", "kv", "attention", "value_attention", "random")
BUDGETS = ("global", "per_chunk")
AUTO = "auto"


@dataclass(frozen=True)
class BlendConfig:
    """How blend picks the chunk tokens to recompute; the defaults are the measured best (docs/fidelity.md)."""

    recompute_ratio: float | str = 0.15  # share of chunk tokens, or "auto"
    check_layer: int = 1  # layers before it are computed for every token; selection happens on it
    signal: str = "value"
    budget: str = "global"  # one top-k over all chunk tokens, or the same share within each chunk
    chunk_start_tokens: int = 0  # always recompute the first N tokens of every chunk after the first
    gradual: float = 1.0  # keep gradual x ratio on the check layer, narrowed to the ratio on the next
    query_chunks: float = 0.0  # share of the budget for whole chunks the question attends to most
    auto_target: float = 0.3  # "auto": smallest ratio whose tokens hold this share of the total score
    auto_min: float = 0.05
    auto_max: float = 0.5
    seed: int = 0  # of the random control

    def __post_init__(self):
        ratio = self.recompute_ratio
        if ratio != AUTO and (isinstance(ratio, str) or not 0.0 <= ratio <= 1.0):
            raise ValueError(f"recompute_ratio must be in [0, 1] or 'auto', got {ratio!r}")
        if ratio == AUTO and self.signal == "random":
            raise ValueError("recompute_ratio='auto' needs a signal that measures something, not 'random'")
        if self.signal not in SIGNALS:
            raise ValueError(f"unknown blend signal {self.signal!r}; choose one of {', '.join(SIGNALS)}")
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown blend budget {self.budget!r}; choose one of {', '.join(BUDGETS)}")
        if self.check_layer < 0 or self.chunk_start_tokens < 0:
            raise ValueError("check_layer and chunk_start_tokens must be >= 0")
        if not 0.0 <= self.query_chunks <= 1.0:
            raise ValueError(f"query_chunks must be in [0, 1] (a share of the budget), got {self.query_chunks}")
        if self.query_chunks and self.budget != "global":
            raise ValueError("query_chunks recomputes whole chunks from one budget: it needs budget='global'")
        if self.gradual < 1.0:
            raise ValueError(f"gradual must be >= 1 (a multiple of the ratio), got {self.gradual}")
        if not 0.0 <= self.auto_min <= self.auto_max <= 1.0 or not 0.0 < self.auto_target <= 1.0:
            raise ValueError("auto needs 0 <= auto_min <= auto_max <= 1 and 0 < auto_target <= 1")


def deviation(fresh: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Per-token L2 distance between fresh and stored tensors over heads and dims ([1, h, n, d] -> [n])."""
    return (fresh - stored).float().pow(2).sum(dim=(0, 1, 3)).sqrt()


def question_attention(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor, scale: float,
                       window: int | None = None) -> torch.Tensor:
    """Attention mass each key position gets from the question rows, summed over heads and rows.

    queries [1, heads, q, d] (post-RoPE), keys [1, kv_heads, n, d]; a row at position p sees keys <= p
    (and > p - window on a sliding layer); `scale` is the layer's attention scale.
    """
    heads, kv_heads = queries.shape[1], keys.shape[1]
    keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    scores = queries.float() @ keys.float().transpose(-1, -2) * scale
    visible = causal_rows_mask(query_positions, 0, keys.shape[2], window)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).sum(dim=(0, 1, 2))


def auto_share(scores: torch.Tensor, config: BlendConfig) -> float:
    """Smallest share of candidates whose top scores hold `auto_target` of the total, within the bounds."""
    if len(scores) == 0:
        return 0.0
    ordered = scores.float().clamp_min(0).sort(descending=True).values
    total = float(ordered.sum())
    if total <= 0:
        return config.auto_min
    needed = int(torch.searchsorted(ordered.cumsum(0), config.auto_target * total)) + 1
    return min(max(needed / len(scores), config.auto_min), config.auto_max)


def keep_count(candidates: int, share: float) -> int:
    """`share` of `candidates`, rounded up (a ratio of 1 keeps all, 0 keeps none)."""
    return min(candidates, math.ceil(share * candidates - 1e-9))


def select_top(scores: torch.Tensor, positions: torch.Tensor, groups: torch.Tensor, sizes: dict[int, int],
               share: float) -> torch.Tensor:
    """Per group, the `share` of its `sizes[group]` tokens with the highest scores among `positions`
    (a group may already be narrowed to fewer); sorted. One group for a global budget."""
    chosen = []
    for group in groups.unique().tolist():
        member = groups == group
        count = min(int(member.sum()), keep_count(sizes[group], share))
        if count:
            chosen.append(positions[member][torch.topk(scores[member], count).indices])
    return torch.cat(chosen).sort().values if chosen else positions[:0]


def chunk_starts(positions: torch.Tensor, layout: PromptLayout, count: int) -> torch.Tensor:
    """Mask over `positions`: the first `count` tokens of every chunk after the first (forced in)."""
    forced = torch.zeros_like(positions, dtype=torch.bool)
    for span in layout.chunk_spans[1:]:
        forced |= (positions >= span.start) & (positions < span.start + count)
    return forced


def attended_chunks(paid: torch.Tensor, positions: torch.Tensor, layout: PromptLayout, tokens: int) -> torch.Tensor:
    """Mask over `positions`: whole chunks, the most attended first (`paid`: attention per position),
    each taken if it still fits in `tokens`."""
    chosen = torch.zeros_like(positions, dtype=torch.bool)
    spans = layout.chunk_spans
    members = [(positions >= s.start) & (positions < s.end) for s in spans]
    mass = torch.stack([paid[m].sum() for m in members])
    for index in mass.argsort(descending=True).tolist():
        if spans[index].length <= tokens:
            chosen |= members[index]
            tokens -= spans[index].length
    return chosen


def budget_groups(positions: torch.Tensor, layout: PromptLayout, budget: str) -> tuple[torch.Tensor, dict[int, int]]:
    """A budget group per position and each group's full size: one group, or one per chunk."""
    if budget == "global":
        return torch.zeros_like(positions), {0: layout.suffix_start - layout.prefix_len}
    starts = torch.tensor([s.start for s in layout.chunk_spans], device=positions.device)
    groups = torch.searchsorted(starts, positions, right=True) - 1
    return groups, {i: s.length for i, s in enumerate(layout.chunk_spans)}
