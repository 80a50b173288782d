"""A store's calibrated blend setting: the smallest recompute ratio (and selection) whose answers agreed
with full prefill at a stated target, per model fingerprint, beside the manifest (its identity fields
stay as they are: a calibration is advice about the KV, not part of what the KV depends on).

Also the partial results of a calibration that has not finished, so a rerun resumes it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from ragblend.engine.selection import BlendConfig

CALIBRATION_KEY = b"calibration"
PARTIAL_KEY = b"calibration-partial"
# The selections calibrate may try: CacheBlend's HKVD (the default BlendConfig) and query-aware chunks.
SELECTIONS = {"hkvd": BlendConfig(), "query": BlendConfig(query_chunks=1.0)}
METRICS = ("identical", "kept", "first_token")


@dataclass(frozen=True)
class Calibration:
    ratio: float  # 1.0 when no ratio below 1 met the target: blend then answers as full prefill
    selection: str  # a key of SELECTIONS
    target: float
    metric: str
    questions: int
    agreement: float | None  # measured at `ratio`; None when no ratio met the target
    ttft_vs_full: float | None
    date: str  # ISO 8601, UTC
    met: bool
    evidence: list[dict] = field(default_factory=list)  # one row per ratio and selection tried

    def blend(self) -> BlendConfig:
        return replace(SELECTIONS[self.selection], recompute_ratio=self.ratio)

    def summary(self) -> str:
        goal = f"{self.metric} >= {self.target:.0%}"
        if not self.met:
            return f"ratio 1.0: no ratio below 1 met {goal} on {self.questions} questions ({self.date[:10]})"
        return (f"ratio {self.ratio:g} ({self.selection}): {self.metric} {self.agreement:.0%} >= {self.target:.0%} "
                f"on {self.questions} questions, TTFT {self.ttft_vs_full:.2f}x full ({self.date[:10]})")


def _read(store, key: bytes) -> dict:
    with store.env.begin() as txn:
        raw = txn.get(key, db=store.meta_db)
    return {} if raw is None else json.loads(bytes(raw))


def _write(store, key: bytes, value: dict | None) -> None:
    with store.env.begin(write=True) as txn:
        if value is None:
            txn.delete(key, db=store.meta_db)
        else:
            txn.put(key, json.dumps(value).encode(), db=store.meta_db)


def read_calibration(store, fingerprint: str) -> Calibration | None:
    """The calibration stored for the model with KV fingerprint `fingerprint`, if any."""
    record = _read(store, CALIBRATION_KEY).get(fingerprint)
    return None if record is None else Calibration(**record)


def write_calibration(store, fingerprint: str, calibration: Calibration) -> None:
    """Store `calibration` for `fingerprint` (other models' calibrations stay) and drop the partial results."""
    records = _read(store, CALIBRATION_KEY)
    records[fingerprint] = asdict(calibration)
    _write(store, CALIBRATION_KEY, records)
    _write(store, PARTIAL_KEY, None)


def read_partial(store, run_key: str) -> dict:
    """Results of an unfinished calibration with this run key ({label: {question index: row}}), or {}."""
    partial = _read(store, PARTIAL_KEY)
    return partial.get("rows", {}) if partial.get("key") == run_key else {}


def write_partial(store, run_key: str, rows: dict) -> None:
    _write(store, PARTIAL_KEY, {"key": run_key, "rows": rows})
