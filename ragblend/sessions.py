"""Multi-turn conversations that never re-prefill their history (CachedAttention).

Turn N+1 loads the stored KV of everything the model saw before (prompt prefix, earlier turns' chunks,
questions and answers) as an exact prefix, places its new chunks after it with their stored KV and fuses
them with the chosen mode, then the question. The turn's new KV is saved in the background: `send`
returns while the save runs, and the next `send` of the session waits only if it has not finished.
"""
from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch
from transformers import DynamicCache

from index.namespaces import DEFAULT_NAMESPACE, label, scoped, unscoped
from kvchunks.kvstore import CorruptKVError, StoredKV
from kvchunks.chunk_kv import ChunkKV
from ragblend.answer import Answer, AnswerStream
from ragblend.contexts import ContextChunk
from ragblend.engine.generate import feed
from ragblend.engine.prompt import PromptTemplate
from ragblend.engine.selection import BlendConfig
from ragblend.query import Resolved
from ragblend.request import History, PreparedPrompt, RequestPath
from ragblend.session_store import SessionInfo, SessionRecord, SessionStore, Turn

TOPIC_SIMILARITY = 0.2  # below this cosine to every recent question+answer (and no shared chunk): off-topic
TOPIC_RECENT_TURNS = 2
TOPIC_MODES = ("keep", "drop")
SOURCES = ("ram", "disk", "recomputed")  # where a turn's history came from, fastest first


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
        self._prefixes: dict[str | None, tuple[PromptTemplate, ChunkKV]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._pending: dict[str, Future] = {}
        self._guard = threading.Lock()
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragblend-session-save")
        self._closed = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, args=(sweep_every_s,), daemon=True,
                                         name="ragblend-session-ttl")
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
        with self.store.env.begin() as txn:
            record = self.store.read(txn, key)
        keys = [self.store.segment_key(key, t.segment) for t in record.turns if t.has_kv] if record else []
        self.store.ram.protect(keys)
        for segment in keys:
            if segment not in self.store.ram:
                try:
                    self.store.ram.put(segment, self.store.kv.load(segment))
                except (KeyError, CorruptKVError):  # gone or damaged: the turn itself recomputes it
                    continue
        return keys

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
        with self._guard:
            futures = [self._pending.get(session_id)] if session_id else list(self._pending.values())
        for future in futures:
            if future is not None:
                future.result()

    def close(self) -> None:
        """Finish pending saves and stop background work; nothing acknowledged is lost."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._saver.shutdown(wait=True)
        self._sweeper.join(timeout=5)

    def _sweep_loop(self, every_s: float) -> None:
        while not self._closed.wait(every_s):
            try:
                self.sweep()
            except Exception as exc:  # noqa: BLE001 - a failed sweep is retried next period
                warnings.warn(f"ragblend: session TTL sweep failed: {exc}", stacklevel=1)

    def _session_lock(self, session_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(session_id, threading.Lock())

    def prefix(self, system: str | None) -> tuple[PromptTemplate, ChunkKV]:
        """The prompt template and prefix KV for a system prompt: computed once, shared by every session."""
        with self._guard:
            if system not in self._prefixes:
                if system is None:
                    self._prefixes[None] = (self.template, self.requests.ingestor.spans.prefix_kv)
                else:
                    template = PromptTemplate.for_tokenizer(self.model.tokenizer, system)
                    kv = self.requests.ingestor.spans.compute([list(template.prefix_ids)], behind_prefix=False)[0]
                    self._prefixes[system] = (template, kv)
            return self._prefixes[system]

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
        embedding = self.embed(turn.request.question) if on_topic_switch == "drop" else None
        switched = embedding is not None and self._off_topic(record, turn.chunks, embedding)
        kept, chunks, suffix = self._plan(template, [] if switched else list(record.turns), turn, max_history_tokens)
        planned = time.perf_counter() - start

        def prefill() -> PreparedPrompt:  # in the engine loop
            began = time.perf_counter()
            prepared, history, loaded = self._prefill(record, kept, chunks, suffix, turn, template)
            prepared.timings.update(history_tokens=len(history.token_ids), history_load_s=planned + loaded - began,
                                    history_source=history.source, topic_switch=float(switched),
                                    retrieve_s=turn.retrieve_s)
            prepared.timings["ttft_s"] += planned + loaded - began
            return prepared

        saved = _TurnSave(self, session_id, chunks, turn.request.question, embedding, {t.segment for t in kept},
                          template)
        prompt_tokens = len(template.prefix_ids) + sum(len(t.token_ids) for t in kept) + sum(
            len(c.token_ids) for c in chunks) + len(suffix)
        answer = self.requests.answer(prefill, turn.request.sampling, stream, prompt_tokens, on_finish=saved.commit)
        return AnswerStream(answer, lambda _text: answer.answer, on_close=release) if stream else answer

    def _plan(self, template: PromptTemplate, turns: list[Turn], turn: Resolved,
              max_history_tokens: int | None) -> tuple[list[Turn], list[ContextChunk], list[int]]:
        """The turns kept in the prompt, the new chunks (those not in them already) and the question suffix."""
        in_history = {c for t in turns for c in t.chunk_ids}
        chunks = _unique([c for c in turn.chunks if c.chunk_id not in in_history])
        suffix = template.suffix_ids(turn.request.question)
        new_tokens = sum(len(c.token_ids) for c in chunks) + len(suffix)
        return self._fit(template, turns, new_tokens, turn.request.max_new_tokens, max_history_tokens), chunks, suffix

    def _prefill(self, record: SessionRecord, kept: list[Turn], chunks: list[ContextChunk], suffix: list[int],
                 turn: Resolved, template: PromptTemplate) -> tuple[PreparedPrompt, History, float]:
        """The turn's prefill over its history; a damaged turn record is recomputed and the prefill retried."""
        request = turn.request
        reserve = request.max_new_tokens + len(template.joint_ids)
        history = self._history(record, kept)
        loaded = time.perf_counter()
        try:
            prepared = self.requests.prefill(history, chunks, suffix, request.mode, turn.blend, request.load_depth,
                                             reserve, request.order)
        except CorruptKVError as error:
            self._drop_segment(record.id, error.key, kept)
            history = self._history(record, kept)
            prepared = self.requests.prefill(history, chunks, suffix, request.mode, turn.blend, request.load_depth,
                                             reserve, request.order)
        return prepared, history, loaded

    def _off_topic(self, record: SessionRecord, chunks: list[ContextChunk], embedding: np.ndarray) -> bool:
        """No chunk shared with the recent turns and the question unlike each of their question+answer."""
        recent = record.turns[-TOPIC_RECENT_TURNS:]
        if not recent or {c.chunk_id for c in chunks} & {c for t in recent for c in t.chunk_ids}:
            return False
        earlier = [np.asarray(t.embedding) for t in recent if t.embedding]
        return bool(earlier) and max(float(np.dot(embedding, e)) for e in earlier) < TOPIC_SIMILARITY

    def _fit(self, template: PromptTemplate, turns: list[Turn], new_tokens: int, max_new_tokens: int,
             max_history_tokens: int | None) -> list[Turn]:
        """Drop the oldest turns (never the prefix) until history + new turn + answer fit the window."""
        window = self.model.max_positions - new_tokens - max_new_tokens - len(template.joint_ids)
        budget = min(window, max_history_tokens) if max_history_tokens is not None else window
        budget -= len(template.prefix_ids)
        turns = list(turns)
        while turns and sum(len(t.token_ids) for t in turns) > budget:
            turns.pop(0)
        return turns

    def _history(self, record: SessionRecord, turns: list[Turn]) -> History:
        """Prefix + kept turns, each from RAM, else disk (read layer by layer by the loader), else recomputed;
        `source` is the slowest of them."""
        template, prefix_kv = self.prefix(record.system)
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

    def _drop_segment(self, session_id: str, key: str, turns: list[Turn]) -> None:
        damaged = [t for t in turns if self.store.segment_key(session_id, t.segment) == key]
        if not damaged:
            raise CorruptKVError(key, -1)
        damaged[0].has_kv = False
        with self.store.env.begin(write=True) as txn:
            self.store.kv.delete(txn, key)
            record = self.store.read(txn, session_id)
            for stored in record.turns:
                stored.has_kv = stored.has_kv and stored.segment != damaged[0].segment
            self.store.write(txn, record)

    def _recompute(self, session_id: str, history: History, turn: Turn) -> ChunkKV:
        """A turn whose save never committed (a crash): prefill its tokens behind the history and store them."""
        prepared = self.requests.prefill(history, [], turn.token_ids, "full", BlendConfig())
        kv = self.requests.segment(_layers(prepared.prefill.cache), len(history.token_ids), len(prepared.layout))
        self._store_segment(session_id, turn, kv)
        return kv

    def _store_segment(self, session_id: str, turn: Turn, kv: ChunkKV) -> bool:
        """Commit a turn's segment and mark it saved; False if the session ended meanwhile."""
        with self.store.env.begin(write=True) as txn:
            record = self.store.read(txn, session_id)
            mine = [t for t in record.turns if t.segment == turn.segment] if record else []
            if not mine:
                txn.abort()
                return False
            self.store.put_segment(txn, session_id, turn, kv)
            mine[0].has_kv = True
            self.store.write(txn, record)
        self.store.ram.put(self.store.segment_key(session_id, turn.segment), kv)
        return True


