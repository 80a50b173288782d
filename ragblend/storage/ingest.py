"""Offline path: chunk documents, precompute each chunk's KV, embed it, and commit it to the store.

Atomic and idempotent: a chunk's KV, text and embedding commit in one transaction; a document
becomes visible only once all its chunks are in; unchanged documents cost no model work; a
changed document replaces its chunks. An interrupted ingest resumes without recomputing.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import lmdb
from tqdm.auto import tqdm

from index.docstore import ChunkRecord, DocRecord
from index.embedder import Embedder
from index.namespaces import DEFAULT_NAMESPACE, label, validate_namespace
from kvchunks.backends import StoreFullError
from kvchunks.backends.lmdb_env import MAX_STORE_BYTES_ENV
from kvchunks.chunking import Chunk, chunk_id, split_document
from kvchunks.chunk_kv import ChunkKV
from ragblend.engine.precompute import SpanComputer
from ragblend.storage.documents import Document
from ragblend.engine.model import LoadedModel
from ragblend.engine.prompt import PromptTemplate
from ragblend.storage.store import Store

COMMIT_EVERY_CHUNKS = 64


@dataclass
class IngestReport:
    documents: int = 0
    unchanged: int = 0
    chunks: int = 0
    computed_chunks: int = 0
    tokens: int = 0
    computed_tokens: int = 0
    bytes_on_disk: int = 0
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.computed_tokens / self.wall_s if self.wall_s else 0.0

    def summary(self) -> str:
        return (
            f"{self.documents} documents ({self.unchanged} unchanged), {self.chunks} chunks, {self.tokens:,} tokens; "
            f"computed KV for {self.computed_chunks} chunks / {self.computed_tokens:,} tokens in {self.wall_s:.1f} s "
            f"({self.tokens_per_s:,.0f} tokens/s); store on disk {self.bytes_on_disk / 1e6:,.1f} MB"
        )


@dataclass
class _PlannedDoc:
    doc: Document
    chunks: list[Chunk]
    ids: list[str] = field(default_factory=list)


@dataclass
class _Run:
    """What the ingest under way applies to every document."""

    ttl_s: float | None = None  # default TTL
    namespace: str = DEFAULT_NAMESPACE
    # Chunk KV of (chunk ids, token lists): computed here, or by Ray actors; None where the computer
    # committed the record to the shared backend itself.
    compute: Callable[[list[str], list[list[int]]], list[ChunkKV | None]] | None = None


class Ingestor:
    def __init__(self, store: Store, model: LoadedModel, template: PromptTemplate, embedder: Embedder,
                 chunk_tokens: int, max_batch_tokens: int = 4096):
        self.store, self.model, self.template, self.embedder = store, model, template, embedder
        self.chunk_tokens = chunk_tokens
        self.spans = SpanComputer(model.decoder, template.prefix_ids, max_batch_tokens)
        self._run = _Run(compute=self._compute_here)

    def _compute_here(self, chunk_ids: list[str], token_lists: list[list[int]]) -> list[ChunkKV]:
        return self.spans.compute(token_lists)

    # ---- planning -------------------------------------------------------------------------------

    def _chunk(self, doc: Document) -> list[Chunk]:
        texts = split_document(doc.text, self.template.chunk_ids, self.chunk_tokens)
        return [Chunk(text=t, token_ids=tuple(self.template.chunk_ids(t)), position=i) for i, t in enumerate(texts)]

    def _plan(self, docs: list[Document]) -> tuple[list[_PlannedDoc], int]:
        planned, unchanged = [], 0
        with self.store.env.begin() as txn:
            for doc in docs:
                old = self.store.docs.get_doc(txn, doc.id, self._run.namespace)
                if old is not None and old.content_hash == doc.content_hash():
                    unchanged += 1
                    continue
                chunks = self._chunk(doc)
                fingerprint = self.store.manifest.kv_fingerprint
                ids = [chunk_id(fingerprint, c.token_ids, self._run.namespace) for c in chunks]
                planned.append(_PlannedDoc(doc, chunks, ids))
        return planned, unchanged

    def _missing(self, planned: list[_PlannedDoc]) -> dict[str, Chunk]:
        """Chunks with no complete record yet (one entry per distinct chunk id)."""
        missing: dict[str, Chunk] = {}
        with self.store.env.begin() as txn:
            for item in planned:
                for cid, chunk in zip(item.ids, item.chunks):
                    if cid in missing:
                        continue
                    if self.store.docs.get_chunk(txn, cid) is None or not self.store.kv.contains(txn, cid):
                        missing[cid] = chunk
        return missing

    # ---- committing -----------------------------------------------------------------------------

    def _store_chunks(self, chunks: dict[str, Chunk]) -> None:
        ids = list(chunks)
        kvs = self._run.compute(ids, [list(chunks[c].token_ids) for c in ids])
        vectors = self.embedder.embed([chunks[c].text for c in ids])
        with self.store.env.begin(write=True) as txn:
            for cid, kv, vector in zip(ids, kvs, vectors):
                record = self.store.docs.get_chunk(txn, cid) or ChunkRecord(
                    cid, chunks[cid].text, list(chunks[cid].token_ids), namespace=self._run.namespace)
                if kv is not None:
                    self.store.kv.put(txn, cid, kv)
                self.store.docs.put_chunk(txn, record)
                self.store.docs.put_embedding(txn, cid, vector)

    def _unlink(self, txn, doc_id: str, chunk_ids: list[str], touched: set[str]) -> None:
        for cid in chunk_ids:
            record = self.store.docs.get_chunk(txn, cid)
            if record is not None:
                record.refs = [ref for ref in record.refs if ref[0] != doc_id]
                self.store.docs.put_chunk(txn, record)
                touched.add(cid)

    def _commit_documents(self, planned: list[_PlannedDoc]) -> None:
        """Make documents visible (and drop what they replaced) in one transaction, then sync the index."""
        touched: set[str] = set()
        with self.store.env.begin(write=True) as txn:
            for item in planned:
                old = self.store.docs.get_doc(txn, item.doc.id, self._run.namespace)
                if old is not None:
                    self._unlink(txn, old.doc_id, old.chunk_ids, touched)
                for cid, chunk in zip(item.ids, item.chunks):
                    record = self.store.docs.get_chunk(txn, cid)
                    record.refs.append([item.doc.id, chunk.position])
                    self.store.docs.put_chunk(txn, record)
                    touched.add(cid)
                tokens = sum(len(c.token_ids) for c in item.chunks)
                ttl_s = item.doc.ttl_s or self._run.ttl_s
                self.store.docs.put_doc(txn, DocRecord(item.doc.id, item.doc.content_hash(), item.ids,
                                                       item.doc.metadata, item.doc.source, tokens,
                                                       expires_at=time.time() + ttl_s if ttl_s else None,
                                                       expire=item.doc.expire, namespace=self._run.namespace))
            live, dead = self._split_live(txn, touched)
            vectors = [self.store.docs.get_embedding(txn, cid) for cid in live]
            self.store.bump_generation(txn)
            generation = self.store.generation(txn)
        self.store.update_index(live, vectors, dead, generation)

    def delete(self, doc_ids: list[str], namespace: str = DEFAULT_NAMESPACE) -> None:
        """Remove documents of `namespace`, and every chunk (KV, embedding, text) no other document shares."""
        doc_ids = list(dict.fromkeys(doc_ids))
        touched: set[str] = set()
        with self.store.env.begin(write=True) as txn:
            unknown = [label(namespace, d) for d in doc_ids if self.store.docs.get_doc(txn, d, namespace) is None]
            if unknown:
                raise KeyError(f"unknown document ids: {', '.join(map(str, unknown))} (nothing was deleted)")
            for doc_id in doc_ids:
                self._unlink(txn, doc_id, self.store.docs.get_doc(txn, doc_id, namespace).chunk_ids, touched)
                self.store.docs.delete_doc(txn, doc_id, namespace)
            _, dead = self._split_live(txn, touched)
            self.store.bump_generation(txn)
            generation = self.store.generation(txn)
        self.store.update_index([], [], dead, generation)

    def _split_live(self, txn, touched: set[str]) -> tuple[list[str], list[str]]:
        """Chunks still referenced, and the unreferenced ones, which are deleted here."""
        live, dead = [], []
        for cid in sorted(touched):
            record = self.store.docs.get_chunk(txn, cid)
            if record.refs:
                live.append(cid)
            else:
                dead.append(cid)
                self.store.docs.delete_chunk(txn, record)
                self.store.drop_kv(txn, [cid])
        return live, dead

    # ---- the whole run --------------------------------------------------------------------------

    def expire(self, now: float | None = None) -> list[str]:
        """Apply ended TTLs: delete documents that asked for it, drop the others' KV; their ids."""
        now = time.time() if now is None else now
        with self.store.env.begin() as txn:
            gone = [d for d in self.store.expired_documents(txn, now) if d.expire == "document"]
        for namespace in {d.namespace for d in gone}:
            self.delete([d.doc_id for d in gone if d.namespace == namespace], namespace)
        return [d.doc_id for d in gone] + self.store.drop_expired_kv(now)

    def ingest(self, docs: list[Document], progress: bool = True, ttl_s: float | None = None,
               namespace: str = DEFAULT_NAMESPACE, kv_compute=None) -> IngestReport:
        """`ttl_s`: the TTL of documents that do not set their own (None: no expiry). `namespace`: the
        tenant the documents belong to, invisible to every other. `kv_compute`: what computes chunk KV
        (default this process's model; a RayKVCompute spreads it). A full store or disk raises
        StoreFullError; documents committed before stay whole, the rest are absent."""
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        compute = kv_compute.compute if kv_compute is not None else self._compute_here
        self._run = _Run(ttl_s, validate_namespace(namespace), compute)
        try:
            return self._ingest(docs, progress)
        except (lmdb.MapFullError, lmdb.DiskError) as exc:
            raise StoreFullError(f"store {self.store.location} is full ({exc.__class__.__name__}): free disk space, "
                                 f"raise {MAX_STORE_BYTES_ENV}, or set a KV budget (kv_max_bytes); documents "
                                 "committed before this point are intact") from None

    def _ingest(self, docs: list[Document], progress: bool) -> IngestReport:
        self.expire()
        start = time.perf_counter()
        planned, unchanged = self._plan(docs)
        missing = self._missing(planned)
        report = IngestReport(documents=len(docs), unchanged=unchanged, computed_chunks=len(missing),
                              computed_tokens=sum(len(c.token_ids) for c in missing.values()))
        report.chunks = sum(len(p.chunks) for p in planned)
        report.tokens = sum(len(c.token_ids) for p in planned for c in p.chunks)
        with tqdm(total=report.computed_tokens, unit="tok", desc="ingest", disable=not progress or not missing) as bar:
            pending: list[_PlannedDoc] = []
            batch: dict[str, Chunk] = {}
            for item in planned:
                batch.update((cid, missing.pop(cid)) for cid in item.ids if cid in missing)
                pending.append(item)
                if len(batch) >= COMMIT_EVERY_CHUNKS:
                    self._flush(batch, pending, bar)
            self._flush(batch, pending, bar)
        report.bytes_on_disk = self.store.stats().disk_bytes
        report.wall_s = time.perf_counter() - start
        return report

    def _flush(self, batch: dict[str, Chunk], pending: list[_PlannedDoc], bar: tqdm) -> None:
        if batch:
            self._store_chunks(batch)
            bar.update(sum(len(c.token_ids) for c in batch.values()))
        if pending:
            self._commit_documents(pending)
            self.store.enforce_budget()
        batch.clear()
        pending.clear()
