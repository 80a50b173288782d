"""A store: one engine (an LMDB folder, or a Redis/Valkey server shared by replicas; kvchunks.backends)
holding documents, chunks, embeddings and KV, and the FAISS index derived from it.

The engine is the source of truth and commits atomically; the FAISS file is rebuilt from the stored
embeddings whenever it is missing or older than the last commit, so a crash between the two is harmless.
"""
from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb
import numpy as np

from index.docstore import DocRecord, DocStore, vector_id
from index.namespaces import DEFAULT_NAMESPACE, label
from index.vector_index import IdFilter, VectorIndex
from kvchunks.backends import open_env, release_env
from kvchunks.budget import KVBudget
from kvchunks.kvstore import KVStore
from kvchunks.paths import PathTree
from kvchunks.paths import usage as path_usage
from ragblend.storage.calibration import Calibration, read_calibration
from ragblend.storage.manifest import FORMAT_VERSION, Manifest, StoreMismatchError
from ragblend.storage.session_store import usage as session_usage


@dataclass(frozen=True)
class StoreStats:
    documents: int
    chunks: int
    tokens: int  # of chunks that hold KV now
    kv_bytes: int
    disk_bytes: int
    orphan_chunks: int
    manifest: Manifest | None
    kv_max_bytes: int | None = None
    pinned_bytes: int = 0
    evicted_chunks: int = 0  # searchable chunks whose KV was evicted (recomputed on their next use)
    kv_hits: int = 0
    kv_misses: int = 0
    evictions: int = 0
    sessions: int = 0
    session_bytes: int = 0  # conversation KV on disk (each process's RAM tier holds a bounded copy)
    evictable_bytes: int = 0  # chunk KV that is not pinned
    medium: str = "on disk"  # where disk_bytes and session KV live: the LMDB files, or a Redis server's memory
    paths: int = 0  # exact-path tree nodes (chunk sequences of depth >= 2 computed in full context)
    path_bytes: int = 0
    path_hits: int = 0  # requests that loaded an exact path of depth >= 2
    path_hit_tokens: int = 0
    calibration: dict | None = None  # this model's calibrated blend setting (ragblend.storage.calibration)

    def lines(self) -> list[str]:
        m = self.manifest
        budget = f" of {self.kv_max_bytes / 1e6:,.1f} MB budget" if self.kv_max_bytes is not None else ""
        rows = [
            ("documents", f"{self.documents:,}"),
            ("chunks", f"{self.chunks:,}" + (f" (+{self.orphan_chunks} unreferenced)" if self.orphan_chunks else "")
             + (f", {self.evicted_chunks:,} with KV evicted" if self.evicted_chunks else "")),
            ("tokens", f"{self.tokens:,}"),
            ("KV payload", f"{self.kv_bytes / 1e6:,.1f} MB{budget}"
             + (f" ({self.kv_bytes / self.tokens:,.0f} B/token)" if self.tokens else "")),
            ("pinned", f"{self.pinned_bytes / 1e6:,.1f} MB (evictable {self.evictable_bytes / 1e6:,.1f} MB)"),
            ("KV uses", f"{self.kv_hits:,} hits, {self.kv_misses:,} misses, {self.evictions:,} evictions"),
            ("exact paths", f"{self.paths:,} ({self.path_bytes / 1e6:,.1f} MB), {self.path_hits:,} hits "
                            f"({self.path_hit_tokens:,} tokens)"),
            ("sessions", f"{self.sessions:,} ({self.session_bytes / 1e6:,.1f} MB of KV {self.medium})"),
            (self.medium, f"{self.disk_bytes / 1e6:,.1f} MB"),
        ]
        if m:
            rows += [("model", f"{m.model} ({m.kv_fingerprint[:12]})"), ("embedder", m.embedder),
                     ("chunk tokens", str(m.chunk_tokens)), ("index", m.index_kind)]
        if self.calibration:
            rows.append(("calibration", Calibration(**self.calibration).summary()))
        return [f"{k:>13}: {v}" for k, v in rows]


