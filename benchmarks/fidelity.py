"""Fidelity ablation: blend's token-selection variants against full prefill, side by side.

    python benchmarks/fidelity.py --synthetic 100 --passages 8 --variants all --ratios 0.15 --out eval-out/fid-synth
    python benchmarks/fidelity.py --dataset ../shared/eval/musique_s.json --limit 20 --passages 6 --out eval-out/fid-musique
    add --write-docs NAME to copy the table (and the curves, with several ratios) into docs/fidelity.md

Every variant answers the same questions over the same prompt tokens as full prefill, greedy; the
table gives the share of full's correct answers kept, identical-to-full answers, F1, first-token KL
to full, recomputed tokens and TTFT / full. Resumable: rerun with the same --out to continue.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsection import machine, replace_section  # noqa: E402

from ragblend.api import RagBlend  # noqa: E402
from ragblend.cli import EVAL_CHUNK_TOKENS, _ratios  # noqa: E402
from ragblend.eval.datasets import load_records  # noqa: E402
from ragblend.eval.evaluate import EvalConfig, run_eval, summarize, summary_table, write_hop_summaries  # noqa: E402
from ragblend.eval.plots import variant_curves  # noqa: E402
from ragblend.engine.selection import BlendConfig  # noqa: E402
from ragblend.eval.synthetic import make_synthetic  # noqa: E402

FIDELITY_DOCS = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"
# CacheBlend's HKVD as the paper's main configuration: value deviation on layer 1, one top-k
BASE = BlendConfig(signal="value", check_layer=1, budget="global", chunk_start_tokens=0, gradual=1.0)
VARIANTS = {
    "value": BASE,
    "key": replace(BASE, signal="key"),
    "kv": replace(BASE, signal="kv"),
    "random": replace(BASE, signal="random"),
    "attention": replace(BASE, signal="attention"),
    "value_attention": replace(BASE, signal="value_attention"),
    "check2": replace(BASE, check_layer=2),
    "check3": replace(BASE, check_layer=3),
    "gradual2": replace(BASE, gradual=2.0),
    "per_chunk": replace(BASE, budget="per_chunk"),
    "starts4": replace(BASE, chunk_start_tokens=4),
    "query": replace(BASE, query_chunks=1.0),  # whole chunks the question attends to, HKVD for the rest
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="JSON/JSONL records {question, answers, ctxs}")
    parser.add_argument("--synthetic", type=int, metavar="N", help="N synthetic one- and two-hop questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--variants", default="all", help=f"comma list of {', '.join(VARIANTS)}, or all")
    parser.add_argument("--ratios", default="0.15", help="e.g. 0.05,0.15,0.3,auto")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-reuse", action="store_true", help="skip the reuse baseline")
    parser.add_argument("--model", help="local HF causal-LM folder (default: bundled SmolLM2)")
    parser.add_argument("--kv-dtype", default="float16", choices=["float16", "int8"], help="chunk KV encoding")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--write-docs", metavar="NAME", help="write the table into docs/fidelity.md section NAME")
    args = parser.parse_args()
    if (args.dataset is None) == (args.synthetic is None):
        sys.exit("give exactly one of --dataset FILE or --synthetic N")
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.dataset:
        records = load_records(args.dataset)
    else:
        records = make_synthetic(args.synthetic, seed=args.seed, passages=args.passages)
    records = records[: args.limit] if args.limit else records
    modes = ("full", "blend") if args.no_reuse else ("full", "reuse", "blend")
    config = EvalConfig(modes=modes, ratios=_ratios(args.ratios), passages=args.passages,
                        max_new_tokens=args.max_new_tokens, variants=tuple((n, VARIANTS[n]) for n in names))
    rb = RagBlend(args.out / "store", model=args.model, chunk_tokens=EVAL_CHUNK_TOKENS, kv_dtype=args.kv_dtype,
                  exact_paths=False)  # fusion against full prefill; full's paths would make blend exact
    rows = run_eval(rb, records, config, args.out)
    summaries = summarize(rows)
    table = summary_table(summaries)
    (args.out / "summary.md").write_text(table + "\n")
    hop_tables = [f"Only the {p.stem.removeprefix('summary-')} questions:\n\n{p.read_text().strip()}"
                  for p in write_hop_summaries(rows, args.out)]
    variant_curves(summaries, args.out / "curves.png")
    print(table)
    if args.write_docs:
        command = "python benchmarks/fidelity.py " + " ".join(sys.argv[1:])
        body = f"Machine: {machine()}. Command: `{command}`\n\n" + "\n\n".join([table, *hop_tables])
        if len(config.ratios) > 1:
            image = FIDELITY_DOCS.parent / "img" / f"fidelity_{args.write_docs}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.out / "curves.png", image)
            body += f"\n\n![{args.write_docs} quality-speed curves](img/{image.name})"
        replace_section(f"fidelity-{args.write_docs}", body, FIDELITY_DOCS)


if __name__ == "__main__":
    main()
