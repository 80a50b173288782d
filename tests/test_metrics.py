import pytest
import torch

from ragblend.eval.metrics import (
    best_em,
    best_f1,
    contains_answer,
    exact_match,
    first_line,
    first_token_kl,
    keeps,
    normalize_answer,
    token_f1,
)


def test_first_line_skips_blank_lines_and_strips():
    assert first_line("\n\n  Paris  \nThe capital of France.") == "Paris"
    assert first_line("") == ""


def test_normalize_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The  Eiffel-Tower, in a PARIS! ") == "eiffeltower in paris"


def test_articles_are_removed_only_as_whole_words():
    assert normalize_answer("Theatre and an Anthem") == "theatre and anthem"


def test_f1_partial_overlap():
    # "eiffel tower" vs "eiffel tower in paris": precision 2/2, recall 2/4.
    assert token_f1("the Eiffel tower", "Eiffel Tower in Paris") == pytest.approx(2 / 3)


def test_f1_counts_repeated_tokens_at_most_as_often_as_in_gold():
    # overlap is 1 ("paris" once): precision 1/2, recall 1/1.
    assert token_f1("Paris Paris", "Paris") == pytest.approx(2 / 3)


def test_f1_edge_cases():
    assert token_f1("Dunmore", "dunmore.") == 1.0
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("", "Paris") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing


def test_exact_match_ignores_case_punctuation_and_articles():
    assert exact_match("The Exeter College.", "exeter college")
    assert not exact_match("Exeter", "Exeter College")


def test_best_scores_use_the_first_line_and_best_gold():
    prediction = "Exeter College\nHe later studied in Oxford."
    assert best_f1(prediction, ["Oxford", "Exeter College"]) == 1.0
    assert best_em(prediction, ["Oxford", "Exeter College"])
    assert not best_em(prediction, ["Oxford"])


def test_contains_answer_looks_for_gold_inside_the_first_line():
    assert contains_answer("The city where she works is Dunmore.", ["Dunmore"])
    assert not contains_answer("Nowhere\nDunmore", ["Dunmore"])


def test_contains_answer_matches_whole_words_only():
    assert contains_answer("Mara Quill, in Dunmore", ["mara quill"])
    assert not contains_answer("Dunmoreton", ["Dunmore"])


def test_kl_is_zero_for_identical_logits():
    logits = torch.randn(50)
    assert first_token_kl(logits, logits.clone()) == pytest.approx(0.0, abs=1e-12)


def test_kl_is_positive_for_different_logits_and_invariant_to_shift():
    ref, other = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 2.0, -1.0])
    assert first_token_kl(ref, other) > 0.1
    assert first_token_kl(ref, ref + 5.0) == pytest.approx(0.0, abs=1e-12)


def test_kl_accepts_low_precision_logits():
    ref = torch.randn(100)
    assert first_token_kl(ref.half(), (ref + 0.5 * torch.randn(100)).bfloat16()) > 0.0


def test_kl_ignores_tokens_the_reference_masks_out():
    masked = torch.tensor([1.0, 0.0, float("-inf")])
    assert first_token_kl(masked, masked.clone()) == pytest.approx(0.0, abs=1e-12)


def test_keeps_is_share_of_reference_hits_that_survive():
    assert keeps([True, True, False, True], [True, False, True, True]) == pytest.approx(2 / 3)


def test_keeps_is_none_when_reference_got_nothing_right():
    assert keeps([False, False], [True, True]) is None


def test_keeps_rejects_lists_of_different_length():
    with pytest.raises(ValueError):
        keeps([True], [True, False])
