"""Answer-quality metrics: SQuAD/MuSiQue-style F1 and EM, plus first-token KL.

The string metrics follow the scoring used by the CacheBlend evaluation: the model's
answer is cut to its first line and both sides are normalised before comparison.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def first_line(text: str) -> str:
    """The first non-empty line, stripped: models often ramble after the answer."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall over the multiset overlap."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def best_f1(prediction: str, golds: list[str]) -> float:
    """F1 of the answer's first line against the best-matching gold answer."""
    answer = first_line(prediction)
    return max((token_f1(answer, gold) for gold in golds), default=0.0)


def best_em(prediction: str, golds: list[str]) -> bool:
    answer = first_line(prediction)
    return any(exact_match(answer, gold) for gold in golds)


def contains_answer(prediction: str, golds: list[str]) -> bool:
    """Lenient check: a normalised gold occurs inside the normalised first line.

    Matching is on whole words, so "Dun" does not count as found in "Dunmore".
    """
    answer = f" {normalize_answer(first_line(prediction))} "
    normalized = (normalize_answer(gold) for gold in golds)
    return any(gold and f" {gold} " in answer for gold in normalized)


def first_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(P_ref || P) of the next-token distributions, in float64 so identical inputs give ~0
    (clamped at 0 against rounding). Tokens the reference rules out (-inf) contribute nothing."""
    ref = torch.log_softmax(reference_logits.double().flatten(), dim=-1)
    other = torch.log_softmax(logits.double().flatten(), dim=-1)
    terms = torch.where(ref.isneginf(), 0.0, ref.exp() * (ref - other))
    return max(float(terms.sum()), 0.0)


def keeps(reference_correct: list[bool], correct: list[bool]) -> float | None:
    """Share of the reference mode's correct answers the other mode also gets right."""
    if len(reference_correct) != len(correct):
        raise ValueError(f"length mismatch: {len(reference_correct)} vs {len(correct)}")
    hits = [other for ref, other in zip(reference_correct, correct) if ref]
    return sum(hits) / len(hits) if hits else None
