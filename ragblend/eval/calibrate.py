"""`ragblend calibrate`: the smallest recompute ratio whose blend answers agree with full prefill at a
stated target on sample questions, stored in the store as the default of every later blend request.

Each question is answered once with `full` (the reference), then blend climbs a ladder of ratios (x
each selection tried), ratio by ratio over all questions; the first that meets the target wins and
the rest are not run. A ratio is rejected as soon as its disagreements exceed what the target allows,
so low ratios cost a few questions each. Metrics, per question:
  identical    the answer's first line equals full prefill's (as in docs/fidelity.md)
  kept         over the questions full answers right (a gold answer in its first line), blend does too
  first_token  the first generated token equals full's (1 new token per answer: the cheapest)
Each blend answer is timed beside a full prefill of the same prompt run just before it, so TTFT / full
is measured side by side. Results are written to the store after every question: a rerun with the
same questions and settings resumes.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from ragblend.eval.metrics import contains_answer, first_line
from ragblend.eval.store_questions import CalibrationQuestion, store_questions
from ragblend.storage.calibration import (METRICS, SELECTIONS, Calibration, read_partial, write_calibration,
                                          write_partial)
from ragblend.storage.documents import jsonl_items

LADDER = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class CalibrationConfig:
    target: float = 0.95
    metric: str = "identical"
    ratios: tuple[float, ...] = LADDER
    selections: tuple[str, ...] = ("hkvd",)
    limit: int = 50  # questions
    top_k: int = 4  # chunks retrieved for questions without contexts
    max_new_tokens: int = 32  # first_token answers need 1

    def __post_init__(self):
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target must be in (0, 1], got {self.target}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if not self.ratios or not all(isinstance(r, (int, float)) and 0.0 < r < 1.0 for r in self.ratios):
            raise ValueError(f"ratios must be in (0, 1) (1.0 is what is stored when none meets the target), "
                             f"got {list(self.ratios)}")
        unknown = [s for s in self.selections if s not in SELECTIONS]
        if not self.selections or unknown:
            raise ValueError(f"unknown selections {unknown}; choose from {', '.join(SELECTIONS)}")
        if self.limit < 1 or self.top_k < 1 or self.max_new_tokens < 1:
            raise ValueError("limit, top_k and max_new_tokens must be >= 1")

    @property
    def new_tokens(self) -> int:
        return 1 if self.metric == "first_token" else self.max_new_tokens

    def runs(self) -> list[tuple[str, str, float]]:
        """(label, selection, ratio) in the order tried: ratio by ratio, each selection at it."""
        return [(f"{s}@{r:g}", s, r) for r in sorted(self.ratios) for s in self.selections]


@dataclass
class RunResult:
    label: str
    selection: str
    ratio: float
    answered: int
    agreement: float | None  # over the questions answered (the ones that count for `kept`)
    ttft_vs_full: float | None
    status: str  # met | rejected (after `answered` questions) | not run


@dataclass
class CalibrationReport:
    calibration: Calibration
    runs: list[RunResult]
    source: str  # where the questions came from

    def table(self) -> str:
        lines = ["| selection | ratio | questions answered | agreement | TTFT / full | result |",
                 "|---|---|---|---|---|---|"]
        for r in self.runs:
            agreement = "" if r.agreement is None else f"{r.agreement:.0%}"
            speed = "" if r.ttft_vs_full is None else f"{r.ttft_vs_full:.2f}"
            lines.append(f"| {r.selection} | {r.ratio:g} | {r.answered} | {agreement} | {speed} | {r.status} |")
        return "\n".join(lines)


def load_questions(path: str | Path, metric: str = "identical") -> list[CalibrationQuestion]:
    """Questions from a JSONL file of {question, contexts?, answers?} (`ctxs` of {title?, text}, the eval
    format, is read as contexts), every line validated before anything runs; `kept` needs answers."""
    from ragblend.eval.evaluate import passage_text

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"questions file not found: {path}")
    questions = []
    for where, item in jsonl_items(path, path.read_text(encoding="utf-8")):
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object with a 'question', got {type(item).__name__}")
        question, contexts, answers = item.get("question"), item.get("contexts"), item.get("answers")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        if contexts is None and isinstance(item.get("ctxs"), list):
            if not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in item["ctxs"]):
                raise ValueError(f"{where}: 'ctxs' must be objects with a string 'text'")
            contexts = [passage_text(c) for c in item["ctxs"]]
        if contexts is not None and (not isinstance(contexts, list) or not contexts
                                     or not all(isinstance(c, str) and c.strip() for c in contexts)):
            raise ValueError(f"{where}: 'contexts' must be a non-empty list of non-empty strings")
        if answers is not None and (not isinstance(answers, list) or not answers
                                    or not all(isinstance(a, str) for a in answers)):
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
        if metric == "kept" and answers is None:
            raise ValueError(f"{where}: metric 'kept' needs gold 'answers' on every question")
        questions.append(CalibrationQuestion(question, contexts, answers))
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def _run_key(fingerprint: str, questions: list[CalibrationQuestion], config: CalibrationConfig) -> str:
    """Identifies partial results that a rerun may resume: same model, questions and settings."""
    payload = json.dumps([fingerprint, [asdict(q) for q in questions], asdict(config)])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@contextmanager
def _fusion_only(rb) -> Iterator[None]:
    """Blend measured on the chunks it fuses: with the exact-path tree on, full prefill's paths would make every
    later blend answer over the same passages exact (loaded, not fused), and any ratio would look perfect. The
    calibrated ratio governs only what follows a request's exact path anyway."""
    kept, rb.requests.exact_paths = rb.requests.exact_paths, False
    try:
        yield
    finally:
        rb.requests.exact_paths = kept


