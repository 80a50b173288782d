"""`ragblend` command line: ingest, stats, query, eval, calibrate, sessions, gc, reindex-kv, serve."""
from __future__ import annotations

import argparse
import os
import sys

from ragblend.query import MODES, ORDERS
from ragblend.storage.documents import DocumentError

EVAL_CHUNK_TOKENS = 2048  # large enough that each evaluation passage stays one chunk


def _ingest(args: argparse.Namespace) -> None:
    from ragblend.api import RagBlend
    from ragblend.storage.documents import read_documents

    docs = read_documents(args.paths)  # read and validate everything before touching the store
    rb = RagBlend(args.store, model=args.model, embedder=args.embedder, chunk_tokens=args.chunk_tokens,
                  index_kind=args.index, kv_max_bytes=args.kv_max_bytes, kv_dtype=args.kv_dtype,
                  kv_backend=args.kv_backend)
    compute = None
    if args.ray is not None:
        compute = rb.ray_kv_compute(args.model, workers=args.ray_workers,
                                    address=None if args.ray == "local" else args.ray)
    report = rb.ingest(docs, progress=True, ttl_s=args.ttl_s, namespace=args.namespace, kv_compute=compute)
    if args.pin:
        rb.pin([d.id for d in docs], args.namespace)
    stats = rb.stats()
    rb.close()
    print(report.summary())
    print("\n".join(stats.lines()))


def _stats(args: argparse.Namespace) -> None:
    import json
    from dataclasses import asdict

    from ragblend.storage.store import Store

    store = Store(args.store, readonly=True, backend=args.kv_backend)
    stats = store.stats()
    if args.json:
        print(json.dumps(asdict(stats)))
        return
    print("\n".join(stats.lines()))
    if args.check:
        problems = store.check()
        print("\n".join(problems) if problems else "consistency check: ok")
        if problems:
            sys.exit(1)


def _query(args: argparse.Namespace) -> None:
    from ragblend.api import RagBlend
    from ragblend.query import Request

    request = Request(args.question, mode=args.mode, top_k=args.top_k, recompute_ratio=args.ratio, order=args.order,
                      max_new_tokens=args.max_new_tokens, stream=args.stream, namespace=args.namespace)
    rb = RagBlend(args.store, model=args.model, embedder=args.embedder, kv_backend=args.kv_backend)
    result = rb.answer(request)
    if args.stream:
        for piece in result:
            print(piece, end="", flush=True)
        print()
        answer = result.answer
    else:
        answer = result
        print(answer.text)
    print(f"\n-- {answer.mode}: {answer.prompt_tokens} prompt tokens, {answer.recomputed_tokens} recomputed")
    for ref in answer.chunks:
        print(f"   {ref.score:.3f}  {ref.doc_id}  ({ref.tokens} tokens, chunk {ref.chunk_id[:12]})")
    print("   " + "  ".join(_timing(k, v) for k, v in answer.timings.items()))


def _timing(name: str, value) -> str:
    """Durations (`*_s`) in milliseconds; counts, ratios and labels as they are."""
    if name.endswith("_s"):
        return f"{name.removesuffix('_s')}={value * 1000:.0f}ms"
    return f"{name}={value:g}" if isinstance(value, (int, float)) else f"{name}={value}"


def _sessions(args: argparse.Namespace) -> None:
    import time

    from index.namespaces import label, scoped, unscoped
    from ragblend.storage.session_store import SessionStore

    sessions = SessionStore(_existing_store(args))
    if args.action == "end":
        if not args.id:
            raise ValueError("sessions end needs a session id")
        namespace = args.namespace or ""
        if not sessions.delete(scoped(namespace, args.id)):
            raise KeyError(f"no session {label(namespace, args.id)!r}")
        print(f"ended {label(namespace, args.id)}")
    elif args.action == "gc":
        expired = [label(*unscoped(key)) for key in sessions.expire()]
        print(f"expired {len(expired)} idle sessions" + (f": {', '.join(expired)}" if expired else ""))
    else:
        now = time.time()
        for record in sessions.records():
            if args.namespace is not None and record.namespace != args.namespace:
                continue
            info = sessions.info(record)
            print(f"{label(info.namespace, info.id)}  {info.turns} turns  {info.tokens:,} tokens  {info.bytes / 1e6:,.1f} MB  "
                  f"idle {now - info.last_used:,.0f}s of {record.ttl_s:,.0f}s")


