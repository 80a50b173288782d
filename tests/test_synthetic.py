import re

import pytest

from ragblend.eval.synthetic import make_synthetic

RECORDS = make_synthetic(40, seed=3)


def test_same_seed_gives_identical_records():
    assert make_synthetic(10, seed=7) == make_synthetic(10, seed=7)


def test_different_seeds_give_different_records():
    assert make_synthetic(10, seed=0) != make_synthetic(10, seed=1)


def test_n_must_be_positive():
    with pytest.raises(ValueError):
        make_synthetic(0)


def test_records_have_the_musique_shape():
    assert len(RECORDS) == 40
    for r in RECORDS:
        assert isinstance(r["question"], str) and r["question"]
        assert r["answers"] and all(isinstance(a, str) and a for a in r["answers"])
        assert r["hops"] in (1, 2)
        assert len(r["ctxs"]) == 6
        for ctx in r["ctxs"]:
            assert set(ctx) == {"title", "text"}
            assert 50 <= len(ctx["text"].split()) <= 120


def test_every_gold_answer_appears_verbatim_in_a_passage():
    for r in RECORDS:
        assert any(r["answers"][0] in ctx["text"] for ctx in r["ctxs"])


def test_both_hop_kinds_are_present_in_about_equal_share():
    hops = [r["hops"] for r in RECORDS]
    assert hops.count(1) == hops.count(2) == 20


def test_two_hop_facts_sit_in_two_separate_passages():
    for r in (r for r in RECORDS if r["hops"] == 2):
        project = re.search(r"the (\w+) project", r["question"]).group(1)
        texts = [ctx["text"] for ctx in r["ctxs"]]
        leader_fact = [i for i, t in enumerate(texts) if f"leader of the {project} project" in t]
        answer_fact = [i for i, t in enumerate(texts) if r["answers"][0] in t]
        assert len(leader_fact) == 1 and len(answer_fact) == 1
        # at least one distractor passage between the two facts
        assert abs(leader_fact[0] - answer_fact[0]) >= 2
        # the answer is not stated in the passage that names the leader, nor the project in the other
        assert r["answers"][0] not in texts[leader_fact[0]]
        assert project not in texts[answer_fact[0]]
