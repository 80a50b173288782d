"""Blend's invariants on the real SmolLM2: exact at ratio 1, reuse beyond the check layer at ratio 0,
and closer to full prefill the more it recomputes (mean first-token KL over 20 questions)."""
from __future__ import annotations

import json
import statistics

import pytest

from ragblend import RagBlend
from ragblend.cli import EVAL_CHUNK_TOKENS
from ragblend.eval.evaluate import passage_text
from ragblend.eval.metrics import first_token_kl
from ragblend.eval.synthetic import make_synthetic

pytestmark = pytest.mark.integration
RECORDS = make_synthetic(20, seed=7)
RATIOS = (0.0, 0.15, 0.3, 0.5, 1.0)


@pytest.fixture(scope="module")
def rb(smollm, embedder, tmp_path_factory) -> RagBlend:
    # Fusion's invariants: no exact-path tree, whose paths from full prefill would make blend exact by loading them.
    return RagBlend(tmp_path_factory.mktemp("fidelity"), model=smollm, embedder=embedder, chunk_tokens=EVAL_CHUNK_TOKENS,
                    exact_paths=False)


def contexts(record: dict, passages: int | None = None) -> list[str]:
    return [passage_text(c) for c in record["ctxs"][:passages]]


def test_blend_at_ratio_one_gives_full_prefills_logits_and_answer(rb):
    for record in RECORDS[:2]:
        full = rb.query(record["question"], contexts=contexts(record), mode="full", max_new_tokens=12)
        blend = rb.query(record["question"], contexts=contexts(record), recompute_ratio=1.0, max_new_tokens=12)
        assert (blend.first_token_logits - full.first_token_logits).abs().max() < 1e-3
        assert blend.token_ids == full.token_ids


def test_blend_at_ratio_one_answers_like_full_on_the_shared_musique_set(rb, shared_eval):
    for record in json.loads((shared_eval / "musique_s.json").read_text())[:2]:
        full = rb.query(record["question"], contexts=contexts(record, 3), mode="full", max_new_tokens=12)
        blend = rb.query(record["question"], contexts=contexts(record, 3), recompute_ratio=1.0, max_new_tokens=12)
        assert (blend.first_token_logits - full.first_token_logits).abs().max() < 1e-3
        assert blend.text == full.text


def test_blend_at_ratio_zero_is_reuse_beyond_the_full_check_layers(rb):
    record = RECORDS[1]
    blend = rb.prefill(record["question"], contexts=contexts(record), recompute_ratio=0.0, check_layer=2)
    reuse = rb.prefill(record["question"], contexts=contexts(record), mode="reuse")
    chunks = slice(blend.layout.prefix_len, blend.layout.suffix_start)
    for index, (fused, stored) in enumerate(zip(blend.prefill.cache.layers, reuse.prefill.cache.layers)):
        same = bool((fused.values[:, :, chunks] == stored.values[:, :, chunks]).all())
        assert same == (index > 2), f"layer {index}"
    unchecked = rb.prefill(record["question"], contexts=contexts(record), recompute_ratio=0.0, check_layer=0)
    assert (unchecked.prefill.logits - reuse.prefill.logits).abs().max() < 1e-3


def test_fidelity_grows_with_the_recompute_ratio(rb):
    kl = {ratio: [] for ratio in RATIOS}
    for record in RECORDS:
        full = rb.prefill(record["question"], contexts=contexts(record), mode="full").prefill.logits
        for ratio in RATIOS:
            logits = rb.prefill(record["question"], contexts=contexts(record), recompute_ratio=ratio).prefill.logits
            kl[ratio].append(first_token_kl(full, logits))
    means = [statistics.mean(kl[ratio]) for ratio in RATIOS]
    print("mean first-token KL to full by ratio:", dict(zip(RATIOS, means)))
    assert means[-1] < 1e-5
    for lower, higher in zip(means, means[1:]):
        assert higher <= lower * 1.1 + 1e-4  # non-increasing, within noise
