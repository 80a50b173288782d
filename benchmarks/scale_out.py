"""Scale-out measurements for docs/scale-out.md.

    python benchmarks/scale_out.py [--sections ingest,backend,cluster] [--passages 30] [--workers 1,2,4]
                                   [--questions 6] [--repeats 3] [--write-docs]

ingest: chunk KV precompute throughput (tokens/s) of a local ingest against Ray ingest with 1, 2 and 4
        actors (one torch thread each) on this machine, over the same MuSiQue passages, into fresh stores;
        the Ray stores are checked to hold the local store's KV bytes.
backend: the same chunks in LMDB and in a real redis-server on loopback (a RedisProcess started here):
         time to read one chunk's 30 layers, and blend TTFT over each question's 10 MuSiQue passages
         with either backend, alternated per repeat, medians (full prefill once per question, for scale).
cluster: one redis-server against a 3-primary Redis Cluster (RedisClusterProcess), both on loopback, the same
         questions' passages ingested into each: chunk read latency, the commit of one chunk's KV, and blend
         TTFT, alternated per repeat, medians; then keys and bytes per primary of the cluster, and the global
         slot's bytes per chunk (for the 100M-chunk estimate).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsection import musique_records, report  # noqa: E402

from index.embedder import Embedder  # noqa: E402
from kvchunks.backends.redis_cluster import GLOBAL  # noqa: E402
from kvchunks.backends.redis_process import RedisClusterProcess, RedisProcess  # noqa: E402
from ragblend.api import RagBlend  # noqa: E402
from ragblend.engine.model import load_model  # noqa: E402
from ragblend.storage.documents import coerce_document  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "scale-out.md"


def _kv_bytes(rb: RagBlend) -> dict:
    with rb.store.env.begin() as txn, txn.cursor(db=rb.store.env.open_db(b"kv", txn=txn)) as cursor:
        return {bytes(k): bytes(v) for k, v in cursor}


def section_ingest(passages: list[dict], workers: list[int]) -> str:
    rows, reference = [], None
    for count in [0, *workers]:  # 0: local
        with tempfile.TemporaryDirectory() as tmp, RagBlend(Path(tmp) / "store") as rb:
            compute = rb.ray_kv_compute(workers=count) if count else None
            report = rb.ingest([coerce_document(p) for p in passages], progress=False, kv_compute=compute)
            stored = _kv_bytes(rb)
            reference = reference or stored
            rows.append((f"Ray, {count} actor{'s' if count > 1 else ''}" if count else "local (2 torch threads)",
                         report.computed_tokens, report.wall_s, report.tokens_per_s, stored == reference))
            if compute:
                compute.close()
        print(rows[-1], flush=True)
    local_rate = rows[0][3]
    lines = [f"{len(passages)} MuSiQue passages, {rows[0][1]:,} chunk tokens (256-token chunks), SmolLM2-135M, "
             "embedding and commits on the driver in every row.", "",
             "| chunk KV computed by | wall | tokens/s | vs local | KV bytes equal to local's |", "|---|---|---|---|---|"]
    for name, _, wall, rate, same in rows:
        lines.append(f"| {name} | {wall:.1f} s | {rate:,.0f} | {rate / local_rate:.2f}x | {'yes' if same else 'NO'} |")
    return "\n".join(lines)


def chunk_read_ms(rb: RagBlend, chunk_ids: list[str]) -> float:
    """Median time to read and decode every layer of one chunk, as the layer loader does."""
    kv, times = rb.store.kv, []
    for chunk_id in chunk_ids:
        began = time.perf_counter()
        with rb.store.env.begin(buffers=True) as txn:
            meta = kv.meta(txn, chunk_id)
            kv.warm(txn, [chunk_id], range(meta.layers))
            for layer in range(meta.layers):
                kv.read_layer(txn, chunk_id, layer, meta)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def section_backend(records: list[dict], questions: int, repeats: int) -> str:
    model, embedder = load_model(None), Embedder()
    with tempfile.TemporaryDirectory() as tmp, RedisProcess(Path(tmp) / "redis") as server:
        stores = {"LMDB": RagBlend(Path(tmp) / "lmdb", model=model, embedder=embedder),
                  "Redis (loopback)": RagBlend(Path(tmp) / "redis-replica", model=model, embedder=embedder,
                                               kv_backend=server.url)}
        asked = [(r["question"], [f"{c['title']}\n{c['text']}" for c in r["ctxs"][:10]]) for r in records[:questions]]
        blend_ttft = {name: [] for name in stores}
        exposed = {name: [] for name in stores}
        full_ttft = []  # full prefill loads no KV: the same with either backend, measured once per question
        for question, passages in asked:
            for rb in stores.values():
                rb.query(question, contexts=passages, max_new_tokens=1)  # stores the passages' KV
            full_ttft.append(stores["LMDB"].query(question, contexts=passages, mode="full", max_new_tokens=1).ttft_s)
            for _ in range(repeats):
                for name, rb in stores.items():
                    answer = rb.query(question, contexts=passages, max_new_tokens=1)
                    blend_ttft[name].append(answer.ttft_s)
                    exposed[name].append(answer.timings["load_exposed_s"])
        chunk_ids = [c.chunk_id for c in stores["LMDB"].query(asked[0][0], contexts=asked[0][1], max_new_tokens=1).chunks]
        read = {name: chunk_read_ms(rb, chunk_ids * 3) for name, rb in stores.items()}
        for rb in stores.values():
            rb.close()
    blend = {name: statistics.median(times) for name, times in blend_ttft.items()}
    full = statistics.median(full_ttft)
    lines = [f"{questions} MuSiQue questions x 10 passages as contexts (~5.5k prompt tokens, {len(chunk_ids)} chunks "
             f"for the first), blend at its default ratio, {repeats} repeats per question alternating backends, "
             f"medians; SmolLM2-135M fp32; Redis on loopback (appendonly). Full prefill TTFT (no KV loaded, the same "
             f"with either backend): {full:.2f} s.", "",
             "| backend | read one chunk (30 layers) | blend TTFT | KV load exposed in blend | blend / full |",
             "|---|---|---|---|---|"]
    for name in stores:
        lines.append(f"| {name} | {read[name]:.2f} ms | {blend[name]:.3f} s | "
                     f"{statistics.median(exposed[name]) * 1e3:.1f} ms | {blend[name] / full:.3f}x |")
    ratio = blend["Redis (loopback)"] / blend["LMDB"]
    lines += ["", f"Blend TTFT with Redis / with LMDB: **{ratio:.2f}x** (target <= 1.2x)."]
    return "\n".join(lines)


def chunk_commit_ms(rb: RagBlend, chunk_ids: list[str]) -> float:
    """Median time to commit one chunk's KV records again (lock, write, announce) in a transaction of its own."""
    kv, times = rb.store.kv, []
    for chunk_id in chunk_ids:
        stored = kv.load(chunk_id)
        began = time.perf_counter()
        with rb.store.env.begin(write=True) as txn:
            kv.put(txn, chunk_id, stored)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def _per_node(rb: RagBlend) -> tuple[list[tuple[str, int, int]], int]:
    """(node, keys, dataset bytes) per primary, and the bytes of the global slot's keys."""
    env, tag = rb.store.env, b"{" + GLOBAL + b"}"
    keyspace, memory = env.node_info("keyspace"), env.node_info("memory")
    nodes = [(name, int(keyspace[name].get("db0", {}).get("keys", 0)), int(memory[name]["used_memory_dataset"]))
             for name in sorted(memory)]
    keys = env.client.execute_command("CLUSTER GETKEYSINSLOT", env.client.keyslot(tag), 1_000_000,
                                      target_nodes=env.client.get_node_from_key(tag))
    global_bytes = sum(int(env.client.memory_usage(key) or 0) for key in keys)
    return nodes, global_bytes


