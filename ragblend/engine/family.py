"""A model family as data: what one decoder layer definition (engine/transformer.py) needs to know to run
Llama, Mistral, Qwen2, Qwen3, SmolLM and Gemma 3 text models exactly as Hugging Face's forward does.

Read from the HF config and modules once at load; anything the layer cannot describe is refused here,
so a model is never answered silently wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

FULL, SLIDING = "full_attention", "sliding_attention"
LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
SANDWICH_PARTS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")  # Gemma's norms around the MLP
SUPPORTED = "Llama, Mistral, Qwen2, Qwen3, SmolLM and Gemma 3 text"
GEMMA3 = "gemma3_text"  # Gemma's (1 + weight) norms
# The model types the layer definition is tested against (equal to HF's forward, tests/test_model_support.py).
# Others with the same module names compute differently: Ernie 4.5's RoPE (7e-3 off HF's logits when accepted
# by shape), Granite's residual / embedding / logit multipliers, SmolLM3's layers without RoPE.
DESCRIBED = ("llama", "mistral", "qwen2", "qwen3", GEMMA3)


class UnsupportedModelError(ValueError):
    """A causal LM whose layers the shared layer definition would run wrongly (and silently) if accepted."""


@dataclass(frozen=True)
class Family:
    sandwich: bool  # Gemma: post-attention and pre/post-feedforward norms; else one norm before each block
    norm_offset: float  # RMSNorm multiplies by (offset + weight): Gemma 1, Llama 0
    qk_norm: bool  # a per-head RMSNorm on queries and keys before RoPE (Qwen3, Gemma 3)
    attention_scale: float  # Gemma 3: query_pre_attn_scalar ** -0.5, else head_dim ** -0.5
    embed_scale: float | None  # Gemma: sqrt(hidden_size), applied in the embedding dtype
    activation: str  # the MLP's gate activation (ACT2FN name)
    layer_types: tuple[str, ...]  # FULL or SLIDING per layer
    sliding_window: int | None  # a SLIDING layer's row at position p sees keys in (p - window, p]
    rope_types: tuple[str, ...]  # the distinct RoPE tables, in the order `rope_of_layer` indexes them
    rope_of_layer: tuple[int, ...]  # each layer's RoPE table
    per_type_rope: bool  # the model's rotary module takes the layer type (Gemma 3: local and global bases)
    final_softcap: float | None  # logits -> cap * tanh(logits / cap)

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    @classmethod
    def of(cls, model: PreTrainedModel) -> Family:
        """The family of an HF causal LM, or UnsupportedModelError naming what does not fit."""
        _check_describable(model)
        config, body = model.config, model.base_model
        layer = body.layers[0]
        layer_types = _layer_types(model)
        per_type_rope = isinstance(getattr(body.rotary_emb, "rope_type", None), dict)  # {layer type: RoPE type}
        rope_types = tuple(sorted(set(layer_types))) if per_type_rope else (FULL,)
        return cls(
            sandwich=hasattr(layer, SANDWICH_PARTS[0]), norm_offset=1.0 if config.model_type == GEMMA3 else 0.0,
            qk_norm=hasattr(layer.self_attn, "q_norm"), attention_scale=float(layer.self_attn.scaling),
            embed_scale=getattr(body.embed_tokens, "scalar_embed_scale", None),
            activation=getattr(config, "hidden_activation", None) or config.hidden_act, layer_types=layer_types,
            sliding_window=int(config.sliding_window) if SLIDING in layer_types else None, rope_types=rope_types,
            rope_of_layer=tuple(rope_types.index(t) if per_type_rope else 0 for t in layer_types),
            per_type_rope=per_type_rope, final_softcap=getattr(config, "final_logit_softcapping", None))


def _check_describable(model: PreTrainedModel) -> None:
    """Refuse what the layer definition does not compute: other layer shapes, soft-capped or bidirectional
    attention, and any family it is not tested against (Gemma 1 and 2 included)."""
    config, name = model.config, type(model).__name__
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{name} has no Llama-style decoder layers; ragblend supports {SUPPORTED}")
    layer = layers[0]
    missing = [part for part in LAYER_PARTS if not hasattr(layer, part)]
    missing += [f"self_attn.{part}" for part in ATTENTION_PARTS if not hasattr(getattr(layer, "self_attn", None), part)]
    missing += [f"mlp.{part}" for part in MLP_PARTS if not hasattr(getattr(layer, "mlp", None), part)]
    if missing:
        raise UnsupportedModelError(f"{name}'s decoder layers lack {missing}; ragblend supports {SUPPORTED}")
    if getattr(config, "attn_logit_softcapping", None) is not None:  # Gemma 2
        raise UnsupportedModelError(f"{name} soft-caps attention logits, which ragblend's attention kernels do not; "
                                    f"ragblend supports {SUPPORTED}")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{name} attends bidirectionally; ragblend supports causal {SUPPORTED}")
    if config.model_type not in DESCRIBED:
        raise UnsupportedModelError(f"{name} ({config.model_type}) is not a family ragblend's layer definition is "
                                    f"tested against, though its layers look alike; ragblend supports {SUPPORTED}")
    sandwich = [hasattr(layer, part) for part in SANDWICH_PARTS]
    if any(sandwich) and not all(sandwich):
        raise UnsupportedModelError(f"{name} has only some of Gemma's sandwich norms; ragblend supports {SUPPORTED}")


def _layer_types(model: PreTrainedModel) -> tuple[str, ...]:
    """Each layer's attention type, as HF's forward masks it (Mistral's window covers every layer)."""
    config, count = model.config, len(model.base_model.layers)
    declared = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    types = tuple(declared) if declared else (SLIDING if window else FULL,) * count
    unknown = set(types) - {FULL, SLIDING}
    if unknown:
        raise UnsupportedModelError(f"{type(model).__name__} has attention layers of types {sorted(unknown)}; "
                                    f"ragblend supports full and sliding-window attention ({SUPPORTED})")
    if SLIDING in types and not window:
        raise UnsupportedModelError(f"{type(model).__name__} declares sliding layers without a window")
    return types
