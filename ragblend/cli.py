"""`ragblend` command line: ingest, stats, query, eval."""
from __future__ import annotations

import argparse
import sys

from ragblend.documents import DocumentError


def _ingest(args: argparse.Namespace) -> None:
    from ragblend.api import RagBlend
    from ragblend.documents import read_documents

    docs = read_documents(args.paths)  # read and validate everything before touching the store
    rb = RagBlend(args.store, model=args.model, embedder=args.embedder, chunk_tokens=args.chunk_tokens,
                  index_kind=args.index)
    report = rb.ingest(docs, progress=True)
    print(report.summary())
    print("\n".join(rb.stats().lines()))


def _stats(args: argparse.Namespace) -> None:
    from ragblend.store import Store

    store = Store(args.store, readonly=True)
    print("\n".join(store.stats().lines()))
    if args.check:
        problems = store.check()
        print("\n".join(problems) if problems else "consistency check: ok")
        if problems:
            sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragblend", description="Fast RAG by fusing precomputed per-chunk KV caches.")
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser("ingest", help="chunk, embed and precompute KV for documents",
                                 description="Ingest .txt, .md and .jsonl files (folders are searched recursively). "
                                             "Resumable: rerun the same command after an interruption.")
    ingest.add_argument("paths", nargs="+", help="files or folders")
    ingest.add_argument("--store", required=True, help="store folder (created if missing)")
    ingest.add_argument("--model", help="local Hugging Face causal-LM folder (default: bundled SmolLM2-135M-Instruct)")
    ingest.add_argument("--embedder", help="local sentence-transformers folder (default: bundled all-MiniLM-L6-v2)")
    ingest.add_argument("--chunk-tokens", type=int, help="tokens per chunk (default 256, or the store's)")
    ingest.add_argument("--index", choices=["flat", "hnsw"], help="vector index: exact flat (default) or approximate hnsw")
    ingest.set_defaults(run=_ingest)

    stats = commands.add_parser("stats", help="what a store holds", description="Print what a store holds.")
    stats.add_argument("--store", required=True)
    stats.add_argument("--check", action="store_true", help="also verify every record (checksums, links)")
    stats.set_defaults(run=_stats)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (DocumentError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"ragblend: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
