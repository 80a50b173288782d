"""Does a calibrated ratio hold on questions it was not chosen on? Calibrate on one sample, test on another.

    python benchmarks/calibrate.py --questions 30 --target 0.8 --out eval-out/calib --write-docs

Two question sets, each split into disjoint calibration and test halves of the same kind:
  synthetic  one- and two-hop questions over their own 8 passages (ragblend.eval.synthetic, seed 21)
  store      fill-in-the-blank questions from a store's own chunks (ragblend.eval.store_questions):
             40 synthetic worlds (seed 31) ingested as documents, 256-token chunks, top-4 retrieval
`ragblend calibrate` picks a ratio on the first half; blend at that ratio then answers the second half
and its agreement with full prefill is compared with the target. Records the wall time of each
calibration, the ratio chosen and its TTFT / full (each blend prefill timed beside a full one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsection import machine, replace_section  # noqa: E402

from ragblend.api import RagBlend  # noqa: E402
from ragblend.cli import EVAL_CHUNK_TOKENS  # noqa: E402
from ragblend.eval.calibrate import CalibrationConfig, calibrate, measure  # noqa: E402
from ragblend.eval.evaluate import passage_text  # noqa: E402
from ragblend.eval.store_questions import CalibrationQuestion, store_questions  # noqa: E402
from ragblend.eval.synthetic import make_synthetic  # noqa: E402

FIDELITY_DOCS = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"


def synthetic_set(out: Path, n: int, model: str | None) -> tuple[RagBlend, list[CalibrationQuestion]]:
    records = make_synthetic(2 * n, seed=21)
    questions = [CalibrationQuestion(r["question"], [passage_text(c) for c in r["ctxs"]], r["answers"]) for r in records]
    return RagBlend(out / "store-synthetic", model, chunk_tokens=EVAL_CHUNK_TOKENS), questions


def store_set(out: Path, n: int, model: str | None) -> tuple[RagBlend, list[CalibrationQuestion]]:
    rb = RagBlend(out / "store-chunks", model, chunk_tokens=256)
    if rb.store.stats().documents == 0:
        worlds = make_synthetic(40, seed=31)
        rb.add_documents([{"id": f"world-{i}", "text": "\n\n".join(passage_text(c) for c in r["ctxs"])}
                          for i, r in enumerate(worlds)])
    return rb, store_questions(rb.store, 2 * n, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=30, help="per half (calibration and test)")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--metric", default="identical")
    parser.add_argument("--sets", default="synthetic,store")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--model", help="a local HF model folder (default: the bundled SmolLM2)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = CalibrationConfig(target=args.target, metric=args.metric, limit=args.questions,
                               max_new_tokens=args.max_new_tokens)
    rows = []
    for name in args.sets.split(","):
        done = args.out / f"{name}.json"
        if done.is_file():
            rows.append(json.loads(done.read_text()))
            continue
        rb, questions = {"synthetic": synthetic_set, "store": store_set}[name](args.out, args.questions, args.model)
        tune, test = questions[: args.questions], questions[args.questions:]
        started = time.perf_counter()
        report = calibrate(rb, tune, config)  # resumable: stored in the store as it goes
        wall = time.perf_counter() - started
        c = report.calibration
        held = measure(rb, test, config, c.selection, c.ratio)
        row = {"set": name, "model": rb.model.name, "calibrate_n": len(tune), "test_n": len(test), "ratio": c.ratio, "met": c.met,
               "calibration_agreement": c.agreement, "ttft_vs_full": held.ttft_vs_full,
               "test_agreement": held.agreement, "calibrate_wall_s": wall, "table": report.table(),
               "runs": [asdict(r) for r in report.runs]}
        done.write_text(json.dumps(row, indent=1))
        rows.append(row)
        rb.close()
    lines = ["| model | question set | calibrate / test questions | chosen ratio | agreement on calibration half | "
             "agreement on test half | test - target | TTFT / full at it | calibrate wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calib = "none met" if not r["met"] else f"{r['calibration_agreement']:.0%}"
        lines.append(f"| {r['model']} | {r['set']} | {r['calibrate_n']} / {r['test_n']} | {r['ratio']:g} | {calib} | "
                     f"{r['test_agreement']:.0%} | {100 * (r['test_agreement'] - args.target):+.0f} points | "
                     f"{r['ttft_vs_full']:.2f} | {r['calibrate_wall_s'] / 60:.1f} min |")
    table = "\n".join(lines)
    ladders = "\n\n".join(f"Ladder on the {r['set']} calibration half:\n\n{r['table']}" for r in rows)
    print(table + "\n\n" + ladders)
    if args.write_docs:
        command = "python benchmarks/calibrate.py " + " ".join(sys.argv[1:])
        body = (f"Machine: {machine()} (shared with other jobs). Command: `{command}`\n\n"
                f"Target: {args.metric} >= {args.target:.0%}.\n\n{table}\n\n{ladders}")
        model = Path(args.model).name if args.model else "default"
        replace_section(f"calibrate-{model}-{args.metric}-{args.target:g}", body, FIDELITY_DOCS)


if __name__ == "__main__":
    main()
