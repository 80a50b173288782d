"""Where conversations live: one record per session in the store (LMDB or a shared Redis), one KV segment
per turn there and in RAM.

A segment is a turn's new tokens (its chunks after fusion, the question, the answer and the joint to the
next user turn) with their KV, keys pre-RoPE, in the same record format as document chunks. Segments
per turn rather than fixed-size blocks: turns are the unit that truncation, topic switches and saves
add or drop, and what sessions share (the prompt prefix) is held once outside them.
No model here: the CLI lists, ends and expires sessions with the store alone.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import lmdb

from index.namespaces import DEFAULT_NAMESPACE, label, unscoped
from kvchunks.chunk_kv import ChunkKV
from kvchunks.kvstore import CorruptKVError, KVStore, entries, family_bytes
from kvchunks.tiers import RamTier
from ragblend.storage.manifest import StoreMismatchError

if TYPE_CHECKING:  # the store reports sessions' usage (below), so this module must not import it to run
    from ragblend.storage.store import Store

DEFAULT_RAM_BYTES = 512 << 20
FAMILY = "session"  # the KVStore family of turn segments
RECORDS_DB = b"sessions"


class SessionNotFoundError(KeyError):
    """No session with this id (never created, ended or expired)."""


@dataclass
class Turn:
    segment: int
    token_ids: list[int]
    chunk_ids: list[str]
    question: str
    embedding: list[float] = field(default_factory=list)  # the question's, kept for topic-switch checks
    has_kv: bool = False  # False until the background save commits its segment
    answer: str = ""  # the answer's text, so a client's copy of the conversation can be checked against it


@dataclass
class SessionRecord:
    id: str  # the record key: the session id, scoped by its namespace (index.namespaces)
    fingerprint: str
    system: str | None
    ttl_s: float
    created: float
    last_used: float
    turns: list[Turn] = field(default_factory=list)
    next_segment: int = 0

    @property
    def namespace(self) -> str:
        return unscoped(self.id)[0]

    @property
    def name(self) -> str:
        """The id its caller knows it by."""
        return unscoped(self.id)[1]

    @property
    def history_tokens(self) -> int:
        return sum(len(t.token_ids) for t in self.turns)

    def expired(self, now: float) -> bool:
        return now - self.last_used > self.ttl_s

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SessionRecord:
        data = json.loads(bytes(raw))
        data["turns"] = [Turn(**t) for t in data["turns"]]
        return cls(**data)


@dataclass(frozen=True)
class SessionInfo:
    id: str
    turns: int
    tokens: int  # history tokens after the prompt prefix
    bytes: int  # KV bytes of its turns (the shared prefix is not counted)
    last_used: float
    tier: str  # "ram" when every turn is in the RAM tier, else "disk"
    namespace: str = DEFAULT_NAMESPACE


def usage(env: lmdb.Environment, txn: lmdb.Transaction) -> tuple[int, int]:
    """Sessions of every model and the KV bytes of their turns on disk (a store's stats; read-only)."""
    return entries(env, txn, RECORDS_DB), family_bytes(env, txn, FAMILY)


class SessionStore:
    def __init__(self, store: Store, ram_bytes: int = DEFAULT_RAM_BYTES):
        self.env = store.env
        self.fingerprint = store.manifest.kv_fingerprint
        self.db = self.env.open_db(RECORDS_DB)
        self.kv = KVStore(self.env, self.fingerprint, family=FAMILY)
        self.ram = RamTier(ram_bytes)

    @staticmethod
    def segment_key(session_id: str, segment: int) -> str:
        return f"{session_id}/{segment:06d}"

    def read(self, txn: lmdb.Transaction, session_id: str) -> SessionRecord | None:
        raw = txn.get(session_id.encode(), db=self.db)
        return None if raw is None else SessionRecord.from_bytes(raw)

    def get(self, session_id: str) -> SessionRecord:
        """The session's record; refused if it was built for another model or prompt."""
        with self.env.begin() as txn:
            record = self.read(txn, session_id)
        if record is None:
            raise SessionNotFoundError(f"no session {label(*unscoped(session_id))!r} (ended, expired or never created); "
                                       "pass create=True to start one with this id")
        if record.fingerprint != self.fingerprint:
            raise StoreMismatchError(f"session {label(*unscoped(session_id))!r} was saved for another model or prompt "
                                     f"(fingerprint {record.fingerprint[:12]}, this store {self.fingerprint[:12]})")
        return record

    def write(self, txn: lmdb.Transaction, record: SessionRecord) -> None:
        txn.put(record.id.encode(), record.to_bytes(), db=self.db)

    def put_segment(self, txn: lmdb.Transaction, session_id: str, turn: Turn, kv: ChunkKV) -> None:
        self.kv.put(txn, self.segment_key(session_id, turn.segment), kv)

    def commit_segment(self, session_id: str, turn: Turn, kv: ChunkKV) -> bool:
        """Commit a turn's segment, mark the turn saved and keep it in RAM; False if the session (or the
        turn) is gone meanwhile."""
        with self.env.begin(write=True) as txn:
            record = self.read(txn, session_id)
            mine = [t for t in record.turns if t.segment == turn.segment] if record else []
            if not mine:
                txn.abort()
                return False
            self.put_segment(txn, session_id, turn, kv)
            mine[0].has_kv = True
            self.write(txn, record)
        self.ram.put(self.segment_key(session_id, turn.segment), kv)
        return True

    def forget_segment(self, session_id: str, key: str, turns: list[Turn]) -> None:
        """A damaged segment (`key` failed its check): delete it and mark its turn, in the record and in
        `turns`, as unsaved, so the turn is recomputed rather than served."""
        damaged = [t for t in turns if self.segment_key(session_id, t.segment) == key]
        if not damaged:
            raise CorruptKVError(key, -1)
        damaged[0].has_kv = False
        with self.env.begin(write=True) as txn:
            self.kv.delete(txn, key)
            record = self.read(txn, session_id)
            for stored in record.turns:
                stored.has_kv = stored.has_kv and stored.segment != damaged[0].segment
            self.write(txn, record)

    def warm(self, session_id: str) -> list[str]:
        """Bring a session's saved segments into the RAM tier and protect them from eviction until
        `ram.release`; the keys protected. A segment gone or damaged is left for its turn to recompute."""
        with self.env.begin() as txn:
            record = self.read(txn, session_id)
        keys = [self.segment_key(session_id, t.segment) for t in record.turns if t.has_kv] if record else []
        self.ram.protect(keys)
        for key in keys:
            if key not in self.ram:
                try:
                    self.ram.put(key, self.kv.load(key))
                except (KeyError, CorruptKVError):
                    continue
        return keys

    def drop_turns(self, txn: lmdb.Transaction, session_id: str, turns: list[Turn]) -> None:
        for turn in turns:
            key = self.segment_key(session_id, turn.segment)
            self.kv.delete(txn, key)
            self.ram.drop(key)

    def delete(self, session_id: str) -> bool:
        """Drop a session's record and every segment, from both tiers; False if there was none."""
        with self.env.begin(write=True) as txn:
            record = self.read(txn, session_id)
            if record is None:
                return False
            self.drop_turns(txn, session_id, record.turns)
            txn.delete(session_id.encode(), db=self.db)
        return True

    def records(self) -> list[SessionRecord]:
        with self.env.begin() as txn, txn.cursor(db=self.db) as cursor:
            return [SessionRecord.from_bytes(raw) for _, raw in cursor]

    def expire(self, now: float | None = None, busy: set[str] = frozenset()) -> list[str]:
        """Delete sessions unused for longer than their TTL (except `busy` ones); their ids."""
        now = time.time() if now is None else now
        expired = [r.id for r in self.records() if r.expired(now) and r.id not in busy]
        for session_id in expired:
            self.delete(session_id)
        return expired

    def info(self, record: SessionRecord) -> SessionInfo:
        keys = [self.segment_key(record.id, t.segment) for t in record.turns]
        with self.env.begin() as txn:
            metas = [self.kv.meta(txn, key) for key in keys]
        stored = sum(m.payload_bytes for m in metas if m is not None)
        tier = "ram" if all(key in self.ram for key in keys) else "disk"
        return SessionInfo(record.name, len(record.turns), record.history_tokens, stored, record.last_used, tier,
                           record.namespace)
