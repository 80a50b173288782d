"""The OpenAI-compatible HTTP surface over one RagBlend: chat and plain completions (streamed or not),
search, document management, store stats, health, readiness and metrics, and a chat page at `/`.
Answers wait in the admission queue; errors come back in OpenAI's format."""
from __future__ import annotations

import asyncio
import hmac
import json
import tempfile
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from index.namespaces import validate_namespace
from kvchunks.backends import BackendUnavailableError
from ragblend.answer import Answer
from ragblend.api import RagBlend
from ragblend.serve.answering import AnswerWork
from ragblend.serve.audit import Audit
from ragblend.serve.conversation import Conversation, HistoryConflict, parse
from ragblend.serve.guard import Guard
from ragblend.serve.ingest_jobs import IngestJobs
from ragblend.serve.metrics import Metrics
from ragblend.serve.render import (
    ChatRender,
    CompletionRender,
    details,
    error_body,
    usage,
)
from ragblend.serve.admission import AdmissionQueue, Cancelled, Job, Overloaded
from ragblend.serve.schemas import (
    LIMITS,
    ChatRequest,
    CompletionRequest,
    DocumentsRequest,
    Limits,
    SearchRequest,
)
from ragblend.storage.session_store import SessionNotFoundError
from ragblend.sessions import SessionBusyError
from ragblend.storage.documents import SUPPORTED_SUFFIXES, DocumentError, coerce_document, read_documents
from ragblend.storage.store import StoreMismatchError

NAMESPACE_HEADER = "x-ragblend-namespace"
PAGE = Path(__file__).parent / "static" / "index.html"  # one file: no build step, nothing from elsewhere
_END = object()


@dataclass(frozen=True)
class ServeConfig:
    """`api_keys`: key -> the namespace it is bound to (None: the request's namespace header chooses).
    Requests answered at once are the RagBlend's `max_batch` (its engine decodes them in one batch)."""

    api_keys: dict[str, str | None] = field(default_factory=dict)
    max_queue: int = 64
    prefetch: bool = True
    limits: Limits = LIMITS
    audit_rate: float = 0.0  # share of blend requests re-answered with full prefill when idle (serve/audit.py)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers


