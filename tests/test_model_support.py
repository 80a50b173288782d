"""Which local model folders ragblend serves: a family the one layer definition describes as data loads
(Llama, Mistral, Qwen2, Qwen3, SmolLM, Gemma 3 text); anything it would run wrongly is refused at load time
with a message naming the reason, never answered silently wrong."""
from __future__ import annotations

import pytest
import torch
from conftest import hf_forward, save_model_dir
from transformers import AutoConfig, AutoModelForCausalLM

from ragblend.engine.family import FULL, SLIDING
from ragblend.engine.fusion import FusionEngine
from ragblend.engine.layout import PromptLayout
from ragblend.engine.model import UnsupportedModelError, load_model

SMALL = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "max_position_embeddings": 8192, "num_attention_heads": 4, "num_key_value_heads": 2}


def save_model(root, smollm_dir, model_type: str, **config) -> str:
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SMALL, **config), dtype=torch.float32)
    return str(save_model_dir(model, root / model_type, smollm_dir))


def test_gemma3_is_described_as_data(tmp_path, smollm_dir):
    model = load_model(save_model(tmp_path, smollm_dir, "gemma3_text", head_dim=16, sliding_window=16,
                                  layer_types=[SLIDING, FULL]), device="cpu")
    family = model.family
    assert (family.sandwich, family.norm_offset, family.qk_norm, family.embed_scale) == (True, 1.0, True, 8.0)
    assert family.layer_types == (SLIDING, FULL) and family.sliding_window == 16
    assert family.rope_types == (FULL, SLIDING) and family.rope_of_layer == (1, 0)
    assert model.max_positions == 8192  # the window bounds what a layer sees, not the prompt


def test_gemma2_soft_capped_attention_is_refused_with_the_reason(tmp_path, smollm_dir):
    with pytest.raises(UnsupportedModelError, match="soft-caps attention"):
        load_model(save_model(tmp_path, smollm_dir, "gemma2", head_dim=16), device="cpu")


def test_a_layer_the_definition_cannot_describe_is_refused(tmp_path, smollm_dir):
    """GPT-2's blocks have no Llama-style layers (one fused qkv projection, LayerNorm, learned positions)."""
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4))
    with pytest.raises(UnsupportedModelError, match="Gemma 3"):
        load_model(save_model_dir(model, tmp_path / "gpt2", smollm_dir), device="cpu")


@pytest.mark.parametrize("model_type", ["ernie4_5", "granite", "olmo", "stablelm"])
def test_a_family_whose_layers_only_look_alike_is_refused(tmp_path, smollm_dir, model_type):
    """Same module names, other arithmetic: Ernie 4.5 rotates queries differently (7e-3 off HF's logits
    when it was accepted by shape), Granite scales embeddings, residuals and logits, OLMo and StableLM
    normalise with LayerNorm."""
    with pytest.raises(UnsupportedModelError, match=f"{model_type}.*not a family"):
        load_model(save_model(tmp_path, smollm_dir, model_type), device="cpu")


def test_a_mistral_sliding_window_is_honoured_past_the_window(tmp_path, smollm_dir):
    """Every layer of a windowed Mistral sees only its window: a prompt four windows long equals HF's forward."""
    model = load_model(save_model(tmp_path, smollm_dir, "mistral", sliding_window=16), device="cpu")
    assert model.family.layer_types == (SLIDING, SLIDING) and model.max_positions == 8192
    ids = list(range(100, 164))
    ours = FusionEngine(model).full_prefill(PromptLayout.build(tuple(ids), [], []))
    expected, _ = hf_forward(model, ids)
    torch.testing.assert_close(ours.logits, expected[-1], atol=1e-4, rtol=1e-4)


def test_a_qwen2_window_that_is_switched_off_does_not_bound_the_prompt(tmp_path, smollm_dir):
    model = load_model(save_model(tmp_path, smollm_dir, "qwen2", sliding_window=512, use_sliding_window=False),
                       device="cpu")
    assert model.max_positions == 8192 and set(model.family.layer_types) == {FULL}
