"""`ragblend calibrate` and the calibrated default: tiny random models, real LMDB stores."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ragblend.api import RagBlend
from ragblend.cli import main
from ragblend.engine.selection import BlendConfig
from ragblend.eval.calibrate import CalibrationConfig, calibrate
from ragblend.eval.store_questions import CalibrationQuestion, store_questions
from ragblend.storage.calibration import Calibration, read_calibration, read_partial, write_calibration
from ragblend.storage.store import Store

DOCS = [
    "The lighthouse of Varn was built in 1821 by the engineer Oda Pell. It stands on a granite cliff above the bay.",
    "Oda Pell later moved to the city of Kessel, where she designed three bridges over the river Amber.",
    "Kessel is famous for its glass markets. Its mayor in 1850 was Tomas Reh, a baker from the coast.",
]
QUESTIONS = [CalibrationQuestion("Who built the lighthouse of Varn?", DOCS, ["Oda Pell"]),
             CalibrationQuestion("Where did Oda Pell move?", None, ["Kessel"]),
             CalibrationQuestion("Who was mayor of Kessel in 1850?", DOCS[1:], ["Tomas Reh"])]


@pytest.fixture
def rb(tiny_model, embedder, tmp_path) -> RagBlend:
    rb = RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder)
    rb.add_documents(DOCS)
    yield rb
    rb.close()


def calibration(ratio: float, selection: str = "hkvd") -> Calibration:
    return Calibration(ratio=ratio, selection=selection, target=0.9, metric="identical", questions=50,
                       agreement=0.92, ttft_vs_full=0.6, date="2026-01-01T00:00:00+00:00", met=True)


def test_a_store_with_a_calibrated_ratio_answers_with_it(rb):
    assert rb.query("Who built it?", max_new_tokens=2).timings["recompute_ratio"] == BlendConfig().recompute_ratio
    write_calibration(rb.store, rb.store.manifest.kv_fingerprint, calibration(0.4))
    assert rb.query("Who built it?", max_new_tokens=2).timings["recompute_ratio"] == 0.4
    assert rb.chat().send("Who built it?", max_new_tokens=2).timings["recompute_ratio"] == 0.4


def test_an_explicit_ratio_or_blend_config_wins_over_the_calibration(rb, tiny_model, embedder):
    write_calibration(rb.store, rb.store.manifest.kv_fingerprint, calibration(0.4))
    assert rb.query("Who built it?", recompute_ratio=0.1, max_new_tokens=2).timings["recompute_ratio"] == 0.1
    config = BlendConfig(recompute_ratio=0.2)
    assert rb.query("Who built it?", blend=config, max_new_tokens=2).timings["recompute_ratio"] == 0.2
    rb.close()
    pinned = RagBlend(rb.store.path, model=tiny_model, embedder=embedder, blend=BlendConfig(recompute_ratio=0.3))
    assert pinned.query("Who built it?", max_new_tokens=2).timings["recompute_ratio"] == 0.3


def test_the_calibration_belongs_to_its_model_fingerprint(rb):
    write_calibration(rb.store, "another-model", calibration(0.7))
    assert read_calibration(rb.store, rb.store.manifest.kv_fingerprint) is None
    assert rb.query("Who built it?", max_new_tokens=2).timings["recompute_ratio"] == BlendConfig().recompute_ratio


def test_calibrate_stores_the_first_ratio_that_meets_the_target_and_queries_use_it(rb):
    # A tiny random model answers with one repeated token whatever the cache: every ratio agrees.
    report = calibrate(rb, QUESTIONS, CalibrationConfig(target=0.9, metric="identical", ratios=(0.6, 0.3)),
                          progress=False)
    assert [(r.ratio, r.status, r.answered) for r in report.runs] == [(0.3, "met", 3), (0.6, "not run", 0)]
    stored = read_calibration(rb.store, rb.store.manifest.kv_fingerprint)
    assert stored == report.calibration and stored.ratio == 0.3 and stored.agreement == 1.0 and stored.met
    assert rb.query("Who built it?", max_new_tokens=2).timings["recompute_ratio"] == 0.3
    assert read_partial(rb.store, "any") == {}  # partial results are dropped once it is stored


def test_when_no_ratio_below_one_meets_the_target_one_is_stored_and_said(rb):
    # Full prefill answers none right, so no ratio can show it keeps full's right answers.
    unanswerable = [replace(q, answers=["Zyzzyva"]) for q in QUESTIONS]
    report = calibrate(rb, unanswerable, CalibrationConfig(target=0.5, metric="kept", ratios=(0.3,)), progress=False)
    assert report.calibration.ratio == 1.0 and not report.calibration.met
    assert "no ratio below 1 met kept >= 50%" in report.calibration.summary()
    answer = rb.query("Who built it?", mode="blend", max_new_tokens=8)
    assert answer.timings["recompute_ratio"] == 1.0
    assert answer.text == rb.query("Who built it?", mode="full", max_new_tokens=8).text


def test_kept_needs_gold_answers(rb):
    with pytest.raises(ValueError, match="gold answers"):
        calibrate(rb, [CalibrationQuestion("Who?")], CalibrationConfig(metric="kept"), progress=False)


def test_store_questions_blank_a_word_of_a_stored_chunk(rb):
    questions = store_questions(rb.store, 2, seed=0)
    assert 1 <= len(questions) <= 2
    for q in questions:
        assert "___" in q.question and q.contexts is None
        assert any(q.answers[0] in d and q.question.split('"')[1].replace("___", q.answers[0]) in " ".join(d.split())
                   for d in DOCS)
    assert store_questions(rb.store, 2, seed=0) == questions


def store_records(path) -> dict:
    store = Store(path, readonly=True)
    with store.env.begin() as txn:
        found = {bytes(k): bytes(v) for k, v in txn.cursor(db=store.meta_db)}
    store.close()
    return found


@pytest.mark.parametrize("lines, message", [
    (['{"question": "ok?"}', '{"contexts": ["a"]}'], "questions.jsonl:2: 'question' must be a non-empty string"),
    (['{"question": "ok?", "contexts": "not a list"}'], "'contexts' must be a non-empty list"),
    (['{"question": "ok?"', ], "questions.jsonl:1: malformed JSON"),
    (['{"question": "ok?"}'], "metric 'kept' needs gold 'answers'"),
])
def test_a_bad_questions_file_is_a_clear_error_that_writes_nothing(rb, tmp_path, capsys, lines, message):
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rb.close()
    before = store_records(rb.store.path)
    metric = ["--metric", "kept"] if "kept" in message else []
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--store", str(rb.store.path), "--questions", str(path), "--out", str(tmp_path / "out"),
              *metric])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert store_records(rb.store.path) == before
    assert not (tmp_path / "out").exists()


def test_stats_show_the_calibration(rb, capsys):
    write_calibration(rb.store, rb.store.manifest.kv_fingerprint, calibration(0.4, "query"))
    rb.close()
    main(["stats", "--store", str(rb.store.path), "--json"])
    shown = json.loads(capsys.readouterr().out)["calibration"]
    assert {k: shown[k] for k in ("ratio", "target", "metric", "questions", "agreement", "selection")} == dict(
        ratio=0.4, target=0.9, metric="identical", questions=50, agreement=0.92, selection="query")
    main(["stats", "--store", str(rb.store.path)])
    assert "calibration: ratio 0.4 (query): identical 92% >= 90% on 50 questions" in capsys.readouterr().out


def test_a_calibrated_selection_is_used_too(rb):
    write_calibration(rb.store, rb.store.manifest.kv_fingerprint, calibration(0.4, "query"))
    assert rb.calibrated_blend() == replace(BlendConfig(query_chunks=1.0), recompute_ratio=0.4)


def test_an_interrupted_calibration_resumes_from_what_it_stored(tiny_model, embedder, tmp_path):
    from ragblend.eval.calibrate import _run_key
    from ragblend.storage.calibration import write_partial

    rb = RagBlend(tmp_path / "store", model=tiny_model, embedder=embedder)
    config = CalibrationConfig(target=0.5, metric="identical", ratios=(0.3,))
    with pytest.raises(ValueError, match="no documents"):  # the second question retrieves from an empty store
        calibrate(rb, QUESTIONS[:2], config, progress=False)
    key = _run_key(rb.store.manifest.kv_fingerprint, QUESTIONS[:2], config)
    partial = read_partial(rb.store, key)
    assert list(partial["full"]) == ["0"]  # the first question's reference answer was stored
    partial["full"]["0"]["text"] = "a reference answer only the stored record has"
    write_partial(rb.store, key, partial)
    rb.add_documents(DOCS)
    report = calibrate(rb, QUESTIONS[:2], config, progress=False)
    assert (report.runs[0].answered, report.runs[0].agreement) == (2, 0.5)  # the stored reference was used
    rb.close()


def test_calibration_measures_fusion_not_the_exact_path_tree(rb):
    """Full prefill's paths would make every later blend over the same passages exact: calibrate runs without
    the tree (it adds no path and loads none) and leaves it on for the store's requests afterwards."""
    calibrate(rb, QUESTIONS, CalibrationConfig(target=0.9, metric="identical", ratios=(0.3,)), progress=False)
    assert rb.stats().paths == 0 and rb.requests.exact_paths
    rb.query(QUESTIONS[0].question, contexts=DOCS, mode="full", max_new_tokens=1)
    assert rb.query(QUESTIONS[0].question, contexts=DOCS, max_new_tokens=1).timings["exact_hit_tokens"] > 0