def _as_api_error(exc: BaseException) -> ApiError:
    """What a failure means to the client; anything unexpected is a 500 with its traceback in the log."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Overloaded):
        return ApiError(429, str(exc), "rate_limit_error", {"Retry-After": "1"})
    if isinstance(exc, SessionNotFoundError):
        return ApiError(404, exc.args[0], "not_found_error")
    if isinstance(exc, HistoryConflict):
        return ApiError(409, str(exc), "conflict_error")
    if isinstance(exc, SessionBusyError):
        return ApiError(409, str(exc), "conflict_error", {"Retry-After": "1"})
    if isinstance(exc, StoreMismatchError):
        return ApiError(503, str(exc), "server_error")
    if isinstance(exc, BackendUnavailableError):
        return ApiError(503, str(exc), "server_error", {"Retry-After": "1"})
    if isinstance(exc, (ValueError, DocumentError)):
        return ApiError(400, str(exc))
    if isinstance(exc, Cancelled):
        return ApiError(499, str(exc))
    traceback.print_exception(exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", "server_error")


def _error_response(exc: BaseException) -> JSONResponse:
    error = _as_api_error(exc)
    return JSONResponse(error_body(str(error), error.kind), status_code=error.status, headers=error.headers)


def create_app(rb: RagBlend, config: ServeConfig = ServeConfig()) -> FastAPI:
    admission = AdmissionQueue(config.max_queue, prefetch=config.prefetch, workers=rb.max_batch)
    jobs = IngestJobs(lambda docs, ttl_s, namespace: rb.ingest(docs, progress=False, ttl_s=ttl_s, namespace=namespace))
    metrics = Metrics(lambda: admission.depth, rb.kv_bytes, rb.engine_stats)
    audit = Audit(rb, config.audit_rate, lambda: admission.depth, metrics.registry)
    model_name = Path(rb.model.name).name
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        # uvicorn stops taking requests and lets running ones finish first; then nothing is dropped:
        await asyncio.to_thread(admission.close)
        await asyncio.to_thread(audit.close)
        await asyncio.to_thread(jobs.close)
        await asyncio.to_thread(rb.close)

    # The schema is served behind the key like every other endpoint; the interactive pages are not
    # served (a browser opening them sends no key).
    app = FastAPI(title="ragblend", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        Guard,
        limit=lambda path: config.limits.max_upload_bytes if path == "/v1/documents" else config.limits.max_body_bytes,
        count=lambda route, status: metrics.requests.labels(route, str(status)).inc(),
        reject=lambda exc: JSONResponse(error_body(str(exc.detail), "invalid_request_error"), exc.status_code))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse(error_body(problems or "invalid request", "invalid_request_error"), 400)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), exc.status_code, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        return _error_response(exc)

    def tenant(request: Request) -> str:
        """The request's namespace: its API key's, or (keys not bound to one) the namespace header's."""
        asked = request.headers.get(NAMESPACE_HEADER)
        if config.api_keys:
            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            given = given.strip() if scheme.lower() == "bearer" else ""
            matches = [key for key in config.api_keys if hmac.compare_digest(key.encode(), given.encode())]
            if not given or not matches:
                raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
            bound = config.api_keys[matches[0]]
            if bound is not None:
                if asked is not None and asked != bound:
                    raise ApiError(403, "this API key may not use another namespace", "permission_error")
                return bound
        try:
            return validate_namespace(asked or "")
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    async def answer(request: Request, work: AnswerWork, stream: bool, render) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        if stream:
            work.emit = lambda piece: loop.call_soon_threadsafe(events.put_nowait, piece)

        def run(job: Job) -> Answer:
            try:
                answer_ = work.run(job)
                p = work.params
                audit.offer(work.conversation.question, p.contexts, work.namespace, p.new_tokens, p.stops,
                            p.temperature, work.session is None and work.conversation.stateless, answer_)
                return answer_
            finally:
                loop.call_soon_threadsafe(events.put_nowait, _END)

        started_at = time.perf_counter()
        try:
            job = admission.submit(Job(run, work.prefetch))
        except Overloaded as exc:
            return _error_response(exc)
        result = asyncio.wrap_future(job.future)
        if not stream:
            try:
                answer_ = await _until_done(request, job, result)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-format error
                return _error_response(exc)
            metrics.answered(answer_, time.perf_counter() - started_at)
            return JSONResponse(render.whole(answer_, work))
        first = await events.get()
        if first is _END:  # nothing streamed: a failure is still an HTTP error
            try:
                await result
            except Exception as exc:  # noqa: BLE001
                return _error_response(exc)
        return StreamingResponse(_sse(job, events, result, first, work, render, metrics, started_at),
                                 media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request, namespace: str = Depends(tenant)):
        try:
            conversation = parse(body.messages)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        session = (body.session_id or True) if "session_id" in body.model_fields_set else None
        work = AnswerWork(rb, body, conversation, namespace, session)
        return await answer(request, work, body.stream, ChatRender(model_name, body.new_tokens))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, namespace: str = Depends(tenant)):
        work = AnswerWork(rb, body, Conversation(None, [], body.prompt), namespace, None)
        return await answer(request, work, body.stream, CompletionRender(model_name, body.new_tokens))

    @app.get("/v1/models")
    async def models(_namespace: str = Depends(tenant)):
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "ragblend"}]}

    @app.post("/v1/search")
    async def search(body: SearchRequest, namespace: str = Depends(tenant)):
        hits = await asyncio.to_thread(rb.search, body.query, body.top_k, namespace)
        return {"object": "list", "data": [{"doc_id": h.doc_id, "chunk_id": h.chunk_id, "score": h.score,
                                            "text": h.text, "position": h.position, "metadata": h.metadata}
                                           for h in hits]}

    @app.post("/v1/documents", status_code=202)
    async def add_documents(request: Request, namespace: str = Depends(tenant)):
        documents, ttl_s = await _documents_of(request)
        job = jobs.submit(documents, ttl_s, namespace)
        return {"job_id": job.id, "status": job.status, "documents": job.documents}

    @app.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str, namespace: str = Depends(tenant)):
        job = jobs.get(job_id)
        if job is None or job.namespace != namespace:
            raise ApiError(404, f"no job {job_id!r}", "not_found_error")
        return job.view()

    @app.delete("/v1/documents/{doc_id}")
    async def delete_document(doc_id: str, namespace: str = Depends(tenant)):
        try:
            await asyncio.to_thread(rb.delete_documents, [doc_id], namespace)
        except KeyError as exc:
            raise ApiError(404, exc.args[0], "not_found_error") from None
        return {"id": doc_id, "deleted": True}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(_namespace: str = Depends(tenant)):
        return app.openapi()

    @app.get("/v1/stats")
    async def stats(_namespace: str = Depends(tenant)):
        """The whole store's numbers (as `ragblend stats --json` prints them, and as /readyz counts documents)."""
        return asdict(await asyncio.to_thread(rb.stats))

    @app.get("/", include_in_schema=False)
    async def page():
        """The chat page; it asks for the API key itself, so it is served without one."""
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(_namespace: str = Depends(tenant)):
        stats = await asyncio.to_thread(rb.stats)
        return {"status": "ready", "model": model_name, "documents": stats.documents, "queue": admission.depth}

    @app.get("/v1/audit")
    async def audit_view(_namespace: str = Depends(tenant)):
        return {**audit.view(), "calibration": await asyncio.to_thread(audit.target)}

    @app.get("/metrics")
    async def metrics_page(_namespace: str = Depends(tenant)):
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _until_done(request: Request, job: Job, result: asyncio.Future):
    """The job's result; if the client disconnects first, the job is cancelled (queued or running)."""
    while True:
        done, _ = await asyncio.wait({result}, timeout=0.25)
        if done:
            return result.result()
        if await request.is_disconnected():
            job.cancel()
            raise Cancelled("the client went away")


