"""TTFT of full / prefix / reuse / blend side by side on the MuSiQue passages (and a synthetic corpus).

    python benchmarks/ttft.py --passages 10 --repeats 3 [--synthetic-passages 20] [--write-docs]

Medians over repeats (each repeat another question and its passages); KV is stored before timing,
so TTFT is load + fuse + first token. Ratios are to full prefill measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsection import DOCS, machine, musique_records, replace_section  # noqa: E402

from ragblend.api import RagBlend  # noqa: E402
from ragblend.cli import EVAL_CHUNK_TOKENS  # noqa: E402
from ragblend.eval.plots import ttft_vs_context  # noqa: E402
from ragblend.eval.speed import speed_sweep, speed_table  # noqa: E402
from ragblend.eval.synthetic import make_synthetic  # noqa: E402

def synthetic_corpus(passages: int, repeats: int) -> list[dict]:
    """Records with `passages` synthetic passages each (facts and distractors pooled from several records)."""
    pool = make_synthetic(repeats * (passages // 4 + 1), seed=1234)
    ctxs = [c for r in pool for c in r["ctxs"]]
    return [{"question": pool[i]["question"], "answers": pool[i]["answers"],
             "ctxs": ctxs[i * passages: (i + 1) * passages]} for i in range(repeats)
            if len(ctxs) >= (i + 1) * passages]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", default="10", help="comma-separated passage counts, e.g. 2,4,6,10")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--synthetic-passages", type=int, default=0, help="also time a synthetic corpus of this many passages")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    records = musique_records()
    if records is None:
        return
    sizes = [int(x) for x in args.passages.split(",")]
    with tempfile.TemporaryDirectory() as store:
        rb = RagBlend(store, chunk_tokens=EVAL_CHUNK_TOKENS, exact_paths=False)  # each mode's own cost, no paths
        rows = speed_sweep(rb, records, sizes, args.repeats, args.ratio)
        tables = [f"MuSiQue passages (blend ratio {args.ratio}, check layer 1):\n\n{speed_table(rows)}"]
        if args.synthetic_passages:
            synthetic = synthetic_corpus(args.synthetic_passages, args.repeats)
            synth_rows = speed_sweep(rb, synthetic, [args.synthetic_passages], args.repeats, args.ratio)
            tables.append(f"Synthetic corpus, {args.synthetic_passages} passages:\n\n{speed_table(synth_rows)}")
    command = "python benchmarks/ttft.py " + " ".join(sys.argv[1:])
    body = f"Machine: {machine()}. Command: `{command}`\n\n" + "\n\n".join(tables)
    print(body)
    if args.write_docs:
        plot = DOCS.parent / "img" / "ttft_vs_context.png"
        plot.parent.mkdir(parents=True, exist_ok=True)
        ttft_vs_context(rows, plot)
        replace_section("ttft", body + f"\n\n![TTFT against context length](img/{plot.name})")


if __name__ == "__main__":
    main()
