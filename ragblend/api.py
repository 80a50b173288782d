"""The public entry point: `RagBlend(store_dir, model=..., embedder=...)`."""
from __future__ import annotations

import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

from index.embedder import Embedder
from index.namespaces import DEFAULT_NAMESPACE, label, scoped, validate_namespace
from kvchunks.backends import BackendUnavailableError
from kvchunks.budget import POLICIES
from kvchunks.chunking import validate_chunk_tokens
from kvchunks.codecs import codec_for
from ragblend.answer import Answer, AnswerStream
from ragblend.chat import Chat
from ragblend.contexts import ContextChunk, from_hit, from_text
from ragblend.storage.documents import Document, coerce_document
from ragblend.engine.model import DECODE_WEIGHTS, LoadedModel, load_model, quiet_loading, with_decode_weights
from ragblend.engine.prompt import PromptTemplate
from ragblend.engine.selection import BlendConfig
from ragblend.storage.calibration import Calibration, read_calibration
from ragblend.storage.ingest import Ingestor, IngestReport
from ragblend.storage.kv_supply import KVSupply
from ragblend.engine.loop import EngineLoop, EngineStats
from ragblend.query import Request, Resolved
from ragblend.request import History, PreparedPrompt, RequestPath
from ragblend.storage.session_store import DEFAULT_RAM_BYTES, SessionInfo, SessionStore
from ragblend.sessions import SessionManager
from ragblend.storage.store import Manifest, Store

DEFAULT_CHUNK_TOKENS = 256


@dataclass
class SearchHit:
    chunk_id: str
    doc_id: str
    score: float
    text: str
    token_ids: list[int] = field(repr=False)
    position: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


