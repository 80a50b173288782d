"""The online path's contract: every mode over the same prompt, blend exact at ratio 1, HKVD picks right.

The stores here keep no exact-path tree (`exact_paths=False`): these tests are of the fusion engine, which a
path holding the whole prompt would bypass; tests/test_paths.py specifies the tree."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import hf_forward

from kvchunks.rope import apply_rope, rotary_cos_sin, rotate_in_place
from ragblend import RagBlend
from ragblend.engine import attention
from ragblend.engine.selection import BlendConfig, auto_share, deviation, select_top

PASSAGES = [
    "The lighthouse of Varn was built in 1821 by the engineer Oda Pell. It stands on a granite cliff.",
    "Oda Pell later moved to the city of Kessel, where she designed three bridges over the river Am.",
    "Kessel is famous for its glass markets. Its mayor in 1850 was Tomas Reh.",
]
QUESTION = "Which city did the builder of the Varn lighthouse move to?"
KINDS = ["llama", "llama_mha", "qwen2", "qwen3", "mistral", "llama3_rope", "gemma3"]


@pytest.fixture(scope="module")
def rb_factory(tiny_model_factory, embedder, tmp_path_factory):
    made: dict[str, RagBlend] = {}

    def make(kind: str = "llama") -> RagBlend:
        if kind not in made:
            made[kind] = RagBlend(tmp_path_factory.mktemp(f"store-{kind}"), model=tiny_model_factory(kind), embedder=embedder,
                                  exact_paths=False)
        return made[kind]

    return make


@pytest.fixture(scope="module")
def rb(rb_factory) -> RagBlend:
    return rb_factory("llama")


def first_logits(rb: RagBlend, contexts, mode: str, ratio: float = 0.15) -> torch.Tensor:
    return rb.prefill(QUESTION, contexts=contexts, mode=mode, recompute_ratio=ratio).prefill.logits


@pytest.mark.parametrize("kind", KINDS)
def test_full_prefill_is_hugging_faces_forward_logits_and_every_layers_kv(rb_factory, kind):
    """Our layers against HF's own: the prompt is longer than gemma3's window, so its sliding layers count."""
    rb = rb_factory(kind)
    prepared = rb.prefill(QUESTION, contexts=PASSAGES, mode="full")
    logits, cache = hf_forward(rb.model, list(prepared.layout.token_ids))
    torch.testing.assert_close(prepared.prefill.logits, logits[-1], atol=1e-4, rtol=1e-4)
    for ours, theirs in zip(prepared.prefill.cache.layers, cache.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_answer_is_hugging_faces_generate_token_for_token(rb_factory, kind):
    rb = rb_factory(kind)
    answer = rb.query(QUESTION, contexts=PASSAGES, mode="full", max_new_tokens=8)
    ids = torch.tensor([rb.prefill(QUESTION, contexts=PASSAGES, mode="full").layout.token_ids])
    with torch.inference_mode():
        generated = rb.model.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = generated[0, ids.shape[1]:].tolist()
    assert answer.token_ids == expected[:len(answer.token_ids)]
    assert len(answer.token_ids) == 8 or expected[len(answer.token_ids)] == rb.model.tokenizer.eos_token_id


@pytest.mark.parametrize("kind", KINDS)
def test_blend_at_full_ratio_reproduces_full_prefill(rb_factory, kind):
    rb = rb_factory(kind)
    full = rb.query(QUESTION, contexts=PASSAGES, mode="full", max_new_tokens=6)
    blend = rb.query(QUESTION, contexts=PASSAGES, mode="blend", recompute_ratio=1.0, max_new_tokens=6)
    assert (blend.first_token_logits - full.first_token_logits).abs().max() < 1e-4
    assert blend.token_ids == full.token_ids


def test_llama3_scaled_rope_config_is_really_scaled(tiny_model_factory):
    params = tiny_model_factory("llama3_rope").config.rope_parameters
    assert params["rope_type"] == "llama3"


@pytest.mark.parametrize("kind", KINDS)
def test_reuse_of_a_single_chunk_equals_full_prefill(rb_factory, kind):
    rb = rb_factory(kind)
    reuse = rb.query(QUESTION, contexts=PASSAGES[:1], mode="reuse", max_new_tokens=6)
    full = rb.query(QUESTION, contexts=PASSAGES[:1], mode="full", max_new_tokens=6)
    assert (reuse.first_token_logits - full.first_token_logits).abs().max() < 1e-3  # fp16 storage
    assert reuse.token_ids == full.token_ids


def test_prefix_mode_reuses_only_prefix_and_first_chunk(rb):
    prepared = rb.prefill(QUESTION, contexts=PASSAGES, mode="prefix")
    assert prepared.prefill.recomputed_tokens == len(prepared.layout) - prepared.layout.spans[1].end
    full = first_logits(rb, PASSAGES, "full")
    assert (prepared.prefill.logits - full).abs().max() < 1e-3  # the first chunk's stored KV is exact


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["prefix", "blend"])
def test_computing_rows_in_small_blocks_changes_nothing(rb_factory, kind, mode, monkeypatch):
    """Long prompts are computed in row blocks; each block must still see every earlier row (in its window)."""
    rb = rb_factory(kind)
    whole = first_logits(rb, PASSAGES, mode, ratio=0.5)
    monkeypatch.setattr(attention, "ROW_BLOCK", 3)
    assert (first_logits(rb, PASSAGES, mode, ratio=0.5) - whole).abs().max() < 1e-4


def test_every_cached_key_carries_rope_of_its_prompt_position(rb):
    """Layer 0's KV depends only on the token, so the fused cache must equal a full forward's there."""
    prepared = rb.prefill(QUESTION, contexts=list(reversed(PASSAGES)), mode="reuse")
    ids = torch.tensor([prepared.layout.token_ids])
    with torch.inference_mode():
        reference = rb.model.model(ids, use_cache=True).cache
    fused = prepared.prefill.cache.layers[0].keys
    assert torch.allclose(fused, reference.layers[0].keys, atol=2e-3, rtol=1e-3)
    # and a stored pre-RoPE key rotated to another position would not match
    span = prepared.layout.chunk_spans[1]
    stored = rb.store.kv.load(span.key).keys[0].float()
    cos, sin = rotary_cos_sin(rb.model.decoder.rotary_emb, torch.arange(span.length) + span.start + 5, torch.float32)
    shifted = apply_rope(stored, cos, sin)
    assert not torch.allclose(shifted, fused[0, :, span.start : span.end], atol=1e-2)


def test_hkvd_picks_exactly_the_tokens_with_the_largest_value_deviation():
    stored = torch.zeros(1, 2, 10, 4)
    fresh = stored.clone()
    for position, size in {3: 5.0, 7: 9.0, 8: 1.0, 1: 0.5}.items():
        fresh[0, :, position] = size
    scores = deviation(fresh, stored)
    assert scores.argsort(descending=True)[:3].tolist() == [7, 3, 8]
    candidates = torch.arange(2, 10)  # positions 0-1 are the prefix, never candidates
    one_group, sizes = torch.zeros(8, dtype=torch.long), {0: 8}
    assert select_top(scores[candidates], candidates, one_group, sizes, 0.25).tolist() == [3, 7]
    assert select_top(scores[candidates], candidates, one_group, sizes, 0.0).tolist() == []
    assert select_top(scores[candidates], candidates, one_group, sizes, 1.0).tolist() == list(range(2, 10))


def test_blend_recomputes_the_ratio_of_chunk_tokens_plus_every_suffix_token(rb):
    for ratio in (0.0, 0.15, 0.5):
        prepared = rb.prefill(QUESTION, contexts=PASSAGES, mode="blend", recompute_ratio=ratio)
        layout = prepared.layout
        chunk_tokens = layout.suffix_start - layout.prefix_len
        suffix_tokens = len(layout) - layout.suffix_start
        assert prepared.prefill.recomputed_tokens == math.ceil(ratio * chunk_tokens - 1e-9) + suffix_tokens


def test_blend_with_zero_ratio_and_no_full_layer_equals_reuse(rb):
    blend = rb.prefill(QUESTION, contexts=PASSAGES, mode="blend", recompute_ratio=0.0, check_layer=0).prefill.logits
    reuse = first_logits(rb, PASSAGES, "reuse")
    assert (blend - reuse).abs().max() < 1e-3  # differs only by layer 0's fp16 rounding


def test_blend_is_closer_to_full_than_reuse(rb):
    full = first_logits(rb, PASSAGES, "full")
    blend = first_logits(rb, PASSAGES, "blend", 0.5)
    reuse = first_logits(rb, PASSAGES, "reuse")
    assert (blend - full).abs().max() < (reuse - full).abs().max()


def test_streaming_yields_the_same_text_as_a_plain_query(rb):
    plain = rb.query(QUESTION, contexts=PASSAGES, max_new_tokens=12)
    stream = rb.query(QUESTION, contexts=PASSAGES, max_new_tokens=12, stream=True)
    pieces = list(stream)
    assert "".join(pieces).strip() == plain.text
    assert stream.answer.text == plain.text


@pytest.mark.integration
def test_stop_string_ends_the_answer_before_it_also_when_streamed(smollm, embedder, tmp_path):
    rb = RagBlend(tmp_path, model=smollm, embedder=embedder)
    plain = rb.query(QUESTION, contexts=PASSAGES, max_new_tokens=12)
    assert len(plain.text) > 6, plain.text
    stop = plain.text[3:6]
    cut = rb.query(QUESTION, contexts=PASSAGES, max_new_tokens=12, stop=[stop])
    streamed = "".join(rb.query(QUESTION, contexts=PASSAGES, max_new_tokens=12, stop=[stop], stream=True))
    assert cut.text == plain.text[:3].strip()
    assert streamed.strip() == cut.text


@pytest.mark.parametrize("contexts", [
    [PASSAGES[0], PASSAGES[0]],  # the same chunk twice
    list(reversed(PASSAGES)),  # chunks in a new order
    ["Yes."],  # a very short chunk
], ids=["same-chunk-twice", "new-order", "short-chunk"])
def test_edge_cases_still_reproduce_full_prefill_at_full_ratio(rb, contexts):
    full = first_logits(rb, contexts, "full")
    blend = first_logits(rb, contexts, "blend", 1.0)
    assert (blend - full).abs().max() < 1e-4


def test_one_token_chunk(rb):
    one = rb.template.tokenizer.decode(rb.template.chunk_ids("Yes.")[:1])
    prepared = rb.prefill(QUESTION, contexts=[one, PASSAGES[1]], mode="blend", recompute_ratio=1.0)
    full = first_logits(rb, [one, PASSAGES[1]], "full")
    assert (prepared.prefill.logits - full).abs().max() < 1e-4


def test_misses_are_stored_and_the_same_query_twice_gives_the_same_answer(rb):
    fresh = ["A passage never seen before about the moon Iru and its silver lakes."]
    first = rb.query(QUESTION, contexts=fresh, max_new_tokens=6)
    with rb.store.env.begin() as txn:
        assert rb.store.kv.contains(txn, first.chunks[0].chunk_id)  # cached on the miss
    second = rb.query(QUESTION, contexts=fresh, max_new_tokens=6)
    assert second.token_ids == first.token_ids
    assert torch.equal(second.first_token_logits, first.first_token_logits)


def test_retrieved_chunks_are_fed_with_their_stored_token_ids(rb):
    rb.add_documents([{"id": "varn", "text": "\n\n".join(PASSAGES)}])
    prepared = rb.prefill(QUESTION, top_k=2, mode="reuse")
    hits = rb.search(QUESTION, top_k=2)
    expected = list(rb.template.prefix_ids)
    for hit in hits:
        expected += hit.token_ids
    expected += rb.template.suffix_ids(QUESTION)
    assert list(prepared.layout.token_ids) == expected
    assert [c.chunk_id for c in prepared.chunks] == [h.chunk_id for h in hits]


def test_answer_reports_mode_timings_and_chunks(rb):
    answer = rb.query(QUESTION, contexts=PASSAGES, mode="blend", max_new_tokens=4)
    assert answer.mode == "blend"
    assert answer.ttft_s > 0 and answer.ttft_s == answer.timings["ttft_s"]
    for key in ("retrieve_s", "load_s", "load_exposed_s", "fuse_s", "check_s", "partial_s", "decode_s", "total_s"):
        assert key in answer.timings
    assert len(answer.chunks) == 3 and answer.prompt_tokens > answer.recomputed_tokens > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="magic"), "unknown mode"),
    (dict(top_k=-1), "top_k"),
    (dict(recompute_ratio=1.5), "recompute_ratio"),
    (dict(recompute_ratio=-0.1), "recompute_ratio"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(contexts=[]), "contexts"),
    (dict(contexts=[""]), "non-empty"),
])
def test_bad_query_arguments_get_clear_errors(rb, kwargs, message):
    kwargs.setdefault("contexts", PASSAGES)
    with pytest.raises(ValueError, match=message):
        rb.query(QUESTION, **kwargs)


def test_empty_question_is_rejected(rb):
    with pytest.raises(ValueError, match="question"):
        rb.query("   ", contexts=PASSAGES)


def test_context_longer_than_the_window_is_rejected(rb):
    long_passages = ["word " * 200] * (rb.model.max_positions // 150)
    with pytest.raises(ValueError, match="window"):
        rb.query(QUESTION, contexts=long_passages, max_new_tokens=4)


# ---- token selection options (BlendConfig) -----------------------------------------------------

SELECTION_VARIANTS = {
    "key": BlendConfig(signal="key"),
    "kv": BlendConfig(signal="kv"),
    "attention": BlendConfig(signal="attention"),
    "value_attention": BlendConfig(signal="value_attention"),
    "random": BlendConfig(signal="random"),
    "per_chunk": BlendConfig(budget="per_chunk"),
    "chunk_starts": BlendConfig(chunk_start_tokens=4),
    "gradual": BlendConfig(gradual=2.0),
    "check_layer_2": BlendConfig(check_layer=2),
    "query_chunks": BlendConfig(query_chunks=1.0),
}


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("name", SELECTION_VARIANTS)
def test_every_selection_variant_is_exact_at_full_ratio(rb_factory, kind, name):
    rb = rb_factory(kind)
    full = first_logits(rb, PASSAGES, "full")
    config = replace(SELECTION_VARIANTS[name], recompute_ratio=1.0)
    blend = rb.prefill(QUESTION, contexts=PASSAGES, mode="blend", blend=config).prefill.logits
    assert (blend - full).abs().max() < 1e-4


@pytest.mark.parametrize("name", SELECTION_VARIANTS)
def test_every_selection_variant_recomputes_its_budget(rb, name):
    config = replace(SELECTION_VARIANTS[name], recompute_ratio=0.3)
    prepared = rb.prefill(QUESTION, contexts=PASSAGES, mode="blend", blend=config)
    layout = prepared.layout
    suffix = len(layout) - layout.suffix_start
    if config.budget == "per_chunk":
        expected = sum(math.ceil(0.3 * s.length - 1e-9) for s in layout.chunk_spans)
    else:
        expected = math.ceil(0.3 * (layout.suffix_start - layout.prefix_len) - 1e-9)
    assert prepared.prefill.recomputed_tokens == expected + suffix
    assert prepared.prefill.timings["recompute_ratio"] == 0.3


def recomputed_positions(rb, config: BlendConfig) -> tuple[set[int], object]:
    """Chunk positions whose final-layer KV differs from the stored KV (i.e. were recomputed)."""
    prepared = rb.prefill(QUESTION, contexts=PASSAGES, mode="blend", blend=config)
    reuse = rb.prefill(QUESTION, contexts=PASSAGES, mode="reuse").prefill.cache
    layout = prepared.layout
    fused = prepared.prefill.cache.layers[-1].values[0]
    stored = reuse.layers[-1].values[0]
    changed = (fused - stored).abs().amax(dim=(0, 2)) > 0
    return {p for p in range(layout.prefix_len, layout.suffix_start) if changed[p]}, layout


def test_chunk_start_tokens_are_always_recomputed(rb):
    chosen, layout = recomputed_positions(rb, BlendConfig(recompute_ratio=0.2, chunk_start_tokens=3))
    for span in layout.chunk_spans[1:]:
        assert set(range(span.start, span.start + 3)) <= chosen


def test_per_chunk_budget_gives_every_chunk_its_share(rb):
    chosen, layout = recomputed_positions(rb, BlendConfig(recompute_ratio=0.3, budget="per_chunk"))
    for span in layout.chunk_spans:
        inside = [p for p in chosen if span.start <= p < span.end]
        assert len(inside) == math.ceil(0.3 * span.length - 1e-9)


def test_query_chunks_recompute_whole_chunks_within_the_budget(rb):
    chosen, layout = recomputed_positions(rb, BlendConfig(recompute_ratio=0.6, query_chunks=1.0))
    whole = [s for s in layout.chunk_spans if set(range(s.start, s.end)) <= chosen]
    assert whole, "at least one chunk fits in 60% of the chunk tokens and is recomputed whole"
    assert len(chosen) == math.ceil(0.6 * (layout.suffix_start - layout.prefix_len) - 1e-9)


def test_random_control_picks_other_tokens_than_the_deviation_signal(rb):
    by_value, _ = recomputed_positions(rb, BlendConfig(recompute_ratio=0.2))
    by_chance, _ = recomputed_positions(rb, BlendConfig(recompute_ratio=0.2, signal="random"))
    assert by_value != by_chance


def test_auto_ratio_stays_within_its_bounds_and_is_reported(rb):
    for target, bound in ((1e-6, 0.1), (1.0, 0.4)):
        config = BlendConfig(recompute_ratio="auto", auto_target=target, auto_min=0.1, auto_max=0.4)
        prepared = rb.prefill(QUESTION, contexts=PASSAGES, mode="blend", blend=config)
        assert prepared.prefill.timings["recompute_ratio"] == pytest.approx(bound, abs=0.02)
    answer = rb.query(QUESTION, contexts=PASSAGES, recompute_ratio="auto", max_new_tokens=2)
    assert 0.0 < answer.timings["recompute_ratio"] <= BlendConfig().auto_max


def test_auto_share_covers_the_target_share_of_the_scores():
    scores = torch.tensor([8.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    config = BlendConfig(recompute_ratio="auto", auto_target=0.8, auto_min=0.0, auto_max=1.0)
    assert auto_share(scores, config) == pytest.approx(0.1)  # the 8 alone holds 80%
    assert auto_share(scores, replace(config, auto_target=0.9)) == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(recompute_ratio=1.5), "recompute_ratio"),
    (dict(recompute_ratio="most"), "recompute_ratio"),
    (dict(signal="vibes"), "signal"),
    (dict(budget="half"), "budget"),
    (dict(gradual=0.5), "gradual"),
    (dict(recompute_ratio="auto", signal="random"), "auto"),
    (dict(check_layer=-1), "check_layer"),
    (dict(query_chunks=1.5), "query_chunks"),
    (dict(query_chunks=0.5, budget="per_chunk"), "query_chunks"),
])
def test_bad_blend_settings_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlendConfig(**kwargs)


def test_instance_default_blend_config_applies_and_per_query_ratio_overrides_it(tiny_model, embedder, tmp_path):
    rb = RagBlend(tmp_path, model=tiny_model, embedder=embedder, blend=BlendConfig(recompute_ratio=0.5))
    default = rb.prefill(QUESTION, contexts=PASSAGES, mode="blend").prefill.timings["recompute_ratio"]
    override = rb.prefill(QUESTION, contexts=PASSAGES, mode="blend", recompute_ratio=0.1).prefill.timings
    assert default == 0.5 and override["recompute_ratio"] == 0.1


def test_in_place_rotation_equals_apply_rope():
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 7, 8)
    cos, sin = torch.randn(1, 7, 8), torch.randn(1, 7, 8)
    expected = apply_rope(keys, cos, sin)
    rotate_in_place(keys, cos, sin)
    assert torch.allclose(keys, expected, atol=1e-6)
