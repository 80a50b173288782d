"""One `send` of a conversation, resolved by the facade: what the session layer answers."""
from __future__ import annotations

from dataclasses import dataclass

from ragblend.contexts import ContextChunk
from ragblend.engine.generate import SamplingConfig
from ragblend.engine.selection import BlendConfig


@dataclass(frozen=True)
class TurnRequest:
    """One `send`, resolved: the question, its contexts and how to fuse and sample them."""

    question: str
    chunks: list[ContextChunk]
    mode: str
    blend: BlendConfig
    sampling: SamplingConfig
    load_depth: int = 2
    retrieve_s: float = 0.0
    order: str = "retrieval"