class Store:
    def __init__(self, path: str | Path, readonly: bool = False, backend: str | None = None):
        """`backend`: None keeps every record in LMDB in `path`; a redis:// URL keeps them in that server,
        shared with every replica pointed at it (`path` then holds nothing this class needs)."""
        self.path = Path(path).expanduser()
        self.readonly, self.backend = readonly, backend
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        self.env = open_env(self.path, readonly, backend)
        self.location = backend or str(self.path)
        self._closed = False
        self.meta_db = self.env.open_db(b"meta", create=not readonly)
        self.docs = DocStore(self.env)
        self.manifest = self._read_manifest()
        self.kv: KVStore | None = None
        self.paths: PathTree | None = None  # None on a read-only open: only the writer keeps the tree
        self.budget: KVBudget | None = None
        if self.manifest:
            self._open_kv(self.manifest)
        self._index: VectorIndex | None = None
        self._index_lock = threading.RLock()  # FAISS is not safe to search while another thread updates it
        self._index_generation = -1
        self._index_mark = None  # when the generation was last read (see the engine's stale_since)
        self._filters: dict[str, IdFilter] = {}  # per namespace, for the index generation below
        self._filters_generation = -1

    def _open_kv(self, manifest: Manifest) -> None:
        self.kv = KVStore(self.env, manifest.kv_fingerprint, dtype=manifest.kv_dtype)
        if not self.readonly:
            self.paths = PathTree(self.env, manifest.kv_fingerprint, manifest.kv_dtype)
        self.budget = KVBudget(self.env, self.kv, self.meta_db, self.paths)

    def drop_kv(self, txn: lmdb.Transaction, chunk_ids: list[str]) -> None:
        """Delete these chunks' KV and every exact path through them (a changed, deleted or expired chunk)."""
        for chunk_id in chunk_ids:
            self.kv.delete(txn, chunk_id)
            self.budget.forget(txn, chunk_id)
        if self.paths is not None:
            self.paths.drop_through(txn, chunk_ids)

    def _read_manifest(self, txn: lmdb.Transaction | None = None) -> Manifest | None:
        if txn is None:
            with self.env.begin() as own:
                return self._read_manifest(own)
        raw = txn.get(b"manifest", db=self.meta_db)
        return None if raw is None else Manifest(**json.loads(bytes(raw)))

    def _check_not_reindexed(self, txn: lmdb.Transaction) -> None:
        """Refuse to go on with a manifest that `ragblend reindex-kv` has replaced since this Store opened."""
        current = self._read_manifest(txn)
        if self.manifest is not None and current is not None and current.kv_fingerprint != self.manifest.kv_fingerprint:
            raise StoreMismatchError(f"store {self.location} was re-indexed for model {current.model!r} while open; "
                                     "reopen it with that model")

    def switch_manifest(self, txn: lmdb.Transaction, manifest: Manifest) -> None:
        """Point the store at another KV fingerprint inside `txn` (reindex-kv); once `txn` commits, every
        other Store on this folder refuses further writes and searches (StoreMismatchError)."""
        self._put_manifest(txn, manifest)
        self._advance_generation(txn)

    def _put_manifest(self, txn: lmdb.Transaction, manifest: Manifest) -> None:
        txn.put(b"manifest", json.dumps(asdict(manifest)).encode(), db=self.meta_db)

    def adopt_manifest(self, manifest: Manifest) -> None:
        """This Store's side of a committed `switch_manifest`."""
        self.manifest = manifest
        self._open_kv(manifest)

    def bind(self, wanted: Manifest) -> None:
        """Fix the manifest of a new store, or check that an existing one matches what is asked for."""
        if self.manifest is None:
            with self.env.begin(write=True) as txn:
                self._put_manifest(txn, wanted)
            self.manifest = wanted
            self._open_kv(wanted)
            return
        have = self.manifest
        if have.format_version != FORMAT_VERSION:
            raise StoreMismatchError(f"store {self.location} has format {have.format_version}; this ragblend reads {FORMAT_VERSION}")
        for field_name, what in (("kv_fingerprint", "model"), ("embedder_fingerprint", "embedder"),
                                  ("chunk_tokens", "chunk size"), ("index_kind", "index kind"),
                                  ("kv_dtype", "KV dtype")):
            if getattr(have, field_name) != getattr(wanted, field_name):
                shown = {"kv_fingerprint": "model", "embedder_fingerprint": "embedder"}.get(field_name, field_name)
                move = " or move it with `ragblend reindex-kv`" if field_name == "kv_fingerprint" else ""
                raise StoreMismatchError(
                    f"store {self.location} was built with {what} {getattr(have, shown)!r} "
                    f"but {getattr(wanted, shown)!r} was asked for; open it with the same {what}{move}, "
                    "or use another store folder"
                )

    # ---- the derived vector index -------------------------------------------------------------

    def _index_path(self, generation: int) -> Path:
        """The saved index of one generation: the name says what it holds, so processes saving different
        generations at once never pair one's file with the other's generation."""
        return self.path / f"index-{generation}.faiss"

    def generation(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"generation", db=self.meta_db)
        return 0 if raw is None else int(raw)

    def bump_generation(self, txn: lmdb.Transaction) -> None:
        """Called inside every transaction that changes which chunks are searchable; aborts it if the
        store was re-indexed for another model meanwhile (what this Store would write is stale)."""
        self._check_not_reindexed(txn)
        self._advance_generation(txn)

    def _advance_generation(self, txn: lmdb.Transaction) -> None:
        txn.put(b"generation", str(self.generation(txn) + 1).encode(), db=self.meta_db)

    @property
    def index(self) -> VectorIndex:
        """The index as of the last commit, reloaded when another process (or Store) has committed since."""
        with self._index_lock:
            stale, self._index_mark = self.env.stale_since(self._index_mark)
            if self._index is not None and not stale:
                return self._index  # a shared backend announces commits; LMDB is checked every time
            with self.env.begin() as txn:
                generation = self.generation(txn)
                if generation != self._index_generation:
                    self._check_not_reindexed(txn)
            if self._index is None or generation != self._index_generation:
                self._load_or_rebuild_index(generation)
            return self._index

    def _load_or_rebuild_index(self, generation: int) -> None:
        """A replica of a shared backend keeps its index in memory only: a saved file could be another
        backend's."""
        if not self.env.shared:
            try:
                self._index, self._index_generation = VectorIndex.load(self._index_path(generation)), generation
                return
            except FileNotFoundError:  # never saved, or a newer generation's save removed it meanwhile
                pass
        self.rebuild_index()

    def update_index(self, live: list[str], vectors: list[np.ndarray], dead: list[str], generation: int) -> None:
        """Apply one commit's changes to the index; a process that missed other commits rebuilds instead."""
        with self._index_lock:
            if self._index is None or self._index_generation != generation - 1:
                self.rebuild_index()
                return
            if dead:
                self._index.remove(np.array([vector_id(c) for c in dead]))
            if live:
                self._index.add(np.array([vector_id(c) for c in live]), np.stack(vectors))
            self._index_generation = generation
            self.save_index(generation)

    def rebuild_index(self) -> VectorIndex:
        """Recreate the FAISS index from the embeddings of every referenced chunk."""
        with self._index_lock:
            index = VectorIndex(self.manifest.embedding_dim, self.manifest.index_kind)
            with self.env.begin() as txn:
                generation = self.generation(txn)
                chunk_ids = [c.chunk_id for c in self.docs.chunk_records(txn) if c.refs]
                vectors = [self.docs.get_embedding(txn, cid) for cid in chunk_ids]
            if chunk_ids:
                index.add(np.array([vector_id(c) for c in chunk_ids]), np.stack(vectors))
            self._index, self._index_generation = index, generation
            self.save_index(generation)
            return index

    def search(self, vector: np.ndarray, k: int, namespace: str = DEFAULT_NAMESPACE) -> list[tuple[int, float]]:
        """Top-`k` (vector id, score) among `namespace`'s chunks only: the filter runs inside FAISS, so
        other namespaces never take a place in the top k."""
        with self._index_lock:
            index = self.index  # first: it reloads after another process's commit
            return index.search(vector, k, self._namespace_filter(index, namespace))

    def _namespace_filter(self, index: VectorIndex, namespace: str) -> IdFilter:
        """A named namespace searches among its own ids; the default one skips every namespaced id (so
        stores from before namespaces need no migration). Built once per index generation."""
        if self._filters_generation != self._index_generation:
            self._filters, self._filters_generation = {}, self._index_generation
        if namespace not in self._filters:
            with self.env.begin() as txn:
                if namespace == DEFAULT_NAMESPACE:
                    self._filters[namespace] = index.filter(excluded=self.docs.namespace_vectors(txn, None))
                else:
                    self._filters[namespace] = index.filter(only=self.docs.namespace_vectors(txn, namespace))
        return self._filters[namespace]

    def save_index(self, generation: int) -> None:
        if self.readonly or self.env.shared:
            return
        self._index.save(self._index_path(generation))
        for old in self.path.glob("index-*.faiss"):
            if int(old.stem.removeprefix("index-")) < generation:
                old.unlink(missing_ok=True)

    # ---- reporting ------------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        with self.env.begin() as txn:
            records = self.docs.chunk_records(txn)
            documents = self.docs.count_docs(txn)
            pinned = self.pinned_chunks(txn)
            kv_bytes = tokens = pinned_bytes = evicted = 0
            for record in records:
                meta = self.kv.meta(txn, record.chunk_id) if self.kv else None
                if record.refs and meta is None:
                    evicted += 1
                if meta and record.refs:
                    kv_bytes += meta.payload_bytes
                    pinned_bytes += meta.payload_bytes if record.chunk_id in pinned else 0
                    tokens += meta.tokens
            budget = {"kv_max_bytes": self.budget.max_bytes(txn), **self.budget.counters(txn)} if self.budget else {}
            sessions, session_bytes = session_usage(self.env, txn)
            paths, path_bytes = path_usage(self.env, txn)
        disk = self.env.size_bytes()
        referenced = sum(1 for r in records if r.refs)
        return StoreStats(documents, referenced, tokens, kv_bytes, disk, len(records) - referenced, self.manifest,
                          pinned_bytes=pinned_bytes, evictable_bytes=kv_bytes - pinned_bytes, evicted_chunks=evicted,
                          sessions=sessions, session_bytes=session_bytes, medium=self.env.medium,
                          paths=paths, path_bytes=path_bytes, **budget, calibration=self._calibration())

    def _calibration(self) -> dict | None:
        found = read_calibration(self, self.manifest.kv_fingerprint) if self.manifest else None
        return asdict(found) if found else None

    # ---- the KV budget --------------------------------------------------------------------------

    def pinned_chunks(self, txn: lmdb.Transaction) -> set[str]:
        return {c for doc in self.docs.doc_records(txn) if doc.pinned for c in doc.chunk_ids}

    def enforce_budget(self, protect: set[str] = frozenset(), txn: lmdb.Transaction | None = None) -> list[str]:
        """Evict least recently used KV until the store is within its budget (see kvchunks.budget), in
        `txn` or a transaction of its own; pins are only read when something must be evicted."""
        if txn is None:
            with self.env.begin(write=True) as own:
                return self.enforce_budget(protect, own)
        return self.budget.enforce(txn, lambda: self.pinned_chunks(txn), protect)

    def set_kv_max_bytes(self, max_bytes: int | None) -> None:
        """Persist the KV budget (None: unbounded) and apply it now; refused if pins alone exceed it."""
        with self.env.begin(write=True) as txn:
            self.budget.set_max_bytes(txn, max_bytes)
            self.enforce_budget(txn=txn)

    def expired_documents(self, txn: lmdb.Transaction, now: float) -> list[DocRecord]:
        return [d for d in self.docs.doc_records(txn) if d.expires_at is not None and d.expires_at <= now]

    def drop_expired_kv(self, now: float) -> list[str]:
        """Drop the KV of documents whose TTL ended (their text and embeddings stay searchable; the KV
        is recomputed on next use and kept); their ids."""
        with self.env.begin(write=True) as txn:
            expired = [d for d in self.expired_documents(txn, now) if d.expire == "kv"]
            for doc in expired:
                self.drop_kv(txn, doc.chunk_ids)
                doc.expires_at = None
                self.docs.put_doc(txn, doc)
        return [d.doc_id for d in expired]

    def set_pinned(self, doc_ids: list[str], pinned: bool, namespace: str = DEFAULT_NAMESPACE) -> None:
        with self.env.begin(write=True) as txn:
            for doc_id in doc_ids:
                record = self.docs.get_doc(txn, doc_id, namespace)
                if record is None:
                    raise KeyError(f"unknown document id {label(namespace, doc_id)!r}")
                record.pinned = pinned
                self.docs.put_doc(txn, record)
            self.enforce_budget(txn=txn)

    def check(self) -> list[str]:
        """Consistency problems: documents pointing at missing chunks, chunks without KV or embedding."""
        problems = []
        with self.env.begin(buffers=True) as txn:
            for doc in self.docs.doc_records(txn):
                name = label(doc.namespace, doc.doc_id)
                for chunk_id in doc.chunk_ids:
                    chunk = self.docs.get_chunk(txn, chunk_id)
                    if chunk is None or chunk.namespace != doc.namespace or \
                            not any(ref[0] == doc.doc_id for ref in chunk.refs):
                        problems.append(f"document {name}: chunk {chunk_id} missing or not linked back")
                    if self.docs.get_embedding(txn, chunk_id) is None:
                        problems.append(f"document {name}: chunk {chunk_id} has no embedding")
                    if self.kv.contains(txn, chunk_id):  # no KV at all is an eviction, not damage
                        problems.extend(self.kv.verify(txn, chunk_id))
        return problems

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release this store's hold on the environment; it closes once no Store in the process uses it."""
        if not self._closed:
            self._closed = True
            release_env(self.path, self.backend)
