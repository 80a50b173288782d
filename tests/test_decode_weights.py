"""int8 decode weights: a faster decode that leaves prefill, stored KV and the first token untouched."""
from __future__ import annotations

import pytest
import torch

from ragblend import RagBlend

PASSAGES = ["The lighthouse of Varn was built in 1821 by the engineer Oda Pell.",
            "Oda Pell later designed three bridges over the river Am in Kessel."]


@pytest.fixture
def pair(tiny_model_factory, embedder, tmp_path):
    model = tiny_model_factory("llama")
    with RagBlend(tmp_path / "store", model=model, embedder=embedder) as exact, \
            RagBlend(tmp_path / "store", model=model, embedder=embedder, decode_weights="int8") as fast:
        yield exact, fast


def test_int8_decode_keeps_the_prefill_and_quantizes_only_decoding(pair):
    exact, fast = pair
    assert fast.model.fingerprint == exact.model.fingerprint  # the store's KV is shared as it is
    quantized = fast.model.decode_model.model.layers[0].self_attn.q_proj
    assert isinstance(quantized, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(exact.model.model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # the original is untouched
    for mode in ("full", "blend"):
        a = exact.query("Who built the lighthouse?", contexts=PASSAGES, mode=mode, max_new_tokens=6)
        b = fast.query("Who built the lighthouse?", contexts=PASSAGES, mode=mode, max_new_tokens=6)
        assert torch.equal(a.first_token_logits, b.first_token_logits) and a.token_ids[0] == b.token_ids[0]


def test_int8_decode_streams_what_it_returns(pair):
    _, fast = pair
    stream = fast.query("Who built the lighthouse?", contexts=PASSAGES, max_new_tokens=8, stream=True)
    text = "".join(stream)
    assert text.strip() == stream.answer.text
    assert fast.query("Who built the lighthouse?", contexts=PASSAGES, max_new_tokens=8).text == stream.answer.text


def test_unknown_decode_weights_are_refused(tiny_model_factory, embedder, tmp_path):
    with pytest.raises(ValueError, match="decode_weights"):
        RagBlend(tmp_path / "store", model=tiny_model_factory("llama"), embedder=embedder, decode_weights="int4")
