"""Specification of chunking: token budgets, sentence-aware packing, document boundaries, stable chunk ids.

Budgets are counted exactly as chunks are stored: `PromptTemplate.chunk_ids(text)` (the passage's
tokens plus its trailing separator), with SmolLM2's tokenizer.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from kvchunks.chunking import MAX_CHUNK_TOKENS, MIN_CHUNK_TOKENS, chunk_id, split_document, validate_chunk_tokens
from ragblend.api import RagBlend
from ragblend.engine.prompt import PromptTemplate

SENTENCES = [
    "The museum opened its doors in 1893 after a decade of fundraising.",
    "Its first curator catalogued eleven thousand beetles by hand!",
    "Why did the city fund a natural history collection at all?",
    "Merchants wanted their sons to study botany before joining the spice trade.",
    "A fire in 1921 destroyed the west wing and most of the fossil hall.",
    "Volunteers rebuilt it within three years, using bricks from the old customs house.",
    "Today the museum welcomes 300,000 visitors a year, many of them school classes.",
    "The beetle collection is still on display, pinned in its original mahogany drawers.",
]
ESSAY = " ".join(SENTENCES[:4]) + "\n\n" + " ".join(SENTENCES[4:])


@pytest.fixture(scope="module")
def template(smollm_dir) -> PromptTemplate:
    return PromptTemplate.for_tokenizer(AutoTokenizer.from_pretrained(smollm_dir))


def tokens(template: PromptTemplate, text: str) -> int:
    return len(template.chunk_ids(text))


def split(template: PromptTemplate, text: str, budget: int) -> list[str]:
    return split_document(text, template.chunk_ids, budget)


MIXED = (ESSAY + "\n\n" + "A URL like https://example.org/a/b/c?query=1&x=2 and numbers 3.14159 2.71828 1.41421. "
         + "Ünïcödé wörds, 漢字のテキスト、そして絵文字 🎉🎉🎉 appear too. " + "tiny " * 120 + "end.")


@pytest.mark.parametrize("budget", [MIN_CHUNK_TOKENS, 24, 40, 128])
def test_no_chunk_exceeds_the_token_budget(template, budget):
    chunks = split(template, MIXED, budget)
    assert chunks
    assert max(tokens(template, c) for c in chunks) <= budget


@pytest.mark.parametrize("budget", [MIN_CHUNK_TOKENS, 40, 128])
def test_chunks_cover_the_document_once_in_order(template, budget):
    chunks = split(template, MIXED, budget)
    # every character but whitespace is kept, once, in order (a word longer than the budget may be cut)
    assert "".join("".join(chunks).split()) == "".join(MIXED.split())


def test_a_short_document_is_one_chunk(template):
    assert split(template, "  A single short sentence.  ", 64) == ["A single short sentence."]


def test_chunks_end_at_sentence_ends_when_sentences_fit(template):
    budget = 48
    assert all(tokens(template, s) <= budget for s in SENTENCES)
    chunks = split(template, ESSAY, budget)
    assert len(chunks) > 1
    assert all(re.search(r"[.!?]$", c) for c in chunks)
    # no sentence is cut: each one sits whole inside exactly one chunk
    for sentence in SENTENCES:
        assert sum(sentence in c for c in chunks) == 1


def test_chunks_are_packed_with_as_many_whole_sentences_as_fit(template):
    budget = 48
    chunks = split(template, " ".join(SENTENCES), budget)
    for chunk, following in zip(chunks, chunks[1:]):
        [next_sentence] = [s for s in SENTENCES if following.startswith(s)]
        assert tokens(template, chunk + " " + next_sentence) > budget


def test_a_chunk_ends_at_a_sentence_end_rather_than_running_into_a_long_sentence(template):
    long_sentence = "The survey listed " + ", ".join(f"species number {i}" for i in range(60)) + "."
    text = SENTENCES[0] + " " + long_sentence
    chunks = split(template, text, 40)
    assert chunks[0] == SENTENCES[0]
    assert all(tokens(template, c) <= 40 for c in chunks)


def test_a_single_giant_sentence_is_split_at_word_boundaries(template):
    words = [f"word{i}" for i in range(400)]
    chunks = split(template, " ".join(words), 32)
    assert len(chunks) > 1 and max(tokens(template, c) for c in chunks) <= 32
    assert [w for c in chunks for w in c.split()] == words  # whole words, in order


@pytest.mark.parametrize("word", ["x" * 5000, "0123456789abcdef" * 200, "🎉" * 600, "漢字" * 500],
                         ids=["letters", "hex", "emoji", "cjk"])
def test_a_single_giant_word_is_still_split_within_the_budget(template, word):
    chunks = split(template, word, MIN_CHUNK_TOKENS)
    assert len(chunks) > 1 and max(tokens(template, c) for c in chunks) <= MIN_CHUNK_TOKENS
    assert "".join(chunks) == word


def test_chunks_never_cross_document_boundaries(tmp_path, tiny_model, embedder):
    doc_a = ESSAY
    doc_b = ("Glaciers carve valleys as they move. Meltwater feeds rivers in summer. "
             "Moraines mark where the ice once stopped. Crevasses open where the ice bends.")
    rb = RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder, chunk_tokens=MIN_CHUNK_TOKENS * 3)
    rb.add_documents([{"id": "a", "text": doc_a}, {"id": "b", "text": doc_b}])
    with rb.store.env.begin() as txn:
        for doc_id, text in (("a", doc_a), ("b", doc_b)):
            chunks = [rb.store.docs.get_chunk(txn, c) for c in rb.store.docs.get_doc(txn, doc_id).chunk_ids]
            assert " ".join(c.text for c in chunks).split() == text.split()
            assert all(c.refs == [[doc_id, i]] for i, c in enumerate(chunks))
            assert all(len(c.token_ids) <= MIN_CHUNK_TOKENS * 3 for c in chunks)
    rb.close()


# --- chunk size limits ----------------------------------------------------------------------------


def test_chunk_size_limits_depend_on_the_model_context():
    validate_chunk_tokens(MIN_CHUNK_TOKENS, 8192)
    validate_chunk_tokens(MAX_CHUNK_TOKENS, 8192)
    validate_chunk_tokens(1024, 2048)
    for too_small_or_large, max_positions in ((MIN_CHUNK_TOKENS - 1, 8192), (MAX_CHUNK_TOKENS + 1, 1 << 20), (1025, 2048)):
        with pytest.raises(ValueError, match="out of range"):
            validate_chunk_tokens(too_small_or_large, max_positions)


# --- chunk ids ------------------------------------------------------------------------------------

FINGERPRINT = "0123456789abcdef0123456789abcdef"


def test_chunk_id_is_the_sha256_of_fingerprint_and_token_ids():
    token_ids = [1, 2, 3, 49151]
    digest = hashlib.sha256(FINGERPRINT.encode() + b"".join(t.to_bytes(4, "little") for t in token_ids))
    assert chunk_id(FINGERPRINT, token_ids) == digest.hexdigest()[:32]
    # pinned: a store written by any past or future version must find its chunks under the same ids
    assert chunk_id(FINGERPRINT, token_ids) == "d75cfcd0ba7582ed856ba9bb3875bcac"


def test_same_tokens_and_fingerprint_give_the_same_id():
    assert chunk_id(FINGERPRINT, [5, 6, 7]) == chunk_id(FINGERPRINT, (5, 6, 7))


def test_a_different_fingerprint_gives_a_different_id():
    assert chunk_id(FINGERPRINT, [5, 6, 7]) != chunk_id(FINGERPRINT[::-1], [5, 6, 7])


def test_different_tokens_give_different_ids():
    ids = {chunk_id(FINGERPRINT, t) for t in ([5, 6, 7], [5, 7, 6], [5, 6], [5, 6, 7, 0], [256 * 5 + 6, 7])}
    assert len(ids) == 5


def test_chunk_ids_are_the_same_in_another_process_with_another_hash_seed():
    code = f"from kvchunks.chunking import chunk_id; print(chunk_id({FINGERPRINT!r}, [5, 6, 7]))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": "4242"})
    assert result.stdout.strip() == chunk_id(FINGERPRINT, [5, 6, 7])
