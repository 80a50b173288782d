"""Decode with the real model.

    python benchmarks/decode.py [--sections cache,weights,quality,batch,memory,e2e,floor] [--contexts 2000,6000]
                                [--tokens 64] [--questions 24] [--batch-context 2000,5500] [--memory-context 7000]
                                [--weights-context 2000,5500] [--answer-tokens 32] [--datasets synthetic,musique]
                                [--passages 10] [--write-docs]

cache: step time with transformers' DynamicCache (concatenates every token) against ragblend's decode
       cache (writes in place), at ~2k and ~6k context, and where a step's time goes (torch profiler).
weights: float32, int8 and int4 decode weights side by side in alternating rounds of one run: one request's
         step at each --weights-context, a step of 4 requests at the first, the LM head alone and the share
         of the vocabulary the exact head recomputes, and the resident memory each option's weights add.
quality: answers with each option against float32 on the synthetic set and MuSiQue (--datasets, --questions
         each, --passages per MuSiQue question, as contexts; greedy, full and blend, every option decoding from
         the same float32 prefill): F1 to gold, correct, kept share, identical first lines, ms/token.
batch: batched decode of 1, 2 and 4 requests at ~2k (or each --batch-context) context each, in alternating rounds in one run
       (so a busy machine slows them alike): step time, per-request latency, aggregate throughput,
       against one request at a time on transformers' forward (the decode before batching).
memory: resident memory during one ~7k-token request's decode against its KV and the weights.
llamacpp: one request's decode step against llama.cpp's llama-cli (--llama-cli PATH, built by you)
          on the bundled Q4_1 GGUF, at each --batch-context, fp32, int8 and int4 decode weights.
floor: where one request's int4 step goes at each --weights-context (attention, Linear calls, LM head, the
       rest, each measured by stubbing it out of the real step), and attention alone over float32 against
       bfloat16 caches (floor is not in the default sections).
e2e: a 32-token blend answer over 10 MuSiQue passages, decoded by each option from the same float32
     prefill (--questions of them; e2e is not in the default sections).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from docsection import musique_records, report  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from ragblend.api import RagBlend  # noqa: E402
import ragblend.engine.decode_step as decode_step_module  # noqa: E402
from ragblend.engine.decode_attention import decode_attention  # noqa: E402
from ragblend.engine.decode_cache import SPARE_TOKENS, decode_cache  # noqa: E402
from ragblend.eval.metrics import best_f1, contains_answer, first_line, keeps  # noqa: E402
from ragblend.eval.synthetic import make_synthetic  # noqa: E402
from ragblend.engine.generate import SamplingConfig, Sequence, decode, feed, step  # noqa: E402
from ragblend.engine.gguf import SMOLLM2  # noqa: E402
from ragblend.engine.model import load_model, with_decode_weights  # noqa: E402


def step_ms(model, cache, start: int, tokens: int) -> float:
    times = []
    for i in range(tokens):
        began = time.perf_counter()
        feed(model, cache, [200 + i % 50], start + i)
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


def prompt_cache(model, length: int, seed: int):
    """A random prompt of `length` tokens prefilled into a decode cache."""
    ids = torch.randint(100, 40000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    cache = DynamicCache()
    logits = feed(model, cache, ids, 0)
    return decode_cache([(layer.keys, layer.values) for layer in cache.layers]), logits


def timed_steps(model, sequences: list[Sequence], tokens: int, batched: bool) -> list[float]:
    """Step times of `tokens` decode steps (fixed tokens), then the caches cropped back to their prompts."""
    times = []
    for i in range(tokens):
        for sequence in sequences:
            sequence.token = 200 + i % 50
            sequence.generated.append(sequence.token)
        began = time.perf_counter()
        if batched:
            step(model, sequences)
        else:
            for sequence in sequences:
                feed(model, sequence.cache, [sequence.token], sequence.position)
        times.append(time.perf_counter() - began)
    for sequence in sequences:
        sequence.cache.crop(-tokens)
        sequence.generated.clear()
    return times


WEIGHTS = ("float32", "int8", "int4")


def decode_weights_mb(option) -> float:
    """The bytes an option's decode step holds beside the float32 model: float32 packs a copy of every
    Linear weight (oneDNN's packed tensors hide their size: counted as the float32 weights they hold)."""
    step = option.decode_step
    if option.decode_weights == "float32":
        linears = [m for m in option.model.modules() if isinstance(m, torch.nn.Linear)]
        return sum(m.weight.numel() * 4 for m in linears) / 2**20
    layers = [layer.__dict__[name] for layer in step.layers for name in ("qkv", "o_proj", "down", "gate_up")]
    head = step.lm_head
    tensors = [t for q in [*layers, head.scores] for t in (q.packed, q.scales, q.bias) if t is not None]
    tensors += [head.error_norms, head.row_norms, head.sum_reach]
    return sum(t.untyped_storage().nbytes() for t in tensors) / 2**20


def decode_options(model) -> tuple[dict, dict]:
    """Each decode-weights option of `model`, packed, and the MB its decode weights hold."""
    options = {w: with_decode_weights(model, w) if w != "float32" else model for w in WEIGHTS}
    return options, {w: decode_weights_mb(option) for w, option in options.items()}


def head_ms(option, sequence: Sequence, repeats: int = 10) -> float:
    """The LM head alone on one request's hidden state (the float32 head packed for 2 rows)."""
    step = option.decode_step
    hidden = step.hidden([200], [sequence.position + 1], [sequence.cache])
    sequence.cache.crop(-1)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        step.lm_head(hidden)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def section_weights(model, contexts: list[int], tokens: int, rounds: int = 4) -> str:
    options, added = decode_options(model)
    weights_mb = sum(p.numel() * p.element_size() for p in model.model.parameters()) / 2**20
    rows = {w: {} for w in WEIGHTS}
    for context in contexts:
        sequences = [Sequence(model, *prompt_cache(model, context + 17 * i, i), context + 17 * i, SamplingConfig(), [])
                     for i in range(4 if context == contexts[0] else 1)]
        for weights, option in options.items():
            timed_steps(option, sequences[:1], 2, True)  # warm-up
            if weights != "float32":  # the exact head counts from here
                option.decode_step.lm_head.rows = option.decode_step.lm_head.recomputed = 0
        one, four = {w: [] for w in WEIGHTS}, {w: [] for w in WEIGHTS}
        for _ in range(rounds):
            for weights, option in options.items():
                one[weights] += timed_steps(option, sequences[:1], tokens // rounds, True)
                if len(sequences) == 4:
                    four[weights] += timed_steps(option, sequences, tokens // rounds, True)
        for weights, option in options.items():
            head = option.decode_step.lm_head
            rows[weights][context] = statistics.median(one[weights]) * 1e3
            if four[weights]:
                rows[weights]["four"] = statistics.median(four[weights]) * 1e3
            if weights != "float32":
                rows[weights][f"share-{context}"] = head.recomputed / (head.rows * model.config.vocab_size)
            if context == contexts[0]:
                rows[weights]["head"] = head_ms(option, sequences[0])
        print(context, rows, flush=True)
    first = contexts[0]
    base = rows["float32"]
    lines = [f"One request's decode step (median over {tokens} tokens per option, in {rounds} alternating rounds of "
             f"the three options), a step of 4 requests at ~{first:,} tokens each, the LM head alone (median of 10), "
             "and the memory each option's decode weights add to the float32 model that prefill keeps "
             f"({weights_mb:,.0f} MB of parameters). SmolLM2-135M, random prompts, fixed decoded tokens.", "",
             "| decode weights | " + " | ".join(f"step at {c:,}" for c in contexts)
             + f" | 4 requests at {first:,}: step / aggregate vs one | LM head | logits recomputed in float32 | "
             "decode weights' memory |",
             "|---|" + "---|" * len(contexts) + "---|---|---|---|"]
    for weights in WEIGHTS:
        r = rows[weights]
        steps = " | ".join(f"{r[c]:.1f} ms ({r[c] / base[c]:.2f}x)" for c in contexts)
        share = " / ".join(f"{100 * r[f'share-{c}']:.2f}%" for c in contexts) if weights != "float32" else "(all)"
        lines.append(f"| {weights} | {steps} | {r['four']:.1f} ms / {4 * r[first] / r['four']:.2f}x | "
                     f"{r['head']:.1f} ms | {share} | {added[weights]:,.0f} MB |")
    return "\n".join(lines)


def quality_records(dataset: str, questions: int, passages: int) -> list[tuple[str, list[str], list[str]]]:
    """(question, passages, gold answers) of the synthetic set (seed 7, 6 passages) or MuSiQue."""
    if dataset == "synthetic":
        return [(r["question"], [c["text"] for c in r["ctxs"]], r["answers"])
                for r in make_synthetic(questions, seed=7, passages=6)]
    records = musique_records() or []
    return [(r["question"], [f"{c['title']}\n{c['text']}" for c in r["ctxs"][:passages]], r["answers"])
            for r in records[:questions]]


def decoded(option, prepared, tokens: int) -> tuple[str, list[int], float]:
    """A greedy answer decoded with `option`'s weights from a float32 prefill (text, tokens, seconds);
    the prefill's cache is cropped back to its prompt afterwards, so every option starts from it."""
    cache, length, generated = prepared.prefill.cache, len(prepared.layout), []
    began = time.perf_counter()
    text = "".join(decode(option, cache, prepared.prefill.logits, length, SamplingConfig(max_new_tokens=tokens),
                          generated))
    elapsed = time.perf_counter() - began
    cache.crop(length - cache.get_seq_length())  # crop takes the (negative) count to remove
    return text, generated, elapsed


def section_quality(model, dataset: str, questions: int, passages: int, tokens: int = 32) -> str:
    """Each decode option's answers from one float32 prefill per question and mode (so the options differ
    in their decode alone), against float32's and the gold answers."""
    records = quality_records(dataset, questions, passages)
    if not records:
        return "skipped: no evaluation data"
    options, _ = decode_options(model)
    found = {(mode, w): [] for mode in ("full", "blend") for w in WEIGHTS}
    with tempfile.TemporaryDirectory() as tmp:
        # The tree off: full's paths would make the blend rows full prefill's answers (loaded, not fused).
        rb = RagBlend(Path(tmp) / "store", model=model, exact_paths=False)
        for number, (question, contexts, _) in enumerate(records):
            for mode in ("full", "blend"):
                prepared = rb.prefill(question, contexts=contexts, mode=mode)
                for weights, option in options.items():  # alternating: a busy machine slows them alike
                    found[mode, weights].append(decoded(option, prepared, tokens))
            print(f"{dataset} {number + 1}/{len(records)}", flush=True)
        rb.close()
    golds = [gold for _, _, gold in records]
    shape = "6 passages each" if dataset == "synthetic" else f"{passages} passages each (MuSiQue)"
    lines = [f"{len(records)} {dataset} questions ({shape} as contexts, greedy, up to {tokens} new tokens). Each "
             "question is prefilled once per mode in float32 and decoded by every option from that prefill, so the "
             "options differ in their decode alone (and share the first token); correct = a gold answer in the "
             "first line; kept = share of float32's correct answers the option also gets right.", "",
             "| mode | decode weights | F1 to gold | correct | kept | first line identical to float32 | "
             "tokens identical | ms per token |", "|---|---|---|---|---|---|---|---|"]
    for mode in ("full", "blend"):
        reference = found[mode, "float32"]
        correct = {w: [contains_answer(text, gold) for (text, _, _), gold in zip(found[mode, w], golds)]
                   for w in WEIGHTS}
        for weights in WEIGHTS:
            answers = found[mode, weights]
            f1 = statistics.mean(best_f1(text, gold) for (text, _, _), gold in zip(answers, golds))
            kept = keeps(correct["float32"], correct[weights])
            ms = statistics.median(1e3 * s / len(ids) for _, ids, s in answers if ids)
            same_line = sum(first_line(a[0]) == first_line(b[0]) for a, b in zip(reference, answers))
            same_tokens = sum(a[1] == b[1] for a, b in zip(reference, answers))
            lines.append(f"| {mode} | {weights} | {f1:.3f} | {sum(correct[weights])} of {len(records)} | "
                         f"{'n/a' if kept is None else f'{kept:.0%}'} | {same_line} of {len(records)} | "
                         f"{same_tokens} of {len(records)} | {ms:.1f} |")
    print("\n".join(lines[-6:]), flush=True)
    return "\n".join(lines)


def section_batch(model, context: int, tokens: int, rounds: int = 4) -> str:
    sizes = (1, 2, 4)
    sequences = [Sequence(model, *prompt_cache(model, context + 17 * i, i), context + 17 * i, SamplingConfig(), [])
                 for i in range(max(sizes))]
    runs = {"hf": [], **{size: [] for size in sizes}}
    timed_steps(model, sequences, 4, True)  # warm-up: packs the weights
    for _ in range(rounds):
        runs["hf"] += timed_steps(model, sequences[:1], tokens // rounds, False)
        for size in sizes:
            runs[size] += timed_steps(model, sequences[:size], tokens // rounds, True)
    ms = {key: statistics.median(times) * 1e3 for key, times in runs.items()}
    print(ms, flush=True)
    lines = [f"Median decode step over {tokens} tokens per row (in {rounds} alternating rounds), SmolLM2-135M fp32, "
             f"~{context:,}-token context per request.", "",
             "| decode | requests | step | per-request latency vs one | aggregate tokens/s | vs one request |",
             "|---|---|---|---|---|---|",
             f"| transformers forward, one at a time (before) | 1 | {ms['hf']:.1f} ms | | {1e3 / ms['hf']:.1f} | "
             f"{ms[1] / ms['hf']:.2f}x |"]
    for size in sizes:
        lines.append(f"| batched step | {size} | {ms[size]:.1f} ms | {ms[size] / ms[1]:.2f}x | "
                     f"{size * 1e3 / ms[size]:.1f} | {size * ms[1] / ms[size]:.2f}x |")
    return "\n".join(lines)


def section_e2e(model, questions: int, answer_tokens: int) -> str:
    """A blend answer of `answer_tokens` tokens over 10 MuSiQue passages: TTFT (float32 prefill, the same for
    every option), then the decode steps of each decode-weights option from that prefill."""
    records = musique_records()
    if records is None:
        return "skipped: no evaluation data"
    options, _ = decode_options(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rb = RagBlend(Path(tmp) / "store", model=model, exact_paths=False)
        for record in records[:questions]:
            passages = [f"{c['title']}\n{c['text']}" for c in record["ctxs"][:10]]
            rb.prefill(record["question"], contexts=passages)  # stores the passages' KV
            prepared = rb.prefill(record["question"], contexts=passages)
            length = len(prepared.layout)
            sequence = Sequence(model, prepared.prefill.cache, prepared.prefill.logits, length, SamplingConfig(), [])
            steps = {w: sum(timed_steps(option, [sequence], answer_tokens - 1, True)) for w, option in options.items()}
            rows.append((prepared.timings["ttft_s"], steps, length))
            print(rows[-1], flush=True)
        rb.close()
    ttft = statistics.median(r[0] for r in rows)
    lines = [f"{questions} MuSiQue questions x 10 passages (median prompt {statistics.median(r[2] for r in rows):,.0f} "
             f"tokens), blend, a {answer_tokens}-token answer (fixed tokens), each option decoding from the same "
             "float32 prefill, medians:", "",
             "| decode weights | TTFT | decode after the first token | answer end to end | vs float32 | ms per token |",
             "|---|---|---|---|---|---|"]
    base = ttft + statistics.median(r[1]["float32"] for r in rows)
    for weights in WEIGHTS:
        decode_s = statistics.median(r[1][weights] for r in rows)
        lines.append(f"| {weights} | {ttft:.2f} s | {decode_s:.2f} s | {ttft + decode_s:.2f} s | "
                     f"{(ttft + decode_s) / base:.2f}x | {decode_s * 1e3 / (answer_tokens - 1):.0f} |")
    return "\n".join(lines)


def llama_cpp_ms_per_token(binary: str, model, context: int, tokens: int, runs: int = 2) -> float:
    """llama.cpp's own decode timing ("eval time ... ms per token") after a `context`-token prompt of
    MuSiQue text, median over `runs`."""
    records = musique_records() or []
    text = "\n".join(f"{c['title']}\n{c['text']}" for r in records[:5] for c in r["ctxs"])
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][: context - 10]
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as prompt:
        prompt.write(model.tokenizer.decode(ids))
        prompt.flush()
        times = []
        for _ in range(runs):
            done = subprocess.run([binary, "-m", str(SMOLLM2.gguf_path()), "-f", prompt.name, "-n", str(tokens), "-c", "8192",
                                   "-t", str(torch.get_num_threads()), "--ignore-eos", "-no-cnv", "--temp", "0"],
                                  check=True, capture_output=True, text=True)
            line = next(x for x in done.stderr.splitlines() if " eval time" in x and "prompt" not in x)
            times.append(float(re.search(r"\(\s*([\d.]+) ms per token", line).group(1)))
    return statistics.median(times)


def section_llamacpp(model, binary: str, contexts: list[int], tokens: int, rounds: int = 4) -> str:
    """One request's decode step against llama.cpp's `llama-cli` (a binary the caller built; nothing of
    llama.cpp is in this project) on the bundled Q4_1 GGUF: same machine, same threads, one run; ragblend's
    options in alternating rounds, as in the weights section."""
    options, _ = decode_options(model)
    rows = []
    for context in contexts:
        llama = llama_cpp_ms_per_token(binary, model, context, tokens)
        sequence = Sequence(model, *prompt_cache(model, context, 0), context, SamplingConfig(), [])
        times = {w: [] for w in WEIGHTS}
        for option in options.values():
            timed_steps(option, [sequence], 4, True)  # warm-up
        for _ in range(rounds):
            for weights, option in options.items():
                times[weights] += timed_steps(option, [sequence], tokens // rounds, True)
        ours = {w: statistics.median(t) * 1e3 for w, t in times.items()}
        rows.append(f"| {context:,} | {llama:.1f} ms | " + " | ".join(
            f"{ours[w]:.1f} ms ({ours[w] / llama:.2f}x)" for w in WEIGHTS) + " |")
        print(rows[-1], flush=True)
    return "\n".join([
        f"One request's decode step after a prompt of the given length, {tokens} tokens, {torch.get_num_threads()} "
        "threads each, same machine, one run (llama.cpp: its own eval timing, median of 2 runs; ragblend: median "
        f"step, the options in {rounds} alternating rounds). llama.cpp reads the bundled Q4_1 weights (~92 MB) "
        "and an fp16 cache; ragblend fp32 weights (540 MB) or int8 / int4 decode weights, and an fp32 cache.", "",
        "| context | llama.cpp (Q4_1, llama-cli) | ragblend fp32 | ragblend int8 decode weights | ragblend int4 |",
        "|---|---|---|---|---|", *rows])


def attention_ms(context: int, dtype: torch.dtype, layers: int, kv_heads: int, group: int, dim: int,
                 repeats: int = 15) -> float:
    """One step's attention alone (every layer's decode_attention over a random cache of `context` keys in
    `dtype`, with the decode cache's spare rows), median of `repeats`."""
    q = torch.randn(1, kv_heads, group, dim).to(dtype)
    caches = [(torch.randn(1, kv_heads, context + SPARE_TOKENS, dim).to(dtype)[:, :, :context],
               torch.randn(1, kv_heads, context + SPARE_TOKENS, dim).to(dtype)[:, :, :context]) for _ in range(layers)]
    times = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        for keys, values in caches:
            decode_attention(q, keys, values, dim ** -0.5).float()
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:]) * 1e3


class Stubbed:
    """A decode step with its attention and/or its Linear calls replaced by outputs of the right shape and
    no work, to measure what each part costs inside a real step (a measurement tool, nothing else)."""

    def __init__(self, option):
        self.step = option.decode_step
        self.linears = [(layer.qkv, layer.o_proj, layer.gate_up, layer.down) for layer in self.step.layers]

    def __call__(self, attention: bool, linears: bool) -> None:
        decode_step_module.decode_attention = (lambda q, k, v, scale: q) if attention else decode_attention
        hidden = self.step.decoder.embed_tokens.weight.shape[1]
        for layer, real in zip(self.step.layers, self.linears):
            if linears:
                widths = (sum(layer.qkv_sizes), hidden, sum(layer.gate_up_sizes), hidden)
                layer.qkv, layer.o_proj, layer.gate_up, layer.down = (
                    lambda x, n=n: torch.zeros(x.shape[0], n) for n in widths)
            else:
                layer.qkv, layer.o_proj, layer.gate_up, layer.down = real


def section_floor(model, contexts: list[int], tokens: int, rounds: int = 6) -> str:
    """Where one request's int4 decode step goes (the real step with parts stubbed, interleaved), and
    attention alone over float32 against bfloat16 caches (the lever a smaller decode cache would pull)."""
    option = with_decode_weights(model, "int4")
    config = model.config
    shape = (config.num_hidden_layers, config.num_key_value_heads,
             config.num_attention_heads // config.num_key_value_heads, model.decoder.head_dim)
    variants = {"step": (False, False), "attention": (True, False), "linears": (False, True), "rest": (True, True)}
    lines = [f"One request's int4 decode step, median over {tokens} tokens per variant in {rounds} interleaved rounds: "
             "the step, and the step with its attention or its Linear calls (120 projections) stubbed out (each "
             "part's cost = the step minus the step without it; the rest is norms, RoPE, cache writes, residuals, "
             "the exact head and Python). Attention alone: the step's 30 decode_attention calls over random caches "
             "of the same shape, float32 against bfloat16, median of 15.", "",
             "| context | int4 step | attention | int4 Linear calls | LM head (exact, int8 scores) | rest | "
             "attention alone, float32 cache | attention alone, bfloat16 cache |", "|---|---|---|---|---|---|---|---|"]
    for context in contexts:
        sequence = Sequence(option, *prompt_cache(model, context, 0), context, SamplingConfig(), [])
        stubbed, times = Stubbed(option), {name: [] for name in variants}
        timed_steps(option, [sequence], 4, True)
        try:
            for _ in range(rounds):
                for name, parts in variants.items():
                    stubbed(*parts)
                    times[name] += timed_steps(option, [sequence], max(1, tokens // rounds), True)
        finally:
            stubbed(False, False)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        head = head_ms(option, sequence)
        alone = {dtype: attention_ms(context, dtype, *shape) for dtype in (torch.float32, torch.bfloat16)}
        lines.append(f"| {context:,} | {ms['step']:.1f} ms | {ms['step'] - ms['attention']:.1f} ms | "
                     f"{ms['step'] - ms['linears']:.1f} ms | {head:.1f} ms | {ms['rest'] - head:.1f} ms | "
                     f"{alone[torch.float32]:.1f} ms | {alone[torch.bfloat16]:.1f} ms "
                     f"({alone[torch.bfloat16] / alone[torch.float32]:.2f}x) |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def rss_mb(field: str) -> float:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status[field].split()[0]) / 1024


def section_memory(model, context: int, tokens: int) -> str:
    sequence = Sequence(model, *prompt_cache(model, context, 0), context, SamplingConfig(), [])
    timed_steps(model, [sequence], 4, True)  # packs the weights
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on
    before = rss_mb("VmRSS")
    timed_steps(model, [sequence], tokens, True)
    peak = rss_mb("VmHWM")
    kv = sum(t.untyped_storage().nbytes() for layer in sequence.cache.layers for t in (layer.keys, layer.values)) / 2**20
    weights = sum(p.numel() * p.element_size() for p in model.model.parameters()) / 2**20
    print(before, peak, kv, weights, flush=True)
    return (f"One request at {context:,} tokens of context, {tokens} decode steps: resident memory {before:,.0f} MB "
            f"before the steps and a peak of {peak:,.0f} MB during them (+{peak - before:,.0f} MB). Its KV buffer "
            f"(prompt + {SPARE_TOKENS} spare rows, fp32) is {kv:,.0f} MB; the weights are {weights:,.0f} MB for "
            f"prefill plus about as much again prepacked for decode; the rest is the Python and torch runtime "
            f"and the allocator's pages kept from the prefill.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="cache,weights,quality,batch,memory")
    parser.add_argument("--contexts", default="2000,6000")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--datasets", default="synthetic,musique", help="quality: synthetic and/or musique")
    parser.add_argument("--passages", type=int, default=10, help="quality: MuSiQue passages per question")
    parser.add_argument("--batch-context", default="2000", help="contexts per request, e.g. 2000,5500")
    parser.add_argument("--answer-tokens", type=int, default=32, help="e2e: tokens per answer")
    parser.add_argument("--llama-cli", help="llamacpp: path to llama.cpp's llama-cli binary")
    parser.add_argument("--memory-context", type=int, default=7000)
    parser.add_argument("--weights-context", default="2000,5500", help="weights: contexts, the first also batched")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    model = load_model(None)
    sections, write = args.sections.split(","), args.write_docs
    command = "python benchmarks/decode.py --sections"
    if "cache" in sections:
        report("decode", section_cache(model, [int(c) for c in args.contexts.split(",")], args.tokens),
               f"{command} cache --contexts {args.contexts} --tokens {args.tokens}", write)
    if "weights" in sections:
        contexts = [int(c) for c in args.weights_context.split(",")]
        report("decode-weights", section_weights(model, contexts, args.tokens),
               f"{command} weights --weights-context {args.weights_context} --tokens {args.tokens}", write)
    if "quality" in sections:
        for dataset in args.datasets.split(","):
            report(f"decode-quality-{dataset}", section_quality(model, dataset, args.questions, args.passages),
                   f"{command} quality --datasets {dataset} --questions {args.questions} --passages {args.passages}",
                   write)
    if "batch" in sections:
        for context in [int(c) for c in args.batch_context.split(",")]:
            report(f"decode-batch-{context}", section_batch(model, context, args.tokens),
                   f"{command} batch --batch-context {context} --tokens {args.tokens}", write)
    if "e2e" in sections:
        report("decode-e2e", section_e2e(model, args.questions, args.answer_tokens),
               f"{command} e2e --questions {args.questions} --answer-tokens {args.answer_tokens}", write)
    if "llamacpp" in sections:
        if not args.llama_cli:
            raise SystemExit("the llamacpp section needs --llama-cli PATH (llama.cpp's llama-cli, built by you)")
        contexts = [int(c) for c in args.batch_context.split(",")]
        report("decode-llamacpp", section_llamacpp(model, args.llama_cli, contexts, args.tokens),
               f"{command} llamacpp --llama-cli PATH --batch-context {args.batch_context} --tokens {args.tokens}", write)
    if "floor" in sections:
        contexts = [int(c) for c in args.weights_context.split(",")]
        report("decode-floor", section_floor(model, contexts, args.tokens),
               f"{command} floor --weights-context {args.weights_context} --tokens {args.tokens}", write)
    if "memory" in sections:
        report("decode-memory", section_memory(model, args.memory_context, args.tokens),
               f"{command} memory --memory-context {args.memory_context} --tokens {args.tokens}", write)


if __name__ == "__main__":
    main()
