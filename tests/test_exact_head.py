"""The exact greedy head: the vocabulary scored on int8 weights, the candidates within the error bound
recomputed in float32, so greedy decoding with int8 or int4 decode weights picks the float32 head's
token every time."""
from __future__ import annotations

import pytest
import torch

from ragblend.engine.decode_step import fused_linear
from ragblend.engine.exact_head import ExactGreedyHead
from ragblend.engine.model import with_decode_weights
from test_batched_decode import prompt

KINDS = ["int8", "int4"]


def float32_head(lm_head: torch.nn.Linear):
    """The float32 decode step's head (oneDNN-packed, two rows at least): the reference."""
    head = fused_linear([lm_head])
    return lambda h: head(h if len(h) > 1 else h.expand(2, -1))[:len(h)]


def linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight
    return layer


def test_the_chosen_logit_is_the_float32_heads_bit_for_bit_and_few_are_recomputed():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(49152, 64, generator=generator) * 0.1
    head, reference = ExactGreedyHead(weight, None), float32_head(linear(weight))
    for rows in (1, 2, 3, 4) * 5:
        hidden = torch.randn(rows, 64, generator=generator) * 3
        got, want = head(hidden), reference(hidden)
        assert torch.equal(got.argmax(dim=1), want.argmax(dim=1))
        assert torch.equal(got.amax(dim=1), want.amax(dim=1))
    assert head.recomputed < 0.05 * head.rows * 49152  # the low-precision scores rule out most of the vocabulary


def test_ties_and_near_ties_go_to_the_float32_heads_token():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(4096, 64, generator=generator) * 0.1
    weight[700] = weight[300]  # an exact tie: the first index wins
    weight[900] = weight[300] * (1 + 1e-6)  # apart by less than any quantization step
    weight[1200] = weight[300] * (1 - 1e-6)
    head, reference = ExactGreedyHead(weight, None), float32_head(linear(weight))
    for sign in (1, -1):
        hidden = sign * weight[300][None].repeat(3, 1) * 40 + torch.randn(3, 64, generator=generator) * 1e-3
        assert torch.equal(head(hidden).argmax(dim=1), reference(hidden).argmax(dim=1))


def greedy_matches(model, kind: str, lengths: list[int], tokens: int) -> float:
    """Decode requests of `lengths` together greedily with the exact head, checking every step's tokens
    against the float32 head on the same hidden states; the share of logits recomputed."""
    step = with_decode_weights(model, kind).decode_step
    reference = float32_head(model.model.lm_head)
    caches, picked = [], []
    for seed, length in enumerate(lengths):
        cache, logits = prompt(model, length, seed)
        caches.append(cache)
        picked.append(int(logits.argmax()))
    for i in range(tokens):
        hidden = step.hidden(picked, [length + i for length in lengths], caches)
        got = step.lm_head(hidden).argmax(dim=1)
        assert torch.equal(got, reference(hidden).argmax(dim=1)), f"step {i}"
        picked = got.tolist()
    return step.lm_head.recomputed / (step.lm_head.rows * model.config.vocab_size)


@pytest.mark.parametrize("family, kind", [("llama", "int8"), ("llama", "int4"), ("qwen2", "int4")])
def test_greedy_generation_picks_the_float32_heads_tokens_over_long_answers(tiny_model_factory, family, kind):
    greedy_matches(tiny_model_factory(family), kind, [40, 75], tokens=100)


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_the_real_model_picks_the_float32_heads_tokens(smollm, kind):
    recomputed = greedy_matches(smollm, kind, [300, 520], tokens=96)
    assert recomputed < 0.05
