"""Specification of the exact-path tree: a request whose chunks begin with a sequence some earlier request
computed in full context loads that sequence's KV and answers as full prefill of the same ordered prompt,
token for token, at any depth; `order="cache"` puts the longest stored sequence first; documents that change
or go take their paths with them; paths survive a restart, stay inside their namespace, live on a shared
Redis like everything else, and share the KV budget (tiny random models, real stores)."""
from __future__ import annotations

import json
import random

import pytest

from ragblend import RagBlend
from ragblend.cli import main

FACTS = [
    "The lighthouse of Varn was built in 1821 by the engineer Oda Pell on a granite cliff.",
    "Oda Pell later moved to the city of Kessel, where she designed three bridges.",
    "Kessel is famous for its glass markets and its mayor Tomas Reh.",
    "The river Am floods every spring and feeds the marshes south of Kessel.",
    "Glass from Kessel was traded for salt with the northern island of Brin.",
    "Brin's harbour froze in the winter of 1850, stranding twelve ships.",
]
OTHER = "Salt merchants from Brin crossed the strait in flat boats every autumn."
QUESTION = "Which city did the builder of the Varn lighthouse move to?"
NEW = 8


@pytest.fixture
def make_rb(tiny_model_factory, embedder, tmp_path):
    made = []

    def make(kind: str = "llama", folder: str = "store", **kwargs) -> RagBlend:
        rb = RagBlend(tmp_path / folder, model=tiny_model_factory(kind), embedder=embedder, **kwargs)
        made.append(rb)
        return rb

    yield make
    for rb in made:
        rb.close()


def ask(rb: RagBlend, contexts: list[str], mode: str, **kwargs):
    return rb.query(QUESTION, contexts=contexts, mode=mode, max_new_tokens=NEW, **kwargs)


def head_tokens(answer, depth: int) -> int:
    """Prompt tokens of the answer's first `depth` chunks."""
    return sum(c.tokens for c in answer.chunks[:depth])


def chunk_ids(answer) -> list[str]:
    return [c.chunk_id for c in answer.chunks]


def nodes(rb: RagBlend):
    rb.requests.wait_paths()  # the last request's nodes are written in the background
    with rb.store.env.begin() as txn:
        return rb.store.paths.nodes(txn)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_prefix_at_every_depth_answers_as_full_prefill_token_for_token(make_rb, kind):
    rb = make_rb(kind)
    full_all = ask(rb, FACTS, "full")  # computes all six chunks in full context: nodes of depth 2..6
    assert len(nodes(rb)) == len(FACTS) - 1
    for depth in range(1, len(FACTS) + 1):
        contexts = FACTS[:depth] + [OTHER]  # a stored head, then a chunk no path holds
        prefix = ask(rb, contexts, "prefix")
        full = ask(rb, contexts, "full")
        assert prefix.timings["exact_hit_tokens"] == head_tokens(prefix, depth)
        assert prefix.token_ids == full.token_ids
        assert (prefix.first_token_logits - full.first_token_logits).abs().max() < 1e-3  # fp16 storage
    assert ask(rb, FACTS, "prefix").token_ids == full_all.token_ids


def test_a_miss_computes_the_sequence_once_and_the_next_request_loads_it_exactly(make_rb):
    rb = make_rb()
    first = ask(rb, FACTS[:4], "prefix")
    again = ask(rb, FACTS[:4], "prefix")
    assert first.timings["exact_hit_tokens"] == head_tokens(first, 1)  # the first chunk's own record
    assert again.timings["exact_hit_tokens"] == head_tokens(again, 4)
    assert again.recomputed_tokens < first.recomputed_tokens
    assert again.token_ids == first.token_ids == ask(rb, FACTS[:4], "full").token_ids
    assert rb.stats().path_hits >= 1 and rb.stats().path_hit_tokens == head_tokens(again, 4)


def test_blend_fuses_only_what_follows_the_exact_path_and_equals_full_where_the_tree_covers_all(make_rb):
    rb = make_rb()
    full = ask(rb, FACTS[:3], "full")
    covered = ask(rb, FACTS[:3], "blend")
    assert covered.timings["exact_hit_tokens"] == head_tokens(covered, 3)
    assert covered.token_ids == full.token_ids
    longer = ask(rb, FACTS[:5], "blend", recompute_ratio=1.0)
    assert longer.timings["exact_hit_tokens"] == head_tokens(longer, 3)
    assert longer.token_ids == ask(rb, FACTS[:5], "full").token_ids  # ratio 1 after an exact path: still exact
    assert len(nodes(rb)) == 4  # blend added nothing (its chunks are fused, not exact); full added 3..5


