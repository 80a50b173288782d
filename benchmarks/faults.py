"""Kill -9 an ingest at random points and check what is left: the store opens, `check` passes, every
document is fully present or fully absent, and rerunning the ingest completes it.

    python benchmarks/faults.py --trials 20 [--docs 40] [--write-docs]

Each trial ingests the same synthetic documents into a fresh store in a child process, a few
documents per `add_documents` call so that commits happen all along (the child loads the model
itself, so kill points fall in loading, chunking, KV precompute and commits alike), and SIGKILLs it
after a uniformly random delay within the measured length of an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsection import machine, replace_section  # noqa: E402

from ragblend.api import RagBlend  # noqa: E402
from ragblend.engine.model import load_model  # noqa: E402
from ragblend.eval.synthetic import make_synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BATCH = 4  # documents per add_documents call in the child: one commit each


def documents(count: int, passages_per_doc: int = 3) -> list[dict]:
    """`count` synthetic documents of `passages_per_doc` passages each."""
    passages = [c["text"] for r in make_synthetic(count, seed=5) for c in r["ctxs"]]
    n = passages_per_doc
    return [{"id": f"doc-{i}", "text": " ".join(passages[n * i: n * i + n])} for i in range(count)]


def run_child(store: Path, docs_file: Path, kill_after: float | None) -> tuple[int, float]:
    script = textwrap.dedent(f"""
        import json
        from ragblend.api import RagBlend
        rb = RagBlend({str(store)!r})
        docs = json.load(open({str(docs_file)!r}))
        for start in range(0, len(docs), {BATCH}):
            rb.add_documents(docs[start:start + {BATCH}])
    """)
    start = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        child.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return child.returncode, time.monotonic() - start


def all_or_nothing(rb: RagBlend, expected: dict[str, str]) -> list[str]:
    """Problems: a document present without every chunk, its KV and its embedding."""
    problems = []
    with rb.store.env.begin() as txn:
        for record in rb.store.docs.doc_records(txn):
            doc_id = record.doc_id
            for chunk_id in record.chunk_ids:
                chunk = rb.store.docs.get_chunk(txn, chunk_id)
                if chunk is None or not rb.store.kv.contains(txn, chunk_id) or \
                        rb.store.docs.get_embedding(txn, chunk_id) is None:
                    problems.append(f"{doc_id}: chunk {chunk_id[:12]} incomplete")
            if doc_id not in expected:
                problems.append(f"{doc_id}: unexpected document")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true", help="update docs/cache.md")
    args = parser.parse_args()
    docs = documents(args.docs)
    expected = {d["id"]: d["text"] for d in docs}
    model = load_model(None)
    rng = random.Random(args.seed)
    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        docs_file = root / "docs.json"
        docs_file.write_text(json.dumps(docs))
        _, full_run = run_child(root / "reference", docs_file, None)
        for trial in range(args.trials):
            store = root / f"trial-{trial}"
            delay = rng.uniform(0.0, full_run)
            code, _ = run_child(store, docs_file, delay)
            if not (store / "data.mdb").is_file():
                rows.append((trial, delay, "before the store existed", 0, "-", "-"))
                continue
            rb = RagBlend(store, model=model)
            present = rb.stats().documents
            problems = rb.store.check() + all_or_nothing(rb, expected)
            rb.add_documents(docs)
            completed = rb.stats().documents == len(docs) and rb.store.check() == []
            failures += bool(problems) or not completed
            rows.append((trial, delay, "killed" if code == -signal.SIGKILL else f"exit {code}", present,
                         "ok" if not problems else "; ".join(problems[:3]), "yes" if completed else "NO"))
            rb.close()
    table = ("| trial | kill after s | child | documents present | consistency | rerun completes |\n"
             "|---|---|---|---|---|---|\n"
             + "\n".join(f"| {t} | {d:.1f} | {c} | {p} | {s} | {r} |" for t, d, c, p, s, r in rows))
    body = (f"Kill -9 of an ingest ({args.docs} documents, {BATCH} per `add_documents` call; an uninterrupted run takes "
            f"{full_run:.1f} s with model loading) at {args.trials} random points: **{failures} failures**.\n\n"
            f"{table}\n\nMachine: {machine()}. Command: `python benchmarks/faults.py --trials {args.trials} "
            f"--docs {args.docs}`")
    print(body)
    if args.write_docs:
        replace_section("faults-kill", body, REPO / "docs" / "cache.md")


if __name__ == "__main__":
    main()
