"""Multi-turn sessions on MuSiQue passages: saved history vs re-prefilling the whole conversation.

    python benchmarks/sessions.py [--sections ttft,identical,truncation,tiers,topic] [--write-docs]

ttft: turn-N TTFT with the history from RAM and from disk vs a full prefill of the same conversation,
      at growing history sizes (medians over repeats; the new turn is one passage + question, mode full).
identical: conversations x turns on the synthetic set (3 passages a turn, mode full): answer identical
      to greedy decoding after a full prefill of the whole conversation.
truncation: the same with a small max_history_tokens: answers vs a fresh prefill of the truncated
      conversation (the quality cost of re-positioning kept turns instead of recomputing them).
tiers: sessions interleaved at random with a RAM budget that holds a fifth of them: RAM hit rate, RSS.
topic: every turn a new MuSiQue question (1 passage), on_topic_switch keep vs drop: prompt tokens, TTFT, F1.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsection import machine, musique_records, replace_section  # noqa: E402

from ragblend.api import RagBlend  # noqa: E402
from ragblend.cli import EVAL_CHUNK_TOKENS  # noqa: E402
from ragblend.engine.generate import SamplingConfig, decode  # noqa: E402
from ragblend.engine.layout import PromptLayout  # noqa: E402
from ragblend.eval.metrics import best_f1, first_token_kl  # noqa: E402
from ragblend.eval.synthetic import make_synthetic  # noqa: E402

def passages(record: dict, count: int) -> list[str]:
    return [f"{c['title']}\n{c['text']}" for c in record["ctxs"][:count]]


def conversation_ids(rb: RagBlend, session_id: str) -> list[int]:
    record = rb.session_manager.store.get(session_id)
    return list(rb.session_manager.prefix(record.system)[0].prefix_ids) + [t for turn in record.turns for t in turn.token_ids]


def turn_prompt(rb: RagBlend, session_id: str, answer) -> list[int]:
    """The exact prompt a turn was answered from: the history it kept (dropped turns are gone from the
    record by then) and the turn's new tokens."""
    history = int(answer.timings["history_tokens"])
    newest = rb.session_manager.store.get(session_id).turns[-1]
    return conversation_ids(rb, session_id)[:history] + newest.token_ids[: answer.prompt_tokens - history]


def full_answer(rb: RagBlend, ids: list[int], max_new_tokens: int):
    """Full prefill of `ids` then greedy decoding: the reference a session turn is compared with."""
    start = time.perf_counter()
    prefill = rb.requests.engine.full_prefill(PromptLayout.build(tuple(ids), [], []))
    ttft = time.perf_counter() - start
    generated: list[int] = []
    for _ in decode(rb.model, prefill.cache, prefill.logits, len(ids), SamplingConfig(max_new_tokens), generated):
        pass
    return generated, prefill.logits, ttft


def short_passages(rb: RagBlend, records: list[dict], max_tokens: int) -> list[tuple[str, str]]:
    """(question, passage) pairs whose passage fits `max_tokens`: a new turn of predictable size."""
    pairs = [(r["question"], p) for r in records for p in passages(r, 10)]
    return [(q, p) for q, p in pairs if len(rb.template.chunk_ids(p)) <= max_tokens]


