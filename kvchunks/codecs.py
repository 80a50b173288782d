"""How one layer of a span's KV is laid out in a record: fp16 as computed, or int8 with scales (KIVI).

int8 follows KIVI's observation: keys have outlier *channels*, so they get one scale per (head, channel)
over the span's tokens; values have no such structure and get one scale per (head, token). Symmetric
absmax scales are kept in fp16 beside the codes and applied on load, in the loader thread.
"""
from __future__ import annotations

import numpy as np


class Float16Codec:
    name = "float16"

    @staticmethod
    def layer_bytes(heads: int, tokens: int, dim: int) -> int:
        return 2 * heads * tokens * dim * 2

    @staticmethod
    def encode(keys: np.ndarray, values: np.ndarray) -> bytes:
        return np.ascontiguousarray(keys, np.float16).tobytes() + np.ascontiguousarray(values, np.float16).tobytes()

    @staticmethod
    def decode(raw, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Zero-copy fp16 views of K and V."""
        flat = np.frombuffer(raw, dtype=np.float16)
        half = flat.size // 2
        return flat[:half].reshape(shape), flat[half:].reshape(shape)


class Int8Codec:
    name = "int8"

    @staticmethod
    def layer_bytes(heads: int, tokens: int, dim: int) -> int:
        return 2 * heads * tokens * dim + 2 * heads * dim + 2 * heads * tokens

    @staticmethod
    def _quantize(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        scale = (np.abs(x).max(axis=axis, keepdims=True) / 127.0).astype(np.float16)
        safe = np.where(scale == 0, 1, scale).astype(np.float32)
        return np.clip(np.rint(x / safe), -127, 127).astype(np.int8), scale

    @classmethod
    def encode(cls, keys: np.ndarray, values: np.ndarray) -> bytes:
        k_codes, k_scale = cls._quantize(keys.astype(np.float32), axis=1)  # per (head, channel)
        v_codes, v_scale = cls._quantize(values.astype(np.float32), axis=2)  # per (head, token)
        return k_codes.tobytes() + v_codes.tobytes() + k_scale.tobytes() + v_scale.tobytes()

    @staticmethod
    def decode(raw, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        heads, tokens, dim = shape
        codes = heads * tokens * dim
        buffer = memoryview(raw)
        k_codes = np.frombuffer(buffer, np.int8, codes, 0).reshape(shape)
        v_codes = np.frombuffer(buffer, np.int8, codes, codes).reshape(shape)
        k_scale = np.frombuffer(buffer, np.float16, heads * dim, 2 * codes).reshape(heads, 1, dim)
        v_scale = np.frombuffer(buffer, np.float16, heads * tokens, 2 * codes + 2 * heads * dim).reshape(heads, tokens, 1)
        return k_codes * k_scale.astype(np.float32), v_codes * v_scale.astype(np.float32)


CODECS = {codec.name: codec for codec in (Float16Codec, Int8Codec)}


def codec_for(name: str):
    if name not in CODECS:
        raise ValueError(f"unknown KV dtype {name!r}; choose one of {', '.join(CODECS)}")
    return CODECS[name]
