"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ragblend.answer import Answer
from ragblend.engine.loop import EngineStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self, queue_depth: Callable[[], int], kv_bytes: Callable[[], dict[str, int]],
                 engine: Callable[[], EngineStats]):
        """`kv_bytes`: KV bytes per tier ("ram", "disk") and of the exact-path tree ("paths")."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ragblend_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("ragblend_ttft_seconds", "time to first token", ["mode"], buckets=LATENCY_BUCKETS,
                              registry=r)
        self.latency = Histogram("ragblend_request_seconds", "answer latency, queueing included", ["mode"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("ragblend_tokens", "tokens by kind", ["kind"], registry=r)
        self.kv_chunks = Counter("ragblend_kv_chunks", "chunk KV uses", ["result"], registry=r)
        self.exact_tokens = Counter("ragblend_exact_path_tokens", "prompt tokens whose KV came from the exact-path "
                                    "tree (its first chunk's record included)", registry=r)
        self.history = Counter("ragblend_session_history", "conversation turns by where their KV came from",
                               ["source"], registry=r)
        Gauge("ragblend_queue_depth", "requests queued or running", registry=r).set_function(queue_depth)
        Gauge("ragblend_decode_batch_mean", "requests fed per decode step, on average since start",
              registry=r).set_function(lambda: engine().mean_batch)
        Gauge("ragblend_exact_path_bytes", "KV bytes the exact-path tree holds in the store",
              registry=r).set_function(lambda: kv_bytes()["paths"])
        tiers = Gauge("ragblend_tier_bytes", "KV bytes held per tier", ["tier"], registry=r)
        for tier in ("ram", "disk"):
            tiers.labels(tier).set_function(lambda tier=tier: kv_bytes()[tier])

    def answered(self, answer: Answer, latency_s: float) -> None:
        self.ttft.labels(answer.mode).observe(answer.ttft_s)
        self.latency.labels(answer.mode).observe(latency_s)
        self.tokens.labels("prompt").inc(answer.prompt_tokens)
        self.tokens.labels("recomputed").inc(answer.recomputed_tokens)
        self.tokens.labels("generated").inc(len(answer.token_ids))
        self.kv_chunks.labels("hit").inc(answer.timings.get("kv_hits", 0))
        self.kv_chunks.labels("miss").inc(answer.timings.get("kv_misses", 0))
        self.exact_tokens.inc(answer.timings.get("exact_hit_tokens", 0))
        if "history_source" in answer.timings:
            self.history.labels(str(answer.timings["history_source"])).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
