"""The dashboard of ``zerocf serve``: ``GET /`` (one static page) and ``GET /api/dashboard?top=10`` (its data).

Only what the serve process can know honestly, all read from Redis or from serve itself:

- ``generations``: every generation Redis still holds (retired ones go after ``ZEROCF_ALS_GC_GRACE_S``), with
  when it was created/published/retired, its rows and the calibration (``scale``, ``bias``) it was published
  with.
- ``applied``: the live generation's offset fence (``g:<g>:offsets``: the last offset of each ``<p>.events``
  partition the LMF workers applied) and the **applied-offsets rate**: the change of their sum between two
  samples, at least :data:`MIN_SAMPLE_GAP_S` apart, taken when the page asks. Serve has no Kafka connection,
  so it reads no consumer lag itself: each LMF worker publishes its events/s and lag with its live quality
  (``quality.workers``) and exports the lag per partition as ``zerocf_lmf_lag`` on its own ``/metrics``.
  The history restarts when the live generation changes (a new generation's fence starts at its snapshot).
- ``requests``: serve's own request counts and latency per path (its Prometheus registry).
- ``top_clicked`` (all-time counts) and ``trending`` (decayed popularity, relative to ``pop_ref_ms``) of the
  live generation.
- ``quality``: live prequential quality, when LMF workers rank clicks (``ZEROCF_LMF_QUALITY_EVERY`` > 0):
  HR@10 of what the system serves against the two popularity orders, over the last ten minutes and per
  30-s window, summed over every worker whose figures have not expired (:func:`workers.online.quality.merge`);
  with none, ``workers`` is empty and ``note`` says that quality is off.

No model (or Redis away) is a 503 with the ``reason`` of ``/healthz``; the page shows its ``error``.
The page is ``static/dashboard.html`` (HTML, CSS and hand-written SVG charts; no external URL).

>>> history = OffsetHistory(clock=iter([0.0, 0.5, 2.0]).__next__)
>>> history.sample(1, 100), history.sample(1, 120), history.sample(1, 400)
(None, None, 150.0)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import redis

from stream.runtime import Response, json_response
from workers.errors import GenerationError, StoreSchemaError
from workers.online.quality import merge as merge_quality
from workers.serving.lookup import Recommender
from workers.serving.queries import BadRequest, parse_dashboard_query

__all__ = ["MIN_SAMPLE_GAP_S", "Dashboard", "OffsetHistory", "dashboard_page"]

MIN_SAMPLE_GAP_S = 1.0  # applied-offset samples closer than this are not kept (several open pages, reloads)
HISTORY = 120  # samples kept for the rate chart
LAG_NOTE = (
    "serve has no Kafka connection: each LMF worker reports its events/s and lag with its live quality (the "
    "quality table), and exports the lag per partition as zerocf_lmf_lag on its own /metrics"
)


def dashboard_page() -> bytes:
    """The dashboard HTML (a package resource)."""
    return (files("workers.serving") / "static" / "dashboard.html").read_bytes()


class OffsetHistory:
    """Samples of the summed applied offsets of one generation; the rate between the last two kept samples.

    :meth:`sample` keeps ``(t, total)`` when at least :data:`MIN_SAMPLE_GAP_S` passed since the last kept one,
    and forgets everything when the generation changed. Thread-safe.
    """

    def __init__(self, clock: Callable[[], float] = time.time, size: int = HISTORY) -> None:
        self._clock, self._lock = clock, threading.Lock()
        self._gen: int | None = None
        self.samples: deque[tuple[float, int]] = deque(maxlen=size)

    def sample(self, generation: int, total: int) -> float | None:
        """Record ``total`` for ``generation`` now; return the rate (offsets/s) or None before two samples."""
        now = self._clock()
        with self._lock:
            if generation != self._gen:
                self._gen = generation
                self.samples.clear()
            if not self.samples or now - self.samples[-1][0] >= MIN_SAMPLE_GAP_S:
                self.samples.append((now, int(total)))
            if len(self.samples) < 2:
                return None
            (t0, a), (t1, b) = self.samples[-2], self.samples[-1]
            return (b - a) / (t1 - t0)

    def points(self) -> list[dict[str, float]]:
        with self._lock:
            return [{"t": t, "total": n} for t, n in self.samples]


class Dashboard:
    """The ``/api/dashboard`` route over a :class:`Recommender`'s store and a server's metrics registry."""

    def __init__(self, rec: Recommender, registry: Any, max_k: int, clock: Callable[[], float] = time.time):
        self.rec, self.registry, self.max_k, self._clock = rec, registry, int(max_k), clock
        self.history = OffsetHistory(clock)

    def route(self, query: str) -> Response:
        try:
            top = parse_dashboard_query(query)
        except BadRequest as exc:
            return json_response(400, {"error": str(exc)})
        try:
            doc = self.collect(top)
        except StoreSchemaError as exc:  # no model (or a lost one): the reasons of /healthz
            reason = "store_lost" if self.rec.generation is not None else "no_model"
            return json_response(503, {"error": str(exc), "reason": reason})
        except redis.RedisError as exc:
            reason = "redis_timeout" if isinstance(exc, redis.TimeoutError) else "redis_unavailable"
            msg = f"Redis did not answer ({type(exc).__name__}); retry later, and check that Redis is up"
            return json_response(503, {"error": msg, "reason": reason})
        return json_response(200, doc)

    def collect(self, top: int) -> dict[str, Any]:
        """The page's data (see the module docstring); raises when Redis holds no model or does not answer."""
        store = self.rec.store
        meta = store.meta()
        live = meta.live_gen
        gens, metas = [], {}
        for g in store.generations():
            try:
                gm = metas[g] = store.generation_meta(g)
            except GenerationError:  # dropped between the two reads
                continue
            gens.append(
                {
                    "generation": gm.g,
                    "state": gm.state,
                    "source": gm.source,
                    "live": gm.g == live,
                    "created_at": gm.created_at,
                    "published_at": gm.published_at,
                    "retired_at": gm.retired_at,
                    "n_users": gm.n_users,
                    "n_items": gm.n_items,
                    "scale": gm.scale,
                    "bias": gm.bias,
                }
            )
        # the fence of every partition: the store has no read-all method, so the serving side reads the hash
        # whose name the store's key helper gives (read-only)
        fence = {int(p): int(o) for p, o in store.r.hgetall(store.keys.offsets(live)).items()}
        total = sum(o + 1 for o in fence.values())
        rate = self.history.sample(live, total)
        pop = store.r.zrevrange(store.keys.popularity(live), 0, top - 1, withscores=True)
        gm_live = metas.get(live)
        return {
            "namespace": store.keys.ns,
            "now": self._clock(),
            "model": {"k": meta.k, "live_generation": live, "model_id": meta.model_id, "updated_at": meta.updated_at},
            "serving": {
                "cached_generation": self.rec.generation,
                "cached_items": self.rec.n_items,
                "cache_refreshes": self.rec.refreshes,
                "max_k": self.max_k,
            },
            "generations": gens,
            "applied": {
                "generation": live,
                "partitions": [{"partition": p, "offset": fence[p]} for p in sorted(fence)],
                "total": total,
                "rate_per_s": rate,
                "history": self.history.points(),
                "note": LAG_NOTE,
            },
            "requests": request_stats(self.registry),
            "top_clicked": [{"item": i, "score": c} for i, c in store.top_items(live, top)],
            "trending": [{"item": i.decode(), "score": float(s)} for i, s in pop],
            "popularity": {
                "ref_ms": gm_live.pop_ref_ms if gm_live else 0,
                "half_life_ms": gm_live.pop_half_life_ms if gm_live else 0,
            },
            "quality": merge_quality(store.read_quality(), self._clock()),
        }


