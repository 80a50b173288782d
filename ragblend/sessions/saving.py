"""What a finished turn leaves behind: its record now (small, synchronous, so the next turn sees it), its
KV in the background (the answer is returned while it is written; the next turn waits for it only if it
has not finished). A lost save costs a recompute, never a wrong history."""
from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
from transformers import DynamicCache

from index.namespaces import label, unscoped
from kvchunks.chunk_kv import cache_layers
from ragblend.answer import Answer
from ragblend.contexts import ContextChunk
from ragblend.engine.generate import feed
from ragblend.engine.prompt import PromptTemplate
from ragblend.request import PreparedPrompt, RequestPath
from ragblend.storage.session_store import SessionStore, Turn


@dataclass(frozen=True)
class AnsweredTurn:
    """What a turn's save needs from its `send`."""

    session_id: str
    chunks: list[ContextChunk]  # the new ones (not already in the history)
    question: str
    embedding: np.ndarray | None  # the question's, when topic switches are checked
    kept: set[int]  # segments of the turns it was answered after (the others were truncated or dropped)
    template: PromptTemplate


class TurnSaver:
    """Commits answered turns: one background writer, and each session's pending write to wait for."""

    def __init__(self, store: SessionStore, requests: RequestPath, embed: Callable[[str], np.ndarray]):
        self.store, self.requests, self.embed = store, requests, embed
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragblend-session-save")
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()

    def on_finish(self, turn: AnsweredTurn) -> Callable[[Answer, PreparedPrompt], None]:
        """The callback the request path calls with the finished answer and the prompt whose cache it grew."""
        return partial(self._commit, turn)

    def wait(self, session_id: str | None = None) -> None:
        """Block until the pending write of one session (or of all) has finished."""
        with self._lock:
            futures = [self._pending.get(session_id)] if session_id else list(self._pending.values())
        for future in futures:
            if future is not None:
                future.result()

    def close(self) -> None:
        """Finish every pending write; nothing acknowledged is lost."""
        self._writer.shutdown(wait=True)

    def _commit(self, done: AnsweredTurn, answer: Answer, prepared: PreparedPrompt) -> None:
        history_len = int(answer.timings["history_tokens"])
        tokens = list(prepared.layout.token_ids[history_len:]) + answer.token_ids + list(done.template.joint_ids)
        store = self.store
        with store.env.begin(write=True) as txn:
            record = store.read(txn, done.session_id)
            if record is None:  # ended while this turn ran
                txn.abort()
                return
            turn = Turn(record.next_segment, tokens, [c.chunk_id for c in done.chunks], done.question,
                        self._topic_embedding(done, answer), answer=answer.text)
            store.drop_turns(txn, done.session_id, [t for t in record.turns if t.segment not in done.kept])
            kept = [t for t in record.turns if t.segment in done.kept]
            record = replace(record, turns=[*kept, turn], next_segment=turn.segment + 1, last_used=time.time())
            store.write(txn, record)
        future = self._writer.submit(self._write, done.session_id, answer, prepared.prefill.cache, history_len, turn)
        with self._lock:
            self._pending[done.session_id] = future

    def _topic_embedding(self, done: AnsweredTurn, answer: Answer) -> list[float]:
        """What later questions are compared with: this turn's question and answer together (a follow-up
        often names what the answer said, not what the question did)."""
        if done.embedding is None:
            return []
        return self.embed(f"{done.question}\n{answer.text}").tolist()

    def _write(self, session_id: str, answer: Answer, cache: DynamicCache, start: int, turn: Turn) -> None:
        began = time.perf_counter()
        try:
            cached = cache.get_seq_length()
            tail = turn.token_ids[cached - start:]  # the last answer token and the joint were never fed
            if tail:
                feed(self.requests.model, cache, tail, cached)
            kv = self.requests.segment(cache_layers(cache), start, start + len(turn.token_ids))
            self.store.commit_segment(session_id, turn, kv)
        except Exception as exc:  # noqa: BLE001 - the turn stays unsaved and is recomputed when next needed
            warnings.warn(f"ragblend: saving a turn of session {label(*unscoped(session_id))} failed ({exc}); "
                          "it will be recomputed on the next turn", stacklevel=1)
        answer.timings["save_s"] = time.perf_counter() - began
