"""Per-chunk KV records in the store's engine (LMDB or Redis, same bytes): one record per (chunk, layer) of
encoded KV, plus one metadata record.

One record per layer is what lets the online path stream a context in layer by layer. Every key
starts with the KV fingerprint (model weights + prompt prefix), so KV of another model is never served.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import lmdb
import numpy as np
import torch

from kvchunks.chunk_kv import ChunkKV
from kvchunks.codecs import codec_for


class CorruptKVError(ValueError):
    """A stored KV record failed its size or checksum check."""

    def __init__(self, key: str, layer: int):
        super().__init__(f"KV record for {key} layer {layer} is corrupt (checksum or size mismatch)")
        self.key = key


@dataclass(frozen=True)
class StoredKV:
    """A span's KV that stays on disk until a loader reads it layer by layer."""

    store: KVStore
    key: str


@dataclass(frozen=True)
class KVMeta:
    tokens: int
    layers: int
    kv_heads: int
    head_dim: int
    crc32: list[int]
    dtype: str = "float16"
    key_layout: str = "pre-rope"

    @property
    def layer_shape(self) -> tuple[int, int, int]:
        return (self.kv_heads, self.tokens, self.head_dim)

    @property
    def layer_bytes(self) -> int:
        return codec_for(self.dtype).layer_bytes(self.kv_heads, self.tokens, self.head_dim)

    @property
    def payload_bytes(self) -> int:
        return self.layer_bytes * self.layers


def _layer_of(meta_key: bytes, layer: int) -> bytes:
    """A layer record's key: its span's metadata key, then the layer."""
    return meta_key + f"/{layer:04d}".encode()


def _float32_arrays(kv: ChunkKV) -> tuple[np.ndarray, np.ndarray]:
    return kv.keys.to(torch.float32).cpu().numpy(), kv.values.to(torch.float32).cpu().numpy()


def _stacked(pairs: list[tuple[np.ndarray, np.ndarray]]) -> ChunkKV:
    """Per-layer (K, V) arrays as one ChunkKV (copied out of any store buffer)."""
    return ChunkKV(torch.from_numpy(np.stack([k for k, _ in pairs])), torch.from_numpy(np.stack([v for _, v in pairs])))


