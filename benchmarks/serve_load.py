"""`ragblend serve` under load, measured from clients over HTTP against a real server process.

    python benchmarks/serve_load.py [--sections load,audit,prefetch] [--clients 1,4,16] [--duration 45]
                                    [--max-batch 1,4] [--write-docs]

load: N concurrent clients for a fixed time, each sending a mix of one-shot RAG questions and
      three-turn sessions (streamed): throughput, p50/p95 TTFT as the client sees it (queueing
      included), errors (429s counted apart), and the server's RSS.
audit: `--audit-rate 0.05` against none, runs interleaved, at 1 and 4 clients: answers/s of each (the audit's
      cost); then one client asks one-shot questions one at a time with every answer audited (rate 1), and
      the audit's agreement with full prefill is compared with an offline comparison of the same answers
      (each re-answered with full prefill by the library on the same chunks).
prefetch: sessions whose KV does not fit the RAM tier (it holds a quarter of them), follow-up turns from
      concurrent clients to random sessions, the same request sequence with the scheduler's prefetch on
      and off: where each turn's history came from (RAM or disk) and mean TTFT.
Documents are MuSiQue passages from ../shared/eval (skipped cleanly where absent).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsection import machine, musique_records, replace_section  # noqa: E402

from ragblend.api import RagBlend  # noqa: E402
from ragblend.serve.launch import ServerProcess  # noqa: E402

RECORDS = 6  # MuSiQue questions whose passages make the store (10 each)
MAX_TOKENS = 16


def build_store(folder: Path, records: list[dict]) -> list[str]:
    """The store of the first RECORDS questions' passages; their questions."""
    with RagBlend(folder) as rb:
        rb.add_documents([{"id": f"q{i}-p{j}", "text": f"{c['title']}\n{c['text']}"}
                          for i, r in enumerate(records) for j, c in enumerate(r["ctxs"])], progress=True)
    return [r["question"] for r in records]


def ask(http, messages: list[dict], session: str | None | bool = False, top_k: int = 2) -> dict:
    """One streamed chat request: status, client-side TTFT and latency, and the final chunk's details."""
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "stream": True, "top_k": top_k}
    if session is not False:
        body["session_id"] = session
    start = time.perf_counter()
    result = {"status": 0, "ttft_s": None, "text": "", "question": messages[-1]["content"], "one_shot": session is False}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        result["status"] = response.status_code
        if response.status_code != 200:
            response.read()
            return result
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or [{}]
            content = choices[0].get("delta", {}).get("content")
            if result["ttft_s"] is None and content:
                result["ttft_s"] = time.perf_counter() - start
            result["text"] += content or ""
            if "ragblend" in chunk:
                result.update(final=chunk, session_id=chunk.get("session_id"))
            if "error" in chunk:
                result["status"] = 500
    result["latency_s"] = time.perf_counter() - start
    return result


def _client(server: ServerProcess, questions: list[str], deadline: float, seed: int, results: list, lock) -> None:
    rng = random.Random(seed)
    with server.client() as http:
        while time.monotonic() < deadline:
            if rng.random() < 0.5:
                batch = [ask(http, [{"role": "user", "content": rng.choice(questions)}])]
            else:
                batch, session = [], None
                for _ in range(3):
                    batch.append(ask(http, [{"role": "user", "content": rng.choice(questions)}], session))
                    session = batch[-1].get("session_id") or session
            with lock:
                results.extend(batch)
            for r in batch:
                if r["status"] == 429:
                    time.sleep(1)


