"""TTFT of every mode side by side, at several context sizes, medians over repeats."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ragblend.api import RagBlend
from ragblend.eval.evaluate import BLEND_TIMINGS, passage_text

MODES = ("full", "prefix", "reuse", "blend")


@dataclass
class SpeedRow:
    passages: int
    mode: str
    prompt_tokens: int
    ttft_s: float  # median over repeats
    ttft_vs_full: float
    repeats: int
    breakdown: dict[str, float] = field(default_factory=dict)  # medians of the engine's timings


def speed_sweep(rb: RagBlend, records: list[dict], sizes: list[int], repeats: int = 3, ratio: float = 0.15,
                modes: tuple[str, ...] = MODES, progress: bool = True) -> list[SpeedRow]:
    """Each repeat uses another record's question and passages; modes run interleaved, KV already stored."""
    rows: list[SpeedRow] = []
    for size in sizes:
        chosen = [r for r in records if len(r["ctxs"]) >= size][:repeats]
        if not chosen:
            raise ValueError(f"no record has {size} passages")
        samples: dict[str, list] = {m: [] for m in modes}
        runs = [(record, mode) for record in chosen for mode in modes]
        for record, mode in tqdm(runs, desc=f"speed {size} passages", disable=not progress):
            contexts = [passage_text(c) for c in record["ctxs"][:size]]
            if mode == modes[0]:  # untimed warm-up: stores any missing KV and warms caches
                rb.prefill(record["question"], contexts=contexts, mode="reuse")
            prepared = rb.prefill(record["question"], contexts=contexts, mode=mode, recompute_ratio=ratio)
            samples[mode].append(prepared)
        full = statistics.median(p.timings["ttft_s"] for p in samples["full"]) if "full" in samples else None
        for mode, prepared in samples.items():
            ttft = statistics.median(p.timings["ttft_s"] for p in prepared)
            breakdown = {k: statistics.median(p.timings.get(k, 0.0) for p in prepared) for k in BLEND_TIMINGS}
            tokens = round(statistics.median(len(p.layout) for p in prepared))
            rows.append(SpeedRow(size, mode, tokens, ttft, ttft / full if full else float("nan"), len(prepared), breakdown))
    return rows


def speed_table(rows: list[SpeedRow]) -> str:
    lines = ["| passages | prompt tokens | mode | median TTFT s | TTFT / full | check s | partial s | load s | exposed load s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r.breakdown
        lines.append(f"| {r.passages} | {r.prompt_tokens} | {r.mode} | {r.ttft_s:.2f} | {r.ttft_vs_full:.3f} | "
                     f"{b['check_s']:.2f} | {b['partial_s']:.2f} | {b['load_s']:.3f} | {b['load_exposed_s']:.3f} |")
    return "\n".join(lines)
