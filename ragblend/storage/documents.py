"""Reading documents from .txt, .md and .jsonl files and folders, with errors that say where."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl", ".pdf")
EXPIRE_MODES = ("kv", "document")  # what a document's TTL drops: its KV only, or the document too


class DocumentError(ValueError):
    """Unreadable input: names the file (and line) so the user can fix it."""


@dataclass
class Document:
    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    ttl_s: float | None = None  # after this long its KV is dropped (and, with expire="document", itself)
    expire: str = "kv"

    def content_hash(self) -> str:
        payload = json.dumps({"text": self.text, "metadata": self.metadata}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()


def check_unicode(value: object, where: str) -> None:
    """Every string in `value` (nested dicts and lists too, keys included) must be valid Unicode; `where`
    names `value` in the error ("" for a request body: its fields name themselves). JSON
    may carry a lone surrogate ("\\ud800"), which Python decodes but the tokenizer and UTF-8 cannot take."""
    pending = [(value, where)]
    while pending:
        item, at = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DocumentError(f"{at}: not valid Unicode (a lone surrogate at character {exc.start})") from None
        elif isinstance(item, dict):
            pending += [(key, at) for key in item] + [(v, f"{at}.{key}".lstrip(".")) for key, v in item.items()]
        elif isinstance(item, (list, tuple)):
            pending += [(v, f"{at}.{i}".lstrip(".")) for i, v in enumerate(item)]


def text_id(text: str) -> str:
    return "doc-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def coerce_document(item: str | dict | Document, where: str = "document") -> Document:
    """A string, a dict with `text` (and optional `id`, `metadata`), or a Document."""
    if isinstance(item, Document):
        return item
    if isinstance(item, str):
        item = {"text": item}
    if not isinstance(item, dict):
        raise DocumentError(f"{where}: expected a string or a dict with 'text', got {type(item).__name__}")
    check_unicode(item, where)
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DocumentError(f"{where}: 'text' must be a non-empty string")
    metadata = item.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise DocumentError(f"{where}: 'metadata' must be an object")
    doc_id = item.get("id")
    if doc_id is not None and (not isinstance(doc_id, (str, int)) or str(doc_id) == ""):
        raise DocumentError(f"{where}: 'id' must be a non-empty string")
    ttl_s, expire = item.get("ttl_s"), item.get("expire", "kv")
    if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or ttl_s <= 0):
        raise DocumentError(f"{where}: 'ttl_s' must be a positive number of seconds")
    if expire not in EXPIRE_MODES:
        raise DocumentError(f"{where}: 'expire' must be one of {', '.join(EXPIRE_MODES)}")
    return Document(id=str(doc_id) if doc_id is not None else text_id(text), text=text, metadata=metadata,
                    ttl_s=ttl_s, expire=expire)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise DocumentError(f"{path}: looks like a binary file, not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DocumentError(f"{path}: file is empty")
    return text


def _read_pdf(path: Path) -> str:
    """The text layer of a PDF (pypdf, from the `serve` extra); scanned pages without one give nothing."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise DocumentError(f"{path}: reading PDF needs pypdf: pip install 'ragblend[serve]'") from None
    try:
        text = "\n\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
    except (PdfReadError, ValueError, OSError) as exc:
        raise DocumentError(f"{path}: not a readable PDF ({exc})") from None
    if not text.strip():
        raise DocumentError(f"{path}: the PDF has no text layer (scanned pages need OCR first)")
    return text


def jsonl_items(path: Path, text: str) -> Iterator[tuple[str, object]]:
    """("file:line", parsed object) for every non-blank line; a malformed line is a DocumentError."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DocumentError(f"{where}: malformed JSON ({exc.msg})") from None


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for where, item in jsonl_items(path, _read_text(path)):
        doc = coerce_document(item, where)
        doc.source = where
        docs.append(doc)
    return docs


def _files(paths: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """(file, root) pairs; a folder contributes its supported files, recursively, in sorted order."""
    found = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DocumentError(f"{path}: no such file or folder")
        if path.is_dir():
            found += [(f, path) for f in sorted(path.rglob("*")) if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES]
        elif path.suffix.lower() in SUPPORTED_SUFFIXES:
            found.append((path, path.parent))
        else:
            raise DocumentError(f"{path}: unsupported file type (use {', '.join(SUPPORTED_SUFFIXES)})")
    return found


def read_documents(paths: list[str | Path]) -> list[Document]:
    """All documents under `paths`; every file is read and checked before anything is returned."""
    docs: list[Document] = []
    for file, root in _files(paths):
        if file.suffix.lower() == ".jsonl":
            docs += _read_jsonl(file)
        else:
            relative = file.relative_to(root).as_posix()
            text = _read_pdf(file) if file.suffix.lower() == ".pdf" else _read_text(file)
            docs.append(Document(id=relative, text=text, metadata={"path": relative}, source=str(file)))
    if not docs:
        raise DocumentError(f"no {', '.join(SUPPORTED_SUFFIXES)} files found under {', '.join(map(str, paths))}")
    duplicates = sorted(doc_id for doc_id, n in Counter(d.id for d in docs).items() if n > 1)
    if duplicates:
        raise DocumentError(f"duplicate document ids: {', '.join(duplicates[:5])}")
    return docs