def section_load(store: Path, questions: list[str], levels: list[int], duration_s: float, batches: list[int]) -> str:
    rows = []
    for batch in batches:
        rows += _load_levels(store, questions, levels, duration_s, batch)
    lines = [f"{duration_s:.0f} s per level; every client alternates at random between a one-shot RAG question "
             f"(top 2 of {RECORDS * 10} MuSiQue passages, 256-token chunks, blend) and a three-turn session; "
             f"streamed, {MAX_TOKENS} new tokens; TTFT measured by the client (queueing included). `--max-batch`: "
             "requests answered at once (1: one after another; more: their decode steps batched).", "",
             "| --max-batch | clients | answers | answers/s | TTFT p50 | TTFT p95 | latency p50 | errors | 429s | server RSS (peak) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for batch, c, n, rate, p50, p95, lat, errors, busy, rss, peak in rows:
        lines.append(f"| {batch} | {c} | {n} | {rate:.2f} | {p50:.2f} s | {p95:.2f} s | {lat:.2f} s | {errors} | {busy} | "
                     f"{rss / 1e6:,.0f} MB ({peak / 1e6:,.0f} MB) |")
    return "\n".join(lines)


def _load_levels(store: Path, questions: list[str], levels: list[int], duration_s: float, batch: int) -> list[tuple]:
    rows = []
    with ServerProcess(store, "--max-queue", "64", "--max-batch", str(batch)) as server:
        with server.client() as http:  # warm-up: first request pays lazy initialisation
            ask(http, [{"role": "user", "content": questions[0]}])
        for clients in levels:
            results, wall = _run_clients(server, questions, clients, duration_s)
            ok = [r for r in results if r["status"] == 200]
            ttfts = sorted(r["ttft_s"] for r in ok if r["ttft_s"] is not None)
            rss, peak = server.rss_bytes()
            rows.append((batch, clients, len(ok), len(ok) / wall, statistics.median(ttfts), ttfts[int(0.95 * (len(ttfts) - 1))],
                         statistics.median(r["latency_s"] for r in ok),
                         sum(r["status"] not in (200, 429) for r in results), sum(r["status"] == 429 for r in results),
                         rss, peak))
            print(rows[-1], flush=True)
    return rows


def _run_clients(server: ServerProcess, questions: list[str], clients: int, duration_s: float) -> tuple[list, float]:
    """`clients` concurrent clients for `duration_s`: their results and the wall time."""
    results, lock = [], threading.Lock()
    deadline = time.monotonic() + duration_s
    threads = [threading.Thread(target=_client, args=(server, questions, deadline, seed, results, lock))
               for seed in range(clients)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.monotonic() - start


def _audit_view(server: ServerProcess, timeout_s: float = 600) -> dict:
    """GET /v1/audit once every sampled request is audited (or given up)."""
    deadline = time.monotonic() + timeout_s
    with server.client() as http:
        while (view := http.get("/v1/audit").json())["pending"] and time.monotonic() < deadline:
            time.sleep(1)
    return view


def _served_copy(base: Path, tmp: str, *args: str) -> ServerProcess:
    store = Path(tmp) / "store"
    shutil.copytree(base, store)  # each run starts from the same store: an audit adds exact paths to it
    return ServerProcess(store, "--max-queue", "64", "--max-batch", "4", *args)


def section_audit(base: Path, questions: list[str], held_out: list[str], levels: list[int], duration_s: float,
                  rate: float, repeats: int) -> str:
    rates: dict[tuple[int, float], list[float]] = {}
    for _ in range(repeats):
        for clients in levels:
            for r in (0.0, rate):
                with tempfile.TemporaryDirectory() as tmp, _served_copy(base, tmp, "--audit-rate", str(r)) as server:
                    with server.client() as http:
                        ask(http, [{"role": "user", "content": questions[0]}])
                    results, wall = _run_clients(server, questions, clients, duration_s)
                    audited = _audit_view(server)["audited"] if r else 0
                rates.setdefault((clients, r), []).append(sum(x["status"] == 200 for x in results) / wall)
                print(clients, r, rates[clients, r][-1], "audited", audited, flush=True)
    lines = [f"{duration_s:.0f} s per run, the load section's mix (one-shot questions and three-turn sessions, blend, "
             f"{MAX_TOKENS} new tokens), `--max-batch 4`; runs with and without `--audit-rate {rate:g}` interleaved, "
             f"{repeats} each, each on a fresh copy of the store; medians.", "",
             f"| clients | answers/s without audit | answers/s with audit {rate:g} | ratio |", "|---|---|---|---|"]
    for clients in levels:
        off, on = statistics.median(rates[clients, 0.0]), statistics.median(rates[clients, rate])
        lines.append(f"| {clients} | {off:.3f} | {on:.3f} | {on / off:.2f} |")
    lines += ["", _audit_agreement(base, held_out)]
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def _audit_agreement(base: Path, questions: list[str]) -> str:
    """Every one-shot answer audited (rate 1, one request at a time, the audit between them), then the same
    answers compared offline: each re-answered with full prefill on its own chunks, first lines compared."""
    from ragblend.eval.metrics import first_line

    with tempfile.TemporaryDirectory() as tmp:
        with _served_copy(base, tmp, "--audit-rate", "1") as server:
            sent = []
            with server.client() as http:
                for question in questions:
                    sent.append(ask(http, [{"role": "user", "content": question}]))
                    _audit_view(server)
            view = _audit_view(server)
        with RagBlend(Path(tmp) / "store", exact_paths=False) as rb:
            agree = 0
            for r in sent:
                hits = rb.chunks([c["chunk_id"] for c in r["final"]["ragblend"]["chunks"]])
                full = rb.query(r["question"], contexts=hits, mode="full", max_new_tokens=MAX_TOKENS)
                agree += first_line(full.text) == first_line(r["text"])
    audited = view["audited"]
    return (f"Agreement, {len(sent)} one-shot questions (MuSiQue questions whose passages are not in the store, "
            f"top 2), every answer audited: the audit counted {audited} ({view['given_up']} given up, "
            f"{view['dropped']} dropped, {view['failed']} failed), identical first line on "
            f"{view['total']['identical'] or 0:.0%} ({round((view['total']['identical'] or 0) * audited)}/{audited}); "
            f"the offline comparison of the same {len(sent)} answers: {agree / len(sent):.0%} ({agree}/{len(sent)}).")


def _prefetch_run(base: Path, questions: list[str], prefetch: bool, sessions: int, turns: int,
                  clients: int, ram_bytes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        shutil.copytree(base, store)
        args = ["--session-ram-bytes", str(ram_bytes)] + ([] if prefetch else ["--no-prefetch"])
        with ServerProcess(store, *args) as server, server.client() as http:
            ids = [ask(http, [{"role": "user", "content": questions[i % len(questions)]}], None, top_k=1)["session_id"]
                   for i in range(sessions)]
            results, lock = [], threading.Lock()

            def follow_ups(seed: int) -> None:
                rng = random.Random(seed)
                with server.client() as own:
                    for _ in range(turns):
                        r = ask(own, [{"role": "user", "content": rng.choice(questions)}], rng.choice(ids), top_k=1)
                        with lock:
                            results.append(r)

            threads = [threading.Thread(target=follow_ups, args=(seed,)) for seed in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    timings = [r["final"]["ragblend"]["timings"] for r in results if r["status"] == 200]
    sources = Counter(t["history_source"] for t in timings)
    return {"turns": len(timings), "ram": sources["ram"], "disk": sources["disk"], "recomputed": sources["recomputed"],
            "ttft_s": statistics.mean(r["final"]["ragblend"]["ttft_s"] for r in results if r["status"] == 200),
            "client_ttft_s": statistics.mean(r["ttft_s"] for r in results if r["status"] == 200 and r["ttft_s"]),
            "history_load_s": statistics.mean(t["history_load_s"] for t in timings)}


def section_prefetch(base: Path, questions: list[str], sessions: int = 16, turns: int = 10, clients: int = 4) -> str:
    per_session = 24 << 20  # about one turn of a 1-passage question with SmolLM2 (fp16)
    ram = sessions * per_session // 4
    runs = {flag: _prefetch_run(base, questions, flag, sessions, turns, clients, ram) for flag in (False, True)}
    lines = [f"{sessions} sessions of one turn (1 passage + question), RAM tier {ram >> 20} MiB (about a quarter of "
             f"their KV), then {clients} clients x {turns} follow-up turns to random sessions (same seeds both runs).", "",
             "| prefetch | turns | history from RAM / disk / recomputed | mean history load | mean TTFT (server) | "
             "mean TTFT (client, queueing included) |", "|---|---|---|---|---|---|"]
    for flag, r in runs.items():
        lines.append(f"| {'on' if flag else 'off'} | {r['turns']} | {r['ram']} / {r['disk']} / {r['recomputed']} | "
                     f"{r['history_load_s'] * 1e3:.1f} ms | {r['ttft_s']:.3f} s | {r['client_ttft_s']:.3f} s |")
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="load,audit,prefetch")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--duration", type=float, default=45.0, help="seconds per load level")
    parser.add_argument("--max-batch", default="1,4", help="load: server --max-batch values, side by side")
    parser.add_argument("--audit-rate", type=float, default=0.05, help="audit: the rate measured against none")
    parser.add_argument("--audit-questions", type=int, default=30, help="audit: one-shot questions audited")
    parser.add_argument("--repeats", type=int, default=2, help="audit: runs of each setting")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    records = musique_records()
    if records is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "store"
        questions = build_store(base, records[:RECORDS])
        sections = args.sections.split(",")
        command = (f"`python benchmarks/serve_load.py --sections {{}} --clients {args.clients} --duration {args.duration:.0f} "
                   f"--max-batch {args.max_batch}`")
        if "load" in sections:
            body = section_load(base, questions, [int(c) for c in args.clients.split(",")], args.duration,
                                [int(b) for b in args.max_batch.split(",")])
            if args.write_docs:
                replace_section("serve-load", f"{body}\n\nMachine: {machine()}. Command: {command.format('load')}")
        if "audit" in sections:
            held_out = [r["question"] for r in records[RECORDS:RECORDS + args.audit_questions]]
            body = section_audit(base, questions, held_out, [int(c) for c in args.clients.split(",")], args.duration,
                                 args.audit_rate, args.repeats)
            if args.write_docs:
                command = (f"`python benchmarks/serve_load.py --sections audit --clients {args.clients} --duration "
                           f"{args.duration:.0f} --audit-rate {args.audit_rate:g} --audit-questions "
                           f"{args.audit_questions} --repeats {args.repeats}`")
                replace_section("serve-audit", f"{body}\n\nMachine: {machine()}. Command: {command}")
        if "prefetch" in sections:
            body = section_prefetch(base, questions)
            if args.write_docs:
                replace_section("serve-prefetch", f"{body}\n\nMachine: {machine()}. Command: {command.format('prefetch')}")


if __name__ == "__main__":
    main()
