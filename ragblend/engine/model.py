"""Model loading: the bundled SmolLM2 GGUF (converted once to safetensors) or any local HF causal-LM folder
of a family the one layer definition describes (engine/family.py)."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from ragblend.engine.decode_step import DecodeStep
from ragblend.engine.family import Family, UnsupportedModelError  # noqa: F401 - raised by load_model, caught by callers
from ragblend.engine.gguf import SMOLLM2
from ragblend.engine.transformer import Transformer

DEFAULT_MODEL = SMOLLM2.name


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

    @cached_property
    def family(self) -> Family:
        return Family.of(self.model)

    @cached_property
    def decoder(self) -> Transformer:
        """The one layer definition over the model's weights: precompute, fused and full prefill run it,
        decode steps run its layers with their own weight layout."""
        return Transformer(self.model, self.family, self.head_dim)

    @property
    def num_layers(self) -> int:
        return len(self.model.base_model.layers)

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
        """The longest prompt served: the model's position limit (sliding windows are honoured on every
        path, so they do not bound it)."""
        return int(getattr(self.config, "max_position_embeddings", 2048))


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


def default_model_path() -> Path:
    """The default model as a safetensors folder, converted from the bundled GGUF on first use (~30 s, once)."""
    return SMOLLM2.folder()


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


def check_supported(model: PreTrainedModel) -> None:
    """Raise UnsupportedModelError unless the family is one the layer definition describes as data
    (Llama, Mistral, Qwen2, Qwen3, SmolLM, Gemma 3 text)."""
    Family.of(model)


def load_model(spec: str | Path | None = None, device: str | None = None) -> LoadedModel:
    """Load the default model (spec None) or a local Hugging Face causal-LM folder; never downloads."""
    path = default_model_path() if spec is None else Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} not found or has no config.json (only local folders are supported)")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stored_dtype = AutoConfig.from_pretrained(path, local_files_only=True).dtype or torch.float32
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=compute_dtype(target, stored_dtype), local_files_only=True).to(target)
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
