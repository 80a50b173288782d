"""Request bodies the server accepts: OpenAI's chat and completion formats plus ragblend's extras, with
the limits that keep one request from taking the server down."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ragblend.query import MODES, Request
from ragblend.storage.documents import DocumentError, check_unicode


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 32 << 20
    max_messages: int = 64
    max_tokens: int = 1024
    max_top_k: int = 32
    max_contexts: int = 32
    max_documents: int = 10_000


LIMITS = Limits()


class Body(BaseModel):
    """A request body: every string in it is checked to be valid Unicode once, here, before any field is
    read (chat messages, contexts, prompts, queries, stops, documents and their metadata alike)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        try:
            check_unicode(data, "")
        except DocumentError as exc:
            raise PydanticCustomError("invalid_unicode", "{problem}", {"problem": str(exc)}) from None
        return data


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class Generation(Body):
    """Fields shared by chat and plain completions."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields (user, seed...) a server may ignore

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=LIMITS.max_tokens)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=LIMITS.max_tokens)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    seed: int | None = None
    top_k: int = Field(default=4, ge=1, le=LIMITS.max_top_k)
    mode: str = "blend"
    order: Literal["retrieval", "cache"] = "retrieval"
    recompute_ratio: float | Literal["auto"] | None = None
    contexts: list[str] | None = Field(default=None, min_length=1, max_length=LIMITS.max_contexts)

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, mode: str) -> str:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        return mode

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if "" in stops:
            raise ValueError("a stop sequence must not be empty (it would end every answer before it began)")
        return stop

    @property
    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 64

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def request(self, question: str, namespace: str, contexts: list | None = None) -> Request:
        """The Request this body asks for, streamed (the server reads every answer as a stream);
        `contexts`: chunks retrieved ahead for it, else the body's own (None retrieves)."""
        return Request(question, contexts=contexts if contexts is not None else self.contexts, top_k=self.top_k,
                       mode=self.mode, recompute_ratio=self.recompute_ratio, max_new_tokens=self.new_tokens,
                       temperature=self.temperature, stop=tuple(self.stops), stream=True, seed=self.seed,
                       order=self.order, namespace=namespace)


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1, max_length=LIMITS.max_messages)
    session_id: str | None = Field(default=None, min_length=1, max_length=128)


class CompletionRequest(Generation):
    prompt: str = Field(min_length=1)


class SearchRequest(Body):
    query: str = Field(min_length=1)
    top_k: int = Field(default=4, ge=1, le=LIMITS.max_top_k)


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, min_length=1)
    text: str = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)
    ttl_s: float | None = Field(default=None, gt=0)
    expire: Literal["kv", "document"] = "kv"


class DocumentsRequest(Body):
    documents: list[DocumentIn] = Field(min_length=1, max_length=LIMITS.max_documents)
    ttl_s: float | None = Field(default=None, gt=0)