def _existing_store(args: argparse.Namespace):
    """A store to maintain (writable), refusing a folder or backend that holds none rather than creating one."""
    from pathlib import Path

    from ragblend.storage.store import Store

    if args.kv_backend is None and not (Path(args.store) / "data.mdb").is_file():
        raise FileNotFoundError(f"no ragblend store at {args.store}")
    store = Store(args.store, backend=args.kv_backend)
    if store.manifest is None:
        raise ValueError(f"{store.location} holds no ragblend store yet")
    return store


def _gc(args: argparse.Namespace) -> None:
    from ragblend.storage.maintenance import collect_garbage

    print(collect_garbage(_existing_store(args), dry_run=args.dry_run).summary())


def _reindex_kv(args: argparse.Namespace) -> None:
    from ragblend.storage.reindex import reindex_kv

    _existing_store(args).close()
    print(reindex_kv(args.store, model=args.model, kv_backend=args.kv_backend).summary())


def _serve(args: argparse.Namespace) -> None:
    try:
        from ragblend.serve.server import api_keys, serve
    except ImportError as exc:
        raise ValueError(f"serving needs the serve extra ({exc.name} is missing): pip install 'ragblend[serve]'") from None
    serve(args.store, model=args.model, embedder=args.embedder, host=args.host, port=args.port,
          keys=api_keys(args.api_key, args.api_keys), max_queue=args.max_queue, max_batch=args.max_batch,
          decode_ram_bytes=args.decode_ram_bytes,
          threads=args.worker_threads, prefetch=not args.no_prefetch, session_ram_bytes=args.session_ram_bytes,
          decode_weights=args.decode_weights, kv_backend=args.kv_backend, audit_rate=args.audit_rate)


def _ratio(text: str) -> float | str:
    """A recompute ratio: a number, or "auto" (chosen per query)."""
    return "auto" if text.strip() == "auto" else float(text)


