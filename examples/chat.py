"""A three-turn RAG conversation: each turn reuses the whole history as stored KV instead of re-prefilling it.

Run `python examples/chat.py` (after `make demo` has set everything up). Prints, per turn, the TTFT, how
many history tokens were reused and where they came from (ram | disk | recomputed); run it twice to see
the second run resume the conversation from disk.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ragblend import RagBlend  # noqa: E402
from ragblend.storage.documents import read_documents  # noqa: E402

HERE = Path(__file__).resolve().parent
STORE = Path(os.environ.get("RAGBLEND_DEMO_STORE", HERE.parent / "store"))
TURNS = [
    "Who leads Project Tidewater?",
    "How many Kestrel turbines does the project use?",
    "How much did the Harbor City council vote to give it?",
]


def main() -> None:
    with RagBlend(STORE) as rb:  # the block's end waits for the last turn's background save
        rb.ingest(read_documents([HERE / "docs"]), progress=False)
        chat = rb.chat("example-chat", create=True)
        for question in TURNS:
            answer = chat.send(question, top_k=2, max_new_tokens=32)
            t = answer.timings
            print(f"Q: {question}\nA: {answer.text}")
            print(f"   TTFT {answer.ttft_s:.2f} s; reused {t['history_tokens']:.0f} history tokens from "
                  f"{t['history_source']}; {answer.prompt_tokens} prompt tokens, {answer.recomputed_tokens} computed\n")
        print(f"session {chat.session_id}: {chat.turns} turns, {chat.history_tokens} tokens of history stored")


if __name__ == "__main__":
    main()
