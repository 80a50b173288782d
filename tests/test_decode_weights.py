"""int8 / int4 decode weights: torch's weight-only kernels, packed within stated error bounds, a faster
decode that leaves prefill, stored KV and the first token untouched."""
from __future__ import annotations

import pytest
import torch

from ragblend import RagBlend
from ragblend.cli import build_parser
from ragblend.engine.weight_only import GROUP_SIZE, OUTPUT_ERROR, QuantizedLinear, dequantized, quantize

PASSAGES = ["The lighthouse of Varn was built in 1821 by the engineer Oda Pell.",
            "Oda Pell later designed three bridges over the river Am in Kessel."]
SHAPES = [(960, 576), (576, 1536), (3072, 576), (128, 64)]  # SmolLM2's fused projections, a tiny model's


def weight(out: int, inputs: int, seed: int) -> torch.Tensor:
    """Random weights with some outlier channels and a group off zero, as trained layers have."""
    w = torch.randn(out, inputs, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[::7] *= 8
    w[3, :GROUP_SIZE] += 0.5
    return w


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_weights_round_trip_within_half_a_step_of_their_channel(shape):
    w = weight(*shape, seed=0)
    step = w.abs().amax(dim=1, keepdim=True) / 127 * (1 + 2 ** -7)  # the scale, rounded up to bfloat16
    assert ((w - dequantized(w, "int8")).abs() <= step / 2).all()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int4_weights_round_trip_within_half_a_step_of_their_group(shape):
    w = weight(*shape, seed=1)
    groups = w.reshape(w.shape[0], -1, GROUP_SIZE)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low) / 15 * (1 + 2 ** -7)
    zero = (low + 8 * step).abs()  # stored in bfloat16: it may shift the grid by 2**-9 of itself
    error = (groups - dequantized(w, "int4").reshape(groups.shape)).abs()
    assert (error <= step / 2 + 2 ** -8 * zero + 1e-7).all()


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_a_kernel_multiplies_by_the_dequantized_weights_within_its_output_rounding(shape, kind):
    w = weight(*shape, seed=2)
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(3))
    got = quantize(w, kind)(x).double()
    exact = x.bfloat16().double() @ dequantized(w, kind).double().T
    slack = 2 ** -20 * x.norm(dim=1, keepdim=True).double() * w.norm(dim=1).double()  # float32 sums
    assert ((got - exact).abs() <= OUTPUT_ERROR * got.abs() + slack).all()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_rows_result_does_not_depend_on_the_other_rows(kind):
    layer = quantize(weight(960, 576, seed=4), kind, bias=torch.randn(960))
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(5))
    alone = torch.cat([layer(row) for row in x.split(1)])
    for rows in range(1, 9):
        assert torch.equal(layer(x[:rows]), alone[:rows])


def test_layers_int4_cannot_pack_are_refused():
    with pytest.raises(ValueError, match="multiple of"):
        quantize(torch.randn(40, 64), "int4")


@pytest.fixture(params=["int8", "int4"])
def pair(request, tiny_model_factory, embedder, tmp_path):
    model = tiny_model_factory("llama")
    with RagBlend(tmp_path / "store", model=model, embedder=embedder) as exact, \
            RagBlend(tmp_path / "store", model=model, embedder=embedder, decode_weights=request.param) as fast:
        yield exact, fast


def test_quantized_decode_keeps_the_prefill_and_quantizes_only_decoding(pair):
    exact, fast = pair
    assert fast.model.fingerprint == exact.model.fingerprint  # the store's KV is shared as it is
    assert fast.model.model is exact.model.model  # one float32 model for prefill, not a second copy
    assert isinstance(fast.model.decode_step.layers[0].qkv, QuantizedLinear)
    assert fast.model.decode_step.layers[0].qkv.kind == fast.model.decode_weights
    for mode in ("full", "blend"):
        a = exact.query("Who built the lighthouse?", contexts=PASSAGES, mode=mode, max_new_tokens=6)
        b = fast.query("Who built the lighthouse?", contexts=PASSAGES, mode=mode, max_new_tokens=6)
        assert torch.equal(a.first_token_logits, b.first_token_logits) and a.token_ids[0] == b.token_ids[0]


def test_quantized_decode_streams_what_it_returns(pair):
    _, fast = pair
    stream = fast.query("Who built the lighthouse?", contexts=PASSAGES, max_new_tokens=8, stream=True)
    text = "".join(stream)
    assert text.strip() == stream.answer.text
    assert fast.query("Who built the lighthouse?", contexts=PASSAGES, max_new_tokens=8).text == stream.answer.text


def test_unknown_decode_weights_are_refused(tiny_model_factory, embedder, tmp_path):
    with pytest.raises(ValueError, match="decode_weights"):
        RagBlend(tmp_path / "store", model=tiny_model_factory("llama"), embedder=embedder, decode_weights="int3")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("weights", ["float32", "int8", "int4"])
def test_serve_takes_every_decode_weights_option(weights):
    args = build_parser().parse_args(["serve", "--store", "s", "--decode-weights", weights])
    assert args.decode_weights == weights
