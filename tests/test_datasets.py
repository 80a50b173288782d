import json

import pytest

from ragblend.eval.datasets import load_records

GOOD = {"question": "Where?", "answers": ["Dunmore"], "ctxs": [{"title": "t", "text": "Mara works in Dunmore."}]}


def test_loads_a_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD], indent=2))
    assert load_records(path) == [GOOD, GOOD]


def test_loads_jsonl_and_skips_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n")
    assert load_records(str(path)) == [GOOD, GOOD]


def test_passage_title_is_optional(tmp_path):
    record = {**GOOD, "ctxs": [{"text": "Mara works in Dunmore."}]}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record))
    assert load_records(path) == [record]


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="no records"):
        load_records(path)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_records(path)


@pytest.mark.parametrize(
    "bad, what",
    [
        ({**GOOD, "question": "  "}, "question"),
        ({k: v for k, v in GOOD.items() if k != "answers"}, "answers"),
        ({**GOOD, "answers": []}, "answers"),
        ({**GOOD, "answers": [3]}, "answers"),
        ({**GOOD, "ctxs": []}, "ctxs"),
        ({**GOOD, "ctxs": [{"title": "t"}]}, r"ctxs\[0\]"),
        ({**GOOD, "ctxs": [{"title": "t", "text": None}]}, r"ctxs\[0\]"),
        ({**GOOD, "ctxs": [{"title": 7, "text": "x"}]}, r"ctxs\[0\]\.title"),
        ("just a string", "object"),
    ],
)
def test_malformed_record_in_json_array_names_file_index_and_field(tmp_path, bad, what):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, bad]))
    with pytest.raises(ValueError, match=rf"data\.json: record 1: .*{what}"):
        load_records(path)


def test_malformed_jsonl_record_names_the_line_number(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "answers": "Dunmore"}) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl:3: .*answers"):
        load_records(path)


def test_invalid_json_line_names_the_line_number(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"data.jsonl:2: malformed JSON"):
        load_records(path)


def test_json_file_that_is_not_an_array_of_records_is_rejected(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(GOOD, indent=2))
    with pytest.raises(ValueError, match="data.json"):
        load_records(path)
