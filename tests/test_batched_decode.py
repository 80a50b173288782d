"""Batched decode: requests decoded together get exactly the tokens and text pieces they get alone,
whatever joins or leaves the batch, and a step is the model's own forward."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import hf_forward
from transformers import DynamicCache

from ragblend import RagBlend
from ragblend.engine.decode_cache import decode_cache
from ragblend.engine.generate import SamplingConfig, Sequence, decode, feed, step
from ragblend.engine.model import DECODE_WEIGHTS, with_decode_weights


def prompt(model, length: int, seed: int) -> tuple[DynamicCache, torch.Tensor]:
    """A random prompt's decode cache and next-token logits, as a prefill hands them to decode."""
    ids = torch.randint(100, 40000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    cache = DynamicCache()
    logits = feed(model, cache, ids, 0)
    return decode_cache([(layer.keys, layer.values) for layer in cache.layers]), logits


def alone(model, length: int, seed: int, sampling: SamplingConfig) -> tuple[list[int], list[str]]:
    cache, logits = prompt(model, length, seed)
    generated: list[int] = []
    return generated, list(decode(model, cache, logits, length, sampling, generated))


def together(model, requests: list[tuple[int, int, SamplingConfig, int]]) -> list[tuple[list[int], list[str]]]:
    """(prompt length, seed, sampling, step it joins at) per request: one batched step at a time."""
    sequences: dict[int, Sequence] = {}
    pieces: list[list[str]] = [[] for _ in requests]
    active: list[int] = []
    for tick in range(200):
        for i, (length, seed, sampling, joins) in enumerate(requests):
            if tick == joins:
                cache, logits = prompt(model, length, seed)
                sequences[i] = Sequence(model, cache, logits, length, sampling, [])
                active.append(i)
        for i in active:
            pieces[i] += sequences[i].advance()
        active = [i for i in active if sequences[i].token is not None]
        if active:
            step(model, [sequences[i] for i in active])
    return [(sequences[i].generated, pieces[i]) for i in range(len(requests))]


def stop_inside(model, length: int, seed: int) -> str:
    """A stop string that the request's answer reaches after a few tokens."""
    tokens, _ = alone(model, length, seed, SamplingConfig(max_new_tokens=12))
    text = model.tokenizer.decode(tokens, skip_special_tokens=True)
    return text[len(text) // 2:len(text) // 2 + 3]


@pytest.mark.parametrize("kind", ["llama", "llama_mha", "qwen2", "qwen3", "mistral", "llama3_rope", "gemma3"])
def test_a_step_is_hugging_faces_forward(tiny_model_factory, kind):
    """37 prompt tokens: past gemma3's window, so its sliding layers attend to the window's keys only."""
    model = tiny_model_factory(kind)
    ours, ours_logits = prompt(model, 37, seed=1)
    ids = torch.randint(100, 40000, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    logits, reference = hf_forward(model, ids)
    torch.testing.assert_close(ours_logits, logits[-1], atol=1e-4, rtol=1e-4)
    for position in range(37, 41):
        expected, _ = hf_forward(model, [500 + position], reference, position)
        got = model.decode_step([500 + position], [position], [ours])[0]
        torch.testing.assert_close(got, expected[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.layers[-1].keys, reference.layers[-1].keys, atol=1e-5, rtol=1e-5)
    assert ours.get_seq_length() == reference.get_seq_length() == 41


@pytest.mark.parametrize("kind, weights", [("llama", w) for w in DECODE_WEIGHTS] + [("qwen3", "float32"),
                                                                                   ("gemma3", "float32")])
def test_requests_decoded_together_get_the_tokens_and_pieces_they_get_alone(tiny_model_factory, kind, weights):
    model = with_decode_weights(tiny_model_factory(kind), weights)
    requests = [  # prompt lengths differ; requests join late and leave at their budget or a stop string
        (40, 0, SamplingConfig(max_new_tokens=20), 0),
        (75, 1, SamplingConfig(max_new_tokens=6), 0),
        (12, 2, SamplingConfig(max_new_tokens=16, temperature=0.8, seed=3), 2),
        (58, 3, SamplingConfig(max_new_tokens=30, stop=(stop_inside(model, 58, 3),)), 5),
        (90, 4, SamplingConfig(max_new_tokens=1), 7),
    ]
    expected = [alone(model, length, seed, sampling) for length, seed, sampling, _ in requests]
    assert together(model, requests) == expected
    assert len(expected[3][0]) < 12  # the stop string ended it early


@pytest.mark.parametrize("weights", DECODE_WEIGHTS)
def test_concurrent_queries_share_steps_and_answer_as_they_do_one_by_one(tiny_model_factory, embedder, tmp_path,
                                                                          weights):
    passages = ["The lighthouse of Varn was built in 1821 by the engineer Oda Pell.",
                "Oda Pell later designed three bridges over the river Am in Kessel."]
    questions = ["Who built the lighthouse?", "What did Oda Pell design?", "Where is Kessel?", "When was it built?"]
    with RagBlend(tmp_path / "store", model=tiny_model_factory("llama"), embedder=embedder,
                  decode_weights=weights) as rb:
        ask = lambda q: rb.query(q, contexts=passages, mode="blend", max_new_tokens=24)  # noqa: E731
        one_by_one = [ask(q).token_ids for q in questions]
        before = rb.engine_stats().steps, rb.engine_stats().tokens
        with ThreadPoolExecutor(len(questions)) as pool:
            concurrent = [a.token_ids for a in pool.map(ask, questions)]
        steps, tokens = rb.engine_stats().steps - before[0], rb.engine_stats().tokens - before[1]
    assert concurrent == one_by_one
    assert tokens > steps  # some steps fed several requests


@pytest.mark.integration
def test_the_real_model_decodes_the_same_tokens_alone_and_batched(smollm):
    requests = [(300, 0, SamplingConfig(max_new_tokens=16), 0), (520, 1, SamplingConfig(max_new_tokens=16), 0),
                (140, 2, SamplingConfig(max_new_tokens=10), 3)]
    expected = [alone(smollm, length, seed, sampling) for length, seed, sampling, _ in requests]
    assert together(smollm, requests) == expected
