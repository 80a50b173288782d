"""Evaluation harness: quality of every mode against full prefill, and TTFT side by side.

Each record's passages are the contexts (one passage, one chunk), the same prompt tokens in every
mode. `full` always runs first: it is the reference for identical answers, first-token KL and "keeps".
"""
from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from ragblend.api import RagBlend
from ragblend.engine.selection import BlendConfig
from ragblend.eval.metrics import best_em, best_f1, contains_answer, first_line, first_token_kl, keeps

BLEND_TIMINGS = ("fuse_s", "check_s", "partial_s", "load_s", "load_exposed_s", "prepare_s")


@dataclass(frozen=True)
class EvalRun:
    label: str
    mode: str
    blend: BlendConfig | None = None


@dataclass(frozen=True)
class EvalConfig:
    modes: tuple[str, ...] = ("full", "prefix", "reuse", "blend")
    ratios: tuple[float | str, ...] = (0.05, 0.15, 0.3, 0.5)
    passages: int | None = None
    max_new_tokens: int = 32
    variants: tuple[tuple[str, BlendConfig], ...] = (("blend", BlendConfig()),)  # named selections

    def runs(self) -> list[EvalRun]:
        """What each question is answered with, in order, full first; blend once per variant and ratio."""
        runs = [EvalRun("full", "full")]
        for mode in self.modes:
            if mode == "blend":
                runs += [EvalRun(f"{name}@{ratio:g}" if ratio != "auto" else f"{name}@auto", "blend",
                                 replace(config, recompute_ratio=ratio))
                         for name, config in self.variants for ratio in self.ratios]
            elif mode != "full":
                runs.append(EvalRun(mode, mode))
        return runs


def passage_text(ctx: dict) -> str:
    title = (ctx.get("title") or "").strip()
    return f"{title}\n{ctx['text'].strip()}" if title else ctx["text"].strip()


def record_key(index: int, record: dict, config: EvalConfig) -> str:
    """Identifies a finished question for resuming: another mode list or ratio list is another run."""
    payload = json.dumps([index, record["question"], config.passages, config.max_new_tokens,
                          [repr(run) for run in config.runs()]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def evaluate_record(rb: RagBlend, record: dict, config: EvalConfig) -> list[dict]:
    contexts = [passage_text(c) for c in record["ctxs"][: config.passages]]
    golds = record["answers"]
    rows, reference = [], None
    for run in config.runs():
        answer = rb.query(record["question"], contexts=contexts, mode=run.mode, blend=run.blend,
                          max_new_tokens=config.max_new_tokens)
        if reference is None:
            reference = answer
        rows.append({
            "label": run.label, "mode": run.mode, "ratio": answer.timings.get("recompute_ratio", 0.0), "question": record["question"], "answers": golds,
            "answer": answer.text, "f1": best_f1(answer.text, golds), "em": best_em(answer.text, golds),
            "correct": contains_answer(answer.text, golds),
            "identical": first_line(answer.text) == first_line(reference.text),
            "kl": first_token_kl(reference.first_token_logits, answer.first_token_logits),
            "ttft_s": answer.ttft_s, "prompt_tokens": answer.prompt_tokens,
            "recomputed_tokens": answer.recomputed_tokens, "hops": record.get("hops"),
            **{k: answer.timings.get(k) for k in BLEND_TIMINGS},
        })
    return rows


def run_eval(rb: RagBlend, records: list[dict], config: EvalConfig, out: Path, progress: bool = True) -> list[dict]:
    """Evaluate every record, appending to out/results.jsonl; records already there are skipped."""
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done: dict[str, list[dict]] = {}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            entry = json.loads(line)
            done[entry["key"]] = entry["rows"]
    with results_path.open("a") as sink:
        for index, record in enumerate(tqdm(records, desc="eval", unit="q", disable=not progress)):
            key = record_key(index, record, config)
            if key in done:
                continue
            # Warm the KV store first so TTFT never includes a one-off precompute of a miss.
            rb.prefill(record["question"], contexts=[passage_text(c) for c in record["ctxs"][: config.passages]],
                       mode="reuse")
            done[key] = evaluate_record(rb, record, config)
            sink.write(json.dumps({"key": key, "rows": done[key]}) + "\n")
            sink.flush()
    keys = [record_key(i, r, config) for i, r in enumerate(records)]
    return [row for key in keys for row in done[key]]


@dataclass
class ModeSummary:
    label: str
    questions: int
    f1: float
    em: float
    correct: float
    keeps: float | None
    identical: float
    kl: float
    ttft_s: float
    ttft_vs_full: float
    recomputed_tokens: float
    ratio: float  # mean recompute ratio used (varies per question with "auto")


def summarize(rows: list[dict]) -> list[ModeSummary]:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by_label = {label: [r for r in rows if r["label"] == label] for label in labels}
    full_correct = [r["correct"] for r in by_label["full"]]
    full_ttft = statistics.median(r["ttft_s"] for r in by_label["full"])
    summaries = []
    for label, items in by_label.items():
        ttft = statistics.median(r["ttft_s"] for r in items)
        summaries.append(ModeSummary(
            label, len(items), statistics.mean(r["f1"] for r in items), statistics.mean(r["em"] for r in items),
            statistics.mean(r["correct"] for r in items), keeps(full_correct, [r["correct"] for r in items]),
            statistics.mean(r["identical"] for r in items), statistics.mean(r["kl"] for r in items), ttft,
            ttft / full_ttft, statistics.mean(r["recomputed_tokens"] for r in items),
            statistics.mean(r["ratio"] for r in items),
        ))
    return summaries


def summary_table(summaries: list[ModeSummary]) -> str:
    """A markdown table (also readable on a terminal)."""
    lines = ["| mode | n | F1 | EM | correct | keeps | identical to full | KL vs full | recomputed tokens | median TTFT s | TTFT / full |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        kept = "n/a" if s.keeps is None else f"{s.keeps:.0%}"
        lines.append(f"| {s.label} | {s.questions} | {s.f1:.3f} | {s.em:.2f} | {s.correct:.0%} | {kept} | "
                     f"{s.identical:.0%} | {s.kl:.3f} | {s.recomputed_tokens:.0f} | {s.ttft_s:.2f} | {s.ttft_vs_full:.2f} |")
    return "\n".join(lines)


def write_summary(summaries: list[ModeSummary], out: Path) -> None:
    (out / "summary.json").write_text(json.dumps([asdict(s) for s in summaries], indent=2))
    (out / "summary.md").write_text(summary_table(summaries) + "\n")


def write_hop_summaries(rows: list[dict], out: Path) -> list[Path]:
    """summary-Nhop.md per hop count, for datasets that label questions with `hops` (the synthetic
    set): cross-passage questions are where reuse should fail and blend should hold."""
    paths = []
    for hops in sorted({r["hops"] for r in rows if r.get("hops")}):
        path = out / f"summary-{hops}hop.md"
        path.write_text(summary_table(summarize([r for r in rows if r.get("hops") == hops])) + "\n")
        paths.append(path)
    return paths
