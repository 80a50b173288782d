"""Where a store's records live: an LMDB folder (the embedded default), a shared Redis/Valkey server, or
a Redis/Valkey Cluster sharding them over its nodes.

Both engines expose the subset of LMDB's API the store is written against (named databases, get / put /
delete, ordered cursors, one writer at a time), so documents, chunks, KV, sessions and their metadata
keep one format whichever engine holds them. One engine handle per location and process, reference
counted: the last Store to close it closes it.
"""
from __future__ import annotations

from pathlib import Path

from kvchunks.backends.errors import BackendUnavailableError, StoreClosedError, StoreFullError
from kvchunks.backends.lmdb_env import LmdbEnv

__all__ = ["BackendUnavailableError", "StoreClosedError", "StoreFullError", "open_env", "release_env"]

_OPEN: dict[str, object] = {}
_USERS: dict[str, int] = {}


def _location(path: Path, backend: str | None) -> str:
    return backend if backend is not None else str(path.resolve())


def open_env(path: Path, readonly: bool, backend: str | None = None):
    """The engine for a store folder (`backend` None), a `redis://` URL or a `redis+cluster://` node list."""
    key = _location(path, backend)
    cached = _OPEN.get(key)
    if backend is None:
        if cached is None or (cached.readonly and not readonly):
            if cached is not None:
                cached.close()  # a read-only handle is upgraded to a writable one
            cached = LmdbEnv(path, readonly)
    elif cached is None:
        if backend.startswith("redis+cluster://"):
            from kvchunks.backends.redis_cluster import RedisClusterEnv

            cached = RedisClusterEnv(backend)
        elif backend.startswith(("redis://", "rediss://", "unix://")):
            from kvchunks.backends.redis_env import RedisEnv

            cached = RedisEnv(backend)
        else:
            raise ValueError("kv_backend must be a redis:// (or rediss://, unix://) URL or "
                             f"redis+cluster://HOST:PORT[,HOST:PORT...], got {backend!r}")
    _OPEN[key] = cached
    _USERS[key] = _USERS.get(key, 0) + 1
    return cached


def release_env(path: Path, backend: str | None = None) -> None:
    key = _location(path, backend)
    _USERS[key] = _USERS.get(key, 1) - 1
    if _USERS[key] <= 0:
        _USERS.pop(key, None)
        env = _OPEN.pop(key, None)
        if env is not None:
            env.close()
