"""End to end with the real models: SmolLM2-135M precomputes the KV, MiniLM retrieves (kept to three short documents)."""
from __future__ import annotations

import pytest
import torch

from kvchunks.rope import apply_rope, rotary_cos_sin
from ragblend.api import RagBlend

pytestmark = pytest.mark.integration

DOCUMENTS = [
    {"id": "reef", "text": "The Great Barrier Reef lies off the coast of Queensland in north-east Australia. "
                           "It is the world's largest coral reef system, made of nearly three thousand reefs, "
                           "and warm-water bleaching events have damaged large parts of it."},
    {"id": "photosynthesis", "text": "Photosynthesis is how green plants turn sunlight into chemical energy. "
                                     "Chlorophyll in the leaves absorbs light, and the plant combines carbon dioxide "
                                     "and water into glucose, releasing oxygen as a by-product."},
    {"id": "rust", "text": "Rust is a systems programming language that guarantees memory safety without a garbage "
                           "collector. Its compiler enforces ownership and borrowing rules, so data races and "
                           "dangling pointers are caught before the program runs."},
]
QUESTIONS = {
    "Where is the largest coral reef in the world?": "reef",
    "How do plants make sugar from light?": "photosynthesis",
    "Which programming language prevents data races through ownership and borrowing?": "rust",
}


@pytest.fixture(scope="module")
def rb(tmp_path_factory, smollm, embedder) -> RagBlend:
    store = RagBlend(tmp_path_factory.mktemp("real") / "store", model=smollm, embedder=embedder)
    store.add_documents(DOCUMENTS)
    yield store
    store.close()


@pytest.mark.parametrize("question", QUESTIONS)
def test_search_finds_the_document_that_answers_the_question_first(rb, question):
    hits = rb.search(question, top_k=3)
    assert hits[0].doc_id == QUESTIONS[question], [(h.doc_id, round(h.score, 3)) for h in hits]


def test_the_store_holds_23040_bytes_of_fp16_kv_per_token(rb):
    stats = rb.stats()
    assert stats.documents == 3 and stats.tokens > 0
    assert stats.kv_bytes / stats.tokens == 23_040  # 30 layers x 3 KV heads x 64 dims x (K, V) x 2 bytes


def test_stored_kv_reproduces_the_real_model_cache(rb, smollm):
    [hit] = rb.search("How do plants make sugar from light?", top_k=1)
    stored = rb.store.kv.load(hit.chunk_id)
    prefix = list(rb.template.prefix_ids)
    with torch.inference_mode():
        cache = smollm.model.model(torch.tensor([prefix + hit.token_ids]), use_cache=True).cache
    P, n = len(prefix), len(hit.token_ids)
    cos, sin = rotary_cos_sin(smollm.decoder.rotary_emb, torch.arange(P, P + n), torch.float32)
    for layer in range(smollm.num_layers):
        for actual, expected in ((apply_rope(stored.keys[layer].float(), cos, sin), cache.layers[layer].keys[0, :, P:]),
                                 (stored.values[layer].float(), cache.layers[layer].values[0, :, P:])):
            scale = expected.abs().max().item()
            torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3 * scale)
