"""Multi-turn conversations that never re-prefill their history (CachedAttention): the sessions of one
RagBlend, their lifecycle (open, seed, end, list, TTL sweep) and the lock that lets one turn of a session
run at a time.

Turn N+1 loads the stored KV of everything the model saw before (prompt prefix, earlier turns' chunks,
questions and answers) as an exact prefix (history.py), places its new chunks after it with their stored
KV and fuses them with the chosen mode, then the question. What it keeps of the session is policy.py's
choice; its new KV is saved in the background (saving.py).
"""
from __future__ import annotations

import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from index.namespaces import DEFAULT_NAMESPACE, label, scoped, unscoped
from kvchunks.chunk_kv import ChunkKV
from ragblend.answer import Answer, AnswerStream
from ragblend.engine.prompt import PromptTemplate
from ragblend.request import PreparedPrompt, RequestPath
from ragblend.sessions import policy
from ragblend.sessions.history import SessionHistory
from ragblend.sessions.prefixes import Prefixes
from ragblend.sessions.saving import AnsweredTurn, TurnSaver
from ragblend.query import Resolved
from ragblend.storage.session_store import SessionInfo, SessionRecord, SessionStore, Turn


class SessionBusyError(RuntimeError):
    """Another turn of the session is running (and did not finish within the manager's `busy_wait_s`)."""


