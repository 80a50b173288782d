"""ragblend: fast RAG by reusing and fusing precomputed per-chunk KV caches."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # set before transformers loads: every model is local, never downloaded

from ragblend.api import RagBlend, SearchHit
from ragblend.documents import Document, DocumentError
from ragblend.engine.selection import BlendConfig
from ragblend.store import StoreMismatchError

__all__ = ["BlendConfig", "Document", "DocumentError", "RagBlend", "SearchHit", "StoreMismatchError"]
__version__ = "0.1.0"
