"""Prompt layout shared by ingest and every query mode: prefix + chunk tokens + question suffix.

The prefix (chat header + instruction) is fixed, so every chunk is precomputed behind the very
tokens the online prompt starts with; it also serves as the attention sink the chunks saw.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

SYSTEM_PROMPT = "You are a helpful assistant that answers questions using the given passages."
INSTRUCTION = "Answer the question using the passages below. Reply with a few words only.\n\n"
CHUNK_SEPARATOR = "\n\n"
_SLOT = "\x00QUESTION_SLOT\x00"
_ANSWER_SLOT = "\x00ANSWER_SLOT\x00"


def starts_with_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer itself starts an encoded text with BOS. Asked of its behaviour, not of its
    `add_bos_token` flag: tokenizers converted from GGUF leave the flag False while their post-processor
    adds BOS, and a base model prompted without its BOS answers far worse (measured on Gemma 3 270M:
    57.5% -> 25% right)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


@dataclass(frozen=True)
class PromptTemplate:
    prefix_ids: tuple[int, ...]
    suffix_head: str  # text before the question
    suffix_tail: str  # text after the question (end of user turn + assistant header)
    joint_ids: tuple[int, ...]  # after an answer: end of the assistant turn + the next user turn's header
    tokenizer: PreTrainedTokenizerBase

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> "PromptTemplate":
        """The template every chunk is precomputed behind; a conversation may bring its own `system` prompt."""
        system = SYSTEM_PROMPT if system is None else system
        if tokenizer.chat_template:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": INSTRUCTION + _SLOT}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prefix_text, tail = text.split(_SLOT)
            messages += [{"role": "assistant", "content": _ANSWER_SLOT}, {"role": "user", "content": _SLOT}]
            joint = tokenizer.apply_chat_template(messages, tokenize=False).split(_ANSWER_SLOT)[1].split(_SLOT)[0]
        else:
            prefix_text, tail, joint = system + "\n\n" + INSTRUCTION, "\nAnswer:", "\n\n"
        prefix_ids = tuple(tokenizer(prefix_text, add_special_tokens=False)["input_ids"])
        if not tokenizer.chat_template and starts_with_bos(tokenizer):
            prefix_ids = (tokenizer.bos_token_id, *prefix_ids)
        joint_ids = tuple(tokenizer(joint, add_special_tokens=False)["input_ids"])
        return cls(prefix_ids=prefix_ids, suffix_head="Question: ", suffix_tail=tail, joint_ids=joint_ids,
                   tokenizer=tokenizer)

    def suffix_ids(self, question: str) -> list[int]:
        text = self.suffix_head + question.strip() + self.suffix_tail
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chunk_ids(self, text: str) -> list[int]:
        """Token ids of one passage as it sits in the prompt (with its trailing separator)."""
        return self.tokenizer(text.strip() + CHUNK_SEPARATOR, add_special_tokens=False)["input_ids"]

    def fingerprint(self, model_fingerprint: str) -> str:
        """Identity of stored KV: the model and the prefix every chunk was computed behind."""
        digest = hashlib.sha256(model_fingerprint.encode())
        digest.update(b"prefix:" + ",".join(map(str, self.prefix_ids)).encode())
        return digest.hexdigest()[:32]
