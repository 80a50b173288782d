"""Starting the server: load the model, embedder and index once, then serve until SIGTERM or SIGINT,
on which uvicorn stops taking requests, lets running ones finish, and the app drains its queue,
ingest jobs and session saves before the process exits 0."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
from pathlib import Path

import uvicorn

from ragblend.api import RagBlend
from ragblend.serve.app import ServeConfig, create_app
from ragblend.storage.session_store import DEFAULT_RAM_BYTES

API_KEY_ENV = "RAGBLEND_API_KEY"


def api_keys(key: str | None, keys_file: str | None) -> dict[str, str | None]:
    """`--api-key` (or RAGBLEND_API_KEY), free to choose a namespace by header, and `--api-keys FILE`,
    a JSON object of key -> the namespace that key is bound to."""
    keys: dict[str, str | None] = {}
    key = key or os.environ.get(API_KEY_ENV)
    if key:
        keys[key] = None
    if keys_file:
        bound = json.loads(Path(keys_file).read_text())
        if not isinstance(bound, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in bound.items()):
            raise ValueError(f"{keys_file}: expected a JSON object of API key -> namespace")
        keys.update(bound)
    return keys


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def open_warning(host: str, keys: dict[str, str | None] | None) -> str | None:
    """What to tell an operator who binds beyond loopback without an API key."""
    if keys or _loopback(host):
        return None
    return (f"ragblend: warning: serving on {host} without an API key: anyone who can reach it can read "
            f"and change the store (set --api-key or {API_KEY_ENV})")


def serve(store: str, model: str | None = None, embedder: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, keys: dict[str, str | None] | None = None, max_queue: int = 64, max_batch: int = 4,
          threads: int | None = None, prefetch: bool = True, session_ram_bytes: int = DEFAULT_RAM_BYTES,
          decode_weights: str = "float32", kv_backend: str | None = None, audit_rate: float = 0.0,
          decode_ram_bytes: int | None = None) -> None:
    warning = open_warning(host, keys)
    if warning:
        print(warning, file=sys.stderr)
    if threads:
        import torch

        torch.set_num_threads(threads)
    rb = RagBlend(store, model=model, embedder=embedder, session_ram_bytes=session_ram_bytes,
                  decode_weights=decode_weights, kv_backend=kv_backend, max_batch=max_batch,
                  decode_ram_bytes=decode_ram_bytes)
    app = create_app(rb, ServeConfig(api_keys=keys or {}, max_queue=max_queue, prefetch=prefetch,
                                     audit_rate=audit_rate))
    for stop in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal after its graceful
        signal.signal(stop, lambda *_: None)      # shutdown: let that return here and exit 0
    shown = f"[{host}]" if ":" in host else host
    print(f"ragblend: serving on http://{shown}:{port}/ (open it in a browser to chat)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)