def test_cache_order_puts_the_longest_stored_sequence_first_and_answers_as_full_of_that_order(make_rb):
    rb = make_rb()
    stored = ask(rb, FACTS[:4], "full")
    shuffled = FACTS[:4][::-1] + FACTS[4:5]
    cached = ask(rb, shuffled, "prefix", order="cache")
    assert cached.order == "cache"
    assert chunk_ids(cached)[:4] == chunk_ids(stored)
    assert cached.timings["exact_hit_tokens"] == head_tokens(cached, 4)
    assert cached.token_ids == ask(rb, FACTS[:5], "full").token_ids
    as_retrieved = ask(rb, shuffled, "prefix")
    assert as_retrieved.order == "retrieval" and chunk_ids(as_retrieved)[0] == chunk_ids(cached)[3]


def test_cache_order_without_a_stored_path_keeps_the_retrieval_order(make_rb):
    rb = make_rb()
    order = random.Random(0).sample(FACTS, 4)
    answer = ask(rb, order, "blend", order="cache")
    assert [c.chunk_id for c in answer.chunks] == chunk_ids(ask(rb, order, "reuse"))


def test_an_unknown_order_is_refused(make_rb):
    rb = make_rb()
    with pytest.raises(ValueError, match="unknown order 'best'"):
        ask(rb, FACTS[:2], "prefix", order="best")


def test_deleting_or_changing_a_document_drops_every_path_through_its_chunks(make_rb):
    rb = make_rb()
    rb.add_documents([{"id": f"d{i}", "text": text} for i, text in enumerate(FACTS[:4])])
    hits = rb.search(FACTS[0], top_k=4)
    rb.query(QUESTION, contexts=hits, mode="full", max_new_tokens=1)
    assert len(nodes(rb)) == 3
    rb.delete_documents([hits[2].doc_id])
    left = nodes(rb)
    assert [node.chunks for node in left] == [[hits[0].chunk_id, hits[1].chunk_id]]  # the head before it
    rb.add_documents([{"id": hits[0].doc_id, "text": "A new text about something else entirely."}])
    assert nodes(rb) == []


def test_paths_survive_a_restart(make_rb):
    rb = make_rb()
    ask(rb, FACTS[:3], "full")
    rb.close()
    reopened = make_rb()
    answer = reopened.query(QUESTION, contexts=FACTS[:3], mode="prefix", max_new_tokens=1)
    assert answer.timings["exact_hit_tokens"] == head_tokens(answer, 3)


def test_a_namespace_never_loads_another_namespaces_path(make_rb):
    rb = make_rb()
    ask(rb, FACTS[:3], "full", namespace="tenant-a")
    other = ask(rb, FACTS[:3], "prefix", namespace="tenant-b")
    assert other.timings["exact_hit_tokens"] == head_tokens(other, 1)
    own = ask(rb, FACTS[:3], "prefix", namespace="tenant-a")
    assert own.timings["exact_hit_tokens"] == head_tokens(own, 3)


def test_a_session_turn_after_history_does_not_use_paths_computed_behind_the_bare_prefix(make_rb):
    rb = make_rb()
    ask(rb, FACTS[:3], "full")
    chat = rb.chat()
    chat.send("Hello there.", contexts=FACTS[3:4], mode="full", max_new_tokens=2)
    turn = chat.send(QUESTION, contexts=FACTS[:3], mode="prefix", max_new_tokens=2)
    assert turn.timings["exact_hit_tokens"] == 0


@pytest.mark.parametrize("policy", ["pgdsf", "lru"])
def test_the_budget_holds_chunk_kv_and_paths_together_and_evicts_children_first(make_rb, policy):
    rb = make_rb(kv_policy=policy)
    ask(rb, FACTS, "full")
    for start in range(3):
        ask(rb, FACTS[start:start + 3], "prefix")
    stats = rb.stats()
    limit = (stats.kv_bytes + stats.path_bytes) // 2
    rb.store.set_kv_max_bytes(limit)
    ask(rb, FACTS[:2], "prefix")
    stats = rb.stats()
    assert stats.kv_bytes + stats.path_bytes <= limit and stats.evictions > 0
    held = {node.key for node in nodes(rb)}
    for node in nodes(rb):  # the tree's invariant: a stored node's parent is stored
        assert node.parent is None or node.parent in held
    assert ask(rb, FACTS[:4], "prefix").token_ids == ask(rb, FACTS[:4], "full").token_ids


def test_an_unknown_policy_is_refused(tiny_model_factory, embedder, tmp_path):
    with pytest.raises(ValueError, match="kv_policy must be one of pgdsf, lru"):
        RagBlend(tmp_path / "store", model=tiny_model_factory("llama"), embedder=embedder, kv_policy="fifo")


def test_stats_json_reports_the_tree(make_rb, tmp_path, capsys):
    rb = make_rb()
    ask(rb, FACTS[:3], "full")
    ask(rb, FACTS[:3], "prefix")
    rb.close()
    main(["stats", "--store", str(tmp_path / "store"), "--json"])
    stats = json.loads(capsys.readouterr().out)
    assert stats["paths"] == 2 and stats["path_bytes"] > 0 and stats["path_hits"] == 1

