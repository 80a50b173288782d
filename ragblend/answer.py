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
    """Iterate for text pieces as they are generated; `.answer` holds the full Answer afterwards.

    What the stream holds (a session's lock, through `on_close`) is freed when it is exhausted, when it
    is closed (`close()`, a `with` block, or an abandoned `for` loop's iterator being collected), and only
    once. An inner iterator with a `close` is closed with it, so nested streams release from the outside in.
    """

    def __init__(self, pieces: Iterator[str], finish: Callable[[str], Answer],
                 on_close: Callable[[], None] | None = None):
        self._pieces, self._finish, self._on_close = pieces, finish, on_close
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        text = []
        try:
            for piece in self._pieces:
                text.append(piece)
                yield piece
            self.answer = self._finish("".join(text))
        finally:
            self.close()

    def close(self) -> None:
        """Stop generating and free what the stream holds; the answer stays unset unless it had finished."""
        try:
            close = getattr(self._pieces, "close", None)
            if close is not None:
                close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()

    def __enter__(self) -> AnswerStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def collect(self) -> Answer:
        with self:
            for _ in self:
                pass
        return self.answer
