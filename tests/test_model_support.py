"""Which local model folders ragblend serves: Llama-shaped families load, anything the fused path would
run wrongly is refused at load time with a message naming the reason, never answered silently wrong."""
from __future__ import annotations

import pytest
import torch
from conftest import save_model_dir
from transformers import AutoConfig, AutoModelForCausalLM

from ragblend.engine.model import UnsupportedModelError, load_model

SMALL = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "max_position_embeddings": 8192, "num_attention_heads": 4, "num_key_value_heads": 2}


def save_model(root, smollm_dir, model_type: str, **config) -> str:
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SMALL, **config), dtype=torch.float32)
    return str(save_model_dir(model, root / model_type, smollm_dir))


@pytest.mark.parametrize("layer_types", [None, ["full_attention"] * 2], ids=["sliding-layers", "full-layers"])
def test_gemma3_layers_are_refused_with_the_reason(tmp_path, smollm_dir, layer_types):
    """Gemma 3 has sliding-window layers, a RoPE per layer type and sandwich norms: refused either way."""
    folder = save_model(tmp_path, smollm_dir, "gemma3_text", head_dim=16, sliding_window=16, layer_types=layer_types)
    with pytest.raises(UnsupportedModelError, match="Llama-shaped"):
        load_model(folder, device="cpu")


def test_a_mistral_sliding_window_bounds_the_prompt(tmp_path, smollm_dir):
    """Row attention sees every earlier key, exact only inside the window: longer prompts are refused."""
    windowed = load_model(save_model(tmp_path, smollm_dir, "mistral", sliding_window=512), device="cpu")
    assert windowed.max_positions == 512


def test_a_qwen2_window_that_is_switched_off_does_not_bound_the_prompt(tmp_path, smollm_dir):
    model = load_model(save_model(tmp_path, smollm_dir, "qwen2", sliding_window=512, use_sliding_window=False),
                       device="cpu")
    assert model.max_positions == 8192
