"""`rb.chat(...)`: a conversation handle whose `send` is `query` with the session's history as stored KV."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ragblend.answer import Answer, AnswerStream
from ragblend.query import Request
from ragblend.storage.session_store import SessionRecord
from ragblend.sessions import TOPIC_MODES, SessionManager

if TYPE_CHECKING:
    from ragblend.api import RagBlend


class Chat:
    def __init__(self, rb: RagBlend, manager: SessionManager, record: SessionRecord, on_topic_switch: str = "keep",
                 max_history_tokens: int | None = None):
        if on_topic_switch not in TOPIC_MODES:
            raise ValueError(f"on_topic_switch must be one of {', '.join(TOPIC_MODES)}, got {on_topic_switch!r}")
        if max_history_tokens is not None and max_history_tokens < 1:
            raise ValueError(f"max_history_tokens must be >= 1, got {max_history_tokens}")
        self._rb, self._manager, self._key = rb, manager, record.id
        self.session_id, self.namespace = record.name, record.namespace
        self.on_topic_switch, self.max_history_tokens = on_topic_switch, max_history_tokens

    @property
    def record(self) -> SessionRecord:
        """The session as stored now: system prompt, kept turns (questions, answers, tokens), TTL."""
        return self._manager.store.get(self._key)

    @property
    def turns(self) -> int:
        return len(self.record.turns)

    def seed(self, exchanges: list[tuple[str, str]]) -> None:
        """Start a new session from earlier (question, answer) exchanges held as text (say, a client's
        copy of a conversation); their KV is computed on the next turn."""
        self._manager.seed(self._key, exchanges)

    @property
    def history_tokens(self) -> int:
        """Tokens the next turn reuses as stored KV: the prompt prefix and every kept turn."""
        record = self.record
        template, _ = self._manager.prefix(record.system)
        return len(template.prefix_ids) + record.history_tokens

    def send(self, question: str, **options) -> Answer | AnswerStream:
        """One turn: the keywords and Answer of `query` (but not its namespace: the session's), plus history
        timings (`history_tokens`, `history_load_s`, `history_source`, `save_s` once the background save
        is done)."""
        return self.answer(Request(question, namespace=self.namespace, **options))

    def answer(self, request: Request) -> Answer | AnswerStream:
        """One turn answering `request`, which must be of the session's namespace."""
        if request.namespace != self.namespace:
            raise ValueError(f"this session is of namespace {self.namespace!r}, the request of {request.namespace!r}")
        turn = self._rb.resolve(request)
        return self._manager.send(self._key, turn, self.on_topic_switch, self.max_history_tokens, request.stream)

    def wait(self) -> None:
        """Block until this session's last turn is saved."""
        self._manager.wait(self._key)
