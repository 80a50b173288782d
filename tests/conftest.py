"""Shared fixtures: tiny random models for fast exactness tests, the real embedder, temp stores."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Each open LMDB store maps its whole cap (default 1 TiB) of address space, and the 128 TiB a process has run
# out after ~120 stores that tests leave to the garbage collector: the suite's stores are tiny, so cap them.
os.environ.setdefault("RAGBLEND_MAX_STORE_BYTES", str(16 << 30))

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from index.embedder import Embedder  # noqa: E402
from ragblend.engine.model import LoadedModel, default_model_path, load_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GEMMA3_WINDOW = 16

# Small enough to run in milliseconds, shaped like the real families (GQA, biases, scaled RoPE).
TINY_CONFIGS = {
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    "llama_mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4),
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    "llama3_rope": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 512}),
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=16),  # q/k norms
    # Sliding layers with a window far shorter than the test prompts, a RoPE per layer type (the global one
    # scaled), sandwich norms, (1 + w) norms, a query scale that is not head_dim ** -0.5, a scaled embedding.
    "gemma3": dict(model_type="gemma3_text", num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                   sliding_window=GEMMA3_WINDOW, query_pre_attn_scalar=32,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}),
}
FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]  # one tiny model per family the layer definition describes


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The real default model as safetensors (converted from the bundled GGUF once per machine)."""
    return default_model_path()


def make_tiny_model_dir(root: Path, kind: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised causal LM saved as a local HF folder, with SmolLM2's tokenizer."""
    spec = dict(TINY_CONFIGS[kind])
    model_type = spec.pop("model_type")
    if "rope_parameters" not in spec:
        spec["rope_theta"] = 10000.0
    config = AutoConfig.for_model(model_type, vocab_size=49152, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=4, max_position_embeddings=8192, tie_word_embeddings=True, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init leaves q/k/v biases at zero and q/k and Gemma norms plain; make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            elif name.endswith("norm.weight") and model_type in ("qwen3", "gemma3_text"):
                param.add_(torch.randn_like(param) * 0.3)
    return save_model_dir(model, root / f"tiny-{kind}-{seed}", tokenizer_dir)


def hf_forward(model: LoadedModel, ids: list[int], cache: DynamicCache | None = None,
               start: int = 0) -> tuple[torch.Tensor, DynamicCache]:
    """Hugging Face's own forward, the reference: logits of every row [n, vocab] and its cache, holding
    every key of sliding layers too (a DynamicCache built without the config keeps them all)."""
    cache = DynamicCache() if cache is None else cache
    positions = torch.arange(start, start + len(ids))[None]
    with torch.inference_mode():
        out = model.model(input_ids=torch.tensor([ids]), cache=cache, position_ids=positions, use_cache=True)
    return out.logits[0].float(), cache


def save_model_dir(model, folder: Path, tokenizer_dir: Path) -> Path:
    """`model` as a local HF folder that load_model accepts, with SmolLM2's tokenizer."""
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def chunk_records(rb) -> dict:
    """Every chunk, KV and KV-metadata record of a RagBlend's store as raw bytes, whichever engine holds
    them: what "the same store" means when two ingests are compared."""
    found = {}
    with rb.store.env.begin() as txn:
        for name in (b"kv", b"kvmeta", b"chunks"):
            with txn.cursor(db=rb.store.env.open_db(name, txn=txn)) as cursor:
                found.update({(name, bytes(k)): bytes(v) for k, v in cursor})
    return found


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, smollm_dir):
    cache: dict[tuple[str, int], LoadedModel] = {}

    def make(kind: str = "llama", seed: int = 0) -> LoadedModel:
        if (kind, seed) not in cache:
            folder = make_tiny_model_dir(tmp_path_factory.mktemp("models"), kind, smollm_dir, seed)
            cache[kind, seed] = load_model(folder, device="cpu")
        return cache[kind, seed]

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_model_factory) -> LoadedModel:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="session")
def smollm(smollm_dir) -> LoadedModel:
    return load_model(smollm_dir, device="cpu")


@pytest.fixture
def shared_eval() -> Path:
    folder = SHARED / "eval"
    if not (folder / "musique_s.json").is_file():
        pytest.skip(f"evaluation data not found at {folder} (the shared/ folder beside the checkout)")
    return folder
