"""What the LMF worker counts: Prometheus metrics (its own registry) and the run summary it logs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


class LMFMetrics:
    """Prometheus metrics of one worker (own registry, so tests can run several in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.events = Counter("zerocf_lmf_events", "events applied (after de-duplication)", registry=r)
        self.duplicates = Counter("zerocf_lmf_duplicates", "replayed events dropped by the deduper", registry=r)
        self.invalid = Counter("zerocf_lmf_invalid_events", "undecodable records on the events topic", registry=r)
        self.batches = Counter("zerocf_lmf_batches", "batches by outcome", ["outcome"], registry=r)
        self.nan_guards = Counter("zerocf_lmf_nan_guards", "batches whose factors were refused (NaN/inf)", registry=r)
        self.errors = Counter("zerocf_lmf_errors", "Redis/Kafka errors retried", ["kind"], registry=r)
        self.loss = Gauge("zerocf_lmf_loss_ewma", "EWMA of the per-event logistic loss", registry=r)
        self.lag = Gauge("zerocf_lmf_lag", "records behind the high watermark", ["partition"], registry=r)
        self.generation = Gauge("zerocf_lmf_generation", "generation being written", registry=r)
        self.latency = Histogram(
            "zerocf_lmf_batch_seconds",
            "batch latency (plan+fetch+train+write)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )


@dataclass
class WorkerStats:
    """Counters of one run of the worker (logged every 10 s and at the end).

    >>> WorkerStats(events=10).summary()["events"]
    10
    """

    events: int = 0
    clicks: int = 0
    batches: int = 0
    duplicates: int = 0
    nan_batches: int = 0
    started: float = field(default_factory=time.monotonic)
    loss_ewma: float = float("nan")

    def add_loss(self, loss: float) -> None:
        """Fold one batch's mean loss into the EWMA (weight 0.02)."""
        prev = self.loss_ewma
        self.loss_ewma = loss if prev != prev else 0.98 * prev + 0.02 * loss

    def summary(self) -> dict[str, Any]:
        secs = max(time.monotonic() - self.started, 1e-9)
        return {
            "events": self.events,
            "clicks": self.clicks,
            "batches": self.batches,
            "duplicates": self.duplicates,
            "nan_batches": self.nan_batches,
            "seconds": round(secs, 2),
            "events_per_s": round(self.events / secs, 1),
            "loss_ewma": round(self.loss_ewma, 5),
        }
