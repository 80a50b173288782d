"""ragblend: fast RAG by reusing and fusing precomputed per-chunk KV caches."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # set before transformers loads: every model is local, never downloaded

from kvchunks.backends import StoreClosedError
from ragblend.api import RagBlend, SearchHit
from ragblend.chat import Chat
from ragblend.query import Request
from ragblend.storage.documents import Document, DocumentError
from ragblend.engine.family import UnsupportedModelError
from ragblend.engine.selection import BlendConfig
from ragblend.storage.session_store import SessionInfo, SessionNotFoundError
from ragblend.storage.store import StoreMismatchError

__all__ = ["BlendConfig", "Chat", "Document", "DocumentError", "RagBlend", "Request", "SearchHit", "SessionInfo",
           "SessionNotFoundError", "StoreClosedError", "StoreMismatchError", "UnsupportedModelError"]
__version__ = "0.1.0"