class RagBlend:
    """A store of documents with precomputed per-chunk KV, and a model to answer questions over it."""

    def __init__(self, store_dir: str | Path, model: str | Path | LoadedModel | None = None,
                 embedder: str | Path | Embedder | None = None, *, chunk_tokens: int | None = None,
                 index_kind: str | None = None, device: str | None = None, blend: BlendConfig | None = None,
                 session_ram_bytes: int = DEFAULT_RAM_BYTES, kv_max_bytes: int | None = None,
                 kv_dtype: str | None = None, decode_weights: str = "float32", kv_backend: str | None = None,
                 kv_policy: str = "pgdsf", exact_paths: bool = True, max_batch: int = 8,
                 decode_ram_bytes: int | None = None):
        """`blend`: how blend mode selects tokens (default: the store's calibration for this model, see
        `calibrate`, else BlendConfig()); per query, `recompute_ratio` and `check_layer` override it, and
        `query(blend=...)` replaces it.
        `session_ram_bytes`: the RAM tier's budget for conversation KV (the disk tier holds all of it).
        `kv_max_bytes`: a budget for chunk KV, kept in the store (least recently used KV is evicted and
        recomputed when next retrieved); None keeps the store's setting (unbounded unless set).
        `kv_dtype`: how a new store encodes chunk KV, "float16" (default) or "int8" (KIVI-style, about
        half the bytes); an existing store keeps its own and refuses another.
        `decode_weights`: "int8" / "int4" decode on weight-only int8 / int4 kernels (CPU; prefill and
        stored KV stay float32; greedy tokens are the float32 head's for the hidden state): see
        docs/benchmarks.md for their speed and answers against float32.
        `kv_policy`: what the KV budget evicts first, "pgdsf" (RAGCache's prefix-aware Greedy-Dual-Size-Frequency:
        hits x compute saved / bytes, aged) or "lru"; chunk KV and exact paths share the one budget.
        `exact_paths`: keep and use the exact-path tree (KV of chunk sequences computed in full context, loaded
        exactly by `prefix` and `blend`); False answers from single-chunk KV alone, as before the tree.
        `kv_backend`: None keeps every record in LMDB in `store_dir`; a redis:// URL keeps documents, chunks,
        KV and sessions in that Redis/Valkey server, shared by every replica pointed at it (docs/scale-out.md).
        `max_batch`: answers decoding at once (one batched forward per token for all of them); more wait.
        `decode_ram_bytes`: RAM for those answers' decode caches (prompt + max_new_tokens each, reserved when
        one starts); an answer that does not fit waits for others to finish (None: max_batch alone limits)."""
        self.blend = blend
        # Everything that can fail is checked before the store folder is created.
        if decode_weights not in DECODE_WEIGHTS:
            raise ValueError(f"decode_weights must be one of {', '.join(DECODE_WEIGHTS)}, got {decode_weights!r}")
        if kv_policy not in POLICIES:
            raise ValueError(f"kv_policy must be one of {', '.join(POLICIES)}, got {kv_policy!r}")
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device=device)
        if decode_weights != "float32":
            self.model = with_decode_weights(self.model, decode_weights)
        with quiet_loading():
            self.embedder = embedder if isinstance(embedder, Embedder) else Embedder(embedder)
        self.template = PromptTemplate.for_tokenizer(self.model.tokenizer)
        if chunk_tokens is not None:
            validate_chunk_tokens(chunk_tokens, self.model.max_positions)
        kv_dtype = codec_for(kv_dtype).name if kv_dtype else None
        self.store = Store(store_dir, backend=kv_backend)
        existing = self.store.manifest
        chunk_tokens = chunk_tokens if chunk_tokens is not None else (existing.chunk_tokens if existing else DEFAULT_CHUNK_TOKENS)
        self.store.bind(Manifest(
            kv_fingerprint=self.template.fingerprint(self.model.fingerprint), model=self.model.name,
            embedder_fingerprint=self.embedder.fingerprint, embedder=self.embedder.name,
            embedding_dim=self.embedder.dim, chunk_tokens=chunk_tokens,
            index_kind=index_kind or (existing.index_kind if existing else "flat"),
            kv_dtype=kv_dtype or (existing.kv_dtype if existing else "float16"),
        ))
        self.chunk_kv = KVSupply(self.store, self.model, self.template.prefix_ids)
        self.ingestor = Ingestor(self.chunk_kv, self.template, self.embedder, chunk_tokens)
        self.store.budget.policy = kv_policy
        if kv_max_bytes is not None:
            self.store.set_kv_max_bytes(kv_max_bytes)
        loop = EngineLoop(self.model, max_batch, decode_ram_bytes)
        self.requests = RequestPath(self.model, self.store, self.chunk_kv, loop, exact_paths)
        self.ingestor.expire()
        # The session databases are opened here, on one thread: LMDB's dbi open is not safe against another
        # thread's open or write transaction (concurrent first chat turns deadlocked in open_db).
        self._session_store = SessionStore(self.store, session_ram_bytes)
        self._session_lock = threading.Lock()
        self._calibrated: BlendConfig | None = None  # the calibration last read (calibrated_blend)
        self._sessions: SessionManager | None = None
        self._started: list[SessionManager] = []  # the session managers `_release` closes
        # `close`, run once: also when this RagBlend is collected or the interpreter exits without it.
        self._release = weakref.finalize(self, _release, self.requests, self._started, self.store)

    def add_documents(self, docs: Iterable[str | dict | Document], progress: bool = False,
                      ttl_s: float | None = None, namespace: str = DEFAULT_NAMESPACE) -> list[str]:
        """Ingest documents (strings, dicts with `text` and optional `id`, `metadata`, `ttl_s`, `expire`);
        returns their ids. `ttl_s` is the default TTL (see `expire`). `namespace`: a tenant whose
        documents, chunks, KV and sessions no other namespace can retrieve, read or end."""
        documents = [coerce_document(d, f"document {i}") for i, d in enumerate(docs)]
        self.ingest(documents, progress=progress, ttl_s=ttl_s, namespace=namespace)
        return [d.id for d in documents]

    def ingest(self, documents: list[Document], progress: bool = True, ttl_s: float | None = None,
               namespace: str = DEFAULT_NAMESPACE, kv_compute=None) -> IngestReport:
        """`kv_compute`: where chunk KV is computed (default here; see `ray_kv_compute`)."""
        return self.ingestor.ingest(documents, progress=progress, ttl_s=ttl_s, namespace=namespace,
                                    kv_compute=kv_compute)

    def ray_kv_compute(self, model: str | Path | None = None, workers: int = 2, address: str | None = None):
        """Chunk KV precompute on `workers` Ray actors, for `ingest(..., kv_compute=)`; `model` is this
        RagBlend's model folder as every Ray node can read it (None: the bundled default)."""
        from ragblend.storage.distributed import RayKVCompute

        manifest = self.store.manifest
        transfer = "float16" if manifest.kv_dtype == "float16" else "float32"
        return RayKVCompute(model, self.template.prefix_ids, self.model.fingerprint, workers=workers, address=address,
                            max_batch_tokens=self.chunk_kv.spans.max_batch_tokens, transfer_dtype=transfer,
                            backend=self.store.backend, kv_fingerprint=manifest.kv_fingerprint,
                            kv_dtype=manifest.kv_dtype)

    def expire(self) -> list[str]:
        """Apply ended document TTLs now (also done on open and before every ingest): a document with
        `expire="document"` is deleted, any other loses its KV (recomputed on next use); their ids."""
        return self.ingestor.expire()

    def delete_documents(self, ids: Iterable[str], namespace: str = DEFAULT_NAMESPACE) -> None:
        self.ingestor.delete(list(ids), namespace)

    def pin(self, doc_ids: Iterable[str], namespace: str = DEFAULT_NAMESPACE) -> None:
        """Keep these documents' KV present and never evict it (KV evicted earlier is recomputed now);
        PinnedOverBudgetError, and nothing pinned, if pinned KV would exceed the budget."""
        ids = list(doc_ids)
        self.chunk_kv.ensure(self._document_chunks(ids, namespace))
        self.store.set_pinned(ids, True, namespace)

    def unpin(self, doc_ids: Iterable[str], namespace: str = DEFAULT_NAMESPACE) -> None:
        self.store.set_pinned(list(doc_ids), False, namespace)

    def search(self, question: str, top_k: int = 4, namespace: str = DEFAULT_NAMESPACE) -> list[SearchHit]:
        """The `top_k` chunks of `namespace` most similar to `question` (cosine), best first."""
        self._validate_question(question, top_k)
        found = self.store.search(self.embedder.embed([question])[0], top_k, validate_namespace(namespace))
        hits = []
        with self.store.env.begin() as txn:
            for vid, score in found:
                record = self.store.docs.chunk_for_vector(txn, vid)
                if record is None or not record.refs or record.namespace != namespace:
                    continue
                doc = self.store.docs.get_doc(txn, record.doc_id, namespace)
                hits.append(SearchHit(record.chunk_id, record.doc_id, score, record.text, record.token_ids,
                                      record.position, doc.metadata if doc else {}))
        return hits

    def chunks(self, chunk_ids: Iterable[str]) -> list[SearchHit]:
        """Stored chunks by id, as hits (score 0) that `query(contexts=...)` reuses the KV of; ValueError
        names a chunk the store no longer holds."""
        with self.store.env.begin() as txn:
            records = {c: self.store.docs.get_chunk(txn, c) for c in chunk_ids}
        missing = [c for c, record in records.items() if record is None]
        if missing:
            raise ValueError(f"chunks no longer stored: {', '.join(missing)}")
        return [SearchHit(r.chunk_id, r.doc_id, 0.0, r.text, r.token_ids, r.position or 0) for r in records.values()]

    def stats(self):
        return self.store.stats()

    def calibration(self) -> Calibration | None:
        """The store's calibration for this model (ratio, metric, target), if it has one."""
        return read_calibration(self.store, self.store.manifest.kv_fingerprint)

    def calibrated_blend(self) -> BlendConfig | None:
        """The store's calibrated blend setting for this model, if it has one (read per query, so a new
        calibration applies at once); while a shared backend is down, the one last read."""
        try:
            found = self.calibration()
        except BackendUnavailableError:  # the request goes on computing what it cannot load: keep its quality
            return self._calibrated
        self._calibrated = found.blend() if found else None
        return self._calibrated

    # ---- conversations ------------------------------------------------------------------------

    def chat(self, session_id: str | None = None, *, system: str | None = None, ttl_s: float = 3600,
             create: bool = False, on_topic_switch: str = "keep", max_history_tokens: int | None = None,
             namespace: str = DEFAULT_NAMESPACE) -> Chat:
        """A new conversation (`session_id` None: an id is generated) or an existing one resumed from the
        store; an unknown id raises SessionNotFoundError unless `create=True`. Its turns reuse the whole
        history as stored KV; `on_topic_switch="drop"` forgets it when a question leaves the topic.
        Session ids are per namespace, and its turns retrieve from that namespace only."""
        manager = self.session_manager
        record = manager.open(session_id, system, ttl_s, create, namespace)
        return Chat(self, manager, record, on_topic_switch, max_history_tokens)

    def end_session(self, session_id: str, namespace: str = DEFAULT_NAMESPACE) -> bool:
        """Drop a session's KV from every tier now; False if there was no such session."""
        return self.session_manager.end(session_id, namespace)

    def sessions(self, namespace: str = DEFAULT_NAMESPACE) -> list[SessionInfo]:
        """Every live session of `namespace`: id, turns, tokens, bytes, last used, tier (expired ones are
        swept first)."""
        return self.session_manager.list(namespace)

    @property
    def session_manager(self) -> SessionManager:
        with self._session_lock:  # first turns of several threads at once: one manager
            if self._sessions is None:
                embed = partial(_embed_one, self.embedder)  # not a method of ours: `_release` must not hold us
                self._sessions = SessionManager(self._session_store, self.requests, self.template, embed)
                self._started.append(self._sessions)
        return self._sessions

    def close(self) -> None:
        """Wait for running answers and pending session saves, record KV uses, stop background work and
        release the store (its LMDB mapping closes once no other RagBlend in the process uses the folder).
        A second call does nothing."""
        self._release()

    def __enter__(self) -> RagBlend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the online path ------------------------------------------------------------------------

    def query(self, question: str, *, contexts: list | None = None, top_k: int = 4, mode: str = "blend",
              recompute_ratio: float | str | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
              stop: list[str] | None = None, stream: bool = False, check_layer: int | None = None,
              blend: BlendConfig | None = None, load_depth: int = 2, seed: int | None = None,
              namespace: str = DEFAULT_NAMESPACE, order: str = "retrieval") -> Answer | AnswerStream:
        """Retrieve from `namespace` (or take `contexts`), fuse the chunks' stored KV as `mode` says, and generate.

        Modes, all over the same prompt tokens: `full` prefills everything; `prefix` reuses the prefix
        and first chunk; `reuse` concatenates all stored KV and prefills only the question; `blend`
        (CacheBlend) also recomputes the `recompute_ratio` share of chunk tokens whose KV deviates most
        (a float, or "auto" to pick it per query; `ans.timings["recompute_ratio"]` says which was used).
        `prefix` and `blend` first load the longest exact path the store holds for the chunks' order (KV
        computed in full context by earlier requests; `ans.timings["exact_hit_tokens"]`); `order="cache"`
        puts the chunks with the longest stored path first, the rest in retrieval order (`ans.order`).
        Concurrent queries (from several threads) decode together, one batched step for all of them.
        """
        return self.answer(Request(question, contexts=contexts, top_k=top_k, mode=mode, recompute_ratio=recompute_ratio,
                                   max_new_tokens=max_new_tokens, temperature=temperature, stop=tuple(stop or ()),
                                   stream=stream, check_layer=check_layer, blend=blend, load_depth=load_depth,
                                   seed=seed, order=order, namespace=namespace))

    def answer(self, request: Request) -> Answer | AnswerStream:
        """Answer a Request (what `query` builds from its keywords): returns once the first token is ready."""
        resolved = self.resolve(request)
        prompt_tokens = (len(self.template.prefix_ids) + sum(len(c.token_ids) for c in resolved.chunks)
                         + len(self.template.suffix_ids(request.question)))
        return self.requests.answer(lambda: self._prefill(resolved, request.max_new_tokens), request.sampling,
                                    request.stream, prompt_tokens)

    def prefill(self, question: str, **options) -> PreparedPrompt:
        """Everything up to the first token (contexts, missing KV, prompt layout and the mode's prefill),
        without answering; `options` as `query`'s."""
        resolved = self.resolve(Request(question, **options))
        return self.requests.run_prefill(lambda: self._prefill(resolved, 0))

    def resolve(self, request: Request) -> Resolved:
        """The request's chunks (retrieved, or its contexts as chunks) and blend settings."""
        config = self._blend_config(request)
        start = time.perf_counter()
        chunks = self._contexts(request)
        return Resolved(request, chunks, config, time.perf_counter() - start)

    def _prefill(self, resolved: Resolved, reserve_tokens: int) -> PreparedPrompt:
        """On the engine loop: the request's prefill behind the store's prompt prefix."""
        request = resolved.request
        history = History(self.template.prefix_ids, [(0, self.chunk_kv.spans.prefix_kv)])
        prepared = self.requests.prefill(history, resolved.chunks, self.template.suffix_ids(request.question),
                                         request.mode, resolved.blend, request.load_depth, reserve_tokens,
                                         request.order)
        prepared.timings["retrieve_s"] = resolved.retrieve_s
        return prepared

    def engine_stats(self) -> EngineStats:
        """The engine's decode steps, tokens fed and prefills since start (`mean_batch` = tokens / steps)."""
        return self.requests.loop.stats

    @property
    def max_batch(self) -> int:
        """Answers decoding at once: the engine's cap on running requests."""
        return self.requests.loop.scheduler.max_running

    def verify_kv(self, chunk_ids: Iterable[str]) -> None:
        """Read the stored KV of these chunks (those that have it), checksums verified: warms its pages ahead
        of a request, and raises CorruptKVError for a damaged record."""
        with self.store.env.begin(buffers=True) as txn:
            for chunk_id in chunk_ids:
                if self.store.kv.contains(txn, chunk_id):
                    self.store.kv.verify(txn, chunk_id)

    def kv_bytes(self) -> dict[str, int]:
        """KV bytes held: conversations in RAM, chunks and conversations on disk, and the exact-path tree."""
        sessions = self._session_store
        with self.store.env.begin() as txn:
            disk = self.store.kv.payload_bytes(txn) + sessions.kv.payload_bytes(txn)
            paths = self.store.paths.kv.payload_bytes(txn)
        return {"ram": sessions.ram.bytes, "disk": disk, "paths": paths}

    def prefetch_session(self, session_id: str, namespace: str = DEFAULT_NAMESPACE) -> Callable[[], None]:
        """Bring a session's stored turns into the RAM tier ahead of its next turn, protected from eviction
        until the returned release is called (CachedAttention's prefetch for queued requests)."""
        manager = self.session_manager
        keys = manager.prefetch(scoped(namespace, session_id))
        return lambda: manager.release(keys)

    @staticmethod
    def _validate_question(question, top_k) -> None:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")

    def _blend_config(self, request: Request) -> BlendConfig:
        """The request's blend settings (validated by BlendConfig); the check layer is at most the last layer."""
        config = request.blend or self.blend or self.calibrated_blend() or BlendConfig()
        if request.recompute_ratio is not None:
            config = replace(config, recompute_ratio=request.recompute_ratio)
        if request.check_layer is not None:
            config = replace(config, check_layer=request.check_layer)
        return replace(config, check_layer=min(config.check_layer, self.model.num_layers - 1))

    def _contexts(self, request: Request) -> list[ContextChunk]:
        if request.contexts is None:
            hits = self.search(request.question, request.top_k, request.namespace)
            if not hits:
                raise ValueError("the store has no documents to retrieve from; add documents or pass contexts=")
            return [from_hit(h) for h in hits]
        return [chunk for item in request.contexts for chunk in self._context(item, request.namespace)]

    def _document_chunks(self, doc_ids: list[str], namespace: str) -> list[ContextChunk]:
        with self.store.env.begin() as txn:
            docs = {d: self.store.docs.get_doc(txn, d, namespace) for d in doc_ids}
            unknown = [label(namespace, d) for d, record in docs.items() if record is None]
            if unknown:
                raise KeyError(f"unknown document ids: {', '.join(unknown)}")
            records = [self.store.docs.get_chunk(txn, c) for doc in docs.values() for c in doc.chunk_ids]
        return [ContextChunk(r.chunk_id, tuple(r.token_ids), r.text, r.doc_id) for r in records]

    def _context(self, item, namespace: str) -> list[ContextChunk]:
        """A SearchHit, a LangChain Document (its stored chunk is reused when it names one of this
        namespace's) or a string. A chunk id of another namespace is never followed: its text is used."""
        if isinstance(item, SearchHit):
            if self._own_chunk(item.chunk_id, item.token_ids, namespace):
                return [from_hit(item)]
            text, metadata = item.text, {"doc_id": item.doc_id}
        else:
            metadata = getattr(item, "metadata", None) or {}
            text = getattr(item, "page_content", item)
            record = self._own_chunk(metadata.get("chunk_id"), None, namespace)
            if record is not None:
                return [ContextChunk(record.chunk_id, tuple(record.token_ids), record.text, record.doc_id,
                                     metadata.get("score"))]
        return from_text(text, self.template.chunk_ids, self.store.manifest.kv_fingerprint,
                         self.store.manifest.chunk_tokens, metadata.get("doc_id"), namespace)

    def _own_chunk(self, chunk_id: str | None, token_ids: list[int] | None, namespace: str):
        """The stored chunk `chunk_id` if it is `namespace`'s (and holds `token_ids`, when given), else None."""
        if not chunk_id:
            return None
        with self.store.env.begin() as txn:
            record = self.store.docs.get_chunk(txn, chunk_id)
        if record is None or record.namespace != namespace:
            return None
        return record if token_ids is None or list(token_ids) == record.token_ids else None


def _embed_one(embedder: Embedder, text: str):
    return embedder.embed([text])[0]


def _release(requests: RequestPath, managers: list[SessionManager], store: Store) -> None:
    """A RagBlend's close, holding nothing of the RagBlend (so a dropped one is collected and closed): the
    engine's running answers finish, then the sessions' pending saves and the exact paths' writes, so no
    thread is inside the store when its environment is released."""
    requests.loop.close()
    for manager in managers:
        manager.close()
    requests.close()
    if store.closed:  # released directly (`rb.store.close()`): nothing left to record or release
        return
    try:
        store.enforce_budget()
    except BackendUnavailableError as exc:  # closing must not fail for it: the uses are only LRU hints
        warnings.warn(f"chunk KV use times not recorded: {exc}", RuntimeWarning, stacklevel=4)  # the caller of close()
    store.close()
