"""Real-model check: on MuSiQue, blend stays closer to full prefill than plain reuse does.

Measured on this 135M model (see docs/benchmarks.md): at ratio 0.15 blend roughly halves reuse's
first-token KL to full prefill; identical answers improve less. Kept small to fit the CI budget.
"""
from __future__ import annotations

import json
import statistics

import pytest

from ragblend import RagBlend
from ragblend.cli import EVAL_CHUNK_TOKENS
from ragblend.eval.evaluate import EvalConfig, evaluate_record

pytestmark = pytest.mark.integration


def test_blend_tracks_full_prefill_far_better_than_reuse(smollm, embedder, shared_eval, tmp_path):
    records = json.loads((shared_eval / "musique_s.json").read_text())[:5]
    rb = RagBlend(tmp_path, model=smollm, embedder=embedder, chunk_tokens=EVAL_CHUNK_TOKENS, exact_paths=False)
    config = EvalConfig(modes=("reuse", "blend"), ratios=(0.15,), passages=3, max_new_tokens=8)
    rows = [row for record in records for row in evaluate_record(rb, record, config)]
    by_label = {label: [r for r in rows if r["label"] == label] for label in ("reuse", "blend@0.15")}
    kl = {label: statistics.mean(r["kl"] for r in items) for label, items in by_label.items()}
    identical = {label: sum(r["identical"] for r in items) for label, items in by_label.items()}
    print(f"mean first-token KL vs full: {kl}; identical answers out of 5: {identical}")
    assert kl["blend@0.15"] < 0.8 * kl["reuse"]
    assert identical["blend@0.15"] >= identical["reuse"]
