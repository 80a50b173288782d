"""Document and chunk records in LMDB: the source of truth the FAISS index is derived from.

A chunk is shared by every document that contains the same tokens; `refs` lists (doc_id, position)
pairs, and a chunk with no refs left is garbage. Embeddings are kept so the vector index can be
rebuilt at any time (after a crash between an LMDB commit and an index save, say).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import lmdb
import numpy as np


@dataclass
class DocRecord:
    doc_id: str
    content_hash: str
    chunk_ids: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    tokens: int = 0
    pinned: bool = False  # its chunks' KV is never evicted
    expires_at: float | None = None  # wall-clock time its TTL ends
    expire: str = "kv"  # what then goes: "kv" or the whole "document"


@dataclass
class ChunkRecord:
    chunk_id: str
    text: str
    token_ids: list[int]
    refs: list[list] = field(default_factory=list)  # [doc_id, position] pairs

    @property
    def doc_id(self) -> str | None:
        return self.refs[0][0] if self.refs else None

    @property
    def position(self) -> int | None:
        return self.refs[0][1] if self.refs else None


def vector_id(chunk_id: str) -> int:
    """The FAISS int64 id of a chunk: 60 bits of its (already cryptographic) hex id."""
    return int(chunk_id[:15], 16)


def _vid_key(vid: int) -> bytes:
    return vid.to_bytes(8, "big")


class DocStore:
    def __init__(self, env: lmdb.Environment):
        self.docs_db = env.open_db(b"docs")
        self.chunks_db = env.open_db(b"chunks")
        self.emb_db = env.open_db(b"emb")
        self.vids_db = env.open_db(b"vids")  # FAISS id -> chunk id

    @staticmethod
    def _get_json(txn: lmdb.Transaction, db, key: str) -> dict | None:
        raw = txn.get(key.encode(), db=db)
        return None if raw is None else json.loads(bytes(raw))

    def get_doc(self, txn: lmdb.Transaction, doc_id: str) -> DocRecord | None:
        data = self._get_json(txn, self.docs_db, doc_id)
        return None if data is None else DocRecord(**data)

    def put_doc(self, txn: lmdb.Transaction, record: DocRecord) -> None:
        txn.put(record.doc_id.encode(), json.dumps(asdict(record)).encode(), db=self.docs_db)

    def delete_doc(self, txn: lmdb.Transaction, doc_id: str) -> None:
        txn.delete(doc_id.encode(), db=self.docs_db)

    def get_chunk(self, txn: lmdb.Transaction, chunk_id: str) -> ChunkRecord | None:
        data = self._get_json(txn, self.chunks_db, chunk_id)
        return None if data is None else ChunkRecord(**data)

    def put_chunk(self, txn: lmdb.Transaction, record: ChunkRecord) -> None:
        txn.put(record.chunk_id.encode(), json.dumps(asdict(record)).encode(), db=self.chunks_db)
        txn.put(_vid_key(vector_id(record.chunk_id)), record.chunk_id.encode(), db=self.vids_db)

    def delete_chunk(self, txn: lmdb.Transaction, chunk_id: str) -> None:
        txn.delete(chunk_id.encode(), db=self.chunks_db)
        txn.delete(chunk_id.encode(), db=self.emb_db)
        txn.delete(_vid_key(vector_id(chunk_id)), db=self.vids_db)

    def chunk_for_vector(self, txn: lmdb.Transaction, vid: int) -> ChunkRecord | None:
        chunk_id = txn.get(_vid_key(vid), db=self.vids_db)
        return None if chunk_id is None else self.get_chunk(txn, bytes(chunk_id).decode())

    def put_embedding(self, txn: lmdb.Transaction, chunk_id: str, vector: np.ndarray) -> None:
        txn.put(chunk_id.encode(), np.ascontiguousarray(vector, dtype=np.float32).tobytes(), db=self.emb_db)

    def get_embedding(self, txn: lmdb.Transaction, chunk_id: str) -> np.ndarray | None:
        raw = txn.get(chunk_id.encode(), db=self.emb_db)
        return None if raw is None else np.frombuffer(bytes(raw), dtype=np.float32)

    def doc_ids(self, txn: lmdb.Transaction) -> list[str]:
        with txn.cursor(db=self.docs_db) as cursor:
            return [bytes(key).decode() for key in cursor.iternext(values=False)]

    def chunk_records(self, txn: lmdb.Transaction) -> list[ChunkRecord]:
        with txn.cursor(db=self.chunks_db) as cursor:
            return [ChunkRecord(**json.loads(bytes(value))) for value in cursor.iternext(keys=False)]

    def doc_records(self, txn: lmdb.Transaction) -> list[DocRecord]:
        with txn.cursor(db=self.docs_db) as cursor:
            return [DocRecord(**json.loads(bytes(value))) for value in cursor.iternext(keys=False)]

    def count_docs(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self.docs_db)["entries"]
