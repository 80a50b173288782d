"""Online audit (`ragblend serve --audit-rate P`): re-answer a share P of blend requests with full prefill
when the server is idle, and report how often blend's answer agreed with it.

Which requests: greedy (temperature 0), one-shot blend answers (session turns are not re-answered: their
prompt holds the conversation's stored KV). Every 1/P-th such request is sampled (a credit counter, so
the share is exact and the same traffic gives the same sample). The re-answer sees the same prompt
tokens: the request's own contexts, or the chunks it retrieved, by chunk id.

When: a sampled request waits in the audit's queue (bounded; beyond it the oldest is dropped) until the
admission queue holds no request, queued or running. The audit then answers with full prefill on its own
thread, and gives up the answer at its next token as soon as a request arrives, to retry it at the next
idle moment (twice at most). So a request never waits behind an audit that has started decoding; one
that arrives during the audit's prefill waits for that prefill (one full prefill, the engine loop's bound).
The answer already sent is never touched: the audit only counts.

What: per audited request, identical answers (first line, as `ragblend calibrate`), first-token
agreement and first-token KL(full || blend); totals and a rolling window of the last `window` audits in
/metrics and GET /v1/audit. When the window's agreement on the store's calibrated metric falls below its
calibrated target, one warning is logged per window (`kept` needs gold answers: `identical` is used).
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from ragblend.answer import Answer
from ragblend.api import RagBlend
from ragblend.eval.metrics import first_line, first_token_kl

log = logging.getLogger("ragblend.audit")
RETRIES = 2  # times an audit given up for a request is tried again
IDLE_POLL_S = 0.05


@dataclass
class Sampled:
    """What the audit needs of one sent blend answer."""

    question: str
    contexts: list | None  # the request's own contexts; None: its retrieved chunks (by id)
    chunk_ids: list[str]
    namespace: str
    max_new_tokens: int
    stop: list[str]
    answer: Answer
    tries: int = 0


@dataclass
class Comparison:
    identical: bool
    first_token: bool
    kl: float


@dataclass
class _Totals:
    audited: int = 0
    identical: int = 0
    first_token: int = 0
    kl_sum: float = 0.0
    window: deque = field(default_factory=deque)  # of Comparison


class Audit:
    def __init__(self, rb: RagBlend, rate: float, busy: Callable[[], int], registry: CollectorRegistry,
                 window: int = 100, queue_max: int = 64):
        """`busy`: requests queued or running (the admission queue's depth); the audit runs only at 0."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"audit rate must be in [0, 1], got {rate}")
        if window < 1 or queue_max < 1:
            raise ValueError("audit window and queue_max must be >= 1")
        self.rb, self.rate, self.busy, self.window = rb, rate, busy, window
        self._pending: deque[Sampled] = deque(maxlen=queue_max)
        self._auditing = 0  # taken from _pending, not yet counted: "pending" includes it
        self._cond = threading.Condition()
        self._closing = False
        self._credit = 0.0
        self._since_warning = 0
        self._totals = _Totals(window=deque(maxlen=window))
        self.counts = {"sampled": 0, "dropped": 0, "given_up": 0, "failed": 0}
        self._metrics(registry)
        self._thread = threading.Thread(target=self._work, name="ragblend-audit", daemon=True)
        if rate > 0:
            self._thread.start()

    def _metrics(self, r: CollectorRegistry) -> None:
        self.outcomes = Counter("ragblend_audit_requests", "blend requests sampled for the audit, by outcome",
                                ["outcome"], registry=r)
        self.agreed = Counter("ragblend_audit_agreements", "audited answers agreeing with full prefill",
                              ["measure"], registry=r)
        self.kl_sum = Counter("ragblend_audit_first_token_kl_sum", "sum of first-token KL(full || blend)",
                              registry=r)
        Gauge("ragblend_audit_pending", "sampled requests waiting for an idle moment or being audited",
              registry=r).set_function(lambda: len(self._pending) + self._auditing)
        window = Gauge("ragblend_audit_window", "rolling window of the last audits: identical and first-token "
                                                "agreement shares, mean first-token KL, size", ["measure"], registry=r)
        for measure in ("identical", "first_token", "kl_mean", "size"):
            window.labels(measure).set_function(lambda m=measure: self.view()["window"][m] or 0.0)

    # ---- the request side (worker threads): cheap, never blocks ----------------------------------

    def offer(self, question: str, contexts: list | None, namespace: str, max_new_tokens: int, stop: list[str],
              temperature: float, one_shot: bool, answer: Answer) -> bool:
        """Consider a sent answer for the audit; True if it was sampled."""
        if self.rate == 0 or answer.mode != "blend" or temperature != 0 or not one_shot:
            return False
        with self._cond:
            self._credit += self.rate
            if self._credit < 1.0 - 1e-9:
                return False
            self._credit -= 1.0
            if len(self._pending) == self._pending.maxlen:
                self._count("dropped")
            self._pending.append(Sampled(question, contexts, [c.chunk_id for c in answer.chunks], namespace,
                                         max_new_tokens, list(stop), answer))
            self._count("sampled")
            self._cond.notify_all()
        return True

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        self.outcomes.labels(outcome).inc()

    # ---- the audit thread ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop; sampled requests not yet audited are left unaudited."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def _next_idle(self) -> Sampled | None:
        """The oldest sampled request, once nothing is queued or running; None when closing."""
        with self._cond:
            while not self._closing and (not self._pending or self.busy() > 0):
                self._cond.wait(IDLE_POLL_S if self._pending else None)  # offer() and close() notify
            if self._closing:
                return None
            self._auditing = 1
            return self._pending.popleft()

    def _work(self) -> None:
        while (item := self._next_idle()) is not None:
            try:
                self._audit(item)
            finally:
                with self._cond:
                    self._auditing = 0

    def _audit(self, item: Sampled) -> None:
        try:
            full = self._full_answer(item)
        except Exception as exc:  # noqa: BLE001 - an audit failure must not stop the audit (or the server)
            log.warning("audit: full prefill failed: %s", exc)
            with self._cond:
                self._count("failed")
            return
        if full is None:  # a request arrived: retry at the next idle moment, or give up
            with self._cond:
                item.tries += 1
                if item.tries > RETRIES:
                    self._count("given_up")
                else:
                    self._pending.appendleft(item)
            return
        self._record(compare(item.answer, full))

    def _full_answer(self, item: Sampled) -> Answer | None:
        """Full prefill's answer to the same prompt, or None if a request arrived before it finished."""
        contexts = item.contexts if item.contexts is not None else self.rb.chunks(item.chunk_ids)
        stream = self.rb.query(item.question, contexts=contexts, mode="full", max_new_tokens=item.max_new_tokens,
                               stop=item.stop, stream=True, namespace=item.namespace)
        pieces = iter(stream)
        for _ in pieces:
            if self.busy() > 0 or self._closing:
                pieces.close()
                return None
        return stream.answer

    def _record(self, c: Comparison) -> None:
        with self._cond:
            t = self._totals
            t.audited += 1
            t.identical += c.identical
            t.first_token += c.first_token
            t.kl_sum += c.kl
            t.window.append(c)
            self._since_warning += 1
            self.outcomes.labels("audited").inc()
            self.agreed.labels("identical").inc(c.identical)
            self.agreed.labels("first_token").inc(c.first_token)
            self.kl_sum.inc(c.kl)
        self._warn_if_below_target()

    def _warn_if_below_target(self) -> None:
        """One warning per window of audits while the window's agreement is below the calibrated target."""
        target = self.target()
        view = self.view()
        if target is None or view["window"]["size"] < self.window or self._since_warning < self.window:
            return
        measure = target["measure"]
        if view["window"][measure] < target["target"]:
            self._since_warning = 0
            log.warning("audit: blend agreed with full prefill on %.0f%% (%s) of the last %d audited requests, "
                        "below the calibrated target of %.0f%%: recalibrate (ragblend calibrate) or raise the ratio",
                        100 * view["window"][measure], measure, self.window, 100 * target["target"])

    def target(self) -> dict | None:
        """The store's calibrated target, as the audit measures it (kept -> identical), or None."""
        found = self.rb.calibration()
        if found is None:
            return None
        measure = "first_token" if found.metric == "first_token" else "identical"
        return {"metric": found.metric, "measure": measure, "target": found.target, "ratio": found.ratio}

    def view(self) -> dict:
        """Counts, totals and the rolling window (GET /v1/audit)."""
        with self._cond:
            t = self._totals
            window = list(t.window)

            def share(count: float, total: int) -> float | None:
                return count / total if total else None

            return {
                "rate": self.rate, **self.counts, "audited": t.audited, "pending": len(self._pending) + self._auditing,
                "total": {"identical": share(t.identical, t.audited), "first_token": share(t.first_token, t.audited),
                          "kl_mean": share(t.kl_sum, t.audited)},
                "window": {"size": len(window), "identical": share(sum(c.identical for c in window), len(window)),
                           "first_token": share(sum(c.first_token for c in window), len(window)),
                           "kl_mean": share(sum(c.kl for c in window), len(window))},
            }


def compare(blend: Answer, full: Answer) -> Comparison:
    return Comparison(first_line(blend.text) == first_line(full.text), blend.token_ids[:1] == full.token_ids[:1],
                      first_token_kl(full.first_token_logits, blend.first_token_logits))
