"""Decode with the real model.

    python benchmarks/decode.py [--sections cache,int8] [--contexts 2000,6000] [--tokens 64] [--questions 24] [--write-docs]

cache: step time with transformers' DynamicCache (concatenates every token) against ragblend's decode
       cache (writes in place), at ~2k and ~6k context, and where a step's time goes (torch profiler).
int8: answers and decode speed with int8 decode weights against float32 on the synthetic eval set
      (passages as contexts, greedy, full and blend): identical answers, F1 to gold, ms per token.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from docsection import machine, replace_section  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from ragblend.api import RagBlend  # noqa: E402
from ragblend.engine.decode_cache import decode_cache  # noqa: E402
from ragblend.eval.metrics import best_f1  # noqa: E402
from ragblend.eval.synthetic import make_synthetic  # noqa: E402
from ragblend.engine.generate import feed  # noqa: E402
from ragblend.engine.model import load_model, with_int8_decode  # noqa: E402


def step_ms(model, cache, start: int, tokens: int) -> float:
    times = []
    for step in range(tokens):
        began = time.perf_counter()
        feed(model, cache, [200 + step % 50], start + step)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def top_ops(model, cache, start: int, steps: int = 8) -> str:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(steps):
            feed(model, cache, [300 + step], start + step)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:4]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return ", ".join(f"{e.key.removeprefix('aten::')} {100 * e.self_cpu_time_total / total:.0f}%" for e in ops)


def section_cache(model, contexts: list[int], tokens: int) -> str:
    rows = []
    for context in contexts:
        prompt = torch.randint(100, 40000, (context,), generator=torch.Generator().manual_seed(0)).tolist()
        dynamic = DynamicCache()
        feed(model, dynamic, prompt, 0)
        growing = decode_cache([(layer.keys.clone(), layer.values.clone()) for layer in dynamic.layers])
        before = step_ms(model, dynamic, context, tokens)
        after = step_ms(model, growing, context, tokens)
        rows.append((context, before, after, top_ops(model, dynamic, context + tokens),
                     top_ops(model, growing, context + tokens)))
        print(rows[-1], flush=True)
    lines = [f"Median decode step over {tokens} tokens, SmolLM2-135M fp32, one request; profile shares are "
             "self CPU time over 8 steps (torch profiler).", "",
             "| context | DynamicCache (concatenate) | decode cache (in place) | where a step goes, before | after |",
             "|---|---|---|---|---|"]
    lines += [f"| {c:,} | {b:.1f} ms | {a:.1f} ms ({a / b:.2f}x) | {pb} | {pa} |" for c, b, a, pb, pa in rows]
    return "\n".join(lines)


def section_int8(model, questions: int) -> str:
    records = make_synthetic(questions, seed=7, passages=6)
    fast_model = with_int8_decode(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, RagBlend(Path(tmp) / "store", model=model) as exact, \
            RagBlend(Path(tmp) / "store", model=fast_model) as fast:
        for mode in ("full", "blend"):
            result = {"same": 0, "f1": [0.0, 0.0], "ms": [[], []]}
            for record in records:
                passages = [c["text"] for c in record["ctxs"]]
                answers = [rb.query(record["question"], contexts=passages, mode=mode, max_new_tokens=32)
                           for rb in (exact, fast)]
                result["same"] += answers[0].token_ids == answers[1].token_ids
                for i, answer in enumerate(answers):
                    result["f1"][i] += best_f1(answer.text, record["answers"]) / len(records)
                    if len(answer.token_ids) > 1:
                        result["ms"][i].append(1e3 * answer.timings["decode_s"] / len(answer.token_ids))
            rows.append((mode, result))
            print(mode, result["same"], result["f1"], flush=True)
    lines = [f"{questions} synthetic questions (seed 7, 6 passages each as contexts, greedy, up to 32 new tokens); "
             "prefill is float32 in both rows, so the first token is the same.", "",
             "| mode | answers identical to float32 decode | F1 to gold: float32 / int8 | ms per decoded token: float32 / int8 |",
             "|---|---|---|---|"]
    for mode, r in rows:
        lines.append(f"| {mode} | {r['same']} of {questions} | {r['f1'][0]:.3f} / {r['f1'][1]:.3f} | "
                     f"{statistics.median(r['ms'][0]):.1f} / {statistics.median(r['ms'][1]):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="cache,int8")
    parser.add_argument("--contexts", default="2000,6000")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    model = load_model(None)
    sections = args.sections.split(",")
    if "cache" in sections:
        body = section_cache(model, [int(c) for c in args.contexts.split(",")], args.tokens)
        command = f"`python benchmarks/decode.py --sections cache --contexts {args.contexts} --tokens {args.tokens}`"
        print(body)
        if args.write_docs:
            replace_section("decode", f"{body}\n\nMachine: {machine()}. Command: {command}")
    if "int8" in sections:
        body = section_int8(model, args.questions)
        print(body)
        if args.write_docs:
            command = f"`python benchmarks/decode.py --sections int8 --questions {args.questions}`"
            replace_section("decode-int8", f"{body}\n\nMachine: {machine()}. Command: {command}")


if __name__ == "__main__":
    main()