async def _documents_of(request: Request):
    """Documents from a JSON body ({documents, ttl_s} or a bare list) or a multipart upload of files,
    all validated before any is ingested."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        uploads = [item for item in form.getlist("files") + form.getlist("file") if hasattr(item, "filename")]
        if not uploads:
            raise ApiError(400, "upload files in a multipart field named 'files'")
        names = _upload_names(uploads)
        with tempfile.TemporaryDirectory() as folder:
            for name, upload in zip(names, uploads):
                (Path(folder) / name).write_bytes(await upload.read())
            try:
                return await asyncio.to_thread(read_documents, [folder]), None
            except DocumentError as exc:
                raise ApiError(400, str(exc).replace(folder + "/", "")) from None
    try:
        raw = await request.json()
        body = DocumentsRequest.model_validate({"documents": raw} if isinstance(raw, list) else raw)
    except json.JSONDecodeError:
        raise ApiError(400, "the body is not valid JSON") from None
    except ValidationError as exc:
        raise ApiError(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    return [coerce_document(d.model_dump(exclude_none=True), f"documents[{i}]")
            for i, d in enumerate(body.documents)], body.ttl_s


def _upload_names(uploads) -> list[str]:
    """The files' names, which become their document ids: each must be a supported file's, and distinct
    (two parts named alike would otherwise overwrite each other, silently keeping only the last)."""
    names = [Path(upload.filename or "upload.txt").name for upload in uploads]
    for name in names:
        if Path(name).suffix.lower() not in SUPPORTED_SUFFIXES or name.startswith("."):
            raise ApiError(400, f"{name!r}: unsupported file name (use a name ending in {', '.join(SUPPORTED_SUFFIXES)})")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ApiError(400, f"two uploaded files are both named {repeated[0]!r}: each file's name is its document "
                            "id, so give each a distinct name")
    return names


async def _sse(job: Job, events: asyncio.Queue, result: asyncio.Future, first, work: AnswerWork, render: ChatRender,
               metrics: Metrics, started_at: float) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's format; the last chunk carries usage, session id and ragblend's
    details, then `[DONE]`. A client that goes away cancels the job."""
    def event(data) -> str:
        return f"data: {json.dumps(data)}\n\n"

    try:
        yield event(render.delta(work, None))
        item = first
        while item is not _END:
            yield event(render.delta(work, item))
            item = await events.get()
        try:
            answer = await result
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            error = _as_api_error(exc)
            yield event(error_body(str(error), error.kind))
        else:
            metrics.answered(answer, time.perf_counter() - started_at)
            yield event({**render.delta(work, None, render.finish_reason(answer)), "usage": usage(answer),
                         "ragblend": details(answer)})
        yield "data: [DONE]\n\n"
    finally:
        if not result.done():
            job.cancel()
