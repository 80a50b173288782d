"""One Request type: validated once when built, whoever builds it (query, Chat.send, the server, the
CLI), and answered the same whichever surface submits it."""
from __future__ import annotations

import pytest

from ragblend import RagBlend, Request
from ragblend.serve.schemas import ChatRequest

PASSAGES = ["The lighthouse of Varn was built in 1821 by the engineer Oda Pell.",
            "Oda Pell later designed three bridges over the river Am in Kessel."]
QUESTION = "Who built the lighthouse?"


@pytest.fixture
def rb(tiny_model, embedder, tmp_path):
    with RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder) as rb:
        yield rb


@pytest.mark.parametrize("options, message", [
    (dict(mode="magic"), "unknown mode"),
    (dict(order="best"), "unknown order 'best'"),
    (dict(top_k=0), "top_k"),
    (dict(recompute_ratio=1.5), "recompute_ratio"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(contexts=[]), "contexts must be a non-empty list"),
    (dict(namespace="no spaces"), "invalid namespace"),
])
def test_a_bad_option_is_refused_when_the_request_is_built(options, message):
    with pytest.raises(ValueError, match=message):
        Request(QUESTION, **options)


def test_an_empty_question_is_refused():
    with pytest.raises(ValueError, match="question"):
        Request("  ")


def test_contexts_and_stops_are_held_as_tuples_and_sampling_follows_the_options():
    request = Request(QUESTION, contexts=PASSAGES, stop=["\n"], max_new_tokens=5, temperature=0.5, seed=2)
    assert request.contexts == tuple(PASSAGES) and request.stop == ("\n",)
    assert (request.sampling.max_new_tokens, request.sampling.temperature, request.sampling.stop,
            request.sampling.seed) == (5, 0.5, ("\n",), 2)


def test_query_and_answer_of_its_request_give_the_same_answer(rb):
    by_keywords = rb.query(QUESTION, contexts=PASSAGES, max_new_tokens=6)
    by_request = rb.answer(Request(QUESTION, contexts=PASSAGES, max_new_tokens=6))
    assert by_keywords.token_ids == by_request.token_ids and by_keywords.text == by_request.text


def test_a_session_answers_a_request_of_its_own_namespace_only(rb):
    chat = rb.chat()
    assert chat.answer(Request(QUESTION, contexts=PASSAGES, max_new_tokens=3)).text is not None
    with pytest.raises(ValueError, match="namespace"):
        chat.answer(Request(QUESTION, contexts=PASSAGES, namespace="other"))


def test_a_server_body_becomes_the_same_request():
    body = ChatRequest.model_validate({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 7,
                                       "stop": "\n", "mode": "reuse", "contexts": PASSAGES, "seed": 1})
    assert body.request(QUESTION, "tenant-a") == Request(QUESTION, contexts=PASSAGES, mode="reuse", max_new_tokens=7,
                                                         stop=("\n",), stream=True, seed=1, namespace="tenant-a")
