"""The one request path: stored history + new chunks + question -> the mode's fused prefill -> decode.

`RagBlend.query` (history = the prompt prefix), `Chat.send` (history = prefix and earlier turns) and the
server all go through it, so a change to fusion, loading or decoding reaches every surface at once.
Requests answered on several threads share the model through one Batcher: their decode steps run
batched, their prefills between steps (ragblend.engine.batcher).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Callable

from kvchunks.backends import BackendUnavailableError
from kvchunks.kvstore import CorruptKVError, StoredKV
from kvchunks.precompute import ChunkKV
from ragblend.answer import Answer, AnswerStream, ChunkRef
from ragblend.contexts import ContextChunk
from ragblend.engine.batcher import Batcher
from ragblend.engine.fusion import FusionEngine, Prefill
from ragblend.engine.generate import SamplingConfig, decode
from ragblend.engine.layout import PromptLayout
from ragblend.engine.loader import KVSource, LayerLoader
from ragblend.engine.model import LoadedModel
from ragblend.engine.selection import BlendConfig
from ragblend.storage.ingest import Ingestor
from ragblend.storage.store import Store

MODES = ("blend", "reuse", "prefix", "full")
FLUSH_USES = 256  # chunk uses noted in memory before they are written (one transaction for all of them)


@dataclass
class History:
    """The stored KV a request's new tokens follow: the prompt prefix, then a session's earlier turns.
    Keys are pre-RoPE, so the same history can sit at any positions (that is what makes truncation free)."""

    token_ids: tuple[int, ...]
    sources: list[tuple[int, KVSource]]  # (position, KV) tiling token_ids in order
    source: str = "ram"  # where earlier turns came from: ram | disk | recomputed

    @property
    def is_prefix_only(self) -> bool:
        return len(self.sources) == 1


@dataclass
class PreparedPrompt:
    layout: PromptLayout
    prefill: Prefill
    chunks: list[ContextChunk]
    timings: dict[str, float]


class RequestPath:
    def __init__(self, model: LoadedModel, store: Store, ingestor: Ingestor):
        self.model, self.store, self.ingestor = model, store, ingestor
        self.engine = FusionEngine(model)
        self.batcher = Batcher(model)

    def prefill(self, history: History, chunks: list[ContextChunk], suffix_ids: list[int], mode: str,
                blend: BlendConfig, load_depth: int = 2, reserve_tokens: int = 0) -> PreparedPrompt:
        """Everything up to the first token: missing chunk KV, the prompt layout and the mode's prefill."""
        start = time.perf_counter()
        layout = PromptLayout.build(history.token_ids, [(c.chunk_id, c.token_ids) for c in chunks], suffix_ids)
        if len(layout) + reserve_tokens > self.model.max_positions:
            raise ValueError(f"prompt of {len(layout)} tokens + {reserve_tokens} new tokens exceeds the model's "
                             f"window of {self.model.max_positions}; use fewer or shorter contexts")
        stored_spans = min({"full": 1, "prefix": 2}.get(mode, len(layout.spans)), len(layout.spans))
        loaded = chunks[: stored_spans - 1]  # only what this mode loads; `full` computes them all
        with self.batcher.prefill():  # between decode steps of other requests, see Batcher
            waited = prepared = time.perf_counter()
            try:
                misses = self.ensure_kv(loaded)
                prepared = time.perf_counter()
                prefill, repaired = self._run_stored(layout, history, mode, stored_spans, blend, load_depth, loaded)
                misses += repaired
            except BackendUnavailableError:  # the shared backend went away: compute what it could not give
                misses = len(loaded)
                computed = dict(zip([c.chunk_id for c in loaded], self._compute_as_stored(loaded)))
                prefill = self._run_engine(layout, history, mode, stored_spans, blend, load_depth, computed)
            prefill.timings["fuse_s"] = time.perf_counter() - prepared
        timings = {"wait_s": waited - start, "prepare_s": prepared - waited, **prefill.timings,
                   "ttft_s": time.perf_counter() - start,
                   "kv_hits": stored_spans - 1 - misses, "kv_misses": misses}
        return PreparedPrompt(layout, prefill, chunks, timings)

    def answer(self, prepared: PreparedPrompt, mode: str, sampling: SamplingConfig, stream: bool,
               on_finish: Callable[[Answer, Prefill], None] | None = None) -> Answer | AnswerStream:
        """Decode from the prepared prompt; `on_finish` sees the answer and the cache it grew."""
        layout, prefill, timings = prepared.layout, prepared.prefill, prepared.timings
        first_token = time.perf_counter()
        generated: list[int] = []
        pieces = decode(self.model, prefill.cache, prefill.logits, len(layout), sampling, generated, self.batcher.step)

        def finish(text: str) -> Answer:
            timings["decode_s"] = time.perf_counter() - first_token
            timings["total_s"] = timings["ttft_s"] + timings["decode_s"]
            refs = [ChunkRef(c.chunk_id, c.doc_id, c.score, len(c.token_ids)) for c in prepared.chunks]
            answer = Answer(text.strip(), mode, timings["ttft_s"], timings, len(layout), prefill.recomputed_tokens,
                            refs, generated, prefill.logits)
            if on_finish is not None:
                on_finish(answer, prefill)
            return answer

        answer_stream = AnswerStream(pieces, finish)
        return answer_stream if stream else answer_stream.collect()

    def _run_stored(self, layout: PromptLayout, history: History, mode: str, stored_spans: int,
                    blend: BlendConfig, depth: int, loaded: list[ContextChunk]) -> tuple[Prefill, int]:
        """The prefill over stored KV, and how many damaged chunk records it had to recompute."""
        try:
            return self._run_engine(layout, history, mode, stored_spans, blend, depth), 0
        except CorruptKVError as error:  # a damaged chunk record: drop it, recompute it, answer anyway
            if error.key not in {c.chunk_id for c in loaded}:
                raise  # a session turn's record: the session layer owns it
            with self.store.env.begin(write=True) as txn:
                self.store.kv.delete(txn, error.key)
            repaired = self.ensure_kv(loaded)
            return self._run_engine(layout, history, mode, stored_spans, blend, depth), repaired

    def _compute_as_stored(self, chunks: list[ContextChunk]) -> list[ChunkKV]:
        """Chunks' KV computed here, rounded as the store's codec would round it: the answer is the one a
        load would have given."""
        kvs = self.ingestor.spans.compute([list(c.token_ids) for c in chunks]) if chunks else []
        return [self.store.kv.as_stored(kv) for kv in kvs]

    def ensure_kv(self, chunks: list[ContextChunk]) -> int:
        """Compute and store the KV of chunks the store lacks (never stored, or evicted), so the next
        request reuses it; the number computed. Then keep the store within its budget, sparing these."""
        with self.store.env.begin() as txn:
            missing = {c.chunk_id: c for c in chunks if not self.store.kv.contains(txn, c.chunk_id)}
        budget = self.store.budget
        budget.used([c.chunk_id for c in chunks if c.chunk_id not in missing], missing)
        if not missing:
            if budget.pending >= FLUSH_USES:
                self.store.enforce_budget()
            return 0
        kvs = self.ingestor.spans.compute([list(c.token_ids) for c in missing.values()])
        with self.store.env.begin(write=True) as txn:
            for chunk_id, kv in zip(missing, kvs):
                self.store.kv.put(txn, chunk_id, kv)
            self.store.enforce_budget({c.chunk_id for c in chunks}, txn)
        return len(missing)

    def _run_engine(self, layout: PromptLayout, history: History, mode: str, stored_spans: int,
                    blend: BlendConfig, depth: int, computed: dict[str, ChunkKV] | None = None) -> Prefill:
        """`full` without earlier turns is the model's own forward (the reference); every other case
        loads the history and the first `stored_spans` - 1 chunks (`computed` ones from memory) and
        computes the rest."""
        if mode == "full" and history.is_prefix_only:
            return self.engine.full_prefill(layout)
        computed = computed or {}
        sources = history.sources + [(s.start, computed.get(s.key) or StoredKV(self.store.kv, s.key))
                                     for s in layout.spans[1:stored_spans]]
        cos, sin = self.engine.rotary(len(layout))
        loader = LayerLoader(self.store.env, sources, len(layout), cos, sin, self.model.num_layers,
                             self.model.dtype, self.model.device, depth)
        fuse = blend if mode == "blend" and len(layout.spans) > 1 else None
        try:
            prefill = self.engine.prefill(layout, loader, layout.spans[stored_spans - 1].end, cos, sin, fuse)
        finally:
            loader.close()
        prefill.timings.update(load_s=loader.stats.busy_s, load_exposed_s=loader.stats.exposed_s)
        return prefill
