"""The prompt as token ids plus where each stored span sits: prefix, chunks in order, question suffix.

Assembled from stored token ids only, never by searching separator strings in text, so chunk
boundaries are exact and every mode sees the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Span:
    """A stored span of the prompt: `key` is a chunk id, or None for the in-memory prefix."""

    key: str | None
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class PromptLayout:
    token_ids: tuple[int, ...]
    spans: tuple[Span, ...]  # prefix first, then chunks; they tile [0, suffix_start)
    suffix_start: int

    @classmethod
    def build(cls, prefix_ids: tuple[int, ...], chunks: list[tuple[str, tuple[int, ...]]], suffix_ids: list[int]) -> "PromptLayout":
        ids = list(prefix_ids)
        spans = [Span(None, 0, len(prefix_ids))]
        for key, chunk_ids in chunks:
            spans.append(Span(key, len(ids), len(chunk_ids)))
            ids.extend(chunk_ids)
        suffix_start = len(ids)
        return cls(tuple(ids + list(suffix_ids)), tuple(spans), suffix_start)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def prefix_len(self) -> int:
        return self.spans[0].length

    @property
    def chunk_spans(self) -> tuple[Span, ...]:
        return self.spans[1:]

    def ids_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.token_ids, dtype=torch.long, device=device)
