"""The one request path: stored history + new chunks + question -> the mode's fused prefill -> decode.

`RagBlend.query` (history = the prompt prefix), `Chat.send` (history = prefix and earlier turns) and the
server all go through it, so a change to fusion, loading or decoding reaches every surface at once.
Every prefill and decode runs in the one engine loop (ragblend.engine.loop): decodes of concurrent
requests batched into one forward per step, prefills between steps.

Exact reuse comes first: behind the store's own prompt prefix, the longest run of leading chunks whose KV the
exact-path tree holds (kvchunks.paths) is loaded as history, exactly as full prefill computes it; `prefix`
computes the rest in full context, `blend` fuses only the chunks after it. Whatever a request computes in
full context (`full`, `prefix`) is added to the tree, in the background, for the next request.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvchunks.backends import BackendUnavailableError
from kvchunks.chunk_kv import ChunkKV, cache_layers
from kvchunks.kvstore import CorruptKVError, StoredKV
from kvchunks.paths import path_key
from ragblend.answer import Answer, AnswerStream, ChunkRef
from ragblend.contexts import ContextChunk
from ragblend.engine.fusion import FusionEngine, Prefill
from ragblend.engine.generate import SamplingConfig, Sequence
from ragblend.engine.layout import PromptLayout
from ragblend.engine.loader import KVSource, LayerLoader
from ragblend.engine.loop import EngineLoop
from ragblend.engine.model import LoadedModel
from ragblend.engine.selection import BlendConfig
from ragblend.storage.kv_supply import KVSupply
from ragblend.storage.store import Store



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
    mode: str
    order: str = "retrieval"


@dataclass
class Plan:
    """How a request's chunks split: `exact` leading chunks loaded as history from the tree, then `stored`
    of the rest loaded from the chunk store (the mode's choice), the others computed."""

    history: History
    layout: PromptLayout
    exact: int
    stored_spans: int  # spans of `layout` (its history first) whose KV is loaded
    loaded: list[ContextChunk]  # chunks whose own KV record is read


class RequestPath:
    def __init__(self, model: LoadedModel, store: Store, chunk_kv: KVSupply, loop: EngineLoop,
                 exact_paths: bool = True):
        self.model, self.store, self.chunk_kv, self.loop = model, store, chunk_kv, loop
        self.exact_paths = exact_paths
        self.engine = FusionEngine(model)
        self._path_saver = ThreadPoolExecutor(1, thread_name_prefix="ragblend-path-save")
        self._path_save: Future | None = None

    def prefill(self, history: History, chunks: list[ContextChunk], suffix_ids: list[int], mode: str,
                blend: BlendConfig, load_depth: int = 2, reserve_tokens: int = 0,
                order: str = "retrieval") -> PreparedPrompt:
        """Everything up to the first token: chunk order, missing chunk KV, the exact path, the prompt layout
        and the mode's prefill."""
        start = time.perf_counter()
        tree = self._tree_applies(history)
        if tree:
            self.wait_paths()  # a path the previous request is saving is there for this one
        looked_up = time.perf_counter()
        try:
            if tree and order == "cache":
                chunks = self._cache_order(chunks)
            plan = self._plan(history, chunks, suffix_ids, mode, tree)
        except BackendUnavailableError:  # the shared backend went away: no paths; the chunks are computed below
            tree = False
            plan = self._plan(history, chunks, suffix_ids, mode, tree)
        tree_s = time.perf_counter() - looked_up  # the tree's bookkeeping on the critical path
        if len(plan.layout) + reserve_tokens > self.model.max_positions:
            raise ValueError(f"prompt of {len(plan.layout)} tokens + {reserve_tokens} new tokens exceeds the model's "
                             f"window of {self.model.max_positions}; use fewer or shorter contexts")
        planned = prepared = time.perf_counter()
        try:
            misses = self.chunk_kv.ensure(plan.loaded)
            prepared = time.perf_counter()
            prefill, repaired = self._run_stored(plan, mode, blend, load_depth)
            misses += repaired
        except BackendUnavailableError:  # the shared backend went away: compute what it could not give
            plan = self._plan(history, chunks, suffix_ids, mode, tree=False)
            misses = len(plan.loaded)
            computed = dict(zip([c.chunk_id for c in plan.loaded], self.chunk_kv.as_stored(plan.loaded)))
            prefill = self._run_engine(plan, mode, blend, load_depth, computed)
        prefill.timings["fuse_s"] = time.perf_counter() - prepared
        exact_tokens = sum(len(c.token_ids) for c in chunks[: plan.exact])
        if plan.exact > 1:
            self.store.budget.path_used(exact_tokens)
        if tree and mode in ("full", "prefix"):
            self._save_paths(chunks, plan, prefill.cache)
        timings = {"prepare_s": prepared - planned, **prefill.timings,
                   "ttft_s": time.perf_counter() - start, "exact_hit_tokens": exact_tokens, "tree_s": tree_s,
                   "kv_hits": len(plan.loaded) - misses + max(plan.exact - 1, 0), "kv_misses": misses}
        return PreparedPrompt(plan.layout, prefill, chunks, timings, mode, order)

    def _tree_applies(self, history: History) -> bool:
        """Paths are computed behind the store's own prompt prefix: not behind a session's earlier turns or
        another system prompt."""
        return (self.exact_paths and self.store.paths is not None
                and history.token_ids == tuple(self.chunk_kv.spans.prefix_ids))

    def _cache_order(self, chunks: list[ContextChunk]) -> list[ContextChunk]:
        by_id = {c.chunk_id: c for c in chunks}
        if len(by_id) < len(chunks):  # a repeated chunk: keep the caller's order
            return chunks
        with self.store.env.begin() as txn:
            return [by_id[c] for c in self.store.paths.cache_order(txn, list(by_id))]

    def _plan(self, history: History, chunks: list[ContextChunk], suffix_ids: list[int], mode: str,
              tree: bool) -> Plan:
        """`full` computes every chunk; `reuse` loads every chunk's own KV; `prefix` and `blend` load the
        longest exact path (behind the store's prefix: the first chunk's record, then tree nodes), after which
        `prefix` computes the rest and `blend` fuses it. Elsewhere `prefix` loads just the first chunk."""
        exact = 0
        if tree and mode in ("prefix", "blend") and chunks:
            with self.store.env.begin() as txn:
                exact = self.store.paths.depth(txn, [c.chunk_id for c in chunks])
            ids = [c.chunk_id for c in chunks[:exact]]
            sources, position = list(history.sources), len(history.token_ids)
            for chunk, kv in zip(chunks, [StoredKV(self.store.kv, ids[0]), *self.store.paths.sources(ids)]):
                sources.append((position, kv))
                position += len(chunk.token_ids)
            history = History(history.token_ids + tuple(t for c in chunks[:exact] for t in c.token_ids), sources)
        rest = chunks[exact:]
        layout = PromptLayout.build(history.token_ids, [(c.chunk_id, c.token_ids) for c in rest], suffix_ids)
        spans = {"full": 1, "prefix": 1 if exact else 2}.get(mode, len(layout.spans))
        stored_spans = min(spans, len(layout.spans))
        return Plan(history, layout, exact, stored_spans, chunks[: min(exact, 1)] + rest[: stored_spans - 1])

    def answer(self, prefill: Callable[[], PreparedPrompt], sampling: SamplingConfig, stream: bool,
               prompt_tokens: int, on_finish: Callable[[Answer, PreparedPrompt], None] | None = None
               ) -> Answer | AnswerStream:
        """Submit a request to the engine: `prefill` runs in its loop, then the answer decodes batched with
        the others. Returns once the prefill is done (its errors raise here); `on_finish` sees the answer
        and the prompt whose cache it grew. `prompt_tokens`: the prompt's length, for admission."""
        submitted = self.loop.submit(self._timed(prefill), lambda p: self._sequence(p, sampling),
                                     prompt_tokens + sampling.max_new_tokens)
        try:
            prepared = submitted.result()
        except BaseException:
            submitted.cancel()  # a caller interrupted while waiting takes its request with it
            raise
        first_token = time.perf_counter()

        def finish(text: str) -> Answer:
            timings = prepared.timings
            timings["decode_s"] = time.perf_counter() - first_token
            timings["total_s"] = timings["ttft_s"] + timings["decode_s"]
            refs = [ChunkRef(c.chunk_id, c.doc_id, c.score, len(c.token_ids)) for c in prepared.chunks]
            answer = Answer(text.strip(), prepared.mode, timings["ttft_s"], timings, len(prepared.layout),
                            prepared.prefill.recomputed_tokens, refs, submitted.sequence.generated,
                            prepared.prefill.logits, prepared.order)
            if on_finish is not None:
                on_finish(answer, prepared)
            return answer

        answer_stream = AnswerStream(submitted, finish)
        return answer_stream if stream else answer_stream.collect()

    def run_prefill(self, prefill: Callable[[], PreparedPrompt]) -> PreparedPrompt:
        """A prefill alone (no answer), run by the engine between decode steps."""
        return self.loop.submit(self._timed(prefill)).result()

    @staticmethod
    def _timed(prefill: Callable[[], PreparedPrompt]) -> Callable[[], PreparedPrompt]:
        """`prefill`, with the time it waited for the engine counted in its `wait_s` and TTFT."""
        submitted = time.perf_counter()

        def run() -> PreparedPrompt:
            began = time.perf_counter()
            prepared = prefill()
            prepared.timings["wait_s"] = began - submitted
            prepared.timings["ttft_s"] += began - submitted
            return prepared

        return run

    def _sequence(self, prepared: PreparedPrompt, sampling: SamplingConfig) -> Sequence:
        prefill = prepared.prefill
        return Sequence(self.model, prefill.cache, prefill.logits, len(prepared.layout), sampling, [])

    def _run_stored(self, plan: Plan, mode: str, blend: BlendConfig, depth: int) -> tuple[Prefill, int]:
        """The prefill over stored KV, and how many damaged chunk records it had to recompute."""
        try:
            return self._run_engine(plan, mode, blend, depth), 0
        except CorruptKVError as error:  # a damaged chunk record: drop it, recompute it, answer anyway
            if error.key not in {c.chunk_id for c in plan.loaded}:
                raise  # a session turn's record: the session layer owns it
            repaired = self.chunk_kv.repair(error.key, plan.loaded)
            return self._run_engine(plan, mode, blend, depth), repaired

    def _run_engine(self, plan: Plan, mode: str, blend: BlendConfig, depth: int,
                    computed: dict[str, ChunkKV] | None = None) -> Prefill:
        """`full` without earlier turns is the model's own forward (the reference); every other case
        loads the history and the first `stored_spans` - 1 chunks after it (`computed` ones from memory) and
        computes the rest."""
        layout, stored_spans = plan.layout, plan.stored_spans
        if mode == "full" and plan.history.is_prefix_only:
            return self.engine.full_prefill(layout)
        computed = computed or {}
        sources = plan.history.sources + [(s.start, computed.get(s.key) or StoredKV(self.store.kv, s.key))
                                          for s in layout.spans[1:stored_spans]]
        cos, sin = self.engine.rotary(len(layout))
        loader = LayerLoader(self.store.env, sources, len(layout), cos, sin, self.model.num_layers,
                             self.model.dtype, self.model.device, depth, self.engine.rope_of_layer)
        fuse = blend if mode == "blend" and len(layout.spans) > 1 else None
        try:
            prefill = self.engine.prefill(layout, loader, layout.spans[stored_spans - 1].end, cos, sin, fuse)
        finally:
            loader.close()
        prefill.timings.update(load_s=loader.stats.busy_s, load_exposed_s=loader.stats.exposed_s)
        return prefill

    # ---- the exact-path tree ------------------------------------------------------------------------

    def _save_paths(self, chunks: list[ContextChunk], plan: Plan, cache: DynamicCache) -> None:
        """Queue the nodes this prefill computed in full context (chunks after the exact path, from depth 2)
        for the tree; the rows are read now, since decoding grows the cache."""
        spans = plan.layout.chunk_spans
        todo = [(j, spans[j - plan.exact]) for j in range(max(plan.exact, 1), len(chunks))]
        if not todo:
            return
        self._path_save = self._path_saver.submit(self._store_paths, [c.chunk_id for c in chunks], todo,
                                                  cache_layers(cache))

    def _store_paths(self, chunk_ids: list[str], todo: list, layers: list) -> None:
        tree = self.store.paths
        with self.store.env.begin() as txn:
            todo = [(j, span) for j, span in todo if tree.node(txn, chunk_ids[: j + 1]) is None]
        if not todo:
            return
        segments = [(j, span.start, self.segment(layers, span.start, span.end)) for j, span in todo]
        with self.store.env.begin(write=True) as txn:
            clock = self.store.budget.clock(txn)
            for j, start, kv in segments:
                parent_stored = j == 1 or tree.node(txn, chunk_ids[:j]) is not None
                if parent_stored:  # a parent evicted meanwhile leaves its children unreachable: skip them
                    tree.put(txn, chunk_ids[: j + 1], start, kv, clock)
            protect = set(chunk_ids) | {path_key(chunk_ids[: j + 1]) for j in range(1, len(chunk_ids))}
            self.store.enforce_budget(protect, txn)

    def wait_paths(self) -> None:
        """Block until the tree holds what the last prefill computed (a failed save only loses the paths)."""
        pending = self._path_save
        if pending is not None:
            try:
                pending.result()
            except Exception as exc:  # noqa: BLE001 - the answer stands; the next request computes them again
                warnings.warn(f"ragblend: saving exact paths failed ({exc}); they will be computed again",
                              RuntimeWarning, stacklevel=2)
            self._path_save = None

    def close(self) -> None:
        self.wait_paths()
        self._path_saver.shutdown(wait=True)

    @torch.inference_mode()
    def segment(self, layers: list[tuple[torch.Tensor, torch.Tensor]], start: int, end: int) -> ChunkKV:
        """Rows [start, end) of per-layer cache tensors as a stored span (ChunkKV.from_rows at this model's
        angles): sessions' turns and the tree's nodes alike."""
        cos, sin = self.engine.rotary(end)
        return ChunkKV.from_rows(layers, start, end, cos[:, start:end], sin[:, start:end],
                                 self.engine.rope_of_layer)
