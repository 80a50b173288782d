"""The exact-path tree on a Zipf stream: TTFT, hit share and answers against full prefill, per mode and order.

    python benchmarks/paths.py --questions 500 --docs 200 [--budget-share 0.5] [--write-docs]

A corpus of `--docs` MuSiQue passages (each cut to its first `--doc-words` words, one chunk each; synthetic
passages where ../shared is absent), and a stream of `--questions` draws: a question picked by Zipf(1.1) over
the corpus's questions, phrased one of a few ways (so near-tied chunks swap places, as paraphrases do), with
top-k drawn from 4-6. Every configuration answers the same stream in its own store, so no configuration's
paths help another:
- `full`: the reference (no tree);
- `prefix 1-chunk`: today's prefix caching before the tree (the first chunk's record alone);
- `prefix tree` in retrieval and in cache order;
- `blend 1-chunk` (no tree) and `blend tree` (cache order; the stream's exact requests fill the tree: each draw
  is answered by blend first, over the paths of earlier draws, then by prefix, which adds its path).
Exact modes are compared token for token with full prefill of the same ordered prompt (computed once per
distinct ordered chunk list). With `--budget-share`, the first `--budget-questions` draws of the cache-order
prefix stream are run again under a KV budget of that share of the unbounded run's bytes, once per policy.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from docsection import musique_records, report  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ragblend.api import RagBlend  # noqa: E402
from ragblend.eval.metrics import best_f1, first_line  # noqa: E402
from ragblend.eval.plots import ttft_vs_hit_share  # noqa: E402
from ragblend.eval.synthetic import make_synthetic  # noqa: E402

PHRASINGS = ["{q}", "Question: {q}", "{q} Answer briefly.", "Tell me: {q}"]
NEW_TOKENS = 8


@dataclass
class Draw:
    question: str
    answers: list[str]
    top_k: int


@dataclass
class Run:
    name: str
    ttft: list[float] = field(default_factory=list)
    hit_tokens: int = 0
    chunk_tokens: int = 0
    identical: int = 0
    compared: int = 0
    f1: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)  # per request: chunk tokens from the tree
    as_retrieved: int = 0  # answers identical to full prefill in retrieval order (what reordering changes)
    texts: list[str] = field(default_factory=list)
    tree_s: list[float] = field(default_factory=list)
    over_budget: int = 0

    def row(self, full_ttft: float) -> str:
        ttft = statistics.median(self.ttft)
        same = f"{self.identical}/{self.compared} ({self.identical / self.compared:.0%})" if self.compared else "-"
        share = self.hit_tokens / max(self.chunk_tokens, 1)
        bookkeeping = f"{statistics.median(self.tree_s) / ttft:.2%}" if self.tree_s else "-"
        return (f"| {self.name} | {ttft * 1000:.0f} | {ttft / full_ttft:.2f}x | {share:.0%} | {same} | "
                f"{self.as_retrieved / len(self.ttft):.0%} | {statistics.mean(self.f1):.3f} | {bookkeeping} |")


def corpus(docs: int, words: int) -> tuple[list[dict], list[dict]]:
    """(documents, question records whose passages are all in the corpus)."""
    records = musique_records() or make_synthetic(docs // 4 + 1, seed=11)
    seen, documents, questions = set(), [], []
    for record in records:
        if len(documents) >= docs:
            break
        fresh = [t for t in dict.fromkeys(" ".join(c["text"].split()[:words]) for c in record["ctxs"]) if t not in seen]
        seen.update(fresh)
        documents += [{"id": f"d{len(documents) + i}", "text": t} for i, t in enumerate(fresh)]
        questions.append(record)
    return documents, questions


def stream(questions: list[dict], n: int, seed: int) -> list[Draw]:
    rng = random.Random(seed)
    weights = np.array([1 / (i + 1) ** 1.1 for i in range(len(questions))])
    picks = np.random.default_rng(seed).choice(len(questions), size=n, p=weights / weights.sum())
    return [Draw(rng.choice(PHRASINGS).format(q=questions[i]["question"]), questions[i]["answers"],
                 rng.randint(4, 6)) for i in picks]


def open_store(root: Path, name: str, model, embedder, docs: list[dict], chunk_tokens: int, **kwargs) -> RagBlend:
    rb = RagBlend(root / name, model=model, embedder=embedder, chunk_tokens=chunk_tokens, **kwargs)
    rb.add_documents(docs, progress=False)
    return rb


def answer(rb: RagBlend, draw: Draw, mode: str, order: str = "retrieval", contexts=None):
    return rb.query(draw.question, top_k=draw.top_k, mode=mode, order=order, contexts=contexts,
                    max_new_tokens=NEW_TOKENS)


def note(run: Run, ans, reference: list[int] | None, draw: Draw, budget: int | None, rb: RagBlend,
         retrieval_full: list[int]) -> None:
    run.ttft.append(ans.ttft_s)
    run.texts.append(ans.text)
    run.as_retrieved += ans.token_ids == retrieval_full
    run.hit_tokens += int(ans.timings.get("exact_hit_tokens", 0))
    run.chunk_tokens += sum(c.tokens for c in ans.chunks)
    run.shares.append(ans.timings.get("exact_hit_tokens", 0) / sum(c.tokens for c in ans.chunks))
    run.f1.append(best_f1(first_line(ans.text), draw.answers))
    if "tree_s" in ans.timings:
        run.tree_s.append(ans.timings["tree_s"])
    if reference is not None:
        run.compared += 1
        run.identical += ans.token_ids == reference
    if budget is not None:
        stats = rb.stats()
        run.over_budget += stats.kv_bytes + stats.path_bytes > budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--doc-words", type=int, default=45)
    parser.add_argument("--chunk-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-share", type=float, default=None)
    parser.add_argument("--budget-questions", type=int, default=200, help="draws of the stream run under the budget")
    parser.add_argument("--out", default="paths-results.json")
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "img" / "paths_ttft.png"))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    documents, questions = corpus(args.docs, args.doc_words)
    draws = stream(questions, args.questions, args.seed)
    root = Path(tempfile.mkdtemp(prefix="ragblend-paths-"))
    base = RagBlend(root / "full", chunk_tokens=args.chunk_tokens, exact_paths=False)
    base.add_documents(documents, progress=True)
    model, embedder = base.model, base.embedder
    stores = {
        "prefix 1-chunk": open_store(root, "p1", model, embedder, documents, args.chunk_tokens, exact_paths=False),
        "prefix tree, retrieval order": open_store(root, "pr", model, embedder, documents, args.chunk_tokens),
        "prefix tree, cache order": open_store(root, "pc", model, embedder, documents, args.chunk_tokens),
        "blend 1-chunk": open_store(root, "b1", model, embedder, documents, args.chunk_tokens, exact_paths=False),
        "blend tree, cache order": open_store(root, "bt", model, embedder, documents, args.chunk_tokens),
    }
    runs = {name: Run(name) for name in ["full", *stores]}
    references: dict[tuple[str, ...], list[int]] = {}

    def reference(ans) -> list[int]:
        """Full prefill's tokens for the answer's ordered chunks (once per ordered list)."""
        key = tuple(c.chunk_id for c in ans.chunks)
        if key not in references:
            hits = {h.chunk_id: h for h in base.search(draw.question, top_k=draw.top_k)}
            references[key] = answer(base, draw, "full", contexts=[hits[c] for c in key]).token_ids
        return references[key]

    repeats = Run("repeated sequences, prefix tree, cache order")
    retrieval_answers: list[list[int]] = []
    seen_sets: set[frozenset[str]] = set()
    for draw in tqdm(draws, desc="stream", unit="q"):
        full = answer(base, draw, "full")
        references.setdefault(tuple(c.chunk_id for c in full.chunks), full.token_ids)
        retrieval_answers.append(full.token_ids)
        note(runs["full"], full, None, draw, None, base, full.token_ids)
        runs["full"].identical += 1
        runs["full"].compared += 1
        for name, mode in (("prefix 1-chunk", "prefix"), ("prefix tree, retrieval order", "prefix"),
                           ("blend 1-chunk", "blend")):
            ans = answer(stores[name], draw, mode)
            note(runs[name], ans, reference(ans) if mode == "prefix" else full.token_ids, draw, None, stores[name],
                 full.token_ids)
        cached = answer(stores["prefix tree, cache order"], draw, "prefix", "cache")
        note(runs["prefix tree, cache order"], cached, reference(cached), draw, None, stores["prefix tree, cache order"],
             full.token_ids)
        chunk_set = frozenset(c.chunk_id for c in cached.chunks)
        if chunk_set in seen_sets:
            note(repeats, cached, reference(cached), draw, None, stores["prefix tree, cache order"], full.token_ids)
        seen_sets.add(chunk_set)
        blended = answer(stores["blend tree, cache order"], draw, "blend", "cache")
        note(runs["blend tree, cache order"], blended, reference(blended), draw, None, stores["blend tree, cache order"],
             full.token_ids)
        answer(stores["blend tree, cache order"], draw, "prefix", "cache")  # the stream's exact request fills the tree

    full_ttft = statistics.median(runs["full"].ttft)
    header = ("| configuration | median TTFT ms | / full | tokens from the tree | identical to full of the same "
              "ordered prompt | identical to full in retrieval order | F1 | tree bookkeeping / TTFT |\n"
              "|---|---|---|---|---|---|---|---|")
    rows = [run.row(full_ttft) for run in runs.values()] + ([repeats.row(full_ttft)] if repeats.ttft else [])
    body = [f"{len(draws)} draws (Zipf 1.1 over {len(questions)} questions, top-k 4-6, {len(documents)} documents "
            f"of <= {args.doc_words} words, {NEW_TOKENS} new tokens)", "", header, *rows]
    if args.budget_share:
        bytes_used = stores["prefix tree, cache order"].stats()
        budget = int((bytes_used.kv_bytes + bytes_used.path_bytes) * args.budget_share)
        body += ["", f"Under a budget of {args.budget_share:.0%} of the unbounded cache-order store "
                 f"({budget / 1e6:.1f} MB of chunk KV + paths):", "", header]
        for policy in ("pgdsf", "lru"):
            rb = open_store(root, f"budget-{policy}", model, embedder, documents, args.chunk_tokens,
                            kv_policy=policy, kv_max_bytes=budget)
            run = Run(f"prefix tree, cache order, {policy}")
            for i, draw in enumerate(tqdm(draws[: args.budget_questions], desc=policy, unit="q")):
                ans = answer(rb, draw, "prefix", "cache")
                note(run, ans, reference(ans), draw, budget, rb, retrieval_answers[i])
            body.append(run.row(full_ttft) + f" over budget at {run.over_budget} of {len(run.ttft)} checks")
    Path(args.out).write_text(json.dumps({name: vars(run) for name, run in runs.items()}))
    ttft_vs_hit_share({name: (run.shares, [t / full_ttft for t in run.ttft]) for name, run in runs.items()},
                      Path(args.plot))
    command = "python benchmarks/paths.py " + " ".join(sys.argv[1:])
    report("paths", "\n".join(body), command, args.write_docs)
    print(f"took {time.process_time():.0f} s of CPU")


if __name__ == "__main__":
    main()
