"""Shared by the benchmark scripts: the machine they ran on, the shared eval data, in-place updates of docs/benchmarks.md."""
from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
MUSIQUE = Path(__file__).resolve().parents[2] / "shared" / "eval" / "musique_s.json"


def musique_records() -> list[dict] | None:
    """The shared MuSiQue questions, or None (after saying so) where ../shared is absent."""
    if not MUSIQUE.is_file():
        print(f"skipping: evaluation data not found at {MUSIQUE}")
        return None
    return json.loads(MUSIQUE.read_text())


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only, fp32"
    return (f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, {device}")


def replace_section(name: str, body: str, docs: Path = DOCS) -> None:
    """Replace the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` (appended if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = docs.read_text() if docs.is_file() else "# Benchmarks\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)


def report(name: str, body: str, command: str, write_docs: bool, docs: Path = DOCS) -> None:
    """Print a benchmark's table; with `write_docs`, put it in its section with the machine and command."""
    print(body, flush=True)
    if write_docs:
        replace_section(name, f"{body}\n\nMachine: {machine()}. Command: `{command}`", docs)
