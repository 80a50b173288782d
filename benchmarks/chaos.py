"""The long variants of tests/test_chaos.py: a real `ragblend serve` soaked by careless clients, killed
with SIGKILL at random moments, and (with --redis) its shared backend restarted under load.

    python benchmarks/chaos.py [--seconds 120] [--clients 24] [--max-queue 8] [--kills 5] [--redis] [--write-docs]

`abandon`: `--clients` threads for `--seconds` against `--max-queue`, each request one of: a plain
answer, a stream hung up after a random number of chunks, a non-streamed answer given up after a
random timeout, a session turn streamed and hung up. Passes when no answer is a 5xx, every 429/409
carries Retry-After, the server is idle within 30 s of the last client, and every session still
answers. `kill`: `--kills` rounds of a session turn and a 40-document upload, SIGKILL after a random
delay, `ragblend stats --check`, restart, the session's next turn and the upload sent again.
`redis`: clients for `--seconds` while the backend is stopped for 3 s and started again, twice:
passes when every answer is a 200 (the answer computed what it could not load) or a 503 with Retry-After.
"""
from __future__ import annotations

import argparse
import collections
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docsection import report  # noqa: E402

from ragblend import RagBlend  # noqa: E402
from ragblend.serve.launch import ServerProcess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCS_FILE = REPO / "docs" / "reliability.md"
KEY = "chaos-key"
DOCS = [{"id": "lighthouse", "text": "The lighthouse of Varn was built in 1821 by the engineer Oda Pell."},
        {"id": "bridges", "text": "Oda Pell later designed three bridges over the river Am in Kessel."},
        {"id": "glass", "text": "Kessel is famous for its glass markets and its mayor Tomas Reh."}]
QUESTIONS = ["Who built the lighthouse of Varn?", "What did Oda Pell design?", "What is Kessel famous for?"]


def ask(**fields) -> dict:
    return {"messages": [{"role": "user", "content": random.choice(QUESTIONS)}], "max_tokens": 16, **fields}


class Tally:
    """Outcomes by kind ("200", "429", "hung up"...), and the refusals that lacked Retry-After."""

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()
        self.missing_retry_after = 0
        self._lock = threading.Lock()

    def note(self, outcome: str, response: httpx.Response | None = None) -> None:
        """Count an outcome; a refusal is waited out for its Retry-After, as a client should."""
        refused = response is not None and response.status_code in (409, 429, 503)
        with self._lock:
            self.counts[outcome] += 1
            if refused and "retry-after" not in response.headers:
                self.missing_retry_after += 1
        if refused:
            time.sleep(float(response.headers.get("retry-after", 1)))

    @property
    def server_errors(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind.startswith("5") and kind != "503")

    def summary(self) -> str:
        return ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts.items()))


def careless_request(http: httpx.Client, sessions: list[str], tally: Tally) -> None:
    """One request of a random careless kind."""
    kind = random.choice(["plain", "stream hung up", "gave up", "session hung up"])
    try:
        if kind == "plain":
            response = http.post("/v1/chat/completions", json=ask())
            tally.note(str(response.status_code), response)
        elif kind == "gave up":
            response = http.post("/v1/chat/completions", json=ask(max_tokens=200), timeout=random.uniform(0.2, 3))
            tally.note(str(response.status_code), response)
        else:
            body = ask(stream=True, max_tokens=200)
            if kind == "session hung up":
                body["session_id"] = random.choice(sessions)
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    tally.note(str(response.status_code), response)
                    return
                for i, _ in enumerate(response.iter_lines()):
                    if i >= random.randint(1, 20):
                        break
            tally.note(kind)
    except httpx.TimeoutException:
        tally.note("gave up")


def abandon(store: Path, args: argparse.Namespace) -> tuple[str, bool]:
    server = ServerProcess(store, "--max-queue", str(args.max_queue), api_key=KEY)
    tally = Tally()
    try:
        with server.client() as http:
            sessions = [http.post("/v1/chat/completions", json=ask(session_id=None)).json()["session_id"]
                        for _ in range(4)]
        deadline = time.monotonic() + args.seconds

        def client():
            with server.client(timeout=120) as http:
                while time.monotonic() < deadline:
                    careless_request(http, sessions, tally)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        idle_s = server.wait_idle(30)
        with server.client(timeout=120) as http:
            continued = [http.post("/v1/chat/completions", json=ask(session_id=s)).status_code for s in sessions]
    finally:
        server.kill()
    ok = tally.server_errors == 0 and tally.missing_retry_after == 0 and continued == [200] * len(sessions)
    return (f"| abandon: {args.clients} clients, {args.seconds:.0f} s, --max-queue {args.max_queue} | "
            f"{tally.summary()}; idle {idle_s:.1f} s after; sessions continued: {continued.count(200)}/"
            f"{len(sessions)} | {'pass' if ok else 'FAIL'} |"), ok


