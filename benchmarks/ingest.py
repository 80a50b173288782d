"""Ingest benchmark: KV precompute throughput (tokens/s) and bytes per token on disk.

Ingests the passages of the first N records of the MuSiQue evaluation subset (../shared/eval/musique_s.json,
beside the checkout) into a temporary store with the real default model, and prints a markdown table.

    python benchmarks/ingest.py                 # first 8 records (80 passages)
    python benchmarks/ingest.py --docs 2        # a quicker run
    python benchmarks/ingest.py --write-docs    # also update the ingest section of docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from docsection import machine as describe_machine, replace_section  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "eval" / "musique_s.json"
DEFAULT_DOCS_FILE = REPO / "docs" / "benchmarks.md"


@dataclass
class Result:
    records: int
    documents: int
    chunks: int
    tokens: int
    computed_tokens: int
    wall_s: float
    model_s: float
    kv_bytes: int
    disk_bytes: int
    expected_kv_bytes_per_token: int

    @property
    def tokens_per_s(self) -> float:
        return self.computed_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def model_tokens_per_s(self) -> float:
        return self.computed_tokens / self.model_s if self.model_s else 0.0


def load_passages(path: Path, records: int):
    """One document per distinct passage of the first `records` records, in order."""
    from ragblend.storage.documents import Document, text_id
    from ragblend.eval.evaluate import passage_text

    data = json.loads(path.read_text())
    docs, seen = [], set()
    for record in data[:records]:
        for ctx in record["ctxs"]:
            text = passage_text(ctx)
            if text and text not in seen:
                seen.add(text)
                docs.append(Document(id=text_id(text), text=text))
    return docs


class ModelTimer:
    """Wall time spent inside the decoder's forward passes (the KV precompute proper), via forward hooks."""

    def __init__(self, module):
        self.seconds, self._start = 0.0, 0.0
        self._handles = [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after)]

    def _before(self, *_):
        self._start = time.perf_counter()

    def _after(self, *_):
        self.seconds += time.perf_counter() - self._start

    def remove(self):
        for handle in self._handles:
            handle.remove()


def run(args: argparse.Namespace) -> tuple[Result, dict]:
    from ragblend.api import RagBlend
    from ragblend.engine.model import load_model

    docs = load_passages(args.data, args.docs)
    model = load_model(args.model, device=args.device)
    cfg_kv = model.num_layers * 2 * model.num_kv_heads * model.head_dim * 2  # fp16 K and V per token
    with tempfile.TemporaryDirectory(prefix="ragblend-bench-") as folder:
        rb = RagBlend(Path(folder) / "store", model=model, embedder=args.embedder, chunk_tokens=args.chunk_tokens)
        timer = ModelTimer(model.decoder)
        try:
            report = rb.ingest(docs, progress=not args.quiet)
        finally:
            timer.remove()
        stats = rb.stats()
        rb.close()
    machine = {"machine": describe_machine(), "model": model.name, "embedder": rb.embedder.name,
               "chunk tokens": rb.store.manifest.chunk_tokens}
    result = Result(records=args.docs, documents=len(docs), chunks=stats.chunks, tokens=stats.tokens,
                    computed_tokens=report.computed_tokens,
                    wall_s=report.wall_s, model_s=timer.seconds, kv_bytes=stats.kv_bytes, disk_bytes=stats.disk_bytes,
                    expected_kv_bytes_per_token=cfg_kv)
    return result, machine


def markdown(result: Result, machine: dict, command: str, data: Path) -> str:
    r = result
    kv_per_token = r.kv_bytes / r.tokens if r.tokens else 0.0
    disk_per_token = r.disk_bytes / r.tokens if r.tokens else 0.0
    lines = [
        "### Ingest: KV precompute throughput and storage",
        "",
        f"Machine: {machine['machine']}.",
        f"Model {machine['model']}, embedder {machine['embedder']}, chunks of at most {machine['chunk tokens']} tokens; "
        f"corpus: the passages of the first {r.records} records of `{data.name}`.",
        "",
        "| docs | chunks | tokens | wall s | tokens/s | model s | model tokens/s | KV bytes/token | on-disk bytes/token |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r.documents:,} | {r.chunks:,} | {r.tokens:,} | {r.wall_s:.1f} | {r.tokens_per_s:,.0f} | {r.model_s:.1f} | "
        f"{r.model_tokens_per_s:,.0f} | {kv_per_token:,.0f} | {disk_per_token:,.0f} |",
        "",
        "`wall s` is the whole ingest (chunking, KV precompute, embedding, LMDB commits, index save); `model s` is "
        "the time inside the model's forward passes. KV bytes/token is the fp16 K and V payload: "
        f"layers x KV heads x head dim x 2 x 2 bytes = {r.expected_kv_bytes_per_token:,} for this model "
        "(23,040 for SmolLM2-135M); on-disk bytes/token also counts LMDB pages, embeddings, chunk text and the index.",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=8, help="records of the corpus whose passages are ingested (default 8)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"corpus (default {DEFAULT_DATA})")
    parser.add_argument("--model", help="local HF causal-LM folder (default: bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--embedder", help="local sentence-transformers folder (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--chunk-tokens", type=int, help="tokens per chunk (default: ragblend's default)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--write-docs", action="store_true", help=f"update the ingest section of {DEFAULT_DOCS_FILE.relative_to(REPO)}")
    parser.add_argument("--docs-file", type=Path, default=DEFAULT_DOCS_FILE, help="the file --write-docs updates")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.docs < 1:
        parser.error("--docs must be at least 1")
    if not args.data.is_file():
        print(f"ingest benchmark skipped: corpus {args.data} not found "
              f"(it lives in the shared/ folder beside the checkout; pass --data FILE to use another)")
        return 0
    command = shlex.join(["python", "benchmarks/ingest.py", *(sys.argv[1:] if argv is None else argv)])
    result, machine = run(args)
    section = markdown(result, machine, command, args.data)
    print(section)
    if args.write_docs:
        replace_section("ingest", section, args.docs_file)
        print(f"\nupdated {args.docs_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
