"""OpenAI's response shapes: chat.completion and text_completion objects, their streamed chunks, usage
(with ragblend's recomputed tokens), the `ragblend` details field, and the error body."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from ragblend.answer import Answer
from ragblend.serve.answering import AnswerWork


def error_body(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def usage(answer: Answer) -> dict:
    completion = len(answer.token_ids)
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": completion,
            "total_tokens": answer.prompt_tokens + completion, "recomputed_tokens": answer.recomputed_tokens}


def details(answer: Answer) -> dict:
    return {"mode": answer.mode, "order": answer.order, "ttft_s": answer.ttft_s,
            "chunks": [{"doc_id": c.doc_id, "chunk_id": c.chunk_id, "score": c.score} for c in answer.chunks],
            "timings": dict(answer.timings)}


@dataclass
class ChatRender:
    """OpenAI chat.completion objects and chunks."""

    model: str
    max_tokens: int
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    kind: str = "chat.completion"

    def _head(self, work: AnswerWork, suffix: str = "") -> dict:
        head = {"id": self.id, "object": self.kind + suffix, "created": self.created, "model": self.model}
        if work.session_id is not None and work.keeps_session:
            head["session_id"] = work.session_id
        return head

    def finish_reason(self, answer: Answer) -> str:
        return "length" if len(answer.token_ids) >= self.max_tokens else "stop"

    def whole(self, answer: Answer, work: AnswerWork) -> dict:
        return {**self._head(work), "choices": [self.choice(answer.text, self.finish_reason(answer))],
                "usage": usage(answer), "ragblend": details(answer)}

    def choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

    def delta(self, work: AnswerWork, piece: str | None, finish: str | None = None) -> dict:
        delta = {"role": "assistant", "content": ""} if piece is None and finish is None else \
            ({"content": piece} if piece is not None else {})
        return {**self._head(work, ".chunk"), "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@dataclass
class CompletionRender(ChatRender):
    """OpenAI text_completion objects (streamed chunks have the same object name)."""

    kind: str = "text_completion"
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")

    def _head(self, work: AnswerWork, suffix: str = "") -> dict:
        return super()._head(work)

    def choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def delta(self, work: AnswerWork, piece: str | None, finish: str | None = None) -> dict:
        return {**self._head(work), "choices": [self.choice(piece or "", finish)]}