def section_ttft(rb: RagBlend, records: list[dict], sizes: list[int], repeats: int) -> str:
    """The new turn is one stored synthetic passage (<= 200 tokens; MuSiQue's are 530-750) with KV
    precomputed as for any ingested document, and its question, fused in the default mode (blend); `full` recomputes that passage instead."""
    chat = rb.chat()
    history_turns = iter(records)
    new_turns = iter(short_passages(rb, make_synthetic(200, seed=7), 200))
    rows = []
    for size in sizes:
        while chat.history_tokens < size - 250:
            record = next(history_turns)
            chat.send(record["question"], contexts=passages(record, 1), mode="reuse", max_new_tokens=8)
        measured: dict[str, list] = {"ram": [], "disk": [], "full": []}
        for case in ("ram", "disk", "full") * repeats:
            question, passage = next(new_turns)
            rb.add_documents([passage])  # stored like any ingested document
            chat.wait()
            if case == "disk":
                rb.session_manager.store.ram.clear()
            answer = chat.send(question, contexts=[passage], mode="full" if case == "full" else "blend",
                               max_new_tokens=1)
            measured[case].append((answer.ttft_s, answer.timings["load_exposed_s"], answer.timings["history_tokens"],
                                   answer.timings["history_source"]))
        prompt = turn_prompt(rb, chat.session_id, answer)
        recompute = statistics.median(full_answer(rb, prompt, 1)[2] for _ in range(2))
        ttft = {case: statistics.median(m[0] for m in runs) for case, runs in measured.items()}
        assert {m[3] for m in measured["disk"]} == {"disk"}
        exposed = statistics.median(m[1] for m in measured["disk"])
        history = statistics.median(m[2] for runs in measured.values() for m in runs)
        rows.append(f"| ~{size:,} | {history:,.0f} | {recompute:.2f} | {ttft['ram']:.3f} | "
                    f"**{ttft['ram'] / recompute:.3f}** | {ttft['disk']:.3f} | **{ttft['disk'] / recompute:.3f}** | "
                    f"{exposed * 1000:.0f} ms | {ttft['full']:.3f} | {ttft['full'] / recompute:.3f} |")
        print(rows[-1], flush=True)
    rb.end_session(chat.session_id)
    return ("| history (target) | history tokens | recompute s | RAM s | RAM / recompute | disk s | "
            "disk / recompute | disk load exposed | RAM, turn in full s | full / recompute |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def section_identical(rb: RagBlend, records: list[dict], conversations: int, turns: int,
                      max_history_tokens: int | None = None) -> tuple[str, dict]:
    same, kls, truncated = [], [], 0
    for c in range(conversations):
        chat = rb.chat(max_history_tokens=max_history_tokens)
        for record in records[c * turns:(c + 1) * turns]:
            before = len(conversation_ids(rb, chat.session_id))
            answer = chat.send(record["question"], contexts=passages(record, 3), mode="full", max_new_tokens=16)
            truncated += answer.timings["history_tokens"] < before
            reference, logits, _ = full_answer(rb, turn_prompt(rb, chat.session_id, answer), 16)
            same.append(answer.token_ids == reference)
            kls.append(first_token_kl(logits, answer.first_token_logits))
        rb.end_session(chat.session_id)
    stats = {"turns": len(same), "identical": statistics.mean(same), "kl": statistics.mean(kls),
             "truncated_turns": truncated}
    line = (f"{stats['turns']} turns ({conversations} conversations x {turns}), "
            f"{'max_history_tokens ' + str(max_history_tokens) + ', ' if max_history_tokens else ''}"
            f"{truncated} turns truncated: answer identical to the reference in **{stats['identical']:.0%}**, "
            f"mean first-token KL {stats['kl']:.2e}")
    print(line, flush=True)
    return line, stats


