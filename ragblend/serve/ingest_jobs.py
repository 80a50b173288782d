"""Background ingestion for `POST /v1/documents`: one job thread, so queries keep running meanwhile.

Documents are validated before a job is created (a rejected upload writes nothing); a job ingests in
small batches so `GET /v1/jobs/{id}` can show progress, and each batch commits whole documents.
"""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from ragblend.storage.documents import Document

BATCH_DOCUMENTS = 8


@dataclass
class IngestJob:
    id: str
    namespace: str
    documents: int
    done: int = 0
    status: str = "queued"  # queued | running | done | failed
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def view(self) -> dict:
        return asdict(self)


class IngestJobs:
    def __init__(self, ingest):
        """`ingest(documents, ttl_s, namespace)` commits one batch."""
        self._ingest = ingest
        self._jobs: dict[str, IngestJob] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragblend-ingest")

    def submit(self, documents: list[Document], ttl_s: float | None, namespace: str) -> IngestJob:
        job = IngestJob(uuid.uuid4().hex, namespace, len(documents))
        with self._lock:
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, documents, ttl_s)
        return job

    def get(self, job_id: str) -> IngestJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def close(self) -> None:
        """Finish every accepted job: an acknowledged document is never dropped by a shutdown."""
        self._pool.shutdown(wait=True)

    def _run(self, job: IngestJob, documents: list[Document], ttl_s: float | None) -> None:
        job.status = "running"
        try:
            for first in range(0, len(documents), BATCH_DOCUMENTS):
                batch = documents[first:first + BATCH_DOCUMENTS]
                self._ingest(batch, ttl_s, job.namespace)
                job.done += len(batch)
            job.status = "done"
        except Exception as exc:  # noqa: BLE001 - reported through the job, the server goes on
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
        job.finished = time.time()
