"""A session's history as a request's `History`: the prompt prefix, then each kept turn's KV from the
fastest tier that holds it (RAM, else disk read layer by layer by the loader, else recomputed), and the
turn's prefill over it, repaired once if a stored segment fails its check."""
from __future__ import annotations

import time

from kvchunks.chunk_kv import ChunkKV, cache_layers
from kvchunks.kvstore import CorruptKVError, StoredKV
from ragblend.contexts import ContextChunk
from ragblend.engine.selection import BlendConfig
from ragblend.request import History, PreparedPrompt, RequestPath
from ragblend.sessions.prefixes import Prefixes
from ragblend.query import Resolved
from ragblend.storage.session_store import SessionRecord, SessionStore, Turn

SOURCES = ("ram", "disk", "recomputed")  # where a turn's history came from, fastest first


class SessionHistory:
    def __init__(self, store: SessionStore, requests: RequestPath, prefixes: Prefixes):
        self.store, self.requests, self.prefixes = store, requests, prefixes

    def prefill(self, record: SessionRecord, kept: list[Turn], chunks: list[ContextChunk], suffix: list[int],
                turn: Resolved, reserve: int) -> tuple[PreparedPrompt, History, float]:
        """The turn's prefill over its history, and when the history was loaded; a damaged segment is
        forgotten, its turn recomputed and the prefill retried."""
        request = turn.request
        history = self.load(record, kept)
        loaded = time.perf_counter()
        try:
            prepared = self.requests.prefill(history, chunks, suffix, request.mode, turn.blend, request.load_depth,
                                             reserve, request.order)
        except CorruptKVError as error:
            self.store.forget_segment(record.id, error.key, kept)
            history = self.load(record, kept)
            prepared = self.requests.prefill(history, chunks, suffix, request.mode, turn.blend, request.load_depth,
                                             reserve, request.order)
        return prepared, history, loaded

    def load(self, record: SessionRecord, turns: list[Turn]) -> History:
        """Prefix + kept turns; `source` is the slowest tier any of them came from."""
        template, prefix_kv = self.prefixes.get(record.system)
        history = History(template.prefix_ids, [(0, prefix_kv)])
        for turn in turns:
            key = self.store.segment_key(record.id, turn.segment)
            kv, source = self.store.ram.get(key), "ram"
            if kv is None and turn.has_kv:
                kv, source = StoredKV(self.store.kv, key), "disk"
            if kv is None:
                kv, source = self._recompute(record.id, history, turn), "recomputed"
            history = History(history.token_ids + tuple(turn.token_ids),
                              [*history.sources, (len(history.token_ids), kv)],
                              max(history.source, source, key=SOURCES.index))
        return history

    def _recompute(self, session_id: str, history: History, turn: Turn) -> ChunkKV:
        """A turn whose save never committed (a crash): prefill its tokens behind the history and store them."""
        prepared = self.requests.prefill(history, [], turn.token_ids, "full", BlendConfig())
        kv = self.requests.segment(cache_layers(prepared.prefill.cache), len(history.token_ids), len(prepared.layout))
        self.store.commit_segment(session_id, turn, kv)
        return kv
