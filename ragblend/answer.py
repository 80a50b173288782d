"""What a query returns: the answer with its timings, or a stream of text pieces that ends in one."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass(frozen=True)
class ChunkRef:
    chunk_id: str
    doc_id: str | None
    score: float | None
    tokens: int


@dataclass
class Answer:
    text: str
    mode: str
    ttft_s: float  # load + fuse + first token; retrieval excluded (timings["retrieve_s"])
    timings: dict[str, float]
    prompt_tokens: int
    recomputed_tokens: int
    chunks: list[ChunkRef]
    token_ids: list[int] = field(default_factory=list)
    first_token_logits: torch.Tensor | None = field(default=None, repr=False)
    order: str = "retrieval"  # the chunk order used: "retrieval", or "cache" (longest stored exact path first)


class AnswerStream:
    """Iterate for text pieces as they are generated; `.answer` holds the full Answer afterwards."""

    def __init__(self, pieces: Iterator[str], finish: Callable[[str], Answer]):
        self._pieces, self._finish = pieces, finish
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        text = []
        for piece in self._pieces:
            text.append(piece)
            yield piece
        self.answer = self._finish("".join(text))

    def collect(self) -> Answer:
        for _ in self:
            pass
        return self.answer