class _TurnSave:
    """What a finished turn leaves behind: its record now (small, synchronous), its KV in the background."""

    def __init__(self, manager: SessionManager, session_id: str, chunks: list[ContextChunk], question: str,
                 embedding: np.ndarray | None, kept: set[int], template: PromptTemplate):
        self.manager, self.session_id = manager, session_id
        self.chunks, self.question, self.embedding = chunks, question, embedding
        self.kept, self.template = kept, template  # segments of the turns this one was answered after

    def commit(self, answer: Answer, prepared: PreparedPrompt) -> None:
        store = self.manager.store
        history_len = int(answer.timings["history_tokens"])
        tokens = list(prepared.layout.token_ids[history_len:]) + answer.token_ids + list(self.template.joint_ids)
        with store.env.begin(write=True) as txn:
            record = store.read(txn, self.session_id)
            if record is None:  # ended while this turn ran
                txn.abort()
                return
            turn = Turn(record.next_segment, tokens, [c.chunk_id for c in self.chunks], self.question,
                        self._topic_embedding(answer), answer=answer.text)
            store.drop_turns(txn, self.session_id, [t for t in record.turns if t.segment not in self.kept])
            kept = [t for t in record.turns if t.segment in self.kept]
            record = replace(record, turns=[*kept, turn], next_segment=turn.segment + 1, last_used=time.time())
            store.write(txn, record)
        future = self.manager._saver.submit(self._save, answer, prepared.prefill.cache, history_len, turn)
        with self.manager._guard:
            self.manager._pending[self.session_id] = future

    def _topic_embedding(self, answer: Answer) -> list[float]:
        """What later questions are compared with: this turn's question and answer together (a follow-up
        often names what the answer said, not what the question did)."""
        if self.embedding is None:
            return []
        return self.manager.embed(f"{self.question}\n{answer.text}").tolist()

    def _save(self, answer: Answer, cache: DynamicCache, start: int, turn: Turn) -> None:
        began = time.perf_counter()
        try:
            cached = cache.get_seq_length()
            tail = turn.token_ids[cached - start:]  # the last answer token and the joint were never fed
            if tail:
                feed(self.manager.model, cache, tail, cached)
            kv = self.manager.requests.segment(_layers(cache), start, start + len(turn.token_ids))
            self.manager._store_segment(self.session_id, turn, kv)
        except Exception as exc:  # noqa: BLE001 - the turn stays unsaved and is recomputed when next needed
            warnings.warn(f"ragblend: saving a turn of session {label(*unscoped(self.session_id))} failed ({exc}); "
                          "it will be recomputed on the next turn", stacklevel=1)
        answer.timings["save_s"] = time.perf_counter() - began


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _unique(chunks: list[ContextChunk]) -> list[ContextChunk]:
    seen: set[str] = set()
    return [c for c in chunks if not (c.chunk_id in seen or seen.add(c.chunk_id))]
