"""A Redis Cluster (or Valkey Cluster) as the store's engine: the shared backend's records sharded over
its primaries, in the same binary format and through the same LMDB-shaped API as one server.

Placement. Redis runs a script or an MGET only on keys of one hash slot, so a key's `{tag}` says which
records must commit together:
- the global slot `{global}` holds the write lock, the commit journal, the `meta` database (manifest,
  generation, budget and counters) and the corpus tables retrieval reads (documents, chunks, embeddings,
  FAISS ids; GLOBAL_DBS): a generation bump and the chunks it makes searchable are on one node, and a
  query keeps retrieving while any other node is down (its KV is recomputed);
- every other database (chunk KV, session KV and records, LRU times, and any record family added later)
  is spread over one bucket per hash slot (a decimal tag that hashes to that slot) by a CRC of the
  record's group: its key without a layer suffix, so the metadata and every layer of one chunk, or of
  one session turn, share a slot (one MGET fetches a chunk's layers). Each bucket keeps the sorted set
  of its keys per database, beside them; the global slot lists the buckets each database uses, so a
  scan merges only those.

Commits (two phases, coordinated in the global slot). Under the write lock, a transaction that touches
buckets writes a journal entry ("staging", its buckets), stages each slot's writes in a list in that slot,
then marks the journal "committed" (the commit point: the lock is checked in the same script), applies
each bucket's list in one script per bucket, and last the global slot's, which also drops the journal. A
writer that dies leaves the journal behind: the next writer to take the lock rolls a committed one
forward and a staging one back before it writes, so a transaction is applied whole or not at all. Readers
see the buckets' writes before the global slot's generation bump, never after it.
"""
from __future__ import annotations

import binascii
import functools
import json
import re
import zlib
from collections import defaultdict

from kvchunks.backends.redis_env import _APPLY, PREFIX, RedisEnv, _retry, write_ops

SCHEME = "redis+cluster://"
GLOBAL = b"global"
GLOBAL_DBS = frozenset({b"meta", b"docs", b"chunks", b"emb", b"vids", b"nsvids"})
# One bucket per hash slot, so a primary's share of the records is its share of the slots (tags hashing
# to random slots leave some two buckets and others none: the fullest of 256 primaries would hold 1.35x
# the mean, simulated); a scan reads only the buckets in use.
SLOTS = 16384
_LAYER_SUFFIX = re.compile(rb"/\d{4}$")  # kvchunks.kvstore's layer records: their span's key + "/LLLL"

