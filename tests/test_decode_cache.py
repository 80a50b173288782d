"""The decode cache writes each new token in place and answers exactly as transformers' own cache."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from ragblend.engine.decode_cache import SPARE_TOKENS, decode_cache, with_spare_rows
from ragblend.engine.generate import feed


def test_decoding_past_the_spare_room_matches_the_models_own_cache(tiny_model):
    prompt = list(range(100, 140))
    reference = DynamicCache()
    feed(tiny_model, reference, prompt, 0)
    growing = decode_cache([(layer.keys.clone(), layer.values.clone()) for layer in reference.layers])
    for step in range(SPARE_TOKENS + 20):  # crosses one regrowth of the buffers
        token, position = [200 + step % 50], len(prompt) + step
        expected, got = feed(tiny_model, reference, token, position), feed(tiny_model, growing, token, position)
        assert torch.equal(expected, got), step
    assert growing.get_seq_length() == reference.get_seq_length() == len(prompt) + SPARE_TOKENS + 20
    assert torch.equal(growing.layers[0].keys, reference.layers[0].keys)


def test_a_prefill_buffer_with_spare_rows_is_decoded_into_without_a_copy(tiny_model):
    prompt = list(range(100, 130))
    reference = DynamicCache()
    feed(tiny_model, reference, prompt, 0)
    handed = []
    for layer in reference.layers:
        keys = with_spare_rows(tuple(layer.keys.shape), layer.keys.dtype, layer.keys.device)
        values = with_spare_rows(tuple(layer.values.shape), layer.values.dtype, layer.values.device)
        keys.copy_(layer.keys)
        values.copy_(layer.values)
        handed.append((keys, values))
    growing = decode_cache(handed)
    assert growing.layers[0].keys.data_ptr() == handed[0][0].data_ptr()  # adopted, not copied
    for step in range(8):
        token, position = [150 + step], len(prompt) + step
        assert torch.equal(feed(tiny_model, reference, token, position), feed(tiny_model, growing, token, position))
    assert growing.layers[0].keys.data_ptr() == handed[0][0].data_ptr()  # grew into its spare rows
