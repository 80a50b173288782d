"""The evaluation harness: a tiny-model run produces every output, resumes, and reports per mode."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ragblend.cli import main

OUTPUTS = ["results.json", "results.jsonl", "summary.md", "summary.json", "quality_vs_ttft.png", "ratio_sweep.png",
           "speed.md", "speed.json", "ttft_vs_context.png", "synthetic.jsonl",
           "summary-1hop.md", "summary-2hop.md"]  # the synthetic set's one- and two-hop questions apart


@pytest.fixture(scope="module")
def eval_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    argv = ["eval", "--synthetic", "2", "--model", tiny_model.model.name_or_path, "--out", str(out),
            "--ratios", "0.15,auto", "--max-new-tokens", "3", "--speed-sizes", "2", "--speed-repeats", "1"]
    main(argv)
    return out, argv


def test_eval_on_two_questions_writes_every_output_file(eval_run):
    out, _ = eval_run
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name


def test_every_question_is_scored_in_every_mode_against_full(eval_run):
    out, _ = eval_run
    rows = json.loads((out / "results.json").read_text())
    labels = {r["label"] for r in rows}
    assert labels == {"full", "prefix", "reuse", "blend@0.15", "blend@auto"}
    assert len(rows) == 2 * len(labels)
    assert all(0.05 <= r["ratio"] <= 0.5 for r in rows if r["label"] == "blend@auto")  # the ratio auto chose
    for row in rows:
        assert {"answer", "f1", "em", "correct", "identical", "kl", "ttft_s", "prompt_tokens", "recomputed_tokens"} <= set(row)
    full = [r for r in rows if r["label"] == "full"]
    assert all(r["identical"] and r["kl"] == pytest.approx(0.0, abs=1e-9) for r in full)


def test_rerun_with_the_same_out_skips_finished_questions(eval_run, capsys):
    out, argv = eval_run
    before = (out / "results.jsonl").read_text()
    main(argv)
    assert (out / "results.jsonl").read_text() == before


def test_rerun_with_other_ratios_scores_them_instead_of_reusing_old_rows(eval_run):
    out, argv = eval_run
    ratios = argv.index("--ratios") + 1
    main([*argv[:ratios], "0.3", *argv[ratios + 1:]])
    labels = {r["label"] for r in json.loads((out / "results.json").read_text())}
    assert labels == {"full", "prefix", "reuse", "blend@0.3"}


def test_malformed_dataset_record_is_reported_with_its_index(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answers": ["a"], "ctxs": [{"title": "t", "text": "x"}]}) + "\n"
                   + json.dumps({"question": "", "answers": ["a"], "ctxs": []}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--dataset", str(bad), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "bad.jsonl" in capsys.readouterr().err


def test_fidelity_ablation_scores_each_named_variant_against_full(tiny_model, tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py"
    out = tmp_path / "fid"
    subprocess.run([sys.executable, str(script), "--synthetic", "2", "--passages", "7", "--variants", "value,random",
                    "--ratios", "0.15,0.5", "--max-new-tokens", "2", "--model", tiny_model.model.name_or_path,
                    "--out", str(out)], check=True, capture_output=True)
    table = (out / "summary.md").read_text()
    for label in ("full", "reuse", "value@0.15", "value@0.5", "random@0.15", "random@0.5"):
        assert f"| {label} |" in table
    assert (out / "curves.png").stat().st_size > 0
