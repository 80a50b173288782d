"""What a turn keeps of its session: the topic-switch test and truncation to the window. Pure functions
on turns: no store, no model, so the policy can change (or be tested) without either."""
from __future__ import annotations

import numpy as np

from ragblend.contexts import ContextChunk
from ragblend.engine.prompt import PromptTemplate
from ragblend.query import Resolved
from ragblend.storage.session_store import Turn

TOPIC_SIMILARITY = 0.2  # below this cosine to every recent question+answer (and no shared chunk): off-topic
TOPIC_RECENT_TURNS = 2
TOPIC_MODES = ("keep", "drop")


def off_topic(turns: list[Turn], chunks: list[ContextChunk], embedding: np.ndarray) -> bool:
    """No chunk shared with the recent turns and the question unlike each of their question+answer."""
    recent = turns[-TOPIC_RECENT_TURNS:]
    if not recent or {c.chunk_id for c in chunks} & {c for t in recent for c in t.chunk_ids}:
        return False
    earlier = [np.asarray(t.embedding) for t in recent if t.embedding]
    return bool(earlier) and max(float(np.dot(embedding, e)) for e in earlier) < TOPIC_SIMILARITY


def plan(template: PromptTemplate, turns: list[Turn], turn: Resolved, max_positions: int,
         max_history_tokens: int | None) -> tuple[list[Turn], list[ContextChunk], list[int]]:
    """The turns kept in the prompt, the new chunks (those not in them already) and the question suffix."""
    in_history = {c for t in turns for c in t.chunk_ids}
    chunks = unique([c for c in turn.chunks if c.chunk_id not in in_history])
    suffix = template.suffix_ids(turn.request.question)
    new_tokens = sum(len(c.token_ids) for c in chunks) + len(suffix)
    window = max_positions - new_tokens - turn.request.max_new_tokens - len(template.joint_ids)
    budget = min(window, max_history_tokens) if max_history_tokens is not None else window
    return fit(turns, budget - len(template.prefix_ids)), chunks, suffix


def fit(turns: list[Turn], budget: int) -> list[Turn]:
    """Drop the oldest turns (never the prefix, which `budget` excludes) until the rest fit `budget` tokens."""
    turns = list(turns)
    while turns and sum(len(t.token_ids) for t in turns) > budget:
        turns.pop(0)
    return turns


def unique(chunks: list[ContextChunk]) -> list[ContextChunk]:
    seen: set[str] = set()
    return [c for c in chunks if not (c.chunk_id in seen or seen.add(c.chunk_id))]
