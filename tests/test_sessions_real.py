"""A real conversation with SmolLM2: every turn answers as a full prefill of the whole conversation would."""
from __future__ import annotations

import pytest
import torch

from ragblend.api import RagBlend
from test_integration_real import DOCUMENTS

pytestmark = pytest.mark.integration

TURNS = ["Where is the largest coral reef in the world?", "What has damaged the coral reef?",
         "How do plants make sugar from light?"]


@pytest.fixture(scope="module")
def rb(tmp_path_factory, smollm, embedder) -> RagBlend:
    rb = RagBlend(tmp_path_factory.mktemp("real-chat") / "store", model=smollm, embedder=embedder)
    rb.add_documents(DOCUMENTS)
    yield rb
    rb.close()


def greedy(rb: RagBlend, ids: list[int], steps: int) -> list[int]:
    with torch.inference_mode():
        out = rb.model.model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                                      eos_token_id=rb.model.tokenizer.eos_token_id, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_saved_history_answers_like_full_recompute_of_the_conversation(rb):
    chat = rb.chat()
    for question in TURNS:
        record = rb.session_manager.store.get(chat.session_id)
        before = list(rb.template.prefix_ids) + [t for turn in record.turns for t in turn.token_ids]
        answer = chat.send(question, top_k=1, mode="full", max_new_tokens=12)
        turn = rb.session_manager.store.get(chat.session_id).turns[-1]
        prompt = before + turn.token_ids[: answer.prompt_tokens - len(before)]
        expected = [t for t in greedy(rb, prompt, 12) if t != rb.model.tokenizer.eos_token_id]
        assert answer.token_ids == expected, (question, answer.text)
    assert answer.timings["history_source"] == "ram" and chat.turns == 3


def test_blend_turns_reuse_the_history_and_answer(rb):
    chat = rb.chat()
    first = chat.send(TURNS[0], top_k=1, max_new_tokens=12)
    second = chat.send(TURNS[1], top_k=1, max_new_tokens=12)
    assert "barrier reef" in first.text.lower(), first.text
    assert second.chunks == []  # the reef passage is already in the history
    assert second.timings["history_tokens"] > first.prompt_tokens