def request_stats(registry: Any) -> list[dict[str, Any]]:
    """Per path: requests, errors (status >= 500), mean latency and the upper bound (ms) of the histogram
    bucket that holds the 95th percentile (None when it is the open-ended one), from serve's registry."""
    by_path: dict[str, dict[str, Any]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    for family in registry.collect():
        for s in family.samples:
            path = s.labels.get("path")
            if path is None:
                continue
            if s.name == "zerocf_serve_requests_total":
                row = by_path.setdefault(path, {"path": path, "requests": 0, "errors": 0})
                row["requests"] += int(s.value)
                row["errors"] += int(s.value) if int(s.labels["status"]) >= 500 else 0
            elif s.name == "zerocf_serve_request_seconds_bucket":
                buckets.setdefault(path, []).append((float(s.labels["le"]), s.value))
            elif s.name == "zerocf_serve_request_seconds_sum":
                sums[path] = s.value
    out = []
    for path, row in sorted(by_path.items()):
        bs = sorted(buckets.get(path, []))
        count = bs[-1][1] if bs else 0.0
        row["mean_ms"] = 1000 * sums.get(path, 0.0) / count if count else None
        le = next((le for le, c in bs if c >= 0.95 * count), None) if count else None
        row["p95_ms_at_most"] = 1000 * le if le is not None and le != float("inf") else None
        out.append(row)
    return out
