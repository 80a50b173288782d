"""Token-by-token decoding from a prefilled cache, with stop strings and streaming text pieces."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import DynamicCache

from ragblend.engine.model import LoadedModel


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def pick_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> int:
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could still become a stop string (or half a character)."""
    if text.endswith("\ufffd"):
        return 1
    for size in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-size:]) for s in stops):
            return size
    return 0


def _eos_ids(model: LoadedModel) -> set[int]:
    ids = model.config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
    if model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def feed(model: LoadedModel, cache: DynamicCache, token_ids: list[int], start: int) -> torch.Tensor:
    """Run `token_ids` at positions start.. over `cache` (which grows by them) with the decode weights;
    the last one's logits."""
    ids = torch.tensor([token_ids], device=model.device)
    positions = torch.arange(start, start + len(token_ids), device=model.device)[None]
    forward = model.decode_model or model.model
    out = forward(input_ids=ids, cache=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


@torch.inference_mode()
def decode(model: LoadedModel, cache: DynamicCache, first_logits: torch.Tensor, prompt_len: int,
           sampling: SamplingConfig, generated: list[int]) -> Iterator[str]:
    """Yield text pieces; token ids accumulate in `generated`. Stops at EOS, a stop string or the budget."""
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    eos = _eos_ids(model)
    logits, emitted = first_logits, 0
    for step in range(sampling.max_new_tokens):
        token = pick_token(logits, sampling, generator)
        if token in eos:
            break
        generated.append(token)
        text = model.tokenizer.decode(generated, skip_special_tokens=True)
        hit = min((text.find(s) for s in sampling.stop if s in text), default=-1)
        if hit >= 0:
            yield text[emitted:hit]
            return
        ready = len(text) - _held_back(text, sampling.stop)
        if ready > emitted:
            yield text[emitted:ready]
            emitted = ready
        if step + 1 == sampling.max_new_tokens:
            break
        logits = feed(model, cache, [token], prompt_len + step)
    text = model.tokenizer.decode(generated, skip_special_tokens=True)
    if len(text) > emitted:
        yield text[emitted:]
