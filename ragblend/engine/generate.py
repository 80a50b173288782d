"""Token-by-token decoding from a prefilled cache, with stop strings and streaming text pieces."""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator

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
    """Run `token_ids` at positions start.. over `cache` (which grows by them) with the float32 weights;
    the last one's logits."""
    return model.decoder.extend(cache, token_ids, start)


class Sequence:
    """One request's decode: its cache, sampling and tokens so far, and the text not yet handed out.
    `advance` picks a token from `logits`; feeding it (alone or in a batch) sets the next `logits`."""

    def __init__(self, model: LoadedModel, cache: DynamicCache, first_logits: torch.Tensor, prompt_len: int,
                 sampling: SamplingConfig, generated: list[int]):
        self.tokenizer, self.eos = model.tokenizer, _eos_ids(model)
        self.cache, self.logits, self.prompt_len = cache, first_logits, prompt_len
        self.sampling, self.generated = sampling, generated
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.emitted = 0
        self.token: int | None = None  # to feed next; None once the sequence has ended

    @property
    def position(self) -> int:
        """Where `token` goes in the cache."""
        return self.prompt_len + len(self.generated) - 1

    def advance(self) -> list[str]:
        """Pick the next token: the text pieces it makes final. Stops at EOS, a stop string or the budget."""
        token, self.token = pick_token(self.logits, self.sampling, self.generator), None
        if token in self.eos:
            return self._rest()
        self.generated.append(token)
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        stops = self.sampling.stop
        hit = min((text.find(s) for s in stops if s in text), default=-1)
        if hit >= 0:
            return [text[self.emitted:hit]]
        pieces = []
        ready = len(text) - _held_back(text, stops)
        if ready > self.emitted:
            pieces.append(text[self.emitted:ready])
            self.emitted = ready
        if len(self.generated) == self.sampling.max_new_tokens:
            return pieces + self._rest()
        self.token = token
        return pieces

    def _rest(self) -> list[str]:
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        return [text[self.emitted:]] if len(text) > self.emitted else []


def step(model: LoadedModel, sequences: list[Sequence]) -> None:
    """Feed every sequence's token in one batched forward; each gets its next logits."""
    logits = model.decode_step([s.token for s in sequences], [s.position for s in sequences],
                               [s.cache for s in sequences])
    for sequence, row in zip(sequences, logits):
        sequence.logits = row


def decode(model: LoadedModel, cache: DynamicCache, first_logits: torch.Tensor, prompt_len: int,
           sampling: SamplingConfig, generated: list[int]) -> Iterator[str]:
    """Yield text pieces of one request decoded alone (token ids accumulate in `generated`): the
    reference a batched decode (ragblend.engine.loop) must equal."""
    sequence = Sequence(model, cache, first_logits, prompt_len, sampling, generated)
    while True:
        yield from sequence.advance()
        if sequence.token is None:
            return
        step(model, [sequence])
