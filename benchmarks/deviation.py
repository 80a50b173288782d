"""Where the fused cache deviates from full prefill: per layer, how large and how concentrated.

    python benchmarks/deviation.py --synthetic 10 --passages 8 [--write-docs]

For each layer: relative value deviation of the chunk tokens from full prefill's (|V - V_full| / |V_full|)
for reuse and for blend, and the share of reuse's squared value deviation held by its top 15% of
tokens (1.0 = all in a few tokens; 0.15 = spread evenly). Answers "is the deviation spread over most
tokens, or does the selection pick the wrong ones?" with numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from docsection import machine, replace_section  # noqa: E402
from fidelity import FIDELITY_DOCS  # noqa: E402

from ragblend.api import RagBlend  # noqa: E402
from ragblend.cli import EVAL_CHUNK_TOKENS  # noqa: E402
from ragblend.eval.evaluate import passage_text  # noqa: E402
from ragblend.eval.synthetic import make_synthetic  # noqa: E402

TOP = 0.15


def layer_deviation(cache, full, chunks: slice) -> list[tuple[float, torch.Tensor]]:
    """Per layer: relative value deviation of the chunk tokens, and each token's squared deviation."""
    out = []
    for fused, reference in zip(cache.layers, full.layers):
        diff = (fused.values[:, :, chunks] - reference.values[:, :, chunks]).float()
        per_token = diff.pow(2).sum(dim=(0, 1, 3))
        out.append((float(diff.norm() / reference.values[:, :, chunks].float().norm()), per_token))
    return out


def top_share(per_token: torch.Tensor) -> float:
    ordered = per_token.sort(descending=True).values
    count = max(1, int(TOP * len(ordered)))
    return float(ordered[:count].sum() / ordered.sum().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=10)
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", type=Path, default=Path("eval-out/deviation-store"))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    rb = RagBlend(args.store, chunk_tokens=EVAL_CHUNK_TOKENS)
    rows: dict[int, dict[str, list[float]]] = {}
    for record in make_synthetic(args.synthetic, seed=args.seed, passages=args.passages):
        contexts = [passage_text(c) for c in record["ctxs"]]
        full = rb.prefill(record["question"], contexts=contexts, mode="full")
        chunks = slice(full.layout.prefix_len, full.layout.suffix_start)
        reuse = layer_deviation(rb.prefill(record["question"], contexts=contexts, mode="reuse").prefill.cache,
                                full.prefill.cache, chunks)
        blend = layer_deviation(rb.prefill(record["question"], contexts=contexts, mode="blend").prefill.cache,
                                full.prefill.cache, chunks)
        for layer, ((reuse_rel, reuse_tokens), (blend_rel, _)) in enumerate(zip(reuse, blend)):
            row = rows.setdefault(layer, {"reuse": [], "blend": [], "top": []})
            row["reuse"].append(reuse_rel)
            row["blend"].append(blend_rel)
            row["top"].append(top_share(reuse_tokens))
    lines = ["| layer | reuse: relative V deviation | blend@0.15: relative V deviation | reuse: share of squared deviation in its top 15% tokens |",
             "|---|---|---|---|"]
    for layer, row in rows.items():
        lines.append(f"| {layer} | {statistics.mean(row['reuse']):.3f} | {statistics.mean(row['blend']):.3f} | "
                     f"{statistics.mean(row['top']):.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        command = "python benchmarks/deviation.py " + " ".join(sys.argv[1:])
        replace_section("deviation", f"Machine: {machine()}. Command: `{command}`\n\n{table}", FIDELITY_DOCS)


if __name__ == "__main__":
    main()