def check_store(store: Path) -> bool:
    done = subprocess.run([sys.executable, "-m", "ragblend.cli", "stats", "--store", str(store), "--check"],
                          capture_output=True, text=True, timeout=600)
    return done.returncode == 0 and done.stdout.strip().endswith("consistency check: ok")


def kill_rounds(store: Path, args: argparse.Namespace, scratch: Path) -> tuple[str, bool]:
    notes = [{"id": f"note-{i}", "text": f"Harbour note {i}: the tide at Varn turned at {i} past noon."}
             for i in range(40)]
    failures, delays = [], []
    for round_ in range(args.kills):
        crashed = scratch / f"kill-{round_}"
        shutil.copytree(store, crashed)
        server = ServerProcess(crashed, api_key=KEY)
        try:
            with server.client() as http:
                session = http.post("/v1/chat/completions", json=ask(session_id=None)).json()["session_id"]
                http.post("/v1/documents", json=notes)
                delay = random.uniform(0, 4)
                delays.append(delay)
                threading.Thread(target=lambda: http_quiet(server, session), daemon=True).start()
                time.sleep(delay)
        finally:
            server.kill()
        if not check_store(crashed):
            failures.append(f"round {round_}: check failed")
            continue
        server = ServerProcess(crashed, api_key=KEY)
        try:
            with server.client() as http:
                turn = http.post("/v1/chat/completions", json=ask(session_id=session))
                job = http.post("/v1/documents", json=notes).json()
                while (status := http.get(f"/v1/jobs/{job['job_id']}").json())["status"] in ("queued", "running"):
                    time.sleep(0.5)
            if turn.status_code != 200 or status["status"] != "done":
                failures.append(f"round {round_}: turn {turn.status_code}, upload {status['status']}")
        finally:
            server.kill()
        shutil.rmtree(crashed)
    ok = not failures
    return (f"| kill -9 at a random moment (0-4 s into a turn and a 40-document upload), {args.kills} rounds | "
            f"store checks clean and the session and upload go on after restart: "
            f"{args.kills - len(failures)}/{args.kills} {'; '.join(failures)} | {'pass' if ok else 'FAIL'} |"), ok


def http_quiet(server: ServerProcess, session: str) -> None:
    """A session turn that the kill interrupts: its outcome does not matter, only what the store keeps."""
    try:
        with server.client() as http:
            http.post("/v1/chat/completions", json=ask(session_id=session))
    except httpx.HTTPError:
        pass


def redis_away(args: argparse.Namespace, scratch: Path) -> tuple[str, bool]:
    from kvchunks.backends.redis_process import RedisProcess, redis_server_binary

    if redis_server_binary() is None:
        return "| redis restarted under load | skipped: redis-server not installed | - |", True
    tally = Tally()
    with RedisProcess(scratch / "redis") as redis:
        with RagBlend(scratch / "redis-store", kv_backend=redis.url) as rb:
            rb.add_documents(DOCS)
        server = ServerProcess(scratch / "redis-store", "--kv-backend", redis.url, api_key=KEY)
        try:
            deadline = time.monotonic() + args.seconds

            def client():
                with server.client(timeout=120) as http:
                    while time.monotonic() < deadline:
                        response = http.post("/v1/chat/completions", json=ask(max_tokens=8))
                        tally.note(str(response.status_code), response)

            threads = [threading.Thread(target=client) for _ in range(4)]
            for thread in threads:
                thread.start()
            for _ in range(2):
                time.sleep(args.seconds / 4)
                redis.stop()
                time.sleep(3)
                redis.start()
            for thread in threads:
                thread.join()
            with server.client() as http:
                after = http.post("/v1/chat/completions", json=ask()).status_code
        finally:
            server.kill()
    ok = set(tally.counts) <= {"200", "503"} and tally.missing_retry_after == 0 and after == 200
    return (f"| redis stopped 3 s and restarted, twice, under 4 clients for {args.seconds:.0f} s | "
            f"{tally.summary()}; after: {after} | {'pass' if ok else 'FAIL'} |"), ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--redis", action="store_true", help="also restart a redis backend under load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true", help="put the table in docs/reliability.md")
    args = parser.parse_args()
    random.seed(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        store = scratch / "store"
        with RagBlend(store) as rb:
            rb.add_documents(DOCS)
        rows = [abandon(store, args), kill_rounds(store, args, scratch)]
        if args.redis:
            rows.append(redis_away(args, scratch))
    table = "| scenario | outcome | verdict |\n|---|---|---|\n" + "\n".join(row for row, _ in rows)
    command = "python benchmarks/chaos.py " + " ".join(sys.argv[1:])
    report("chaos", table, command, args.write_docs, DOCS_FILE)
    sys.exit(0 if all(ok for _, ok in rows) else 1)


if __name__ == "__main__":
    main()
