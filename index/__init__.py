"""Embedding and nearest-neighbour search over document chunks."""
from index.embedder import Embedder, default_embedder_path
from index.vector_index import VectorIndex

__all__ = ["Embedder", "VectorIndex", "default_embedder_path"]
