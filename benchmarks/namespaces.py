"""What filtering retrieval by tenant namespace inside FAISS costs, and what it keeps.

N unit vectors (MiniLM's 384 dimensions, drawn around 1,000 topic centres as sentence embeddings
cluster; isotropic noise would make any HNSW graph miss) are spread over T namespaces plus the default one;
queries search the whole index, one namespace (IDSelectorBatch over its ids) and the default namespace
(IDSelectorNot over every namespaced id). Reports median search time per query and, for HNSW, recall@k of the filtered search
against an exact filtered search.

    python benchmarks/namespaces.py [--vectors 100000] [--tenants 20] [--write-docs]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.docsection import machine, replace_section  # noqa: E402
from index.vector_index import IdFilter, VectorIndex  # noqa: E402

CACHE_DOC = Path(__file__).resolve().parents[1] / "docs" / "cache.md"
DIM, TOP_K, QUERIES = 384, 4, 200


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    noise = _unit(rng.standard_normal((n, DIM)))
    return _unit(centres[rng.integers(0, len(centres), n)] + 0.5 * noise)


def _median_ms(index: VectorIndex, queries: np.ndarray, where: IdFilter | None = None) -> float:
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q, TOP_K, where)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _recall(approx: VectorIndex, exact: VectorIndex, queries: np.ndarray, **ids) -> float:
    """Share of the exact (flat) filtered top k that the approximate index finds under the same filter."""
    approx_where, exact_where = (approx.filter(**ids), exact.filter(**ids)) if ids else (None, None)
    found = [len({i for i, _ in approx.search(q, TOP_K, approx_where)} & {i for i, _ in exact.search(q, TOP_K, exact_where)})
             for q in queries]
    return sum(found) / (TOP_K * len(queries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--write-docs", action="store_true", help="update docs/cache.md")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((1000, DIM)))
    vectors, queries = _clustered(rng, args.vectors, centres), _clustered(rng, QUERIES, centres)
    ids = np.arange(args.vectors, dtype=np.int64)
    owner = rng.integers(0, args.tenants + 1, args.vectors)  # 0: the default namespace
    one_tenant, namespaced = ids[owner == 1], ids[owner != 0]
    indexes = {}
    for kind in ("flat", "hnsw"):
        indexes[kind] = VectorIndex(DIM, kind)
        indexes[kind].add(ids, vectors)
    rows = []
    for kind, index in indexes.items():
        start = time.perf_counter()
        one, default = index.filter(only=one_tenant), index.filter(excluded=namespaced)
        build_ms = (time.perf_counter() - start) * 1e3
        row = [kind, _median_ms(index, queries), _median_ms(index, queries, one), _median_ms(index, queries, default),
               build_ms]
        if kind == "hnsw":
            row += [_recall(index, indexes["flat"], queries), _recall(index, indexes["flat"], queries, only=one_tenant),
                    _recall(index, indexes["flat"], queries, excluded=namespaced)]
        rows.append(row)
    lines = [f"{args.vectors:,} vectors over {args.tenants} namespaces + the default one (one namespace: "
             f"{len(one_tenant):,} ids; namespaced: {len(namespaced):,}), top {TOP_K}, median of {QUERIES} queries. "
             f"Machine: {machine()}.", "",
             "| index | no filter | one namespace (`IDSelectorBatch`) | default namespace (`IDSelectorNot`) | "
             "both filters built (once per index generation) | HNSW recall@4: no filter / one namespace / default |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        recall = f"{row[5]:.3f} / {row[6]:.3f} / {row[7]:.3f}" if len(row) > 5 else "exact"
        lines.append(f"| {row[0]} | {row[1]:.2f} ms | {row[2]:.2f} ms | {row[3]:.2f} ms | {row[4]:.1f} ms | {recall} |")
    lines += ["", "A store builds each namespace's filter once per index generation (after each commit) and reuses "
              "it for every search until the next.", "", "`python benchmarks/namespaces.py --write-docs`"]
    body = "\n".join(lines)
    print(body)
    if args.write_docs:
        replace_section("namespaces", body, CACHE_DOC)


if __name__ == "__main__":
    main()
