"""Split a document into chunks of at most `max_tokens` LLM tokens, preferring paragraph and sentence ends."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable

MIN_CHUNK_TOKENS = 16
MAX_CHUNK_TOKENS = 4096
_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Chunk:
    """One chunk: its text, the exact token ids its KV is computed for, and its place in the document."""

    text: str
    token_ids: tuple[int, ...]
    position: int


def chunk_id(kv_fingerprint: str, token_ids: tuple[int, ...] | list[int], namespace: str = "") -> str:
    """Stable across processes and machines (sha256, never Python's salted hash()); a tenant namespace
    gets ids (so KV, embedding and text records) of its own for the same tokens."""
    digest = hashlib.sha256(kv_fingerprint.encode())
    if namespace:
        digest.update(b"\x1fnamespace:" + namespace.encode() + b"\x1f")
    digest.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return digest.hexdigest()[:32]


def validate_chunk_tokens(max_tokens: int, model_max_positions: int) -> None:
    upper = min(MAX_CHUNK_TOKENS, model_max_positions // 2)
    if not MIN_CHUNK_TOKENS <= max_tokens <= upper:
        raise ValueError(f"chunk size {max_tokens} tokens is out of range: use {MIN_CHUNK_TOKENS}..{upper}")


def _pieces(text: str) -> list[str]:
    """Sentences, with a paragraph break kept as the end of its last sentence."""
    pieces = []
    for paragraph in _PARAGRAPH.split(text.strip()):
        sentences = [s for s in _SENTENCE_END.split(paragraph.strip()) if s]
        pieces.extend(s + " " for s in sentences[:-1])
        if sentences:
            pieces.append(sentences[-1] + "\n\n")
    return pieces


def split_document(text: str, encode: Callable[[str], list[int]], max_tokens: int) -> list[str]:
    """Greedy packing of sentences into chunk texts; a sentence longer than the budget is cut by tokens.

    `encode` must return the ids exactly as the chunk will be stored (separator included), so the
    budget is checked on the real token count, not an estimate.
    """
    chunks: list[str] = []
    current = ""
    for piece in _pieces(text):
        candidate = current + piece
        if len(encode(candidate)) <= max_tokens:
            current = candidate
            continue
        if current:
            chunks.append(current)
        current = piece
        while len(encode(current)) > max_tokens:
            head, current = _cut_by_tokens(current, encode, max_tokens)
            chunks.append(head)
    if current.strip():
        chunks.append(current)
    return [c.strip() for c in chunks if c.strip()]


def _cut_by_tokens(text: str, encode: Callable[[str], list[int]], max_tokens: int) -> tuple[str, str]:
    """Longest prefix of whole words that fits the budget (a word-free run is cut by characters)."""
    words = text.split(" ")
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(" ".join(words[:mid]))) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    if lo == 1 and len(encode(words[0])) > max_tokens:
        cut = max(1, len(text) * max_tokens // (2 * len(encode(text))))
        return text[:cut], text[cut:]
    return " ".join(words[:lo]), " ".join(words[lo:])
