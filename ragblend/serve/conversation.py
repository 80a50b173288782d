"""From OpenAI chat messages to what a ragblend conversation holds: a system prompt, earlier
(question, answer) exchanges, and the question of this turn."""
from __future__ import annotations

from dataclasses import dataclass

from ragblend.serve.schemas import Message
from ragblend.storage.session_store import SessionRecord


class HistoryConflict(ValueError):
    """The client's copy of a conversation differs from the session the server holds."""


@dataclass(frozen=True)
class Conversation:
    system: str | None
    exchanges: list[tuple[str, str]]
    question: str

    @property
    def stateless(self) -> bool:
        """Answerable as a plain `query`: no system prompt and nothing said before."""
        return self.system is None and not self.exchanges


def parse(messages: list[Message]) -> Conversation:
    """System (or developer) messages first, then alternating user / assistant, ending with a user message."""
    texts = [(m.role, m.text()) for m in messages]
    system = [text for role, text in texts if role in ("system", "developer")]
    turns = [(role, text) for role, text in texts if role not in ("system", "developer")]
    if len(system) > 1 or any(role in ("system", "developer") for role, _ in texts[len(system):]):
        raise ValueError("give at most one system message, before the others")
    if not turns or turns[-1][0] != "user" or not turns[-1][1].strip():
        raise ValueError("the last message must be a non-empty user message (the question)")
    earlier = turns[:-1]
    if any(role != expected for (role, _), expected in zip(earlier, ["user", "assistant"] * len(earlier))) \
            or len(earlier) % 2:
        raise ValueError("earlier messages must alternate user, assistant")
    exchanges = [(earlier[i][1], earlier[i + 1][1]) for i in range(0, len(earlier), 2)]
    return Conversation(system[0] if system else None, exchanges, turns[-1][1])


def check_continues(record: SessionRecord, conversation: Conversation) -> None:
    """A request continuing a session may send only its new question, or the whole conversation so far,
    whose end must be the session's kept turns (older ones may have been truncated away)."""
    if conversation.system is not None and conversation.system != record.system:
        raise HistoryConflict(f"session {record.name!r} was started with another system prompt")
    if not conversation.exchanges:
        return
    held = [(t.question.strip(), t.answer.strip()) for t in record.turns]
    sent = [(q.strip(), a.strip()) for q, a in conversation.exchanges]
    if len(sent) < len(held) or sent[len(sent) - len(held):] != held:
        raise HistoryConflict(f"the messages sent do not match session {record.name!r} "
                              f"({len(held)} turns held, {len(sent)} exchanges sent); send only the new user "
                              "message, or the conversation exactly as the server answered it")
