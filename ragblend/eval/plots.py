"""PNG plots for the evaluation: quality against TTFT, the recompute-ratio sweep, TTFT against context, and
TTFT against the share of prompt chunks served by the exact-path tree."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ragblend.eval.calibrate import CalibrationReport  # noqa: E402
from ragblend.eval.evaluate import ModeSummary  # noqa: E402
from ragblend.eval.speed import SpeedRow  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quality_vs_ttft(summaries: list[ModeSummary], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summaries:
        ax.scatter(s.ttft_s, s.f1, marker="o", color="tab:blue")
        ax.scatter(s.ttft_s, s.identical, marker="^", color="tab:orange")
        ax.annotate(s.label, (s.ttft_s, s.f1), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.scatter([], [], marker="o", color="tab:blue", label="F1")
    ax.scatter([], [], marker="^", color="tab:orange", label="identical to full")
    ax.set(xlabel="median TTFT (s)", ylabel="score", title="Quality against time to first token")
    ax.legend()
    _save(fig, path)


def ratio_sweep(summaries: list[ModeSummary], path: Path) -> None:
    blends = sorted(((s.ratio, s) for s in summaries if s.label.startswith("blend@")), key=lambda item: item[0])
    refs = {s.label: s for s in summaries if s.label in ("full", "reuse")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    ratios = [r for r, _ in blends]
    left.plot(ratios, [s.f1 for _, s in blends], "o-", label="blend F1")
    left.plot(ratios, [s.identical for _, s in blends], "^-", label="blend identical to full")
    right.plot(ratios, [s.ttft_s for _, s in blends], "o-", label="blend")
    for name, style in (("full", "--"), ("reuse", ":")):
        if name in refs:
            left.axhline(refs[name].f1, linestyle=style, color="gray", label=f"{name} F1")
            right.axhline(refs[name].ttft_s, linestyle=style, color="gray", label=name)
    kl = left.twinx()  # answers of a small model flip easily; the KL shows the trend they hide
    kl.plot(ratios, [s.kl for _, s in blends], "s-", color="tab:red", label="blend KL vs full")
    if "reuse" in refs:
        kl.axhline(refs["reuse"].kl, linestyle=":", color="tab:red", label="reuse KL vs full")
    kl.set(ylabel="first-token KL vs full")
    left.set(xlabel="recompute ratio", ylabel="score", title="Quality")
    right.set(xlabel="recompute ratio", ylabel="median TTFT (s)", title="Speed")
    left.legend(fontsize=7, loc="center left")
    kl.legend(fontsize=7, loc="center right")
    right.legend(fontsize=7)
    _save(fig, path)


def ttft_vs_context(rows: list[SpeedRow], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r.mode for r in rows):
        points = sorted((r.prompt_tokens, r.ttft_s) for r in rows if r.mode == mode)
        ax.plot(*zip(*points), "o-", label=mode)
    ax.set(xlabel="prompt tokens", ylabel="median TTFT (s)", title="TTFT against context length")
    ax.legend()
    _save(fig, path)


def variant_curves(summaries: list[ModeSummary], path: Path) -> None:
    """Quality-speed curves: recompute ratio on x; kept share, first-token KL and TTFT / full on y;
    a line per variant (labels `variant@ratio`), reuse as a reference line."""
    variants = dict.fromkeys(s.label.split("@")[0] for s in summaries if "@" in s.label)
    fig, (kept, kl, speed) = plt.subplots(1, 3, figsize=(13, 3.8))
    for variant in variants:
        points = sorted(((s.ratio, s) for s in summaries if s.label.split("@")[0] == variant), key=lambda p: p[0])
        ratios = [r for r, _ in points]
        kept.plot(ratios, [s.keeps or 0.0 for _, s in points], "o-", label=variant)
        kl.plot(ratios, [s.kl for _, s in points], "o-", label=variant)
        speed.plot(ratios, [s.ttft_vs_full for _, s in points], "o-", label=variant)
    for s in summaries:
        if s.label == "reuse":
            kept.axhline(s.keeps or 0.0, linestyle=":", color="gray", label="reuse")
            kl.axhline(s.kl, linestyle=":", color="gray", label="reuse")
    kept.set(xlabel="recompute ratio", ylabel="share of full's correct answers kept", title="Answers kept")
    kl.set(xlabel="recompute ratio", ylabel="first-token KL to full", title="Distance to full prefill")
    speed.set(xlabel="recompute ratio", ylabel="TTFT / full", title="Speed")
    kept.legend(fontsize=7)
    _save(fig, path)


def ttft_vs_hit_share(runs: dict[str, tuple[list[float], list[float]]], path: Path) -> None:
    """`runs`: configuration -> (per-request tree hit share, per-request TTFT / full's median); each request
    faint, each configuration's medians bold."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (name, (shares, ratios)), color in zip(runs.items(), plt.cm.tab10.colors):
        ax.scatter(shares, ratios, s=6, alpha=0.25, color=color)
        ax.scatter(sorted(shares)[len(shares) // 2], sorted(ratios)[len(ratios) // 2], s=60, color=color,
                   edgecolor="black", label=name)
    ax.set(xlabel="share of chunk tokens loaded from the exact-path tree", ylabel="TTFT / full prefill's median",
           title="TTFT against exact-path hits, by mode and order")
    ax.legend(fontsize=7)
    _save(fig, path)


def calibration_curve(report: CalibrationReport, path: Path) -> None:
    """Agreement with full prefill and TTFT / full against the ratio, per selection, with the target;
    a hollow marker is a ratio rejected early (its agreement over the questions it answered)."""
    c = report.calibration
    fig, (agree, speed) = plt.subplots(1, 2, figsize=(10, 3.8))
    for selection in dict.fromkeys(r.selection for r in report.runs):
        runs = [r for r in report.runs if r.selection == selection and r.agreement is not None]
        line, = agree.plot([r.ratio for r in runs], [r.agreement for r in runs], "-", label=selection)
        for r in runs:
            agree.plot(r.ratio, r.agreement, "o", color=line.get_color(),
                       fillstyle="full" if r.status == "met" else "none")
        speed.plot([r.ratio for r in runs], [r.ttft_vs_full for r in runs], "o-", label=selection)
    agree.axhline(c.target, linestyle="--", color="gray", label=f"target {c.target:.0%}")
    agree.set(xlabel="recompute ratio", ylabel=f"agreement with full ({c.metric})", ylim=(-0.02, 1.02),
              title=f"chosen: {c.ratio:g}" + ("" if c.met else " (none below 1 met the target)"))
    speed.set(xlabel="recompute ratio", ylabel="TTFT / full", title="Speed")
    agree.legend(fontsize=7)
    speed.legend(fontsize=7)
    _save(fig, path)
