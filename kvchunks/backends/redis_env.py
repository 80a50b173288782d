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

Where a key lives, how a scan merges indexes and how a commit is applied are RedisEnv methods, which
the Redis Cluster engine (redis_cluster.py) overrides; transactions and cursors are shared.
"""
from __future__ import annotations

import heapq
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kvchunks.backends.errors import BackendUnavailableError, StoreClosedError, StoreFullError

PREFIX = b"ragblend:"
CHANGES_CHANNEL = PREFIX + b"changes"
LOCK_KEY = PREFIX + b"writelock"
LOCK_TTL_MS = 30_000  # a writer that died frees the store after this long
LOCK_WAIT_S = 120.0
GENERATION_CHECK_S = 2.0  # a replica re-reads the generation at least this often, announced or not
KEY_PAGE = 1024  # keys per ZRANGEBYLEX round trip in a cursor
VALUE_PAGE = 256  # values per MGET round trip in a cursor

# One transaction's writes as a flat list of operations, applied in one script on the slot (one server:
# everything) that holds their keys: ('p', data key, index key, member, value) puts a record and lists it
# in its database's index; ('d', data key, index key, member) deletes both; ('s', set, member) notes a
# member in a set (a cluster's list of the buckets a database uses).
_APPLY = """
local function apply(ops, i)
  while i <= #ops do
    if ops[i] == 'p' then
      redis.call('SET', ops[i + 1], ops[i + 4])
      redis.call('ZADD', ops[i + 2], 0, ops[i + 3])
      i = i + 5
    elseif ops[i] == 'd' then
      redis.call('DEL', ops[i + 1])
      redis.call('ZREM', ops[i + 2], ops[i + 3])
      i = i + 4
    else
      redis.call('SADD', ops[i + 1], ops[i + 2])
      i = i + 3
    end
  end
end
"""
# KEYS: the write lock. ARGV: its token, then the operations. Applies them and frees the lock, or does
# nothing if the lock is not this writer's any more.
_COMMIT = _APPLY + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
apply(ARGV, 2)
redis.call('DEL', KEYS[1])
return 1
"""
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def write_ops(env: RedisEnv, writes: dict[tuple[bytes, bytes], bytes | None]) -> list[bytes]:
    """A transaction's buffered writes (None: deleted) as `_APPLY` operations."""
    ops: list[bytes] = []
    for (db, key), value in writes.items():
        placed = [env.data_key(db, key), env.index_key(db, key), key]
        ops += [b"p", *placed, value] if value is not None else [b"d", *placed]
    return ops


@dataclass(frozen=True)
class RedisDB:
    """A named database: where its records and the sorted set of its keys live is the engine's to say."""

    name: bytes


def _redis():
    try:
        import redis
    except ImportError:
        raise ImportError("a redis:// kv_backend needs the redis client: pip install 'ragblend[redis]'") from None
    return redis


