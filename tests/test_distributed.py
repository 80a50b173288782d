"""Ingest with chunk KV computed on Ray actors (a real local Ray cluster): the store it writes is the
same, byte for byte, as a local ingest's, and a worker that dies loses no chunk."""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from conftest import chunk_records, make_tiny_model_dir  # noqa: E402
from ragblend import RagBlend  # noqa: E402
from ragblend.cli import main  # noqa: E402
from ragblend.storage.documents import coerce_document  # noqa: E402

DOCS = [{"id": f"note-{i}", "text": f"Note {i}. " + "The tide tables of the northern harbour are printed weekly. " * (3 + i)}
        for i in range(6)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm_dir):
    return make_tiny_model_dir(tmp_path_factory.mktemp("models"), "llama", smollm_dir)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_ingest_writes_the_same_bytes_as_a_local_one(model_dir, embedder, tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(f'{{"id": "{d["id"]}", "text": "{d["text"]}"}}\n' for d in DOCS))
    main(["ingest", str(tmp_path / "docs.jsonl"), "--store", str(tmp_path / "ray"), "--model", str(model_dir),
          "--chunk-tokens", "32", "--ray", "--ray-workers", "2"])
    with RagBlend(tmp_path / "local", model=model_dir, embedder=embedder, chunk_tokens=32) as local, \
            RagBlend(tmp_path / "ray", model=model_dir, embedder=embedder) as distributed:
        local.add_documents(DOCS)
        assert chunk_records(distributed) == chunk_records(local)
        assert len([k for k in chunk_records(local) if k[0] == b"kvmeta"]) > len(DOCS)  # several chunks per document


def test_a_killed_worker_is_restarted_and_its_chunks_computed(model_dir, embedder, tmp_path):
    with RagBlend(tmp_path / "store", model=model_dir, embedder=embedder, chunk_tokens=32) as rb:
        compute = rb.ray_kv_compute(model_dir, workers=2)
        ray.kill(compute.actors[0], no_restart=False)  # as if its node went down
        report = rb.ingest([coerce_document(d) for d in DOCS], progress=False, kv_compute=compute)
        assert report.computed_chunks == rb.stats().chunks and rb.store.check() == []


def test_workers_with_another_model_are_refused(model_dir, smollm_dir, embedder, tmp_path):
    other = make_tiny_model_dir(tmp_path, "llama", smollm_dir, seed=5)
    with RagBlend(tmp_path / "store", model=model_dir, embedder=embedder) as rb:
        with pytest.raises(ValueError, match="different model"):
            rb.ray_kv_compute(other, workers=1)


@pytest.mark.parametrize("kind", ["server", "cluster"])
def test_ray_actors_write_kv_straight_into_a_shared_backend_the_same_bytes(model_dir, embedder, tmp_path, kind):
    pytest.importorskip("redis", reason="the redis extra is not installed")
    from kvchunks.backends.redis_process import RedisClusterProcess, RedisProcess, redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server; .ci/run installs it)")
    (tmp_path / "docs.jsonl").write_text("".join(f'{{"id": "{d["id"]}", "text": "{d["text"]}"}}\n' for d in DOCS))
    backend = RedisProcess(tmp_path / "redis") if kind == "server" else RedisClusterProcess(tmp_path / "cluster")
    with backend as server:
        main(["ingest", str(tmp_path / "docs.jsonl"), "--store", str(tmp_path / "driver"), "--model", str(model_dir),
              "--chunk-tokens", "32", "--kv-backend", server.url, "--ray", "--ray-workers", "2"])
        with RagBlend(tmp_path / "local", model=model_dir, embedder=embedder, chunk_tokens=32) as local, \
                RagBlend(tmp_path / "replica", model=model_dir, embedder=embedder, kv_backend=server.url) as shared:
            local.add_documents(DOCS)
            assert chunk_records(shared) == chunk_records(local)
            assert shared.store.check() == [] and shared.stats().kv_bytes == local.stats().kv_bytes
