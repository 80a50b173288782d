"""Decode step time with the real model: transformers' DynamicCache (concatenates every token) against
ragblend's decode cache (writes in place), at ~2k and ~6k context, and where a step's time goes.

    python benchmarks/decode.py [--contexts 2000,6000] [--tokens 64] [--write-docs]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from docsection import machine, replace_section  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from ragblend.engine.decode_cache import decode_cache  # noqa: E402
from ragblend.engine.generate import feed  # noqa: E402
from ragblend.engine.model import load_model  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="2000,6000")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    model = load_model(None)
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        prompt = torch.randint(100, 40000, (context,), generator=torch.Generator().manual_seed(0)).tolist()
        dynamic = DynamicCache()
        feed(model, dynamic, prompt, 0)
        growing = decode_cache([(layer.keys.clone(), layer.values.clone()) for layer in dynamic.layers])
        before = step_ms(model, dynamic, context, args.tokens)
        after = step_ms(model, growing, context, args.tokens)
        rows.append((context, before, after, top_ops(model, dynamic, context + args.tokens),
                     top_ops(model, growing, context + args.tokens)))
        print(rows[-1], flush=True)
    lines = [f"Median decode step over {args.tokens} tokens, SmolLM2-135M fp32, one request; profile shares are "
             "self CPU time over 8 steps (torch profiler).", "",
             "| context | DynamicCache (concatenate) | decode cache (in place) | where a step goes, before | after |",
             "|---|---|---|---|---|"]
    lines += [f"| {c:,} | {b:.1f} ms | {a:.1f} ms ({a / b:.2f}x) | {pb} | {pa} |" for c, b, a, pb, pa in rows]
    body = "\n".join(lines) + f"\n\nMachine: {machine()}. Command: `python benchmarks/decode.py --contexts {args.contexts} --tokens {args.tokens}`"
    print(body)
    if args.write_docs:
        replace_section("decode", body)


if __name__ == "__main__":
    main()
