"""Specification of reading documents and of the `ragblend` command line (tiny model, real MiniLM).

Bad input is reported as a `DocumentError` naming the file (and line), and the CLI turns it into
exit status 2 with `ragblend: error: ...` before the store is created or touched.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

import pytest

from ragblend.cli import build_parser, main
from ragblend.storage.documents import DocumentError, read_documents

# --- reading documents ----------------------------------------------------------------------------


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_folders_are_read_recursively_in_sorted_order_with_relative_paths_as_ids(tmp_path):
    write(tmp_path / "b.md", "# Bee\n\nBees make honey.")
    write(tmp_path / "a.txt", "Ants build nests.")
    write(tmp_path / "sub" / "c.txt", "Crickets chirp at night.")
    write(tmp_path / "notes.docx", b"PK ignored inside folders")
    docs = read_documents([tmp_path])
    assert [d.id for d in docs] == ["a.txt", "b.md", "sub/c.txt"]
    assert docs[2].text == "Crickets chirp at night." and docs[2].metadata == {"path": "sub/c.txt"}
    assert docs[2].source == str(tmp_path / "sub" / "c.txt")


def test_jsonl_lines_become_documents_with_ids_metadata_and_line_sources(tmp_path):
    path = write(tmp_path / "docs.jsonl", "\n".join([
        json.dumps({"id": "x1", "text": "First.", "metadata": {"lang": "en"}}),
        "",
        json.dumps({"text": "Second, without an id."}),
    ]))
    first, second = read_documents([path])
    assert (first.id, first.text, first.metadata, first.source) == ("x1", "First.", {"lang": "en"}, f"{path}:1")
    assert second.id.startswith("doc-") and second.source == f"{path}:3"


def test_a_document_without_an_id_gets_one_derived_from_its_text(tmp_path):
    a = write(tmp_path / "a.jsonl", json.dumps({"text": "Same text."}))
    b = write(tmp_path / "b.jsonl", json.dumps({"text": "Other text."}))
    assert read_documents([a])[0].id == read_documents([a])[0].id != read_documents([b])[0].id


def test_content_hash_changes_with_text_or_metadata(tmp_path):
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(d) for d in [
        {"id": "1", "text": "Alpha."}, {"id": "2", "text": "Alpha."}, {"id": "3", "text": "Beta."},
        {"id": "4", "text": "Alpha.", "metadata": {"k": 1}}]))
    a, same, other_text, other_meta = read_documents([path])
    assert a.content_hash() == same.content_hash()
    assert len({a.content_hash(), other_text.content_hash(), other_meta.content_hash()}) == 3


# Each bad input: a builder (tmp_path -> paths) and what the message must say.
def _missing(tmp):
    return [tmp / "nowhere.txt"], [r"nowhere\.txt", "no such file or folder"]


def _empty(tmp):
    return [write(tmp / "empty.txt", "  \n\n")], [r"empty\.txt", "empty"]


def _binary(tmp):
    return [write(tmp / "image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))], [r"image\.txt", "binary"]


def _not_utf8(tmp):
    return [write(tmp / "latin1.md", "caf\xe9 cr\xe8me".encode("latin-1"))], [r"latin1\.md", "UTF-8"]


def _malformed_jsonl(tmp):
    path = write(tmp / "broken.jsonl", json.dumps({"text": "fine"}) + "\n\n" + '{"text": "unterminated\n')
    return [path], [re.escape(f"{path}:3"), "malformed JSON"]


def _jsonl_without_text(tmp):
    path = write(tmp / "notext.jsonl", json.dumps({"text": "fine"}) + "\n" + json.dumps({"title": "no text"}))
    return [path], [re.escape(f"{path}:2"), "'text'"]


def _unsupported_suffix(tmp):
    return [write(tmp / "report.docx", b"PK")], [r"report\.docx", "unsupported file type", r"\.txt"]


def _unreadable_pdf(tmp):
    return [write(tmp / "scan.pdf", b"%PDF-1.4 truncated")], [r"scan\.pdf", "not a readable PDF"]


def _folder_without_documents(tmp):
    write(tmp / "in" / "slides.pptx", b"PK")
    (tmp / "in" / "empty-sub").mkdir()
    return [tmp / "in"], ["no .* files found", re.escape(str(tmp / "in"))]


def _duplicate_ids(tmp):
    a = write(tmp / "a.jsonl", json.dumps({"id": "same", "text": "One."}))
    b = write(tmp / "b.jsonl", json.dumps({"id": "same", "text": "Two."}))
    return [a, b], ["duplicate document ids", "same"]


BAD_INPUTS = [_missing, _empty, _binary, _not_utf8, _malformed_jsonl, _jsonl_without_text, _unsupported_suffix,
              _unreadable_pdf,
              _folder_without_documents, _duplicate_ids]
BAD_IDS = [f.__name__.lstrip("_") for f in BAD_INPUTS]


@pytest.mark.parametrize("bad_input", BAD_INPUTS, ids=BAD_IDS)
def test_bad_input_raises_a_document_error_that_says_where(tmp_path, bad_input):
    paths, fragments = bad_input(tmp_path)
    with pytest.raises(DocumentError) as excinfo:
        read_documents(paths)
    for fragment in fragments:
        assert re.search(fragment, str(excinfo.value)), (fragment, str(excinfo.value))


def test_one_bad_file_among_good_ones_fails_the_whole_read(tmp_path):
    write(tmp_path / "good.txt", "Good text.")
    write(tmp_path / "bad.txt", "")
    with pytest.raises(DocumentError, match=r"bad\.txt"):
        read_documents([tmp_path])


# --- the command line -----------------------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `ragblend ARGV` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def error_line(stderr: str) -> str:
    """The CLI's one-line error (stderr may also carry model-loading progress bars)."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("ragblend: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def folder_digest(folder: Path) -> dict[str, str]:
    """What the store folder holds, byte for byte (the LMDB lock file aside)."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.name != "lock.mdb"}


def stat_value(text: str, label: str) -> str:
    match = re.search(rf"^\s*{label}: (.+)$", text, flags=re.MULTILINE)
    assert match, f"no {label!r} line in:\n{text}"
    return match.group(1)


CORPUS = {
    "harbour.md": "# Harbour\n\nThe harbour master logs every ship. Ferries leave at dawn.\n\nFog closes the port in winter.",
    "bakery.txt": "The bakery opens at six. Its rye bread sells out by noon, and the croissants soon after.",
    "notes.jsonl": json.dumps({"id": "orchard", "text": "The orchard grows cider apples and quinces.",
                               "metadata": {"season": "autumn"}}) + "\n",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name, text in CORPUS.items():
        write(folder / name, text)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tiny_model) -> str:
    return tiny_model.model.config._name_or_path


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus, tiny_dir):
    """A store built by `ragblend ingest` on the corpus folder, and what that command printed."""
    store = tmp_path_factory.mktemp("cli") / "store"
    code, out, err = run_cli(["ingest", str(corpus), "--store", str(store), "--model", tiny_dir, "--chunk-tokens", "32"])
    assert code == 0, err
    return store, out


def test_ingest_prints_a_summary_of_documents_chunks_tokens_and_speed(built):
    _, out = built
    match = re.search(r"(\d+) documents \((\d+) unchanged\), (\d+) chunks, ([\d,]+) tokens; .*\(([\d,.]+) tokens/s\)", out)
    assert match, out
    documents, unchanged, chunks, tokens, _ = match.groups()
    assert (int(documents), int(unchanged)) == (3, 0)
    assert int(chunks) >= 3 and int(tokens.replace(",", "")) > 0


def test_stats_prints_the_counts_of_an_ingested_store(built):
    store, ingest_out = built
    code, out, err = run_cli(["stats", "--store", str(store)])
    assert code == 0, err
    assert stat_value(out, "documents") == "3"
    chunks_in_summary = re.search(r"(\d+) chunks,", ingest_out).group(1)
    assert stat_value(out, "chunks") == chunks_in_summary
    tokens_in_summary = re.search(r"([\d,]+) tokens;", ingest_out).group(1)
    assert stat_value(out, "tokens") == tokens_in_summary
    assert "tiny-llama-0" in stat_value(out, "model")


def test_stats_check_reports_a_consistent_store(built):
    store, _ = built
    code, out, _ = run_cli(["stats", "--store", str(store), "--check"])
    assert code == 0 and "consistency check: ok" in out


def test_rerunning_the_same_ingest_reports_every_document_unchanged(built, corpus, tiny_dir):
    store, _ = built
    before = folder_digest(store)
    code, out, err = run_cli(["ingest", str(corpus), "--store", str(store), "--model", tiny_dir])
    assert code == 0, err
    assert "3 documents (3 unchanged)" in out and "computed KV for 0 chunks" in out
    assert folder_digest(store) == before


def test_stats_on_a_missing_store_is_an_error_and_creates_nothing(tmp_path):
    code, _, err = run_cli(["stats", "--store", str(tmp_path / "nothing-here")])
    assert code == 2 and "nothing-here" in error_line(err)
    assert not (tmp_path / "nothing-here").exists()


@pytest.mark.parametrize("bad_input", BAD_INPUTS, ids=BAD_IDS)
def test_ingest_of_bad_input_exits_2_without_creating_a_store(tmp_path, bad_input, tiny_dir):
    paths, fragments = bad_input(tmp_path)
    store = tmp_path / "store"
    code, out, err = run_cli(["ingest", *map(str, paths), "--store", str(store), "--model", tiny_dir])
    assert code == 2
    assert re.search(fragments[0], error_line(err)), err
    assert "Traceback" not in err
    assert not store.exists()


@pytest.mark.parametrize("bad_input", [_malformed_jsonl, _duplicate_ids], ids=["malformed_jsonl", "duplicate_ids"])
def test_ingest_of_bad_input_leaves_an_existing_store_unchanged(tmp_path, built, bad_input, tiny_dir):
    store, _ = built
    before = folder_digest(store)
    paths, _ = bad_input(tmp_path)
    code, _, err = run_cli(["ingest", *map(str, paths), "--store", str(store), "--model", tiny_dir])
    assert code == 2 and error_line(err)
    assert folder_digest(store) == before


def test_ingest_with_another_model_than_the_store_was_built_with_exits_2(built, corpus, tiny_model_factory):
    store, _ = built
    before = folder_digest(store)
    other = tiny_model_factory("llama", seed=1).model.config._name_or_path
    code, _, err = run_cli(["ingest", str(corpus), "--store", str(store), "--model", other])
    assert code == 2 and "tiny-llama-0" in error_line(err)
    assert folder_digest(store) == before


def test_ingest_with_a_chunk_size_out_of_range_exits_2_without_creating_a_store(tmp_path, corpus, tiny_dir):
    store = tmp_path / "store"
    code, _, err = run_cli(["ingest", str(corpus), "--store", str(store), "--model", tiny_dir, "--chunk-tokens", "8"])
    assert code == 2 and "out of range" in error_line(err)
    assert not store.exists()


def subcommands() -> list[str]:
    [action] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(action.choices)


def test_the_cli_offers_ingest_and_stats():
    assert {"ingest", "stats"} <= set(subcommands())


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in subcommands()], ids=" ".join)
def test_help_works_for_the_program_and_every_subcommand(argv):
    code, out, _ = run_cli(argv)
    assert code == 0
    assert out.startswith("usage: ragblend") and "--help" in out


def pdf_with_text(text: str) -> bytes:
    """A minimal one-page PDF whose text layer is `text` (Helvetica, no compression)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


def test_a_pdf_is_read_from_its_text_layer(tmp_path):
    write(tmp_path / "mill.pdf", pdf_with_text("The tide mill was built in 1802."))
    [doc] = read_documents([tmp_path])
    assert (doc.id, doc.text) == ("mill.pdf", "The tide mill was built in 1802.")
