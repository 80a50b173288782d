"""Multi-turn conversations over stored KV: a session's turns are loaded, never re-prefilled."""
from ragblend.sessions.manager import TOPIC_MODES, SessionBusyError, SessionManager, TurnRequest

__all__ = ["TOPIC_MODES", "SessionBusyError", "SessionManager", "TurnRequest"]
