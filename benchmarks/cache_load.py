"""A KV budget under load: many documents, a budget holding a tenth of their KV, Zipf-skewed questions.

    python benchmarks/cache_load.py [--docs 1000] [--queries 2000] [--budget-share 0.1] [--write-docs]

Ingests synthetic documents with `kv_max_bytes` set to `budget-share` of their KV, then asks about
document i with probability ~ 1/(i+1)^s (Zipf, s = 1.1) in `reuse` mode (the KV path, one new token).
Reports the KV hit rate, p50/p95 TTFT of hits and misses, KV bytes against the budget, the LMDB
file size and anonymous RSS over the run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsection import machine, replace_section  # noqa: E402
from faults import documents  # noqa: E402
from sessions import anon_rss_bytes  # noqa: E402

from ragblend.api import RagBlend  # noqa: E402

DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "cache.md"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--budget-share", type=float, default=0.1)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--write-docs", action="store_true", help="update docs/cache.md")
    args = parser.parse_args()
    docs = documents(args.docs, passages_per_doc=1)
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, args.docs + 1) ** args.zipf
    picks = rng.choice(args.docs, size=args.queries, p=weights / weights.sum())
    with tempfile.TemporaryDirectory() as folder:
        rb = RagBlend(Path(folder) / "store")
        start = time.perf_counter()
        rb.add_documents(docs, progress=True)
        ingest_s = time.perf_counter() - start
        total = rb.stats().kv_bytes
        budget = int(total * args.budget_share)
        rb.store.set_kv_max_bytes(budget)
        ttft = {"hit": [], "miss": []}
        rss, sizes, over = [], [], 0
        for step, pick in enumerate(picks):
            question = docs[pick]["text"].split(". ")[0]
            answer = rb.query(question, top_k=1, mode="reuse", max_new_tokens=1)
            ttft["miss" if answer.timings["kv_misses"] else "hit"].append(answer.ttft_s)
            if step % 100 == 0:
                rss.append(anon_rss_bytes())
                sizes.append((Path(folder) / "store" / "data.mdb").stat().st_size)
                over += rb.stats().kv_bytes > budget
        stats = rb.stats()
        rb.close()
    hits = len(ttft["hit"]) / args.queries
    body = (f"{args.docs} documents ({total / 1e6:,.0f} MB of KV, ingested in {ingest_s:,.0f} s), budget "
            f"{budget / 1e6:,.0f} MB ({args.budget_share:.0%}), {args.queries} Zipf(s={args.zipf}) questions in "
            f"`reuse` mode, top 1:\n\n"
            f"| KV hit rate | TTFT p50 / p95, hits | TTFT p50 / p95, misses | KV bytes at the end | evictions | "
            f"data.mdb first / last | anonymous RSS first / max |\n|---|---|---|---|---|---|---|\n"
            f"| **{hits:.0%}** | {statistics.median(ttft['hit']):.3f} / {percentile(ttft['hit'], 95):.3f} s | "
            f"{percentile(ttft['miss'], 50):.3f} / {percentile(ttft['miss'], 95):.3f} s | "
            f"{stats.kv_bytes / 1e6:,.1f} MB (over budget at {over} of {len(rss)} checks) | {stats.evictions:,} | "
            f"{sizes[0] / 1e6:,.0f} / {sizes[-1] / 1e6:,.0f} MB | {rss[0] / 1e6:,.0f} / {max(rss) / 1e6:,.0f} MB |\n\n"
            f"Machine: {machine()}. Command: `python benchmarks/cache_load.py --docs {args.docs} "
            f"--queries {args.queries} --budget-share {args.budget_share}`")
    print(body)
    if args.write_docs:
        replace_section("cache-load", body, DOCS_PAGE)


if __name__ == "__main__":
    main()