def section_cluster(records: list[dict], questions: int, repeats: int) -> str:
    model, embedder = load_model(None), Embedder()
    asked = [(r["question"], [f"{c['title']}\n{c['text']}" for c in r["ctxs"][:10]]) for r in records[:questions]]
    passages = [{"id": f"q{i}-p{j}", "text": text} for i, (_, texts) in enumerate(asked) for j, text in enumerate(texts)]
    with tempfile.TemporaryDirectory() as tmp, RedisProcess(Path(tmp) / "redis") as server, \
            RedisClusterProcess(Path(tmp) / "cluster", masters=3) as cluster:
        stores = {name: RagBlend(Path(tmp) / name, model=model, embedder=embedder, kv_backend=url)
                  for name, url in (("1 server", server.url), ("cluster, 3 primaries", cluster.url))}
        for rb in stores.values():
            rb.add_documents(passages)
        chunk_ids = [c.chunk_id for c in stores["1 server"].query(asked[0][0], contexts=asked[0][1],
                                                                   max_new_tokens=1).chunks]
        ttft = {name: [] for name in stores}
        exposed = {name: [] for name in stores}
        read = {name: [] for name in stores}
        commit = {name: [] for name in stores}
        for _ in range(repeats):
            for question, texts in asked:
                for name, rb in stores.items():
                    answer = rb.query(question, contexts=texts, max_new_tokens=1)
                    assert answer.timings["kv_misses"] == 0, "the passages' KV should all be stored"
                    ttft[name].append(answer.ttft_s)
                    exposed[name].append(answer.timings["load_exposed_s"])
            for name, rb in stores.items():
                read[name].append(chunk_read_ms(rb, chunk_ids))
                commit[name].append(chunk_commit_ms(rb, chunk_ids[:5]))
        cluster_rb = stores["cluster, 3 primaries"]
        stats = cluster_rb.stats()
        nodes, global_bytes = _per_node(cluster_rb)
        for rb in stores.values():
            rb.close()
    med = {name: {k: statistics.median(v[name]) for k, v in
                  (("ttft", ttft), ("exposed", exposed), ("read", read), ("commit", commit))} for name in stores}
    lines = [f"{questions} MuSiQue questions x 10 passages ingested into each backend ({stats.chunks} chunks, "
             f"{stats.kv_bytes / 1e6:,.1f} MB of fp16 KV), then asked with those passages as contexts (all KV "
             f"loaded, blend at its default ratio), {repeats} rounds alternating backends, medians; SmolLM2-135M "
             "fp32; every node on loopback (appendonly, fsync always).", "",
             "| backend | read one chunk (30 layers) | commit one chunk's KV | blend TTFT | KV load exposed in blend |",
             "|---|---|---|---|---|"]
    for name in stores:
        m = med[name]
        lines.append(f"| Redis, {name} | {m['read']:.2f} ms | {m['commit']:.1f} ms | {m['ttft']:.3f} s | "
                     f"{m['exposed'] * 1e3:.1f} ms |")
    ratio = med["cluster, 3 primaries"]["ttft"] / med["1 server"]["ttft"]
    lines += ["", f"Blend TTFT on the cluster / on one server: **{ratio:.2f}x**.", "",
              "| primary | keys | data bytes | share of data |", "|---|---|---|---|"]
    total = sum(b for _, _, b in nodes)
    for name, keys, data in nodes:
        lines.append(f"| {name} | {keys:,} | {data / 1e6:,.1f} MB | {data / total:.0%} |")
    lines += ["", f"Global slot (write lock, meta, documents, chunks, embeddings, FAISS ids): "
              f"{global_bytes / 1e6:,.2f} MB, {global_bytes / stats.chunks:,.0f} B per chunk; "
              f"everything else: {(total - global_bytes) / stats.kv_bytes:.3f} bytes per byte of KV payload."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="ingest,backend")
    parser.add_argument("--passages", type=int, default=30)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true", help="update docs/scale-out.md")
    args = parser.parse_args()
    records = musique_records()
    if records is None:
        return
    sections = args.sections.split(",")
    if "ingest" in sections:
        passages = [{"id": f"{i}-{j}", "text": f"{c['title']}\n{c['text']}"}
                    for i, r in enumerate(records) for j, c in enumerate(r["ctxs"])][: args.passages]
        body = section_ingest(passages, [int(w) for w in args.workers.split(",")])
        command = f"python benchmarks/scale_out.py --sections ingest --passages {args.passages} --workers {args.workers}"
        report("scale-out-ingest", body, command, args.write_docs, DOC)
    if "backend" in sections:
        body = section_backend(records, args.questions, args.repeats)
        command = f"python benchmarks/scale_out.py --sections backend --questions {args.questions} --repeats {args.repeats}"
        report("scale-out-backend", body, command, args.write_docs, DOC)
    if "cluster" in sections:
        body = section_cluster(records, args.questions, args.repeats)
        command = f"python benchmarks/scale_out.py --sections cluster --questions {args.questions} --repeats {args.repeats}"
        report("scale-out-cluster", body, command, args.write_docs, DOC)


if __name__ == "__main__":
    main()
