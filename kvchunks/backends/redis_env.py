"""A Redis/Valkey server as the store's engine, in the subset of LMDB's API the store is written against,
so every record type (documents, chunks, embeddings, manifest, chunk and session KV, LRU metadata) is
shared by every replica pointed at one server, in the same binary format as on disk.

Keys: `ragblend:{db}:{key}`, and per database a sorted set `ragblend:{db}#` of its keys (all score 0,
so ZRANGEBYLEX walks them in LMDB's byte order for prefix scans). No key carries a TTL and the server
must not evict keys on its own (see docs/scale-out.md): the KV byte budget and every expiry are
ragblend's, identical on both engines.

Writes: a write transaction takes the store's write lock (one writer at a time across every replica,
as LMDB allows one per file), buffers its writes (its own reads see them), and commits them in one
server-side script that applies all of them atomically, or none if the lock was lost meanwhile; then
it announces the commit on a pub/sub channel. Reads see every commit whole, but a read transaction is
not a snapshot: two of its reads may straddle another replica's commit.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kvchunks.backends.errors import BackendUnavailableError, StoreFullError

PREFIX = b"ragblend:"
CHANGES_CHANNEL = PREFIX + b"changes"
LOCK_KEY = PREFIX + b"writelock"
LOCK_TTL_MS = 30_000  # a writer that died frees the store after this long
LOCK_WAIT_S = 120.0
GENERATION_CHECK_S = 2.0  # a replica re-reads the generation at least this often, announced or not
KEY_PAGE = 1024  # keys per ZRANGEBYLEX round trip in a cursor
VALUE_PAGE = 256  # values per MGET round trip in a cursor

# KEYS: none (one server, not a cluster). ARGV: lock key, token, puts count, deletes count, then
# (data key, index key, member, value) per put and (data key, index key, member) per delete.
_COMMIT = """
if redis.call('GET', ARGV[1]) ~= ARGV[2] then return 0 end
local puts, deletes, i = tonumber(ARGV[3]), tonumber(ARGV[4]), 5
for _ = 1, puts do
  redis.call('SET', ARGV[i], ARGV[i + 3])
  redis.call('ZADD', ARGV[i + 1], 0, ARGV[i + 2])
  i = i + 4
