"""Calibration questions when the user has none: fill-in-the-blank questions made from the store's own chunks.

For a seeded sample of chunks, one sentence of 6-40 words is taken and one word of it blanked out (the
last name or number in it, else its last word of 4+ letters); the question asks for the missing word,
and that word is its gold answer. The question is answered like any request: retrieved from the store
(top-k), so the prompts have the store's real chunks, sizes and neighbours.

Why this is fair: the answer sits in one retrieved chunk and the question cannot be answered without
reading it, so blend has to keep what full prefill reads; nothing about the sample depends on blend.
What it is not: cross-passage reasoning. Questions that need two chunks flip more easily under
blend (docs/fidelity.md, two-hop rows), so a store whose traffic asks them should be calibrated on a
questions file of that traffic.
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from index.namespaces import DEFAULT_NAMESPACE

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
MIN_WORDS, MAX_WORDS = 6, 40


@dataclass(frozen=True)
class CalibrationQuestion:
    question: str
    contexts: list[str] | None = None  # None: retrieved from the store
    answers: list[str] | None = None  # gold answers (needed by the `kept` metric)


def _blank(sentence: str) -> tuple[str, str] | None:
    """(the sentence with one word blanked, that word), or None when no word qualifies."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    bare = [w.strip(string.punctuation) for w in words]
    usable = [i for i in range(1, len(words)) if len(bare[i]) >= 4 and bare[i].isalnum()]
    named = [i for i in usable if bare[i][0].isupper() or bare[i].isdigit()]
    if not usable:
        return None
    index = (named or usable)[-1]
    blanked = words[:index] + [words[index].replace(bare[index], "___")] + words[index + 1:]
    return " ".join(blanked), bare[index]


def store_questions(store, count: int, seed: int = 0, namespace: str = DEFAULT_NAMESPACE) -> list[CalibrationQuestion]:
    """Up to `count` fill-in-the-blank questions, at most one per chunk, from a seeded shuffle of the
    namespace's chunks (the same store and seed give the same questions)."""
    with store.env.begin() as txn:
        chunks = sorted((r for r in store.docs.chunk_records(txn) if r.refs and r.namespace == namespace),
                        key=lambda r: r.chunk_id)
    random.Random(seed).shuffle(chunks)
    questions = []
    for chunk in chunks:
        made = [b for s in _SENTENCE.split(chunk.text.strip()) if (b := _blank(" ".join(s.split())))]
        if made:
            sentence, word = made[len(made) // 2]
            questions.append(CalibrationQuestion(
                f'Fill in the blank from the documents: "{sentence}" What is the missing word?', None, [word]))
        if len(questions) == count:
            break
    if not questions:
        raise ValueError("the store has no chunk with a sentence to make a question from; give --questions FILE")
    return questions
