"""Document and chunk records in the store's engine: the source of truth the FAISS index is derived from.

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

from index.namespaces import DEFAULT_NAMESPACE, SEPARATOR, scoped


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
    namespace: str = DEFAULT_NAMESPACE


@dataclass
class ChunkRecord:
    chunk_id: str
    text: str
    token_ids: list[int]
    refs: list[list] = field(default_factory=list)  # [doc_id, position] pairs, all in the chunk's namespace
    namespace: str = DEFAULT_NAMESPACE

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


def _namespace_key(namespace: str, vid: int = -1) -> bytes:
    """Key of a vector in its namespace's list; the bare prefix (vid -1) for a scan."""
    prefix = namespace.encode() + SEPARATOR.encode()
    return prefix if vid < 0 else prefix + _vid_key(vid)


class DocStore:
    def __init__(self, env: lmdb.Environment):
        self.docs_db = env.open_db(b"docs")
        self.chunks_db = env.open_db(b"chunks")
        self.emb_db = env.open_db(b"emb")
        self.vids_db = env.open_db(b"vids")  # FAISS id -> chunk id
        self.namespaced_db = env.open_db(b"nsvids")  # namespace + FAISS id of chunks outside the default namespace

    @staticmethod
    def _get_json(txn: lmdb.Transaction, db, key: str) -> dict | None:
        raw = txn.get(key.encode(), db=db)
        return None if raw is None else json.loads(bytes(raw))

    def get_doc(self, txn: lmdb.Transaction, doc_id: str, namespace: str = DEFAULT_NAMESPACE) -> DocRecord | None:
        data = self._get_json(txn, self.docs_db, scoped(namespace, doc_id))
        return None if data is None else DocRecord(**data)

    def put_doc(self, txn: lmdb.Transaction, record: DocRecord) -> None:
        key = scoped(record.namespace, record.doc_id)
        txn.put(key.encode(), json.dumps(asdict(record)).encode(), db=self.docs_db)

    def delete_doc(self, txn: lmdb.Transaction, doc_id: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        txn.delete(scoped(namespace, doc_id).encode(), db=self.docs_db)

    def get_chunk(self, txn: lmdb.Transaction, chunk_id: str) -> ChunkRecord | None:
        data = self._get_json(txn, self.chunks_db, chunk_id)
        return None if data is None else ChunkRecord(**data)

    def put_chunk(self, txn: lmdb.Transaction, record: ChunkRecord) -> None:
        txn.put(record.chunk_id.encode(), json.dumps(asdict(record)).encode(), db=self.chunks_db)
        txn.put(_vid_key(vector_id(record.chunk_id)), record.chunk_id.encode(), db=self.vids_db)
        if record.namespace != DEFAULT_NAMESPACE:
            txn.put(_namespace_key(record.namespace, vector_id(record.chunk_id)), b"", db=self.namespaced_db)

    def delete_chunk(self, txn: lmdb.Transaction, record: ChunkRecord) -> None:
        txn.delete(record.chunk_id.encode(), db=self.chunks_db)
        txn.delete(record.chunk_id.encode(), db=self.emb_db)
        txn.delete(_vid_key(vector_id(record.chunk_id)), db=self.vids_db)
        if record.namespace != DEFAULT_NAMESPACE:
            txn.delete(_namespace_key(record.namespace, vector_id(record.chunk_id)), db=self.namespaced_db)

    def namespace_vectors(self, txn: lmdb.Transaction, namespace: str | None) -> np.ndarray:
        """FAISS ids of one namespace's chunks (not the default one), or of every namespaced chunk (None)."""
        prefix = b"" if namespace is None else _namespace_key(namespace)
        vids = []
        with txn.cursor(db=self.namespaced_db) as cursor:
            if cursor.set_range(prefix):
                for key in cursor.iternext(values=False):
                    if not bytes(key).startswith(prefix):
                        break
                    vids.append(int.from_bytes(bytes(key)[-8:], "big"))
        return np.array(vids, dtype=np.int64)

    def chunk_for_vector(self, txn: lmdb.Transaction, vid: int) -> ChunkRecord | None:
        chunk_id = txn.get(_vid_key(vid), db=self.vids_db)
        return None if chunk_id is None else self.get_chunk(txn, bytes(chunk_id).decode())

    def put_embedding(self, txn: lmdb.Transaction, chunk_id: str, vector: np.ndarray) -> None:
        txn.put(chunk_id.encode(), np.ascontiguousarray(vector, dtype=np.float32).tobytes(), db=self.emb_db)

    def get_embedding(self, txn: lmdb.Transaction, chunk_id: str) -> np.ndarray | None:
        raw = txn.get(chunk_id.encode(), db=self.emb_db)
        return None if raw is None else np.frombuffer(bytes(raw), dtype=np.float32)

    def chunk_records(self, txn: lmdb.Transaction) -> list[ChunkRecord]:
        with txn.cursor(db=self.chunks_db) as cursor:
            return [ChunkRecord(**json.loads(bytes(value))) for value in cursor.iternext(keys=False)]

    def doc_records(self, txn: lmdb.Transaction) -> list[DocRecord]:
        with txn.cursor(db=self.docs_db) as cursor:
            return [DocRecord(**json.loads(bytes(value))) for value in cursor.iternext(keys=False)]

    def count_docs(self, txn: lmdb.Transaction) -> int:
        return txn.stat(self.docs_db)["entries"]
