"""One answer request as a scheduler job: what it prefetches while queued, and what the worker runs.

Every answer goes through `RagBlend.query` or a session's `Chat.send`, so the server answers exactly as
the Python API does. The worker always iterates the answer as a stream, so a request whose client went
away stops at its next token.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from index.namespaces import scoped
from ragblend.answer import Answer, AnswerStream
from ragblend.api import RagBlend
from ragblend.chat import Chat
from ragblend.serve.conversation import Conversation, check_continues
from ragblend.serve.scheduler import Job
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
            with self.rb.store.env.begin(buffers=True) as txn:
                for hit in self._hits:
                    if self.rb.store.kv.contains(txn, hit.chunk_id):
                        self.rb.store.kv.verify(txn, hit.chunk_id)
        if not isinstance(self.session, str):
            return None
        manager = self.rb.session_manager
        keys = manager.prefetch(scoped(self.namespace, self.session))
        return lambda: manager.release(keys)

    def run(self, job: Job) -> Answer:
        p = self.params
        contexts = p.contexts
        if contexts is None and self._retrieved.is_set() and self._hits:
            contexts = self._hits
        options = dict(contexts=contexts, top_k=p.top_k, mode=p.mode, order=p.order, recompute_ratio=p.recompute_ratio,
                       max_new_tokens=p.new_tokens, temperature=p.temperature, stop=p.stops, stream=True,
                       seed=p.seed)
        if self.session is None and self.conversation.stateless:
            return self._collect(job, self.rb.query(self.conversation.question, namespace=self.namespace, **options))
        chat = self._open()
        self.session_id = chat.session_id
        try:
            return self._collect(job, chat.send(self.conversation.question, **options))
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