def _retry():
    """Retries with backoff (about 0.75 s in all): a quick server restart costs latency, not answers."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return Retry(ExponentialBackoff(cap=0.5, base=0.05), 4)


class RedisEnv:
    shared = True
    medium = "in Redis"  # size_bytes is the server's used memory, not a file size
    readonly = False
    lock_key = LOCK_KEY

    def __init__(self, url: str):
        redis = _redis()
        self.url = url
        self._errors = self._connection_errors(redis)
        with self.translated("connect to"):  # a cluster client asks its nodes for the slot map right away
            self.client = self._connect(url)
            self.client.ping()
        self._check_eviction_policy()
        self._commit = self.client.register_script(_COMMIT)
        self._unlock = self.client.register_script(_UNLOCK)
        self._announcements = 0  # commits announced so far (and subscription losses)
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()

    def _connect(self, url: str):
        redis = _redis()
        return redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=30.0, retry=_retry(),
                                    retry_on_error=[redis.ConnectionError, redis.TimeoutError])

    @staticmethod
    def _connection_errors(redis) -> tuple[type[Exception], ...]:
        return redis.ConnectionError, redis.TimeoutError

    @contextmanager
    def translated(self, doing: str) -> Iterator[None]:
        """Connection failures as BackendUnavailableError naming the URL."""
        try:
            yield
        except self._errors as exc:
            raise BackendUnavailableError(f"cannot {doing} the KV backend at {self.url}: {exc}") from exc

    def _policies(self) -> list[str]:
        return [self.client.config_get("maxmemory-policy").get("maxmemory-policy", "noeviction")]

    def _check_eviction_policy(self) -> None:
        """Refuse a server that may evict any key: documents and chunks must never vanish behind the index."""
        try:
            policies = self._policies()
        except _redis().ResponseError:  # CONFIG disabled (managed services): the operator's word stands
            return
        for policy in policies:
            if policy.startswith("allkeys"):
                raise ValueError(f"the Redis server at {self.url} evicts any key (maxmemory-policy {policy}); "
                                 "ragblend keeps documents there, so set maxmemory-policy to noeviction (ragblend's "
                                 "kv_max_bytes bounds the KV it stores)")

    # ---- where records live: one server holds every key ------------------------------------------

    def data_key(self, db: bytes, key: bytes) -> bytes:
        return PREFIX + db + b":" + key

    def index_key(self, db: bytes, key: bytes) -> bytes:
        """The sorted set that lists `key` among its database's keys."""
        return PREFIX + db + b"#"

    def indexes(self, db: bytes) -> list[bytes]:
        """Every sorted set listing keys of `db` (a scan merges them)."""
        return [PREFIX + db + b"#"]

    def mget(self, keys: list[bytes]) -> list[bytes | None]:
        return self.client.mget(keys)

    def _pages(self, requests: list[tuple[bytes, bytes, int]]) -> list[list[bytes]]:
        """One ZRANGEBYLEX page per (index, low bound, count), all in one pipeline (one round trip per node)."""
        pipe = self.client.pipeline(transaction=False)
        for index, low, count in requests:
            pipe.zrangebylex(index, low, b"+", start=0, num=count)
        with self.translated("read from"):
            return pipe.execute()

    def scan(self, db: bytes, start: bytes) -> Iterator[bytes]:
        """The stored keys of `db` that are >= `start`, in byte order: the first page of every index in one
        pipeline, then each index's next pages (doubling) as the merge reaches its end."""
        with self.translated("read from"):
            indexes = self.indexes(db)
        if not indexes:
            return iter(())
        first = max(KEY_PAGE // len(indexes), 16)
        pages = self._pages([(index, b"[" + start, first) for index in indexes])
        return heapq.merge(*(self._paged(index, page, first) for index, page in zip(indexes, pages)))

    def _paged(self, index: bytes, page: list[bytes], count: int) -> Iterator[bytes]:
        while True:
            yield from page
            if len(page) < count:
                return
            count = min(count * 2, KEY_PAGE)
            page = self._pages([(index, b"(" + page[-1], count)])[0]

    def count(self, db: bytes) -> int:
        with self.translated("read from"):
            pipe = self.client.pipeline(transaction=False)
            for index in self.indexes(db):
                pipe.zcard(index)
            return sum(pipe.execute())

    # ---- the LMDB-shaped API ----------------------------------------------------------------------

    def open_db(self, name: bytes, txn: RedisTxn | None = None, create: bool = True) -> RedisDB:
        return RedisDB(name)

    def begin(self, write: bool = False, buffers: bool = False) -> RedisTxn:
        if self._closed.is_set():
            raise StoreClosedError(f"the ragblend store at {self.url} was closed (its RagBlend's close())")
        return RedisTxn(self, write)

    def warm(self, txn: RedisTxn, db: RedisDB, keys: list[bytes]) -> None:
        """Fetch these records in one round trip; the transaction's next reads of them are local."""
        txn.prefetch(db, keys)

    def _used_memory(self) -> list[int]:
        return [int(self.client.info("memory").get("used_memory", 0))]

    def size_bytes(self) -> int:
        with self.translated("read memory use from"):
            return sum(self._used_memory())

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
        """Tell other replicas a commit landed; a lost announcement only delays them by GENERATION_CHECK_S."""
        try:
            self.client.publish(CHANGES_CHANNEL, b"1")
        except self._errors:
            pass

    # ---- the write lock -----------------------------------------------------------------------------

    def lock(self) -> bytes:
        token, deadline, pause = secrets.token_bytes(16), time.monotonic() + LOCK_WAIT_S, 0.001
        with self.translated("take the write lock on"):
            while not self.client.set(self.lock_key, token, nx=True, px=LOCK_TTL_MS):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another writer held the store's write lock at {self.url} for "
                                       f"{LOCK_WAIT_S:.0f} s")
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
        return token

    def unlock(self, token: bytes) -> None:
        try:
            self._unlock(keys=[self.lock_key], args=[token])
        except self._errors:  # the server is gone: the lock's TTL frees it
            pass

    @contextmanager
    def writing(self) -> Iterator[None]:
        """A commit's failures as the caller can act on them: unreachable, or full."""
        with self.translated("commit to"):
            try:
                yield
            except _redis().ResponseError as exc:
                if "OOM" in str(exc):
                    raise StoreFullError(f"the Redis server at {self.url} is full (maxmemory): raise maxmemory, "
                                         "or set a KV budget (kv_max_bytes); what was committed before is intact") from None
                raise

    def commit(self, token: bytes, writes: dict[tuple[bytes, bytes], bytes | None]) -> None:
        """All of `writes` in one script, atomically, if this writer still holds the lock."""
        with self.writing():
            applied = self._commit(keys=[self.lock_key], args=[token, *write_ops(self, writes)])
        if not applied:
            self.lock_lost()
        self.announce()

    def lock_lost(self) -> None:
        raise TimeoutError(f"the write lock at {self.url} expired before the commit ({LOCK_TTL_MS} ms); "
                           "nothing of this transaction was written")

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
            return self.env.client.get(self.env.data_key(*slot))

    def get_many(self, db: RedisDB, keys: list[bytes]) -> list[bytes | None]:
        fetch = [k for k in keys if (db.name, k) not in self._writes]
        with self.env.translated("read from"):
            fetched = dict(zip(fetch, self.env.mget([self.env.data_key(db.name, k) for k in fetch]))) if fetch else {}
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
        return {"entries": self.env.count(db.name)}

    def keys_from(self, db: RedisDB, start: bytes) -> Iterator[bytes]:
        """Keys >= `start` in byte order, this transaction's own writes merged in."""
        own = sorted(k for (name, k) in self._writes if name == db.name and k >= start)
        previous = None
        for key in heapq.merge(self.env.scan(db.name, start), own):
            if key != previous and self._writes.get((db.name, key), b"") is not None:
                yield key
            previous = key

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
