"""`ragblend gc`: remove what no query can reach any more, and say how many bytes that freed.

Documents whose TTL asks for their deletion are deleted when a RagBlend opens the store or ingests
(that needs the index); gc drops the KV of the others.

LMDB puts freed pages on its free list and reuses them for later writes, so the file stops growing
once ingest/delete cycles reach a steady state; it never shrinks by itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from index.namespaces import label
from ragblend.storage.session_store import SessionStore
from ragblend.storage.store import Store


@dataclass
class GcReport:
    orphan_chunks: list[str] = field(default_factory=list)  # no document refers to them
    orphan_kv: list[str] = field(default_factory=list)  # KV of a chunk that no longer exists
    foreign_records: int = 0  # KV written under another model or prompt fingerprint
    expired_sessions: list[str] = field(default_factory=list)
    expired_kv_documents: list[str] = field(default_factory=list)  # TTL ended: KV dropped, text kept
    bytes_freed: int = 0
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        return (f"{len(self.orphan_chunks)} unreferenced chunks, {len(self.orphan_kv)} orphan KV records, "
                f"{self.foreign_records} records of other fingerprints, {len(self.expired_sessions)} expired "
                f"sessions, {len(self.expired_kv_documents)} documents past their TTL: "
                f"{verb} {self.bytes_freed / 1e6:,.1f} MB of KV")


def collect_garbage(store: Store, dry_run: bool = False) -> GcReport:
    report = GcReport(dry_run=dry_run)
    sessions = SessionStore(store)
    with store.env.begin(write=not dry_run) as txn:
        chunks = {r.chunk_id: r for r in store.docs.chunk_records(txn)}
        report.orphan_chunks = [c for c, record in chunks.items() if not record.refs]
        dead_kv = [c for c in store.kv.chunk_ids(txn) if c not in chunks or not chunks[c].refs]
        report.orphan_kv = [c for c in dead_kv if c not in chunks]
        for chunk_id in dead_kv:
            meta = store.kv.meta(txn, chunk_id)
            report.bytes_freed += meta.payload_bytes
        foreign = [(kv, key, size) for kv in (store.kv, sessions.kv, store.paths.kv) for key, size in kv.foreign(txn)]
        report.foreign_records = len(foreign)
        report.bytes_freed += sum(size for _, _, size in foreign)
        if not dry_run:
            for chunk_id in report.orphan_chunks:
                store.docs.delete_chunk(txn, chunks[chunk_id])
            store.drop_kv(txn, dead_kv)
            for kv, key, _ in foreign:
                kv.delete_foreign(txn, key)
    now = time.time()
    with store.env.begin() as txn:
        ended = [d for d in store.expired_documents(txn, now) if d.expire == "kv"]
        report.expired_kv_documents = [d.doc_id for d in ended]
        metas = [store.kv.meta(txn, c) for d in ended for c in d.chunk_ids]
        report.bytes_freed += sum(m.payload_bytes for m in metas if m is not None)
    if not dry_run:
        store.drop_expired_kv(now)
    expired = [r for r in sessions.records() if r.expired(now)]
    report.bytes_freed += sum(sessions.info(r).bytes for r in expired)
    report.expired_sessions = [label(r.namespace, r.name) for r in expired]
    if not dry_run:
        for record in expired:
            sessions.delete(record.id)
    return report