end
for _ = 1, deletes do
  redis.call('DEL', ARGV[i])
  redis.call('ZREM', ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
redis.call('DEL', ARGV[1])
return 1
"""
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass(frozen=True)
class RedisDB:
    """A named database: a key prefix and the sorted set of its keys."""

    name: bytes

    def key(self, key: bytes) -> bytes:
        return PREFIX + self.name + b":" + key

    @property
    def index(self) -> bytes:
        return PREFIX + self.name + b"#"


def _redis():
    try:
        import redis
    except ImportError:
        raise ImportError("a redis:// kv_backend needs the redis client: pip install 'ragblend[redis]'") from None
    return redis


class RedisEnv:
    shared = True
    medium = "in Redis"  # size_bytes is the server's used memory, not a file size
    readonly = False

    def __init__(self, url: str):
        redis = _redis()
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self.url = url
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=30.0,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 4),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        with self.translated("connect to"):
            self.client.ping()
        self._check_eviction_policy()
        self._commit = self.client.register_script(_COMMIT)
        self._unlock = self.client.register_script(_UNLOCK)
        self._announcements = 0  # commits announced so far (and subscription losses)
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()

    @contextmanager
    def translated(self, doing: str) -> Iterator[None]:
        """Connection failures as BackendUnavailableError naming the URL."""
        try:
            yield
        except self._errors as exc:
            raise BackendUnavailableError(f"cannot {doing} the KV backend at {self.url}: {exc}") from exc

    def _check_eviction_policy(self) -> None:
        """Refuse a server that may evict any key: documents and chunks must never vanish behind the index."""
        try:
            policy = self.client.config_get("maxmemory-policy").get("maxmemory-policy", "noeviction")
        except _redis().ResponseError:  # CONFIG disabled (managed services): the operator's word stands
            return
        if policy.startswith("allkeys"):
            raise ValueError(f"the Redis server at {self.url} evicts any key (maxmemory-policy {policy}); ragblend "
                             "keeps documents there, so set maxmemory-policy to noeviction (ragblend's kv_max_bytes "
                             "bounds the KV it stores)")

    # ---- the LMDB-shaped API ----------------------------------------------------------------------

    def open_db(self, name: bytes, txn: RedisTxn | None = None, create: bool = True) -> RedisDB:
        return RedisDB(name)

    def begin(self, write: bool = False, buffers: bool = False) -> RedisTxn:
        return RedisTxn(self, write)

    def warm(self, txn: RedisTxn, db: RedisDB, keys: list[bytes]) -> None:
        """Fetch these records in one round trip; the transaction's next reads of them are local."""
        txn.prefetch(db, keys)

    def size_bytes(self) -> int:
        with self.translated("read memory use from"):
            return int(self.client.info("memory").get("used_memory", 0))

    # ---- generation announcements ------------------------------------------------------------------

    def stale_since(self, mark: tuple[int, float] | None) -> tuple[bool, tuple[int, float]]:
        """Whether a reader that last read the generation at `mark` should read it again (a commit was
        announced since, or GENERATION_CHECK_S passed: an announcement is lost while the subscription
        reconnects), and the mark to keep."""
        if self._listener is None:
            self._listener = threading.Thread(target=self._listen, name="ragblend-redis-changes", daemon=True)
            self._listener.start()
        now = time.monotonic()
        if mark is None or mark[0] != self._announcements or now - mark[1] >= GENERATION_CHECK_S:
            return True, (self._announcements, now)
        return False, mark

    def _listen(self) -> None:
        while not self._closed.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANGES_CHANNEL)
                while not self._closed.is_set():
                    if pubsub.get_message(timeout=0.5) is not None:
                        self._announcements += 1
            except Exception:  # noqa: BLE001 - the server restarts: re-subscribe; readers re-check meanwhile
                self._announcements += 1
                self._closed.wait(0.5)

    def announce(self) -> None:
        self.client.publish(CHANGES_CHANNEL, b"1")

    # ---- the write lock -----------------------------------------------------------------------------

    def lock(self) -> bytes:
        token, deadline, pause = secrets.token_bytes(16), time.monotonic() + LOCK_WAIT_S, 0.001
        with self.translated("take the write lock on"):
            while not self.client.set(LOCK_KEY, token, nx=True, px=LOCK_TTL_MS):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another writer held the store's write lock at {self.url} for "
                                       f"{LOCK_WAIT_S:.0f} s")
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
        return token

    def unlock(self, token: bytes) -> None:
        try:
            self._unlock(keys=[LOCK_KEY], args=[token])
        except self._errors:  # the server is gone: the lock's TTL frees it
            pass

    def commit(self, token: bytes, writes: dict[tuple[bytes, bytes], bytes | None]) -> None:
        puts = [(db, key, value) for (db, key), value in writes.items() if value is not None]
        deletes = [(db, key) for (db, key), value in writes.items() if value is None]
        args: list[bytes] = [LOCK_KEY, token, str(len(puts)).encode(), str(len(deletes)).encode()]
        for name, key, value in puts:
            db = RedisDB(name)
            args += [db.key(key), db.index, key, value]
        for name, key in deletes:
            db = RedisDB(name)
            args += [db.key(key), db.index, key]
        with self.translated("commit to"):
            try:
                applied = self._commit(args=args)
            except _redis().ResponseError as exc:
                if "OOM" in str(exc):
                    raise StoreFullError(f"the Redis server at {self.url} is full (maxmemory): raise maxmemory, "
                                         "or set a KV budget (kv_max_bytes); what was committed before is intact") from None
                raise
        if not applied:
            raise TimeoutError(f"the write lock at {self.url} expired before the commit ({LOCK_TTL_MS} ms); "
                               "nothing of this transaction was written")
        self.announce()

    def close(self) -> None:
        self._closed.set()
        self.client.close()


