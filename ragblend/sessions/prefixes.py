"""The prompt prefix per system prompt: its template and KV, computed once and shared by every session
that uses it (sessions never hold a copy; their records start after it)."""
from __future__ import annotations

import threading

from kvchunks.chunk_kv import ChunkKV
from ragblend.engine.precompute import SpanComputer
from ragblend.engine.prompt import PromptTemplate


class Prefixes:
    def __init__(self, template: PromptTemplate, spans: SpanComputer, tokenizer):
        """`template` and `spans`: the store's own prompt (system None) and what computes KV behind it."""
        self.template, self.spans, self.tokenizer = template, spans, tokenizer
        self._by_system: dict[str | None, tuple[PromptTemplate, ChunkKV]] = {}
        self._lock = threading.Lock()

    def get(self, system: str | None) -> tuple[PromptTemplate, ChunkKV]:
        with self._lock:
            if system not in self._by_system:
                self._by_system[system] = self._compute(system)
            return self._by_system[system]

    def _compute(self, system: str | None) -> tuple[PromptTemplate, ChunkKV]:
        if system is None:
            return self.template, self.spans.prefix_kv
        template = PromptTemplate.for_tokenizer(self.tokenizer, system)
        return template, self.spans.compute([list(template.prefix_ids)], behind_prefix=False)[0]
