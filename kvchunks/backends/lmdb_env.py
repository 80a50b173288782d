"""The embedded engine: one LMDB environment in the store folder, used as it is.

Transactions are LMDB's own (zero-copy reads, one writer at a time per file); this wrapper only adds
what the shared engine needs the store to ask: nothing to prefetch, and every search checks the
generation because a read costs microseconds here.
"""
from __future__ import annotations

import os
from pathlib import Path

import lmdb

from kvchunks.backends.errors import StoreClosedError

MAX_STORE_BYTES_ENV = "RAGBLEND_MAX_STORE_BYTES"  # caps a store's file; default 1 TiB of address space


def _map_size() -> int:
    """LMDB's map size: address space only, the file grows with the data (sparse on Linux)."""
    return int(os.environ.get(MAX_STORE_BYTES_ENV, 1 << 40))


class LmdbEnv:
    shared = False
    medium = "on disk"  # where size_bytes counts, for reports

    def __init__(self, path: Path, readonly: bool):
        self.path, self.readonly = path, readonly
        if readonly and not (path / "data.mdb").is_file():
            raise FileNotFoundError(f"no ragblend store at {path}")
        self.env = lmdb.open(str(path.resolve()), map_size=_map_size(), max_dbs=32, readonly=readonly)
        self.closed = False

    def begin(self, write: bool = False, buffers: bool = False) -> lmdb.Transaction:
        return self._open().begin(write=write, buffers=buffers)

    def open_db(self, name: bytes, txn: lmdb.Transaction | None = None, create: bool = True):
        return self._open().open_db(name, txn=txn, create=create)

    def _open(self) -> lmdb.Environment:
        if self.closed:  # LMDB's own error names no store ("operate on closed/deleted/dropped object")
            raise StoreClosedError(f"the ragblend store at {self.path} was closed (its RagBlend's close())")
        return self.env

    def warm(self, txn: lmdb.Transaction, db, keys: list[bytes]) -> None:
        """Reads here are page-cache hits; nothing to fetch ahead."""

    def stale_since(self, mark: None) -> tuple[bool, None]:
        return True, None

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def close(self) -> None:
        self.closed = True
        self.env.close()
