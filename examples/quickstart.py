"""Quick start: ingest the example documents, then answer questions in blend, full and prefix mode.

Blend first (it fuses the chunks' stored KV), then full prefill (the reference, which leaves its chunk
sequence in the exact-path tree), then prefix (which loads that sequence exactly and answers as full).

Run with `make demo` (sets up everything on a fresh machine) or `python examples/quickstart.py`.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ragblend import RagBlend  # noqa: E402
from ragblend.storage.documents import read_documents  # noqa: E402

HERE = Path(__file__).resolve().parent
STORE = Path(os.environ.get("RAGBLEND_DEMO_STORE", HERE.parent / "store"))


def main() -> None:
    rb = RagBlend(STORE)  # defaults: SmolLM2-135M-Instruct and all-MiniLM-L6-v2, both bundled
    report = rb.ingest(read_documents([HERE / "docs"]))
    print(report.summary())
    print("\n".join(rb.stats().lines()))
    for question in (HERE / "questions.txt").read_text().splitlines():
        if not question.strip():
            continue
        blend = rb.query(question, mode="blend", max_new_tokens=32)
        full = rb.query(question, mode="full", max_new_tokens=32)
        exact = rb.query(question, mode="prefix", max_new_tokens=32)
        print(f"\nQ: {question}")
        print(f"  sources: {', '.join(sorted({c.doc_id for c in blend.chunks}))} ({blend.prompt_tokens} prompt tokens)")
        print(f"  full  : {full.text!r}  (TTFT {full.ttft_s:.2f} s)")
        print(f"  blend : {blend.text!r}  (TTFT {blend.ttft_s:.2f} s, {full.ttft_s / blend.ttft_s:.1f}x faster)")
        print(f"  prefix: {exact.text!r}  (TTFT {exact.ttft_s:.2f} s, {exact.timings['exact_hit_tokens']} tokens "
              f"from the exact-path tree, same answer as full: {exact.token_ids == full.token_ids})")


if __name__ == "__main__":
    main()
