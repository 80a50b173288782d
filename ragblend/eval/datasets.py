"""Load RAG evaluation records from a JSON array or JSONL file, validating each one.

A record is `{"question": str, "answers": [str, ...], "ctxs": [{"title": str, "text": str}, ...]}`
(the MuSiQue shape; `title` may be left out); each ctx is one passage and becomes one KV chunk.
Errors name the file and the record so a bad line in a large file is easy to find.
"""

from __future__ import annotations

import json
from pathlib import Path

from ragblend.storage.documents import jsonl_items


def load_records(path: str | Path) -> list[dict]:
    """Records from `path`: a JSON array of records, or one JSON record per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    text = path.read_text(encoding="utf-8")
    records = _load_array(path, text) if text.lstrip().startswith("[") else _load_jsonl(path, text)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _load_array(path: Path, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    for i, record in enumerate(data):
        _check(record, f"{path}: record {i}")
    return data


def _load_jsonl(path: Path, text: str) -> list[dict]:
    records = []
    for where, record in jsonl_items(path, text):
        _check(record, where)
        records.append(record)
    return records


def _check(record: object, where: str) -> None:
    """Raise ValueError describing the first thing wrong with `record`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
    ctxs = record.get("ctxs")
    if not isinstance(ctxs, list) or not ctxs:
        raise ValueError(f"{where}: 'ctxs' must be a non-empty list of passages")
    for j, ctx in enumerate(ctxs):
        if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
            raise ValueError(f"{where}: ctxs[{j}] must be an object with a string 'text'")
        if not isinstance(ctx.get("title", ""), str):
            raise ValueError(f"{where}: ctxs[{j}].title must be a string")