# KEYS: the write lock, the journal. ARGV: the lock's token, the journal's new text.
_MARK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""
# KEYS: a slot's staged list, then keys to drop once it is applied (the journal, for the global slot).
_APPLY_STAGED = _APPLY + """
apply(redis.call('LRANGE', KEYS[1], 0, -1), 1)
for i = 1, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""
# KEYS: the journal. ARGV: a transaction id. Drops the journal if it is that transaction's.
_DROP_JOURNAL = """
local entry = redis.call('GET', KEYS[1])
if entry and string.find(entry, ARGV[1], 1, true) then redis.call('DEL', KEYS[1]) end
return 1
"""


def _slot_key(tag: bytes, name: bytes) -> bytes:
    return PREFIX + b"{" + tag + b"}:" + name


JOURNAL = _slot_key(GLOBAL, b"journal")


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """(host, port) of each node in `redis+cluster://HOST:PORT[,HOST:PORT...]`."""
    nodes = []
    for node in url.removeprefix(SCHEME).strip("/").split(","):
        host, _, port = node.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"kv_backend {url!r}: expected redis+cluster://HOST:PORT[,HOST:PORT...], got {node!r}")
        nodes.append((host, int(port)))
    return nodes


@functools.cache
def _slot_tags() -> list[bytes]:
    """For each hash slot, the first decimal tag that Redis hashes to it (CRC16, as the cluster does):
    about 110k tries, 0.1-0.3 s once per process."""
    tags: list[bytes | None] = [None] * SLOTS
    missing, n = SLOTS, 0
    while missing:
        tag = b"%d" % n
        slot = binascii.crc_hqx(tag, 0) % SLOTS
        if tags[slot] is None:
            tags[slot], missing = tag, missing - 1
        n += 1
    return tags


def bucket_of(key: bytes) -> bytes:
    """The bucket tag of a record: its group's CRC picks a slot, so a span's layers land with its metadata."""
    return _slot_tags()[zlib.crc32(_LAYER_SUFFIX.sub(b"", key)) % SLOTS]


class RedisClusterEnv(RedisEnv):
    lock_key = _slot_key(GLOBAL, b"writelock")

    def _connect(self, url: str):
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster_nodes(url)],
                            socket_connect_timeout=2.0, socket_timeout=30.0, retry=_retry(),
                            require_full_coverage=False)

    @staticmethod
    def _connection_errors(redis) -> tuple[type[Exception], ...]:
        from redis.exceptions import ClusterError, RedisClusterException

        return redis.ConnectionError, redis.TimeoutError, ClusterError, RedisClusterException

    def _policies(self) -> list[str]:
        replies = self.client.config_get("maxmemory-policy", target_nodes=self.client.PRIMARIES)
        return [reply.get("maxmemory-policy", "noeviction") for reply in replies.values()]

    def _used_memory(self) -> list[int]:
        return [int(info.get("used_memory", 0)) for info in self.node_info("memory").values()]

    def node_info(self, section: str) -> dict[str, dict]:
        """INFO `section` of every primary, by node address."""
        return self.client.info(section, target_nodes=self.client.PRIMARIES)

    # ---- placement ----------------------------------------------------------------------------------

    @staticmethod
    def tag(db: bytes, key: bytes) -> bytes:
        return GLOBAL if db in GLOBAL_DBS else bucket_of(key)

    def data_key(self, db: bytes, key: bytes) -> bytes:
        return _slot_key(self.tag(db, key), db + b":" + key)

    def index_key(self, db: bytes, key: bytes) -> bytes:
        return _slot_key(self.tag(db, key), db + b"#")

    @staticmethod
    def _buckets_key(db: bytes) -> bytes:
        return _slot_key(GLOBAL, b"buckets:" + db)

    def indexes(self, db: bytes) -> list[bytes]:
        if db in GLOBAL_DBS:
            return [_slot_key(GLOBAL, db + b"#")]
        return [_slot_key(tag, db + b"#") for tag in sorted(self.client.smembers(self._buckets_key(db)))]

    def mget(self, keys: list[bytes]) -> list[bytes | None]:
        """One MGET per slot, pipelined: one round trip per node holding any of them."""
        return self.client.mget_nonatomic(keys)

    # ---- commits ------------------------------------------------------------------------------------

    def commit(self, token: bytes, writes: dict[tuple[bytes, bytes], bytes | None]) -> None:
        parts: dict[bytes, dict[tuple[bytes, bytes], bytes | None]] = defaultdict(dict)
        for (db, key), value in writes.items():
            parts[self.tag(db, key)][(db, key)] = value
        if list(parts) == [GLOBAL]:  # one slot: one script, as on one server
            super().commit(token, writes)
            return
        buckets = sorted(t for t in parts if t != GLOBAL)
        used = {(db, self.tag(db, key)) for (db, key), value in writes.items() if value is not None}
        ops = {tag: write_ops(self, part) for tag, part in parts.items()}
        ops[GLOBAL] = ops.get(GLOBAL, []) + [op for db, tag in sorted(used) if tag != GLOBAL
                                             for op in (b"s", self._buckets_key(db), tag)]
        txid = token.hex()
        with self.writing():
            self._mark(token, "staging", txid, buckets)
            try:
                pipe = self.client.pipeline()
                for tag, slot_ops in ops.items():
                    if slot_ops:
                        pipe.rpush(self._staged(tag, txid), *slot_ops)
                pipe.execute()
                self._mark(token, "committed", txid, buckets)
            except BaseException:
                self._roll_back(txid, buckets)
                raise
            self._roll_forward(txid, buckets)
        self.unlock(token)
        self.announce()

    @staticmethod
    def _staged(tag: bytes, txid: str) -> bytes:
        return _slot_key(tag, b"staged:" + txid.encode())

    def _mark(self, token: bytes, state: str, txid: str, buckets: list[bytes]) -> None:
        entry = json.dumps({"state": state, "txid": txid, "buckets": [b.decode() for b in buckets]})
        if not self.client.eval(_MARK, 2, self.lock_key, JOURNAL, token, entry):
            self.lock_lost()

    def _roll_forward(self, txid: str, buckets: list[bytes]) -> None:
        """Apply a committed transaction's staged writes: every bucket's, then the global slot's (its
        generation bump last), which also drops the journal. Idempotent: an applied list is gone."""
        pipe = self.client.pipeline()
        for tag in buckets:
            pipe.execute_command("EVAL", _APPLY_STAGED, 1, self._staged(tag, txid))
        pipe.execute()
        self.client.eval(_APPLY_STAGED, 2, self._staged(GLOBAL, txid), JOURNAL)

    def _roll_back(self, txid: str, buckets: list[bytes]) -> None:
        """Drop an uncommitted transaction's staged writes, then its journal entry (best effort: the next
        writer does it otherwise)."""
        try:
            pipe = self.client.pipeline()
            for tag in [*buckets, GLOBAL]:
                pipe.delete(self._staged(tag, txid))
            pipe.execute()
            self.client.eval(_DROP_JOURNAL, 1, JOURNAL, txid)
        except self._errors:
            pass

    def lock(self) -> bytes:
        """The write lock, with whatever a writer that died left half done finished or undone first."""
        token = super().lock()
        try:
            with self.writing():
                raw = self.client.get(JOURNAL)
                if raw is not None:
                    entry = json.loads(raw)
                    buckets = [b.encode() for b in entry["buckets"]]
                    if entry["state"] == "committed":
                        self._roll_forward(entry["txid"], buckets)
                    else:
                        self._roll_back(entry["txid"], buckets)
        except BaseException:
            self.unlock(token)
            raise
        return token
