"""Scale-out measurements for docs/scale-out.md.

    python benchmarks/scale_out.py [--passages 30] [--workers 1,2,4] [--write-docs]

ingest: chunk KV precompute throughput (tokens/s) of a local ingest against Ray ingest with 1, 2 and 4
        actors (one torch thread each) on this machine, over the same MuSiQue passages, into fresh stores;
        the Ray stores are checked to hold the local store's KV bytes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsection import machine, musique_records, replace_section  # noqa: E402

from ragblend.api import RagBlend  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=30)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--write-docs", action="store_true", help="update docs/scale-out.md")
    args = parser.parse_args()
    records = musique_records()
    if records is None:
        return
    passages = [{"id": f"{i}-{j}", "text": f"{c['title']}\n{c['text']}"}
                for i, r in enumerate(records) for j, c in enumerate(r["ctxs"])][: args.passages]
    body = section_ingest(passages, [int(w) for w in args.workers.split(",")])
    print(body)
    if args.write_docs:
        command = f"`python benchmarks/scale_out.py --passages {args.passages} --workers {args.workers}`"
        replace_section("scale-out-ingest", f"{body}\n\nMachine: {machine()}. Command: {command}", DOC)


if __name__ == "__main__":
    main()
