"""A `ragblend serve` process on a free local port, for tests, benchmarks and scripts that need a real
server: started, waited for (`/healthz`), stopped with SIGTERM as an operator would."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, store: str | Path, *args: str, api_key: str | None = None, start_timeout_s: float = 180):
        """`args`: more `ragblend serve` options (--model, --max-queue...)."""
        self.port, self.api_key = free_port(), api_key
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if api_key:
            env["RAGBLEND_API_KEY"] = api_key
        self.process = subprocess.Popen([sys.executable, "-m", "ragblend.cli", "serve", "--store", str(store),
                                         "--port", str(self.port), *args], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self._wait_ready(start_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ragblend serve exited with {self.process.returncode}: {self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(f"ragblend serve did not answer /healthz within {timeout_s:.0f} s")

    def client(self, timeout: float = 300, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout, **kwargs)

    def rss_bytes(self) -> tuple[int, int]:
        """(current, peak) resident memory of the server process."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines())
        return tuple(int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM"))

    def metric(self, sample: str) -> float:
        """One sample's value from /metrics, as written there (`ragblend_queue_depth`,
        `ragblend_requests_total{endpoint="/v1/search",status="200"}`); 0 when absent."""
        with self.client() as http:
            page = http.get("/metrics", timeout=10).text
        values = [line.rsplit(" ", 1)[1] for line in page.splitlines() if line.startswith(sample + " ")]
        return float(values[0]) if values else 0.0

    def wait_idle(self, timeout_s: float) -> float:
        """Seconds until no request is queued or running; TimeoutError after `timeout_s`."""
        start = time.monotonic()
        while self.metric("ragblend_queue_depth") > 0:
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"requests still queued or running after {timeout_s:.0f} s")
            time.sleep(0.1)
        return time.monotonic() - start

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to finish anything."""
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM, then the exit code (0 after a graceful shutdown)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