class _Calibrator:
    def __init__(self, rb, questions: list[CalibrationQuestion], config: CalibrationConfig, partial: dict,
                 save_partial, bar):
        self.rb, self.questions, self.config = rb, questions, config
        self.rows, self.save_partial, self.bar = partial, save_partial, bar

    def _answer(self, q: CalibrationQuestion, mode: str, blend=None):
        return self.rb.query(q.question, contexts=q.contexts, top_k=self.config.top_k, mode=mode, blend=blend,
                             max_new_tokens=self.config.new_tokens)

    def reference(self) -> None:
        """Full prefill's answer to every question (and the chunks' KV stored, so blend's TTFT has no misses)."""
        done = self.rows.setdefault("full", {})
        for i, q in enumerate(self.questions):
            if str(i) not in done:
                answer = self._answer(q, "full")
                self.rb.prefill(q.question, contexts=q.contexts, top_k=self.config.top_k, mode="reuse")
                done[str(i)] = {"text": first_line(answer.text), "first_token": answer.token_ids[:1],
                                "correct": bool(q.answers) and contains_answer(answer.text, q.answers)}
                self.save_partial(self.rows)
            self.bar.update()

    def _agrees(self, q: CalibrationQuestion, full: dict, answer) -> bool | None:
        """Whether blend's answer agrees with full's; None where the question does not count (kept)."""
        if self.config.metric == "identical":
            return first_line(answer.text) == full["text"]
        if self.config.metric == "first_token":
            return answer.token_ids[:1] == full["first_token"]
        return contains_answer(answer.text, q.answers) if full["correct"] else None

    def run(self, label: str, selection: str, ratio: float, stop_early: bool = True) -> RunResult:
        """Blend at `ratio` over the questions until the target is met or can no longer be (or over all
        of them: `stop_early` False, to measure a ratio on held-out questions)."""
        config = self.config
        full_rows = self.rows["full"]
        counted = [str(i) for i in range(len(self.questions))
                   if config.metric != "kept" or full_rows[str(i)]["correct"]]
        allowed = math.floor((1 - config.target) * len(counted) + 1e-9)
        done = self.rows.setdefault(label, {})
        blend = replace(SELECTIONS[selection], recompute_ratio=ratio)
        for i, q in enumerate(self.questions):
            if stop_early and sum(1 for row in done.values() if row["agrees"] is False) > allowed:
                break
            if str(i) not in done:
                full_ttft = self.rb.prefill(q.question, contexts=q.contexts, top_k=config.top_k,
                                            mode="full").timings["ttft_s"]
                answer = self._answer(q, "blend", blend)
                done[str(i)] = {"agrees": self._agrees(q, full_rows[str(i)], answer), "ttft_s": answer.ttft_s,
                                "full_ttft_s": full_ttft, "ratio": answer.timings.get("recompute_ratio", ratio)}
                self.save_partial(self.rows)
            self.bar.update()
        votes = [row["agrees"] for row in done.values() if row["agrees"] is not None]
        agreement = sum(votes) / len(votes) if votes else None
        speed = (statistics.median(r["ttft_s"] for r in done.values())
                 / statistics.median(r["full_ttft_s"] for r in done.values())) if done else None
        met = len(done) == len(self.questions) and len(votes) - sum(votes) <= allowed and bool(counted)
        return RunResult(label, selection, ratio, len(done), agreement, speed, "met" if met else "rejected")