class RedisTxn:
    def __init__(self, env: RedisEnv, write: bool):
        self.env, self.write = env, write
        self._writes: dict[tuple[bytes, bytes], bytes | None] = {}  # None: deleted
        self._warm: dict[tuple[bytes, bytes], bytes | None] = {}
        self._token = env.lock() if write else None
        self._done = False

    def __enter__(self) -> RedisTxn:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None:
            self.commit()
        else:
            self.abort()

    def get(self, key: bytes, db: RedisDB) -> bytes | None:
        slot = (db.name, bytes(key))
        if slot in self._writes:
            return self._writes[slot]
        if slot in self._warm:
            return self._warm.pop(slot)
        with self.env.translated("read from"):
            return self.env.client.get(db.key(slot[1]))

    def get_many(self, db: RedisDB, keys: list[bytes]) -> list[bytes | None]:
        fetch = [k for k in keys if (db.name, k) not in self._writes]
        with self.env.translated("read from"):
            fetched = dict(zip(fetch, self.env.client.mget([db.key(k) for k in fetch]))) if fetch else {}
        return [self._writes[(db.name, k)] if (db.name, k) in self._writes else fetched[k] for k in keys]

    def prefetch(self, db: RedisDB, keys: list[bytes]) -> None:
        self._warm.update(((db.name, k), v) for k, v in zip(keys, self.get_many(db, keys)))

    def put(self, key: bytes, value, db: RedisDB) -> bool:
        self._check_writable()
        self._writes[(db.name, bytes(key))] = bytes(value)
        return True

    def delete(self, key: bytes, db: RedisDB) -> bool:
        self._check_writable()
        self._writes[(db.name, bytes(key))] = None
        return True

    def _check_writable(self) -> None:
        if not self.write:
            raise PermissionError("write in a read-only transaction")

    def cursor(self, db: RedisDB) -> RedisCursor:
        return RedisCursor(self, db)

    def stat(self, db: RedisDB) -> dict[str, int]:
        with self.env.translated("read from"):
            return {"entries": int(self.env.client.zcard(db.index))}

    def keys_from(self, db: RedisDB, start: bytes) -> Iterator[bytes]:
        """Keys >= `start` in byte order, this transaction's own writes merged in."""
        own = sorted(k for (name, k), _ in self._writes.items() if name == db.name and k >= start)
        low = b"[" + start
        while True:
            with self.env.translated("read from"):
                page = self.env.client.zrangebylex(db.index, low, b"+", start=0, num=KEY_PAGE)
            last = page[-1] if len(page) == KEY_PAGE else None
            mine = [k for k in own if last is None or k <= last]
            own = own[len(mine):]
            for key in sorted(set(page).union(mine)):
                if self._writes.get((db.name, key), b"") is not None:
                    yield key
            if last is None:
                return
            low = b"(" + last

    def commit(self) -> None:
        if self._done:
            return
        self._done = True
        if self._token is None:
            return
        try:
            if self._writes:
                self.env.commit(self._token, self._writes)
            else:
                self.env.unlock(self._token)
        except BaseException:
            self.env.unlock(self._token)
            raise

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._writes.clear()
            if self._token is not None:
                self.env.unlock(self._token)


class RedisCursor:
    """Walks a database in key order from a start key (everything, unless `set_range` moved it)."""

    def __init__(self, txn: RedisTxn, db: RedisDB):
        self.txn, self.db = txn, db
        self._start = b""

    def __enter__(self) -> RedisCursor:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def set_range(self, key: bytes) -> bool:
        """Start at the first key >= `key`; False if there is none."""
        self._start = bytes(key)
        return next(self.txn.keys_from(self.db, self._start), None) is not None

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return self.iternext()

    def iternext(self, keys: bool = True, values: bool = True) -> Iterator:
        page: list[bytes] = []
        for key in self.txn.keys_from(self.db, self._start):
            page.append(key)
            if len(page) == VALUE_PAGE:
                yield from self._emit(page, keys, values)
                page = []
        yield from self._emit(page, keys, values)

    def _emit(self, page: list[bytes], keys: bool, values: bool) -> Iterator:
        if not values:
            yield from page
            return
        for key, value in zip(page, self.txn.get_many(self.db, page)):
            if value is None:  # deleted between the key scan and the read
                continue
            yield (key, value) if keys else value
