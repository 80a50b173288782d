"""One answer request as an admission-queue job: what it prefetches while queued, and what the worker runs.

The body becomes the one Request type (Generation.request), answered by `RagBlend.answer` or a
session's `Chat.answer`, so the server answers exactly as the Python API does. The worker always reads
the answer as a stream, so a request whose client went away is dropped by the engine at its next step.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ragblend.answer import Answer, AnswerStream
from ragblend.api import RagBlend
from ragblend.chat import Chat
from ragblend.serve.conversation import Conversation, check_continues
from ragblend.serve.admission import Job
from ragblend.serve.schemas import Generation


@dataclass
class AnswerWork:
    rb: RagBlend
    params: Generation
    conversation: Conversation
    namespace: str
    session: str | bool | None  # an id to continue; True: a new session kept (`"session_id": null`);
    # None: none kept (one is used for this request alone when it sends a system prompt or history)
    emit: Callable[[str], None] = lambda piece: None
    session_id: str | None = None  # the session answered in, once run
    _hits: list | None = None
    _retrieved: threading.Event = field(default_factory=threading.Event)

    @property
    def keeps_session(self) -> bool:
        return self.session is not None

    def prefetch(self) -> Callable[[], None] | None:
        """Retrieve ahead and read the chunks' KV pages (checksums verified on the way), and bring a
        continued session's turns into the RAM tier, protected until this job has run."""
        if self.params.contexts is None:
            self._hits = self.rb.search(self.conversation.question, self.params.top_k, self.namespace)
            self._retrieved.set()
            self.rb.verify_kv(hit.chunk_id for hit in self._hits)
        if not isinstance(self.session, str):
            return None
        return self.rb.prefetch_session(self.session, self.namespace)

    def run(self, job: Job) -> Answer:
        hits = self._hits if self._retrieved.is_set() else None
        request = self.params.request(self.conversation.question, self.namespace, hits or None)
        if self.session is None and self.conversation.stateless:
            return self._collect(job, self.rb.answer(request))
        chat = self._open()
        self.session_id = chat.session_id
        try:
            return self._collect(job, chat.answer(request))
        finally:
            if not self.keeps_session:
                chat.wait()
                self.rb.end_session(chat.session_id, self.namespace)

    def _open(self) -> Chat:
        conversation = self.conversation
        if not isinstance(self.session, str):  # a new session, kept (null) or for this request only
            chat = self.rb.chat(system=conversation.system, namespace=self.namespace)
            if conversation.exchanges:
                chat.seed(conversation.exchanges)
            return chat
        chat = self.rb.chat(self.session, namespace=self.namespace)
        record = chat.record
        check_continues(record, conversation)
        if not record.turns and conversation.exchanges:
            chat.seed(conversation.exchanges)
        return chat

    def _collect(self, job: Job, stream: AnswerStream) -> Answer:
        """The stream's answer, emitting its pieces; closed on every exit (cancelled, failed or done), so
        what it holds, a session's lock above all, is released before the job ends."""
        with stream:
            for piece in stream:
                job.check()
                self.emit(piece)
        return stream.answer