def anon_rss_bytes() -> int:
    """Resident anonymous memory: the heap, without LMDB's file-backed pages (the page cache's to manage)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def section_tiers(rb: RagBlend, records: list[dict], sessions: int, turns: int, fit: int, seed: int = 0) -> str:
    ids = [rb.chat().session_id for _ in range(sessions)]
    schedule = [sid for sid in ids for _ in range(turns)]
    random.Random(seed).shuffle(schedule)
    # the budget: `fit` sessions of average size, measured on a probe conversation of the same shape
    probe = rb.chat()
    for record in records[:turns]:
        probe.send(record["question"], contexts=passages(record, 1), mode="reuse", max_new_tokens=4)
    probe.wait()
    per_session = next(s.bytes for s in rb.sessions() if s.id == probe.session_id)
    rb.end_session(probe.session_id)
    manager = rb.session_manager
    manager.store.ram.max_bytes = budget = fit * per_session
    manager.store.ram.clear()
    base_rss, peaks = anon_rss_bytes(), [0, 0]  # the process so far: model, index, earlier sections
    sources, chats = [], {sid: rb.chat(sid) for sid in ids}
    for step, sid in enumerate(schedule):
        record = records[step % len(records)]
        answer = chats[sid].send(record["question"], contexts=passages(record, 1), mode="reuse", max_new_tokens=4)
        if answer.timings["history_tokens"] > len(rb.template.prefix_ids):
            sources.append(answer.timings["history_source"])
        half = 2 * step // len(schedule)
        peaks[half] = max(peaks[half], anon_rss_bytes())
    manager.wait()
    held = manager.store.ram.bytes
    for sid in ids:
        rb.end_session(sid)
    hits = sources.count("ram") / len(sources)
    return (f"{sessions} sessions x {turns} turns interleaved at random, RAM budget {budget / 1e6:.0f} MB "
            f"(~{fit} sessions of {per_session / 1e6:.1f} MB): history from RAM in **{hits:.0%}** of "
            f"{len(sources)} follow-up turns (disk otherwise, never recomputed: "
            f"{sources.count('recomputed')}); RAM tier held {held / 1e6:.0f} MB at the end, "
            f"{manager.store.ram.evictions} evictions; anonymous RSS (heap, not LMDB's file pages) {base_rss / 1e6:.0f} MB "
            f"before the run (model, index), peak {peaks[0] / 1e6:.0f} MB over the first 75 turns and "
            f"{peaks[1] / 1e6:.0f} MB over the last 75: budget + a fixed overhead, not growing with sessions")


def section_topic(rb: RagBlend, records: list[dict], conversations: int, turns: int) -> str:
    results = {}
    for policy in ("keep", "drop"):
        tokens, ttfts, f1s, switches = [], [], [], 0
        for c in range(conversations):
            chat = rb.chat(on_topic_switch=policy)
            for record in records[c * turns:(c + 1) * turns]:
                answer = chat.send(record["question"], contexts=passages(record, 1), mode="full", max_new_tokens=16)
                tokens.append(answer.prompt_tokens)
                ttfts.append(answer.ttft_s)
                f1s.append(best_f1(answer.text, record["answers"]))
                switches += int(answer.timings["topic_switch"])
            rb.end_session(chat.session_id)
        results[policy] = (statistics.mean(tokens), statistics.median(ttfts), statistics.mean(f1s), switches)
    rows = [f"| {p} | {t:,.0f} | {ttft:.2f} | {f1:.3f} | {s} |" for p, (t, ttft, f1, s) in results.items()]
    return (f"{conversations} conversations x {turns} turns, each turn an unrelated MuSiQue question "
            "with its first passage (F1 is low for this model on MuSiQue either way):\n\n"
            "| on_topic_switch | mean prompt tokens | median TTFT s | token F1 | switches detected |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="ttft,identical,truncation,tiers,topic")
    parser.add_argument("--sizes", default="1024,2048,4096,7168", help="history sizes for the ttft section")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    records = musique_records()
    if records is None:
        return
    synthetic = make_synthetic(4 * args.conversations * args.turns, seed=11)
    runs = {
        "ttft": lambda: "Turn-N TTFT, saved history vs re-prefilling the whole conversation:\n\n"
                        + section_ttft(rb, records, [int(s) for s in args.sizes.split(",")], args.repeats),
        "identical": lambda: "Saved history vs full recompute of the whole conversation: "
                             + section_identical(rb, synthetic, args.conversations, args.turns)[0],
        "truncation": lambda: "Truncation (oldest turns dropped, kept turns re-positioned, not recomputed) vs a "
                              "fresh prefill of the truncated conversation: "
                              + section_identical(rb, synthetic, args.conversations // 2, args.turns, 500)[0],
        "tiers": lambda: "RAM tier: " + section_tiers(rb, synthetic, 50, 3, 10),
        "topic": lambda: "Topic switches: " + section_topic(rb, records, args.conversations // 2, args.turns),
    }
    with tempfile.TemporaryDirectory() as folder:
        rb = RagBlend(Path(folder) / "store", chunk_tokens=EVAL_CHUNK_TOKENS)
        for name in args.sections.split(","):
            body = (f"{runs[name]()}\n\nMachine: {machine()}. "
                    f"Command: `python benchmarks/sessions.py --sections {name}`")
            print(body, flush=True)
            if args.write_docs:
                replace_section(f"sessions-{name}", body)
        rb.close()


if __name__ == "__main__":
    main()
