"""A long cache's decode attention is split along the keys so every CPU thread has work; the split
changes nothing but the time."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_forward, save_model_dir
from transformers import AutoConfig, AutoModelForCausalLM

from ragblend.engine.decode_attention import MIN_PART_KEYS, decode_attention
from ragblend.engine.decode_cache import decode_cache
from ragblend.engine.model import load_model


@pytest.fixture
def two_threads():
    """3 kv heads on 2 threads: the case the split exists for."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def cache_layer(length: int, heads: int = 3, dim: int = 16, seed: int = 0):
    """One layer of a decode cache holding `length` random keys/values (the buffer's spare rows unused)."""
    generator = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(1, heads, length, dim, generator=generator) for _ in range(2))
    return decode_cache([(keys, values)]).layers[0]


@pytest.mark.parametrize("length", [2 * MIN_PART_KEYS, 2 * MIN_PART_KEYS + 1, 5 * MIN_PART_KEYS + 3])
def test_split_attention_equals_attention_over_the_whole_cache(two_threads, length):
    layer = cache_layer(length)
    query = torch.randn(1, 3, 2, 16)
    expected = F.scaled_dot_product_attention(query, layer.keys.contiguous(), layer.values.contiguous(), scale=0.25)
    torch.testing.assert_close(decode_attention(query, layer.keys, layer.values, 0.25), expected, atol=1e-6, rtol=1e-5)


def test_a_cache_with_no_spare_rows_left_still_attends_right(two_threads):
    keys, values = (torch.randn(1, 3, 2 * MIN_PART_KEYS + 1, 16) for _ in range(2))  # plain tensors: no buffer
    query = torch.randn(1, 3, 2, 16)
    expected = F.scaled_dot_product_attention(query, keys, values, scale=0.25)
    torch.testing.assert_close(decode_attention(query, keys, values, 0.25), expected, atol=1e-6, rtol=1e-5)


def test_a_sliding_windows_view_of_a_long_cache_attends_right(two_threads):
    """A sliding layer attends to the last `window` keys: a view that starts inside the buffer."""
    layer = cache_layer(5 * MIN_PART_KEYS + 3)
    window = 2 * MIN_PART_KEYS + 1
    keys, values = layer.keys[:, :, -window:], layer.values[:, :, -window:]
    query = torch.randn(1, 3, 2, 16)
    expected = F.scaled_dot_product_attention(query, keys.contiguous(), values.contiguous(), scale=0.25)
    torch.testing.assert_close(decode_attention(query, keys, values, 0.25), expected, atol=1e-6, rtol=1e-5)


def test_a_step_over_a_long_cache_is_hugging_faces_forward(two_threads, tmp_path, smollm_dir):
    config = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=96, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                                  max_position_embeddings=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = load_model(save_model_dir(AutoModelForCausalLM.from_config(config), tmp_path / "m", smollm_dir))
    prompt = torch.randint(100, 40000, (2 * MIN_PART_KEYS + 40,), generator=torch.Generator().manual_seed(1)).tolist()
    _, reference = hf_forward(model, prompt)
    ours = decode_cache([(layer.keys.clone(), layer.values.clone()) for layer in reference.layers])
    for position in range(len(prompt), len(prompt) + 3):
        expected, _ = hf_forward(model, [500 + position], reference, position)
        got = model.decode_step([500 + position], [position], [ours])[0]
        torch.testing.assert_close(got, expected[-1], atol=1e-4, rtol=1e-4)
