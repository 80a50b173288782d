"""`ragblend reindex-kv`: recompute the chunks' KV for another model, tokenizer or prompt while the store
keeps serving the old KV until the new set is complete.

KV records are keyed by fingerprint, so the new ones are written beside the old; one transaction then
switches the manifest and re-tokenises chunk texts for the new tokenizer. Text, embeddings and chunk ids
stay. Chunks without KV (evicted, or ingested during the run) get it on first use, as after an eviction.
Processes still on the old model refuse further searches and ingests once the switch commits
(StoreMismatchError); conversations, whose KV belongs to the old model, end. The old records are then
freed as `ragblend gc` frees them. A run that is interrupted resumes where it stopped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from kvchunks.chunking import validate_chunk_tokens
from kvchunks.kvstore import KVStore
from ragblend.engine.model import LoadedModel, load_model
from ragblend.engine.precompute import SpanComputer
from ragblend.engine.prompt import PromptTemplate
from ragblend.storage.maintenance import collect_garbage
from ragblend.storage.session_store import SessionStore
from ragblend.storage.store import Store

COMMIT_EVERY_CHUNKS = 64


@dataclass
class ReindexReport:
    computed_chunks: int = 0
    resumed_chunks: int = 0  # already had KV for the new fingerprint (an interrupted run's work)
    chunks_without_kv: int = 0  # evicted before the run: computed on first use
    retokenized_chunks: int = 0  # whose token ids the new tokenizer changed
    ended_sessions: int = 0
    bytes_freed: int = 0
    wall_s: float = 0.0

    def summary(self) -> str:
        return (f"computed KV for {self.computed_chunks} chunks ({self.resumed_chunks} done by an earlier run, "
                f"{self.chunks_without_kv} without KV left for first use), {self.retokenized_chunks} re-tokenised, "
                f"{self.ended_sessions} sessions ended, {self.bytes_freed / 1e6:,.1f} MB of old KV freed "
                f"in {self.wall_s:.1f} s")


def reindex_kv(store_dir: str | Path, model: str | Path | LoadedModel | None = None, device: str | None = None,
               progress: bool = True, kv_backend: str | None = None) -> ReindexReport:
    """Move the store at `store_dir` (or `kv_backend`) to `model` (a folder, a LoadedModel, or the bundled
    default)."""
    start = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    store = Store(store_dir, backend=kv_backend)
    try:
        if store.manifest is None:
            raise ValueError(f"{store_dir} holds no ragblend store yet")
        validate_chunk_tokens(store.manifest.chunk_tokens, loaded.max_positions)
        template = PromptTemplate.for_tokenizer(loaded.tokenizer)
        target = replace(store.manifest, kv_fingerprint=template.fingerprint(loaded.fingerprint), model=loaded.name)
        report = ReindexReport()
        if target.kv_fingerprint != store.manifest.kv_fingerprint:
            _compute(store, target, loaded, template, report, progress)
            _switch(store, target, template, report)
            report.bytes_freed = collect_garbage(store).bytes_freed
        report.wall_s = time.perf_counter() - start
        return report
    finally:
        store.close()


def _compute(store: Store, target, model: LoadedModel, template: PromptTemplate, report: ReindexReport,
             progress: bool) -> None:
    """New-fingerprint KV for every chunk that holds KV now, committed in batches (so a rerun resumes)."""
    new_kv = KVStore(store.env, target.kv_fingerprint, dtype=target.kv_dtype)
    spans = SpanComputer(model.decoder, template.prefix_ids)
    with store.env.begin() as txn:
        live = [r for r in store.docs.chunk_records(txn) if r.refs]
        report.chunks_without_kv = sum(1 for r in live if not store.kv.contains(txn, r.chunk_id))
        todo = [r for r in live if store.kv.contains(txn, r.chunk_id) and not new_kv.contains(txn, r.chunk_id)]
    report.resumed_chunks = len(live) - report.chunks_without_kv - len(todo)
    for first in tqdm(range(0, len(todo), COMMIT_EVERY_CHUNKS), desc="reindex-kv", unit="batch",
                      disable=not progress or not todo):
        batch = todo[first:first + COMMIT_EVERY_CHUNKS]
        kvs = spans.compute([template.chunk_ids(r.text) for r in batch])
        with store.env.begin(write=True) as txn:
            for record, kv in zip(batch, kvs):
                new_kv.put(txn, record.chunk_id, kv)
        report.computed_chunks += len(batch)


def _switch(store: Store, target, template: PromptTemplate, report: ReindexReport) -> None:
    """One transaction: chunks carry the new tokenizer's ids and the manifest names the new fingerprint;
    then conversations of the old model end (their KV cannot serve the new one)."""
    old_sessions = SessionStore(store, ram_bytes=0)
    with store.env.begin(write=True) as txn:
        for record in store.docs.chunk_records(txn):
            token_ids = template.chunk_ids(record.text)
            if token_ids != record.token_ids:
                record.token_ids = token_ids
                store.docs.put_chunk(txn, record)
                report.retokenized_chunks += 1
        store.switch_manifest(txn, target)
    store.adopt_manifest(target)
    for session in old_sessions.records():
        report.ended_sessions += old_sessions.delete(session.id)