class KVStore:
    """`family` names the pair of databases: "kv" for document chunks, "session" for conversation turns;
    both hold the same record format, so every reader and writer serves both."""

    def __init__(self, env: lmdb.Environment, kv_fingerprint: str, family: str = "kv", dtype: str = "float16"):
        self.env = env
        self.fingerprint = kv_fingerprint
        self.codec = codec_for(dtype)
        self.kv_db = env.open_db(family.encode())
        self.meta_db = env.open_db(f"{family}meta".encode())
        try:  # payload bytes per fingerprint, kept on every write
            self.totals_db = env.open_db(f"{family}bytes".encode())
        except lmdb.Error:  # a read-only open of a store written before the totals
            self.totals_db = None

    def _meta_key(self, chunk_id: str) -> bytes:
        return f"{self.fingerprint}/{chunk_id}".encode()

    def _layer_key(self, chunk_id: str, layer: int) -> bytes:
        return _layer_of(self._meta_key(chunk_id), layer)

    def meta(self, txn: lmdb.Transaction, chunk_id: str) -> KVMeta | None:
        raw = txn.get(self._meta_key(chunk_id), db=self.meta_db)
        return None if raw is None else KVMeta(**json.loads(bytes(raw)))

    def contains(self, txn: lmdb.Transaction, chunk_id: str) -> bool:
        return txn.get(self._meta_key(chunk_id), db=self.meta_db) is not None

    def put(self, txn: lmdb.Transaction, chunk_id: str, kv: ChunkKV) -> int:
        """Write all layers and the metadata inside the caller's transaction; returns payload bytes."""
        keys, values = _float32_arrays(kv)
        checksums, total = [], 0
        for layer, (k, v) in enumerate(zip(keys, values)):
            payload = self.codec.encode(k, v)
            checksums.append(zlib.crc32(payload))
            total += len(payload)
            txn.put(self._layer_key(chunk_id, layer), payload, db=self.kv_db)
        layers, kv_heads, tokens, head_dim = keys.shape
        meta = KVMeta(tokens=tokens, layers=layers, kv_heads=kv_heads, head_dim=head_dim, crc32=checksums,
                      dtype=self.codec.name)
        replaced = self.meta(txn, chunk_id)
        self._count(txn, self.fingerprint, total - (replaced.payload_bytes if replaced else 0))
        txn.put(self._meta_key(chunk_id), json.dumps(asdict(meta)).encode(), db=self.meta_db)
        return total

    def as_stored(self, kv: ChunkKV) -> ChunkKV:
        """`kv` as a load of it would return it (the codec's rounding), without storing it."""
        keys, values = _float32_arrays(kv)
        return _stacked([self.codec.decode(self.codec.encode(k, v), keys.shape[1:]) for k, v in zip(keys, values)])

    def payload_bytes(self, txn: lmdb.Transaction) -> int:
        """Payload bytes of this fingerprint's records: a running total, not a scan."""
        raw = None if self.totals_db is None else txn.get(self.fingerprint.encode(), db=self.totals_db)
        return self._scan_bytes(txn, self.fingerprint) if raw is None else int(raw)

    def _scan_bytes(self, txn: lmdb.Transaction, fingerprint: str) -> int:
        """The total by reading every record's metadata: once per store, before its first counted write."""
        return sum(KVMeta(**json.loads(raw)).payload_bytes for _, raw in self._metas(txn, fingerprint))

    def _metas(self, txn: lmdb.Transaction, fingerprint: str) -> Iterator[tuple[bytes, bytes]]:
        """(key, metadata) of every record under `fingerprint`, in key order, stopping at its last."""
        prefix = f"{fingerprint}/".encode()
        with txn.cursor(db=self.meta_db) as cursor:
            if not cursor.set_range(prefix):
                return
            for key, raw in cursor:
                if not bytes(key).startswith(prefix):
                    return
                yield bytes(key), bytes(raw)

    def _count(self, txn: lmdb.Transaction, fingerprint: str, delta: int) -> None:
        raw = txn.get(fingerprint.encode(), db=self.totals_db)
        total = (self._scan_bytes(txn, fingerprint) if raw is None else int(raw)) + delta
        txn.put(fingerprint.encode(), str(total).encode(), db=self.totals_db)

    def delete(self, txn: lmdb.Transaction, chunk_id: str) -> None:
        self._delete_record(txn, self._meta_key(chunk_id))

    def warm(self, txn: lmdb.Transaction, chunk_ids: list[str], layers: range) -> None:
        """Ask the engine for these layer records ahead of `read_layer` (one round trip on a shared
        backend; nothing on LMDB)."""
        keys = [self._layer_key(c, layer) for c in chunk_ids for layer in layers]
        self.env.warm(txn, self.kv_db, keys)

    def read_layer(self, txn: lmdb.Transaction, chunk_id: str, layer: int, meta: KVMeta) -> tuple[np.ndarray, np.ndarray]:
        """One layer's K and V as the record's codec decodes them (fp16: zero-copy views valid while `txn`
        is open), checksum verified: a flipped byte is reported (CorruptKVError), never served."""
        raw = txn.get(self._layer_key(chunk_id, layer), db=self.kv_db)
        if raw is None:
            raise KeyError(f"KV record missing for chunk {chunk_id} layer {layer}")
        if len(raw) != meta.layer_bytes or zlib.crc32(raw) != meta.crc32[layer]:
            raise CorruptKVError(chunk_id, layer)
        return codec_for(meta.dtype).decode(raw, meta.layer_shape)

    def load(self, chunk_id: str) -> ChunkKV:
        """A whole chunk's KV as stored (decoded), for inspection and tests."""
        with self.env.begin(buffers=True) as txn:
            meta = self.meta(txn, chunk_id)
            if meta is None:
                raise KeyError(f"no KV stored for chunk {chunk_id}")
            return _stacked([self.read_layer(txn, chunk_id, layer, meta) for layer in range(meta.layers)])

    def chunk_ids(self, txn: lmdb.Transaction) -> list[str]:
        skip = len(self.fingerprint) + 1
        return [key[skip:].decode() for key, _ in self._metas(txn, self.fingerprint)]

    def foreign(self, txn: lmdb.Transaction) -> list[tuple[bytes, int]]:
        """(metadata key, payload bytes) of every record written under another fingerprint."""
        own = f"{self.fingerprint}/".encode()
        found = []
        with txn.cursor(db=self.meta_db) as cursor:
            for key, raw in cursor:
                if not bytes(key).startswith(own):
                    found.append((bytes(key), KVMeta(**json.loads(bytes(raw))).payload_bytes))
        return found

    def delete_foreign(self, txn: lmdb.Transaction, meta_key: bytes) -> None:
        self._delete_record(txn, meta_key)

    def _delete_record(self, txn: lmdb.Transaction, meta_key: bytes) -> None:
        """A record's layers and its metadata."""
        raw = txn.get(meta_key, db=self.meta_db)
        if raw is None:
            return
        meta = KVMeta(**json.loads(bytes(raw)))
        for layer in range(meta.layers):
            txn.delete(_layer_of(meta_key, layer), db=self.kv_db)
        self._count(txn, bytes(meta_key).decode().split("/", 1)[0], -meta.payload_bytes)
        txn.delete(meta_key, db=self.meta_db)

    def verify(self, txn: lmdb.Transaction, chunk_id: str) -> list[str]:
        """Problems with one chunk's records (missing layer, wrong size, checksum mismatch)."""
        meta = self.meta(txn, chunk_id)
        if meta is None:
            return [f"chunk {chunk_id}: no KV metadata"]
        problems = []
        self.warm(txn, [chunk_id], range(meta.layers))
        for layer, expected in enumerate(meta.crc32):
            raw = txn.get(self._layer_key(chunk_id, layer), db=self.kv_db)
            if raw is None or len(raw) != meta.layer_bytes or zlib.crc32(raw) != expected:
                problems.append(f"chunk {chunk_id}: layer {layer} record missing or corrupt")
        return problems


def family_bytes(env: lmdb.Environment, txn: lmdb.Transaction, family: str) -> int:
    """Payload bytes of every record of a family under any fingerprint, from its metadata (a store's stats,
    read-only: nothing is created); 0 if the family was never written."""
    try:
        db = env.open_db(f"{family}meta".encode(), txn=txn, create=False)
    except lmdb.Error:
        return 0
    with txn.cursor(db=db) as cursor:
        return sum(KVMeta(**json.loads(bytes(raw))).payload_bytes for raw in cursor.iternext(keys=False))


def entries(env: lmdb.Environment, txn: lmdb.Transaction, name: bytes) -> int:
    """Entries of a named database, 0 if it was never created (read-only: nothing is created)."""
    try:
        return txn.stat(env.open_db(name, txn=txn, create=False))["entries"]
    except lmdb.Error:
        return 0
