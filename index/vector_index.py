"""FAISS inner-product index keyed by caller ids, with replace, remove and crash-safe save."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

KINDS = ("flat", "hnsw")
HNSW_M = 32  # graph degree: FAISS's usual choice for ~100k-1M vectors
HNSW_EF_SEARCH = 64  # FAISS defaults to 16, which loses recall on small k
HNSW_EF_SEARCH_MAX = 1024  # a filtered search widens its beam by 1 / share allowed, up to this


def _new_index(dim: int, kind: str) -> faiss.IndexIDMap2:
    """IndexIDMap2 maps caller ids to rows and, unlike IndexIDMap, can reconstruct vectors by id."""
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        raise ValueError(f"unknown index kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return faiss.IndexIDMap2(inner)


def _kind_of(index: faiss.IndexIDMap2) -> str:
    return "hnsw" if isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW) else "flat"


@dataclass(frozen=True)
class IdFilter:
    """Which ids a search may return, as FAISS search parameters (None: all of them)."""

    params: faiss.SearchParameters | None
    empty: bool = False
    selectors: tuple = ()  # what `params` points at: the C++ side holds raw pointers, so keep them alive


class VectorIndex:
    """Nearest neighbours by inner product; callers pass L2-normalised vectors so scores are cosines."""

    def __init__(self, dim: int, kind: str = "flat"):
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.kind = kind
        self._index = _new_index(dim, kind)

    def __len__(self) -> int:
        return self._index.ntotal

    def ids(self) -> np.ndarray:
        """Stored ids in storage order (int64)."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under `ids`; an id already present gets its vector replaced, not duplicated."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape [n, {self.dim}], got {list(vectors.shape)}")
        if len(ids) != len(vectors):
            raise ValueError(f"got {len(ids)} ids for {len(vectors)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids passed to one add() call must be unique")
        self.remove(ids)
        self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        """Drop `ids`; ids that are not present are ignored."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        drop = np.isin(self.ids(), ids)
        if not drop.any():
            return
        if self.kind == "flat":
            self._index.remove_ids(ids)
        else:
            self._rebuild(keep=~drop)

    def _rebuild(self, keep: np.ndarray) -> None:
        """HNSW graphs cannot delete nodes, so rebuild from the kept rows (O(n), fine for occasional edits)."""
        ids, vectors = self.ids()[keep], self._index.index.reconstruct_n(0, len(self))[keep]
        self._index = _new_index(self.dim, self.kind)
        self._index.add_with_ids(np.ascontiguousarray(vectors), ids)

    def search(self, query: np.ndarray, k: int, where: IdFilter | None = None) -> list[tuple[int, float]]:
        """Top-`k` `(id, score)` pairs for one `[dim]` query, best first, among the ids `where` allows:
        FAISS applies the filter while it searches, so k stays k."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        query = np.asarray(query, dtype=np.float32)
        if query.shape != (self.dim,):
            raise ValueError(f"query must have shape [{self.dim}], got {list(query.shape)}")
        if len(self) == 0 or (where is not None and where.empty):
            return []
        params = where.params if where is not None else None
        scores, ids = self._index.search(query[None, :], min(k, len(self)), params=params)
        # HNSW (or a filter) may leave fewer than k neighbours; FAISS pads those slots with id -1.
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i != -1]

    def filter(self, only: np.ndarray | None = None, excluded: np.ndarray | None = None) -> IdFilter:
        """The ids in `only` (when given) and not in `excluded`, as FAISS search parameters; build it once
        and pass it to every search until the index changes."""
        if only is not None:
            selectors = (faiss.IDSelectorBatch(np.ascontiguousarray(only, dtype=np.int64)),)
            allowed = len(only)
        elif excluded is not None and len(excluded):
            inner = faiss.IDSelectorBatch(np.ascontiguousarray(excluded, dtype=np.int64))
            selectors = (faiss.IDSelectorNot(inner), inner)
            allowed = len(self) - len(excluded)
        else:
            return IdFilter(None)
        if self.kind == "hnsw":  # the beam must meet about ef allowed nodes, not ef nodes
            widened = HNSW_EF_SEARCH * len(self) // max(allowed, 1)
            ef = min(max(widened, HNSW_EF_SEARCH), HNSW_EF_SEARCH_MAX)
            return IdFilter(faiss.SearchParametersHNSW(sel=selectors[0], efSearch=ef), allowed == 0, selectors)
        return IdFilter(faiss.SearchParameters(sel=selectors[0]), allowed == 0, selectors)

    def save(self, path: Path) -> None:
        """Write atomically: a temp file in the same folder, then os.replace, so a crash never tears it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = faiss.serialize_index(self._index)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> VectorIndex:
        """Restore an index written by save(); kind and dim come from the file itself."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Vector index file not found: {path}")
        index = faiss.read_index(str(path))
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"{path} was not written by VectorIndex.save (found {type(index).__name__})")
        loaded = cls.__new__(cls)
        loaded.dim, loaded.kind, loaded._index = index.d, _kind_of(index), index
        return loaded

    def __repr__(self) -> str:
        return f"VectorIndex(dim={self.dim}, kind={self.kind!r}, size={len(self)})"