def calibrate(rb, questions: str | Path | list[CalibrationQuestion] | None = None,
              config: CalibrationConfig = CalibrationConfig(), *, progress: bool = True, save: bool = True,
              seed: int = 0) -> CalibrationReport:
    """Calibrate `rb`'s store for its model (see the module docstring); `questions`: a JSONL file, a list,
    or None for fill-in-the-blank questions from the store's chunks (seeded by `seed`). With `save`, the
    result becomes the store's default blend setting for this model (partial results are kept meanwhile)."""
    if questions is None:
        questions, source = store_questions(rb.store, config.limit, seed), f"store chunks (seed {seed})"
    elif isinstance(questions, (str, Path)):
        questions, source = load_questions(questions, config.metric)[: config.limit], str(questions)
    else:
        questions, source = list(questions)[: config.limit], "given questions"
    if config.metric == "kept" and not all(q.answers for q in questions):
        raise ValueError("metric 'kept' needs gold answers on every question")
    fingerprint = rb.store.manifest.kv_fingerprint
    key = _run_key(fingerprint, questions, config)
    partial = read_partial(rb.store, key) if save else {}
    runs = config.runs()
    with _fusion_only(rb), tqdm(total=len(questions) * (1 + len(runs)), desc="calibrate", unit="answer",
                                disable=not progress) as bar:
        calibrator = _Calibrator(rb, questions, config, partial,
                                 (lambda rows: write_partial(rb.store, key, rows)) if save else (lambda rows: None), bar)
        calibrator.reference()
        results = []
        for label, selection, ratio in runs:
            results.append(calibrator.run(label, selection, ratio))
            bar.total -= len(questions) - results[-1].answered  # a rejected ratio stopped early
            bar.refresh()
            if results[-1].status == "met":
                break
    results += [RunResult(label, s, r, 0, None, None, "not run") for label, s, r in runs[len(results):]]
    chosen = next((r for r in results if r.status == "met"), None)
    calibration = Calibration(
        ratio=chosen.ratio if chosen else 1.0, selection=chosen.selection if chosen else "hkvd",
        target=config.target, metric=config.metric, questions=len(questions),
        agreement=chosen.agreement if chosen else None, ttft_vs_full=chosen.ttft_vs_full if chosen else None,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), met=chosen is not None,
        evidence=[asdict(r) for r in results])
    if save:
        write_calibration(rb.store, fingerprint, calibration)
    return CalibrationReport(calibration, results, source)


def measure(rb, questions: list[CalibrationQuestion], config: CalibrationConfig, selection: str, ratio: float,
            progress: bool = True) -> RunResult:
    """Agreement of blend at `ratio` with full prefill over every question, nothing stored: how a
    calibrated ratio holds on questions it was not chosen on."""
    with _fusion_only(rb), tqdm(total=2 * len(questions), desc=f"measure {selection}@{ratio:g}",
                                disable=not progress) as bar:
        calibrator = _Calibrator(rb, questions, config, {}, lambda rows: None, bar)
        calibrator.reference()
        return calibrator.run(f"{selection}@{ratio:g}", selection, ratio, stop_early=False)
