"""One question and how to answer it: the Request every surface builds (`RagBlend.query`, `Chat.send`,
the server, the CLI), validated once here, and what the store resolves it to."""
from __future__ import annotations

from dataclasses import dataclass, field

from index.namespaces import DEFAULT_NAMESPACE, validate_namespace
from ragblend.contexts import ContextChunk
from ragblend.engine.generate import SamplingConfig
from ragblend.engine.selection import BlendConfig

MODES = ("blend", "reuse", "prefix", "full")
ORDERS = ("retrieval", "cache")  # chunks as retrieved, or the longest stored exact path first


@dataclass(frozen=True)
class Request:
    """`contexts`: passages (strings, SearchHits, LangChain Documents) to answer from; None retrieves the
    `top_k` best chunks of `namespace`. The rest is documented on `RagBlend.query`."""

    question: str
    contexts: tuple | None = None
    top_k: int = 4
    mode: str = "blend"
    recompute_ratio: float | str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    stream: bool = False
    check_layer: int | None = None
    blend: BlendConfig | None = None
    load_depth: int = 2
    seed: int | None = None
    order: str = "retrieval"
    namespace: str = DEFAULT_NAMESPACE
    sampling: SamplingConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError("question must be a non-empty string")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; choose one of {', '.join(ORDERS)}")
        if self.contexts is not None and not self.contexts:
            raise ValueError("contexts must be a non-empty list (or None to retrieve)")
        validate_namespace(self.namespace)
        overrides = {"recompute_ratio": self.recompute_ratio, "check_layer": self.check_layer}
        BlendConfig(**{k: v for k, v in overrides.items() if v is not None})  # their errors, before any work
        set_field = object.__setattr__  # frozen: normalised once, here
        if self.contexts is not None:
            set_field(self, "contexts", tuple(self.contexts))
        set_field(self, "stop", tuple(self.stop or ()))
        set_field(self, "sampling", SamplingConfig(self.max_new_tokens, self.temperature, self.stop, self.seed))


@dataclass(frozen=True)
class Resolved:
    """A Request with what the store resolved for it: its chunks (retrieved or given, in order) and the
    blend settings it runs with."""

    request: Request
    chunks: list[ContextChunk]
    blend: BlendConfig
    retrieve_s: float = 0.0
