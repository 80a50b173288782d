"""Multi-turn conversations over stored KV: a session's turns are loaded, never re-prefilled."""
from ragblend.sessions.manager import SessionBusyError, SessionManager
from ragblend.sessions.policy import TOPIC_MODES

__all__ = ["TOPIC_MODES", "SessionBusyError", "SessionManager"]