class SessionManager:
    """Every open conversation of one RagBlend: their locks, pending saves, shared prefixes and TTL sweep."""

    busy_wait_s = 5.0  # a turn waits this long for the session's running one: a follow-up sent as the last
    # finishes gets in, a second turn sent while one runs (a client retrying a timed-out request) is
    # refused rather than queued behind it for as long as that answer takes

    def __init__(self, sessions: SessionStore, requests: RequestPath, template: PromptTemplate,
                 embed: Callable[[str], np.ndarray], sweep_every_s: float = 60.0):
        self.store, self.requests, self.template, self.embed = sessions, requests, template, embed
        self.model = requests.model
        self.prefixes = Prefixes(template, requests.chunk_kv.spans, self.model.tokenizer)
        self.history = SessionHistory(sessions, requests, self.prefixes)
        self.saver = TurnSaver(sessions, requests, embed)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._closed = threading.Event()
        self._sweeper = threading.Thread(target=_sweep_while_open, daemon=True, name="ragblend-session-ttl",
                                         args=(weakref.ref(self), self._closed, sweep_every_s))
        self._sweeper.start()

    # ---- sessions as a whole ------------------------------------------------------------------

    def open(self, session_id: str | None, system: str | None, ttl_s: float, create: bool,
             namespace: str = DEFAULT_NAMESPACE) -> SessionRecord:
        """A session's record (`session_id` is the caller's id; records are keyed by namespace too)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.sweep()
        key = scoped(namespace, session_id if session_id is not None else uuid.uuid4().hex)
        if session_id is not None and not create:
            record = self.store.get(key)
            if system is not None and system != record.system:
                raise ValueError(f"session {session_id!r} was started with another system prompt")
            return record
        if session_id is not None and create:
            with self.store.env.begin() as txn:
                existing = self.store.read(txn, key)
            if existing is not None:
                return self.store.get(key)
        now = time.time()
        record = SessionRecord(key, self.store.fingerprint, system, ttl_s, now, now)
        with self.store.env.begin(write=True) as txn:
            self.store.write(txn, record)
        return record

    def prefetch(self, key: str) -> list[str]:
        """Bring a session's stored turns into the RAM tier ahead of its next turn and protect them from
        eviction until `release`: what a scheduler does for queued requests. The keys protected."""
        return self.store.warm(key)

    def release(self, keys: list[str]) -> None:
        self.store.ram.release(keys)

    def seed(self, key: str, exchanges: list[tuple[str, str]]) -> None:
        """Give a session without turns the earlier (question, answer) exchanges a client holds as text;
        their KV is computed on the session's next turn, as for a turn whose save was lost."""
        record = self.store.get(key)
        if record.turns:
            raise ValueError(f"session {record.name!r} already has turns")
        template, _ = self.prefix(record.system)
        turns = [Turn(record.next_segment + i, [*template.suffix_ids(question), *self._encode(answer),
                                                *template.joint_ids], [], question, answer=answer)
                 for i, (question, answer) in enumerate(exchanges)]
        with self.store.env.begin(write=True) as txn:
            self.store.write(txn, replace(record, turns=turns, next_segment=record.next_segment + len(turns)))

    def _encode(self, text: str) -> list[int]:
        return self.model.tokenizer(text, add_special_tokens=False)["input_ids"]

    def end(self, session_id: str, namespace: str = DEFAULT_NAMESPACE) -> bool:
        key = scoped(namespace, session_id)
        with self._session_lock(key):
            self.wait(key)
            return self.store.delete(key)

    def list(self, namespace: str = DEFAULT_NAMESPACE) -> list[SessionInfo]:
        self.sweep()
        return [self.store.info(r) for r in self.store.records() if r.namespace == namespace]

    def sweep(self) -> list[str]:
        """Expire sessions idle past their TTL (never one in the middle of a turn)."""
        with self._guard:
            busy = {sid for sid, lock in self._locks.items() if lock.locked()}
        return self.store.expire(busy=busy)

    def wait(self, session_id: str | None = None) -> None:
        """Block until the pending save of one session (or of all) has finished."""
        self.saver.wait(session_id)

    def close(self) -> None:
        """Finish pending saves and stop background work; nothing acknowledged is lost."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.saver.close()
        self._sweeper.join(timeout=5)

    def _session_lock(self, session_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(session_id, threading.Lock())

    def prefix(self, system: str | None) -> tuple[PromptTemplate, ChunkKV]:
        """The prompt template and prefix KV for a system prompt: computed once, shared by every session."""
        return self.prefixes.get(system)

    # ---- one turn -----------------------------------------------------------------------------

    def send(self, session_id: str, turn: Resolved, on_topic_switch: str, max_history_tokens: int | None,
             stream: bool) -> Answer | AnswerStream:
        """One turn, holding the session's lock until the answer is done (a stream: until it is exhausted
        or closed). A turn that finds another one running waits `busy_wait_s`, then raises SessionBusyError."""
        lock = self._session_lock(session_id)
        if not lock.acquire(timeout=self.busy_wait_s):
            raise SessionBusyError(f"session {label(*unscoped(session_id))} is answering another turn; "
                                   "retry when it has finished")
        try:
            self.wait(session_id)
            result = self._send(session_id, turn, on_topic_switch, max_history_tokens, stream, lock.release)
        except BaseException:
            lock.release()
            raise
        if not stream:
            lock.release()
        return result

    def _send(self, session_id: str, turn: Resolved, on_topic_switch: str, max_history_tokens: int | None,
              stream: bool, release: Callable[[], None]) -> Answer | AnswerStream:
        record = self.store.get(session_id)
        template, _ = self.prefix(record.system)
        start = time.perf_counter()
        question = turn.request.question
        embedding = self.embed(question) if on_topic_switch == "drop" else None
        switched = embedding is not None and policy.off_topic(record.turns, turn.chunks, embedding)
        kept, chunks, suffix = policy.plan(template, [] if switched else list(record.turns), turn,
                                           self.model.max_positions, max_history_tokens)
        reserve = turn.request.max_new_tokens + len(template.joint_ids)
        planned = time.perf_counter() - start

        def prefill() -> PreparedPrompt:  # on the engine loop: it must not submit to the engine itself
            began = time.perf_counter()
            prepared, history, loaded = self.history.prefill(record, kept, chunks, suffix, turn, reserve)
            prepared.timings.update(history_tokens=len(history.token_ids), history_load_s=planned + loaded - began,
                                    history_source=history.source, topic_switch=float(switched),
                                    retrieve_s=turn.retrieve_s)
            prepared.timings["ttft_s"] += planned + loaded - began
            return prepared

        done = AnsweredTurn(session_id, chunks, question, embedding, {t.segment for t in kept}, template)
        prompt_tokens = (len(template.prefix_ids) + sum(len(t.token_ids) for t in kept)
                         + sum(len(c.token_ids) for c in chunks) + len(suffix))
        answer = self.requests.answer(prefill, turn.request.sampling, stream, prompt_tokens,
                                      on_finish=self.saver.on_finish(done))
        return AnswerStream(answer, lambda _text: answer.answer, on_close=release) if stream else answer


def _sweep_while_open(manager: weakref.ref, closed: threading.Event, every_s: float) -> None:
    """The TTL sweep, holding the manager only while it sweeps: a RagBlend dropped without `close` is still
    collected (with its store's mapping), and the thread ends with it."""
    while not closed.wait(every_s):
        alive = manager()
        if alive is None:
            return
        try:
            alive.sweep()
        except Exception as exc:  # noqa: BLE001 - a failed sweep is retried next period
            warnings.warn(f"ragblend: session TTL sweep failed: {exc}", stacklevel=1)
        del alive
