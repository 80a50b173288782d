"""Chunk KV precompute spread over Ray actors (the `ray` extra): `ragblend ingest ... --ray [ADDRESS]`.

Chunking, embedding and document commits stay on the driver; each actor loads the model once and
computes the KV of whole length-groups of chunks, the same groups a local ingest computes, so the stored
records are the same bytes. With LMDB the actors send KV back and the driver writes it; with a shared
backend (redis:// or redis+cluster://) each actor commits its groups' KV records there itself, and only chunk ids travel.
An actor that dies is restarted by Ray and its group is computed again (Ray retries the call), so a
failed worker loses no chunk. `address=None` starts a local Ray cluster.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from kvchunks.backends import open_env
from kvchunks.chunk_kv import ChunkKV
from kvchunks.kvstore import KVStore
from ragblend.engine.model import load_model
from ragblend.engine.precompute import SpanComputer, batches_by_length

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("distributed ingest needs Ray: pip install 'ragblend[ray]'") from exc

ACTOR_RETRIES = 2
START_TIMEOUT_S = 600  # loading the model on every actor


@ray.remote(max_restarts=ACTOR_RETRIES, max_task_retries=ACTOR_RETRIES)
class KVWorker:
    """One model replica computing spans' KV behind the prompt prefix."""

    def __init__(self, model: str | None, prefix_ids: list[int], threads: int, backend: str | None,
                 kv_fingerprint: str, kv_dtype: str):
        torch.set_num_threads(threads)
        loaded = load_model(model, device="cpu")
        self.fingerprint = loaded.fingerprint
        self.spans = SpanComputer(loaded.decoder, prefix_ids)
        self.kv = None
        if backend is not None:  # a shared backend: no folder
            self.kv = KVStore(open_env(Path(), False, backend), kv_fingerprint, dtype=kv_dtype)

    def model_fingerprint(self) -> str:
        return self.fingerprint

    def compute(self, token_lists: list[list[int]], dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
        cast = getattr(torch, dtype)
        return [(kv.keys.to(cast).numpy(), kv.values.to(cast).numpy()) for kv in self.spans.compute(token_lists)]

    def commit(self, chunk_ids: list[str], token_lists: list[list[int]]) -> int:
        """Compute and commit these chunks' KV records to the shared backend; the payload bytes."""
        kvs = self.spans.compute(token_lists)
        with self.kv.env.begin(write=True) as txn:
            return sum(self.kv.put(txn, chunk_id, kv) for chunk_id, kv in zip(chunk_ids, kvs))


class RayKVCompute:
    """What an Ingestor calls to compute chunk KV, with the work on `workers` Ray actors."""

    def __init__(self, model: str | Path | None, prefix_ids: list[int], model_fingerprint: str, workers: int = 2,
                 address: str | None = None, threads_per_worker: int = 1, max_batch_tokens: int = 4096,
                 transfer_dtype: str = "float16", backend: str | None = None, kv_fingerprint: str = "",
                 kv_dtype: str = "float16"):
        """`model`: a folder every Ray node can read (None: the bundled default); `transfer_dtype`: what
        actors send back ("float16" is exact for fp16 stores, "float32" for int8 ones); `backend`: a
        shared backend's URL, which actors then write the KV records (`kv_fingerprint`, `kv_dtype`) to."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        self.max_batch_tokens, self.transfer_dtype, self.writes_kv = max_batch_tokens, transfer_dtype, backend is not None
        # More actors than the cluster has CPUs share them (fractional CPUs) rather than wait forever.
        cpus = min(threads_per_worker, ray.cluster_resources().get("CPU", 1) / workers)
        self.actors = [KVWorker.options(num_cpus=cpus).remote(
            None if model is None else str(model), list(prefix_ids), threads_per_worker, backend, kv_fingerprint,
            kv_dtype) for _ in range(workers)]
        try:
            found = set(ray.get([actor.model_fingerprint.remote() for actor in self.actors], timeout=START_TIMEOUT_S))
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(f"{workers} Ray workers did not start within {START_TIMEOUT_S} s "
                               f"(cluster resources: {ray.cluster_resources()})") from None
        if found != {model_fingerprint}:
            raise ValueError(f"Ray workers loaded a different model ({', '.join(sorted(found))}) than the store's "
                             f"({model_fingerprint}); give them the same model folder")

    def compute(self, chunk_ids: list[str], token_lists: list[list[int]]) -> list[ChunkKV | None]:
        """One ChunkKV per span, in order (None for each when the actors committed them to the shared
        backend themselves); length-groups go round-robin to the actors."""
        groups = batches_by_length(token_lists, self.max_batch_tokens)
        actors = [self.actors[i % len(self.actors)] for i in range(len(groups))]
        results: list[ChunkKV | None] = [None] * len(token_lists)
        if self.writes_kv:
            ray.get([actor.commit.remote([chunk_ids[j] for j in group], [list(token_lists[j]) for j in group])
                     for actor, group in zip(actors, groups)])
            return results
        calls = [actor.compute.remote([list(token_lists[j]) for j in group], self.transfer_dtype)
                 for actor, group in zip(actors, groups)]
        for group, arrays in zip(groups, ray.get(calls)):
            for index, (keys, values) in zip(group, arrays):
                results[index] = ChunkKV(torch.from_numpy(keys).float(), torch.from_numpy(values).float())
        return results

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