def _ratios(text: str) -> tuple[float | str, ...]:
    return tuple(_ratio(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _eval(args: argparse.Namespace) -> None:
    import json
    from dataclasses import asdict
    from pathlib import Path

    from ragblend.api import RagBlend
    from ragblend.eval.datasets import load_records
    from ragblend.eval.evaluate import EvalConfig, run_eval, summarize, summary_table, write_hop_summaries, write_summary
    from ragblend.eval.plots import quality_vs_ttft, ratio_sweep, ttft_vs_context
    from ragblend.eval.speed import speed_sweep, speed_table
    from ragblend.eval.synthetic import make_synthetic

    if (args.dataset is None) == (args.synthetic is None):
        raise ValueError("give exactly one of --dataset FILE or --synthetic N")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dataset:
        records = load_records(args.dataset)
    else:
        records = make_synthetic(args.synthetic, seed=args.seed)
        (out / "synthetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    records = records[: args.limit] if args.limit else records
    config = EvalConfig(modes=tuple(args.modes.split(",")), ratios=_ratios(args.ratios), passages=args.passages,
                        max_new_tokens=args.max_new_tokens)
    # The tree off: every mode is measured against full prefill of the same passages, whose paths would
    # otherwise make each later mode exact by loading them (benchmarks/paths.py measures the tree).
    rb = RagBlend(args.store or out / "store", model=args.model, chunk_tokens=EVAL_CHUNK_TOKENS,
                  kv_backend=args.kv_backend, exact_paths=False)
    rows = run_eval(rb, records, config, out)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    summaries = summarize(rows)
    write_summary(summaries, out)
    quality_vs_ttft(summaries, out / "quality_vs_ttft.png")
    if any(s.label.startswith("blend@") for s in summaries):
        ratio_sweep(summaries, out / "ratio_sweep.png")
    print(summary_table(summaries))
    for path in write_hop_summaries(rows, out):
        print(f"\n{path.stem}:\n{path.read_text()}")
    if args.speed_sizes:
        speed = speed_sweep(rb, records, _ints(args.speed_sizes), repeats=args.speed_repeats)
        (out / "speed.json").write_text(json.dumps([asdict(r) for r in speed], indent=1))
        (out / "speed.md").write_text(speed_table(speed) + "\n")
        ttft_vs_context(speed, out / "ttft_vs_context.png")
        print(speed_table(speed))
    print(f"results in {out}/")


def _calibrate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ragblend.api import RagBlend
    from ragblend.eval.calibrate import LADDER, CalibrationConfig, calibrate, load_questions
    from ragblend.eval.plots import calibration_curve

    # Everything the user gave is checked before the store is opened: a bad file writes nothing.
    config = CalibrationConfig(target=args.target, metric=args.metric, ratios=_ratios(args.ratios) if args.ratios else LADDER,
                               selections=tuple(args.selections.split(",")), limit=args.limit, top_k=args.top_k,
                               max_new_tokens=args.max_new_tokens)
    questions = load_questions(args.questions, config.metric) if args.questions else None
    _existing_store(args).close()
    rb = RagBlend(args.store, model=args.model, embedder=args.embedder, kv_backend=args.kv_backend)
    report = calibrate(rb, questions, config, seed=args.seed)
    rb.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.md").write_text(report.table() + "\n")
    calibration_curve(report, out / "calibration.png")
    print(f"questions: {report.source}, {report.calibration.questions}")
    print(report.table())
    if not report.calibration.met:
        print(f"\nNo ratio below 1 met {config.metric} >= {config.target:.0%}: this model cannot fuse at that quality "
              "on these questions. Stored ratio 1.0 (blend answers as full prefill); lower the target to trade.")
    print(f"\nstored: {report.calibration.summary()}\nplot: {out / 'calibration.png'}")


def _store_option(parser: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    parser.add_argument("--store", required=required, help=help or "store folder")
    parser.add_argument("--kv-backend", metavar="URL", default=os.environ.get("RAGBLEND_KV_BACKEND"),
                        help="keep the store's records in this Redis/Valkey server (redis://host:6379/0) or cluster "
                             "(redis+cluster://host:7000,host:7001), shared by every replica pointed at it, instead "
                             "of LMDB in --store (default: env "
                             "RAGBLEND_KV_BACKEND, else LMDB)")


def _namespace_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", default="", help="tenant namespace: its documents, KV and sessions are "
                                                        "invisible to every other (default: the default namespace)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragblend", description="Fast RAG by fusing precomputed per-chunk KV caches.")
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser("ingest", help="chunk, embed and precompute KV for documents",
                                 description="Ingest .txt, .md, .pdf and .jsonl files (folders are searched recursively). "
                                             "Resumable: rerun the same command after an interruption.")
    ingest.add_argument("paths", nargs="+", help="files or folders")
    _store_option(ingest, help="store folder (created if missing)")
    ingest.add_argument("--model", help="local Hugging Face causal-LM folder (default: bundled SmolLM2-135M-Instruct)")
    ingest.add_argument("--embedder", help="local sentence-transformers folder (default: bundled all-MiniLM-L6-v2)")
    ingest.add_argument("--chunk-tokens", type=int, help="tokens per chunk (default 256, or the store's)")
    ingest.add_argument("--index", choices=["flat", "hnsw"], help="vector index: exact flat (default) or approximate hnsw")
    ingest.add_argument("--kv-max-bytes", type=int, help="budget for chunk KV, kept in the store; least recently used "
                                                         "KV is evicted beyond it (text and embeddings stay)")
    ingest.add_argument("--pin", action="store_true", help="never evict these documents' KV")
    ingest.add_argument("--ttl-s", type=float, help="documents' TTL in seconds (unless a .jsonl line sets its own "
                                                    "ttl_s): then their KV is dropped, or with expire=document, they are")
    ingest.add_argument("--kv-dtype", choices=["float16", "int8"], help="KV encoding of a new store (default float16)")
    _namespace_option(ingest)
    ingest.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="compute chunk KV on Ray actors (the ray extra): a cluster ADDRESS, or alone for a "
                             "local cluster; the model folder must be readable on every node")
    ingest.add_argument("--ray-workers", type=int, default=2, help="Ray actors, each with one model (default 2)")
    ingest.set_defaults(run=_ingest)

    query = commands.add_parser("query", help="answer a question from the store",
                                description="Retrieve, fuse the chunks' stored KV and generate an answer.")
    query.add_argument("question")
    _store_option(query)
    query.add_argument("--model", help="must be the model the store was built with (default: bundled SmolLM2)")
    query.add_argument("--embedder", help="must be the store's embedder (default: bundled all-MiniLM-L6-v2)")
    query.add_argument("--mode", choices=MODES, default="blend")
    query.add_argument("--order", choices=ORDERS, default="retrieval",
                       help="chunk order: as retrieved, or the longest stored exact path first")
    query.add_argument("--top-k", type=int, default=4)
    query.add_argument("--ratio", type=_ratio, default=None,
                       help="blend: share of chunk tokens to recompute, or auto (default: the store's calibrated "
                            "ratio, else 0.15)")
    query.add_argument("--max-new-tokens", type=int, default=64)
    query.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    _namespace_option(query)
    query.set_defaults(run=_query)

    evaluate = commands.add_parser("eval", help="quality and speed of every mode on a dataset",
                                   description="Score every mode against gold answers and full prefill; "
                                               "resumable (rerun with the same --out to continue).")
    evaluate.add_argument("--dataset", help="JSON array or JSONL of {question, answers, ctxs[{title, text}]}")
    evaluate.add_argument("--synthetic", type=int, metavar="N", help="generate N synthetic one- and two-hop questions")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of --synthetic")
    evaluate.add_argument("--modes", default="full,prefix,reuse,blend")
    evaluate.add_argument("--ratios", default="0.05,0.15,0.3,0.5", help="blend recompute ratios (auto allowed)")
    evaluate.add_argument("--limit", type=int, help="first N questions only")
    evaluate.add_argument("--passages", type=int, help="first K passages of each question only")
    evaluate.add_argument("--max-new-tokens", type=int, default=32)
    evaluate.add_argument("--speed-sizes", default="", help="e.g. 2,4,6,10: also time every mode at these passage counts")
    evaluate.add_argument("--speed-repeats", type=int, default=3)
    evaluate.add_argument("--out", default="eval-out", help="output folder (results.json, summary, plots)")
    _store_option(evaluate, required=False, help="KV store for the passages (default: OUT/store)")
    evaluate.add_argument("--model", help="local HF causal-LM folder (default: bundled SmolLM2)")
    evaluate.set_defaults(run=_eval)

    calib = commands.add_parser("calibrate", help="find the smallest recompute ratio that meets a quality target",
                                description="Answer sample questions with full prefill and with blend over a ladder "
                                            "of ratios; store the smallest ratio whose agreement with full meets the "
                                            "target as this store's default for the model. Resumable: rerun the same "
                                            "command after an interruption.")
    _store_option(calib)
    calib.add_argument("--model", help="must be the store's model (default: bundled SmolLM2)")
    calib.add_argument("--embedder", help="must be the store's embedder (default: bundled all-MiniLM-L6-v2)")
    calib.add_argument("--questions", metavar="FILE", help="JSONL of {question, contexts?, answers?} (default: "
                                                           "fill-in-the-blank questions from the store's chunks)")
    calib.add_argument("--target", type=float, default=0.95, help="agreement with full prefill to meet (default 0.95)")
    calib.add_argument("--metric", choices=["identical", "kept", "first_token"], default="identical",
                       help="identical: same answer; kept: full's right answers stay right (needs answers); "
                            "first_token: same first token")
    calib.add_argument("--ratios", help="comma list in (0, 1) (default 0.05,0.1,0.15,0.2,0.3,0.5,0.7,0.9)")
    calib.add_argument("--selections", default="hkvd", help="comma list of hkvd, query (query-aware chunks)")
    calib.add_argument("--limit", type=int, default=50, help="questions (default 50)")
    calib.add_argument("--top-k", type=int, default=4, help="chunks retrieved for questions without contexts")
    calib.add_argument("--max-new-tokens", type=int, default=32)
    calib.add_argument("--seed", type=int, default=0, help="which chunks the store's own questions come from")
    calib.add_argument("--out", default="calibrate-out", help="folder for the table and the plot")
    calib.set_defaults(run=_calibrate)

    stats = commands.add_parser("stats", help="what a store holds", description="Print what a store holds.")
    _store_option(stats)
    stats.add_argument("--check", action="store_true", help="also verify every record (checksums, links)")
    stats.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    stats.set_defaults(run=_stats)

    sessions = commands.add_parser("sessions", help="list, end or expire conversations",
                                   description="Conversations saved in a store: list them, end one (drops its KV), "
                                               "or gc (drops every session idle past its TTL).")
    sessions.add_argument("action", choices=["list", "end", "gc"])
    sessions.add_argument("id", nargs="?", help="session id (for end)")
    _store_option(sessions)
    sessions.add_argument("--namespace", help="the tenant namespace of the session (end), or to list only (list; "
                                              "default: every namespace)")
    sessions.set_defaults(run=_sessions)

    gc = commands.add_parser("gc", help="remove unreachable records and report the bytes freed",
                             description="Remove unreferenced chunks, orphan KV records, KV of other model "
                                         "fingerprints and expired sessions.")
    _store_option(gc)
    gc.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    gc.set_defaults(run=_gc)

    reindex = commands.add_parser("reindex-kv", help="recompute chunk KV for another model or prompt",
                                  description="Recompute every chunk's KV for MODEL (text, embeddings and chunk "
                                              "ids stay); the old KV keeps serving until the new set is complete, "
                                              "then the store switches in one transaction. Resumable.")
    _store_option(reindex)
    reindex.add_argument("--model", help="local HF causal-LM folder (default: bundled SmolLM2)")
    reindex.set_defaults(run=_reindex_kv)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server over a store",
                                description="Load the model, embedder and index once and answer /v1/chat/completions, "
                                            "/v1/completions, /v1/search, /v1/documents, /v1/audit, /healthz, /readyz and /metrics "
                                            "until SIGTERM or SIGINT (running requests and session saves finish first).")
    _store_option(serve)
    serve.add_argument("--model", help="must be the store's model (default: bundled SmolLM2)")
    serve.add_argument("--embedder", help="must be the store's embedder (default: bundled all-MiniLM-L6-v2)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY (default: env RAGBLEND_API_KEY)")
    serve.add_argument("--api-keys", metavar="FILE", help="JSON object of API key -> the namespace it is bound to")
    serve.add_argument("--max-queue", type=int, default=64, help="requests queued or running; beyond, 429")
    serve.add_argument("--max-batch", type=int, default=4,
                       help="requests answered at once, their decode steps batched (default 4)")
    serve.add_argument("--decode-ram-bytes", type=int,
                       help="RAM for running answers' decode caches (prompt + max_tokens each); an answer that "
                            "does not fit waits for others to finish (default: --max-batch alone limits)")
    serve.add_argument("--worker-threads", "--workers-threads", type=int,
                       help="torch threads for the model (default: torch's)")
    serve.add_argument("--no-prefetch", action="store_true", help="do not prefetch queued requests' KV")
    serve.add_argument("--session-ram-bytes", type=int, default=512 << 20,
                       help="RAM tier for conversation KV (default 512 MiB; the disk tier holds all of it)")
    serve.add_argument("--decode-weights", choices=["float32", "int8", "int4"], default="float32",
                       help="int8 / int4: faster decode on weight-only kernels, not always the same text")
    serve.add_argument("--audit-rate", type=float, default=0.0, metavar="P",
                       help="re-answer this share of greedy one-shot blend requests with full prefill when the server "
                            "is idle, and report agreement in /metrics and GET /v1/audit (default 0: off)")
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (DocumentError, FileNotFoundError, ValueError, KeyError, ConnectionError) as exc:
        print(f"ragblend: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
