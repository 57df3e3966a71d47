"""Live quality of the LMF workers for the dashboard of ``zerocf serve``: rolling HR@10 against popularity.

With ``ZEROCF_LMF_QUALITY_EVERY=n`` (> 0) ``zerocf lmf`` ranks every n-th click right before it is learned (on a
catalogue of more than 20,000 items every ``max(n, items / RANK_ITEMS_PER_CLICK)``-th: a rank is a pass over every
item, ~20 ns each at k 64, so the default's cost stays at about 0.4 µs per trained click, ~1 %, whatever the
catalogue):
the prequential protocol of :mod:`workers.evaluation.prequential`, inside the kernel (the clicked item's
place among every known item, the user's earlier clicks excluded, by the model and by both popularity orders;
see :func:`workers.kernels.lmf.lmf_train`). A :class:`QualityTracker` (the worker's ``rank_hook``) folds the
ranks into time windows of :data:`WINDOW_S` seconds (wall time of the ranking, aligned to multiples of
:data:`WINDOW_S`, so the windows of several workers line up): per window the clicks ranked and the expected
hits at :data:`K` under a random tie-break (as :func:`workers.evaluation.metrics.rank_metrics`) of

- ``model``: what the system serves that user: the model's ranking when the user had a vector, the
  decayed-popularity fallback otherwise (``cold`` counts those), as ``prequential_summary`` counts it;
- ``popularity``: all-time click counts;
- ``decayed``: time-decayed popularity (the fallback's order).

A :class:`QualityReporter` thread publishes the last :data:`WINDOWS` windows every :data:`PUBLISH_EVERY_S`
seconds with :meth:`workers.store.FactorStore.write_quality` (key ``quality:<worker>`` with a TTL of
:data:`TTL_S`, so a dead worker's figures expire; nothing is written before a first click is ranked; no user
or item id is ever in the figures). Serve merges every live worker's windows with :func:`merge`.

>>> t = QualityTracker(clock=lambda: 65.0)
>>> t([("u", "i", 0, 0, 20, 0, 30, 0, 1), ("v", "i", 50, 0, 9, 1, 3, 0, 0)])
>>> [(w["t"], w["clicks"], w["model"], w["popularity"], w["decayed"]) for w in t.windows()]
[(60.0, 2, 2.0, 0.5, 1.0)]
>>> m = merge([{**t.snapshot(), "worker": "w1", "generation": 1, "every": 1, "published_at": 70.0}], now=70.0)
>>> m["clicks"], m["model_hr"], m["popularity_hr"], m["decayed_hr"], m["cold"]
(2, 1.0, 0.25, 0.5, 0.5)
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from workers.online.worker import LMFWorker
    from workers.store import FactorStore

log = logging.getLogger(__name__)

__all__ = ["K", "PUBLISH_EVERY_S", "RANK_ITEMS_PER_CLICK", "TTL_S", "WINDOWS", "WINDOW_S", "QualityReporter",
           "QualityTracker", "attach", "expected_hit", "merge"]  # fmt: skip

K = 10  # the cut-off of HR@k
WINDOW_S = 30.0  # length of a time window (wall time)
WINDOWS = 20  # windows kept and shown: the rolling figures cover the last WINDOWS * WINDOW_S seconds (10 min)
PUBLISH_EVERY_S = 5.0  # how often a worker writes its figures
TTL_S = 60.0  # a worker's figures expire this long after its last write (a dead worker's disappear)
SERIES = ("model", "popularity", "decayed")
RANK_ITEMS_PER_CLICK = 20  # at most one ranked click per this many catalogue items (~20 ns per item and rank)


def expected_hit(greater: float, ties: float, k: int = K) -> float:
    """P(rank < k) for a rank uniform on ``greater .. greater + ties`` (0-based): a random tie-break.

    >>> expected_hit(3, 0), expected_hit(7, 5, k=10), expected_hit(10, 0)
    (1.0, 0.5, 0.0)
    """
    return min(1.0, max(0.0, (k - greater) / (ties + 1.0)))


def _window_start(t: float, window_s: float) -> float:
    return math.floor(t / window_s) * window_s


class QualityTracker:
    """The rank hook: prequential ranks folded into the last ``windows`` time windows of ``window_s`` seconds.

    A rank row is ``(user, item, model greater, model ties, count greater, count ties, decayed greater,
    decayed ties, warm)`` (:func:`workers.online.model.rank_rows`). Thread-safe: the worker's thread folds,
    the reporter's reads.
    """

    def __init__(self, k: int = K, window_s: float = WINDOW_S, windows: int = WINDOWS,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        if k < 1 or window_s <= 0 or windows < 1:
            raise ValueError(f"k={k}, window_s={window_s} and windows={windows} must be positive")
        self.k, self.window_s, self.size, self._clock = int(k), float(window_s), int(windows), clock
        self.ranked = 0  # clicks ranked since the start (all windows, even those dropped)
        self._lock = threading.Lock()
        self._windows: dict[float, dict[str, Any]] = {}  # start -> {"t", "clicks", "cold", *SERIES}

    def __call__(self, ranks: Iterable[Sequence[Any]]) -> None:
        now = _window_start(self._clock(), self.window_s)
        k = self.k
        with self._lock:
            w = self._windows.get(now)
            if w is None:
                w = self._windows[now] = {"t": now, "clicks": 0, "cold": 0, **dict.fromkeys(SERIES, 0.0)}
            for row in ranks:
                mg, mt, cg, ct, dg, dt, warm = (int(x) for x in row[2:9])
                decayed = expected_hit(dg, dt, k)
                w["clicks"] += 1
                w["cold"] += 0 if warm else 1
                w["model"] += expected_hit(mg, mt, k) if warm else decayed
                w["popularity"] += expected_hit(cg, ct, k)
                w["decayed"] += decayed
                self.ranked += 1
            self._prune(now)

    def __bool__(self) -> bool:  # an empty tracker is still a hook
        return True

    def _prune(self, now: float) -> None:
        oldest = now - (self.size - 1) * self.window_s
        for t in [t for t in self._windows if t < oldest]:
            del self._windows[t]

    def windows(self) -> list[dict[str, Any]]:
        """The windows of the last ``windows * window_s`` seconds that hold a ranked click, oldest first."""
        with self._lock:
            self._prune(_window_start(self._clock(), self.window_s))
            return [dict(self._windows[t]) for t in sorted(self._windows)]

    def snapshot(self) -> dict[str, Any]:
        """What a worker publishes (without its identity): ``k``, ``window_s``, ``windows``, ``ranked``."""
        windows = self.windows()
        return {"k": self.k, "window_s": self.window_s, "windows": windows, "ranked": self.ranked}


class QualityReporter:
    """Publishes a tracker's figures every ``every_s`` seconds from a daemon thread (and once at :meth:`close`).

    The document is :meth:`QualityTracker.snapshot` plus ``worker`` (``host:pid:random``), ``generation`` (the
    one the worker writes), ``every`` (the ranking rate) and ``published_at``. Redis errors are logged (once
    per outage) and the next period tries again.
    """

    def __init__(self, store: FactorStore, tracker: QualityTracker, *, every_n: int | Callable[[], int],
                 generation: Callable[[], int] = lambda: 0, worker: str | None = None,
                 every_s: float = PUBLISH_EVERY_S, ttl_s: float = TTL_S,
                 progress: Callable[[], tuple[int, int | None, float]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.store, self.tracker, self.generation, self._clock = store, tracker, generation, clock
        self._progress = progress  # (events applied so far, records behind on its partitions or None, loss EWMA)
        self._last: tuple[float, int] | None = None  # (time, events) of the previous publish
        self._every = every_n if callable(every_n) else (lambda n=int(every_n): n)
        self.worker = worker or f"{store.owner}:{uuid.uuid4().hex[:6]}"
        self.every_s, self.ttl_s = float(every_s), float(ttl_s)
        self.published = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def publish(self) -> bool:
        """Write the figures now; False (nothing written) while no click was ranked."""
        if self.tracker.ranked == 0:
            return False
        now = self._clock()
        doc = {**self.tracker.snapshot(), "worker": self.worker, "generation": int(self.generation()),
               "every": self.every_n, "published_at": now, "events_per_s": None, "lag": None,
               "loss": None}  # fmt: skip
        if self._progress is not None:
            events, lag, loss = self._progress()
            doc["loss"] = round(loss, 5) if math.isfinite(loss) else None
            if self._last is not None and now > self._last[0]:
                doc["events_per_s"] = round((events - self._last[1]) / (now - self._last[0]), 1)
            self._last, doc["lag"] = (now, events), lag
        self.store.write_quality(self.worker, doc, self.ttl_s)
        self.published += 1
        return True

    @property
    def every_n(self) -> int:
        """The ranking rate now: one click in ``every_n``."""
        return int(self._every())

    def _publish_logged(self) -> None:
        try:
            self.publish()
        except redis.RedisError as exc:
            if not self._failing:
                log.warning("live quality not published (%s: %s); retrying every %.0f s", type(exc).__name__, exc,
                            self.every_s)  # fmt: skip
            self._failing = True
            return
        if self._failing:
            log.info("live quality published again")
        self._failing = False

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._publish_logged()

    def start(self) -> QualityReporter:
        self._thread = threading.Thread(target=self._loop, name="zerocf-lmf-quality", daemon=True)
        self._thread.start()
        log.info("live quality on: ranking every %d-th click, HR@%d published as worker %s every %.0f s",
                 self.every_n, self.tracker.k, self.worker, self.every_s)  # fmt: skip
        return self

    def close(self) -> None:
        """Stop the thread and publish the last figures (they expire after the TTL)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._publish_logged()


def attach(worker: LMFWorker, every: int | None = None, **kw: Any) -> QualityReporter | None:
    """Give ``worker`` a :class:`QualityTracker` as its rank hook, every ``every``-th click (default the
    worker's ``ZEROCF_LMF_QUALITY_EVERY``; at least one per :data:`RANK_ITEMS_PER_CLICK` items of its catalogue),
    and return its started :class:`QualityReporter` (``kw``: its options); None, and nothing attached, when that
    is 0. :meth:`LMFWorker.run` does this itself unless it was given a rank hook."""
    n = worker.cfg.quality_every if every is None else int(every)
    if n <= 0:
        return None
    tracker = QualityTracker()
    worker.rank_hook, worker.rank_every, worker.rank_items_per_click = tracker, n, RANK_ITEMS_PER_CLICK
    return QualityReporter(worker.store, tracker, every_n=lambda: worker.effective_rank_every,
                           generation=lambda: worker.g,
                           progress=lambda: (worker.stats.events, worker.lag_total, worker.stats.loss_ewma),
                           **kw).start()  # fmt: skip


def _maybe(value: Any, kind: Callable[[Any], Any]) -> Any:
    return None if value is None else kind(value)


def _hr(hits: float, clicks: int) -> float | None:
    return round(hits / clicks, 4) if clicks else None


def merge(docs: Sequence[Mapping[str, Any]], now: float) -> dict[str, Any]:
    """The dashboard's ``quality``: every worker's windows of the last ``WINDOWS * WINDOW_S`` seconds up to
    ``now``, summed per window start; per window and overall ``clicks`` and HR@k of ``model``, ``popularity``
    and ``decayed`` (None without clicks), the ``cold`` share, and per worker what it published. Documents of
    another ``k`` or window length, or malformed ones, are left out (logged)."""
    oldest = _window_start(now, WINDOW_S) - (WINDOWS - 1) * WINDOW_S
    sums: dict[float, dict[str, float]] = {}
    workers = []
    for doc in docs:
        try:
            if int(doc["k"]) != K or float(doc["window_s"]) != WINDOW_S:
                log.info("live quality of worker %s is HR@%s per %s s, not HR@%d per %g s: left out",
                         doc.get("worker"), doc["k"], doc["window_s"], K, WINDOW_S)  # fmt: skip
                continue
            mine = [(float(w["t"]), int(w["clicks"]), int(w["cold"]), [float(w[s]) for s in SERIES])
                    for w in doc["windows"]]  # fmt: skip
            row = {"worker": str(doc["worker"]), "generation": int(doc["generation"]), "every": int(doc["every"]),
                   "published_at": float(doc["published_at"]), "ranked": int(doc["ranked"]),
                   "events_per_s": _maybe(doc.get("events_per_s"), float),
                   "lag": _maybe(doc.get("lag"), int), "loss": _maybe(doc.get("loss"), float)}  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("malformed live-quality figures left out (%s: %s)", type(exc).__name__, exc)
            continue
        clicks = 0
        for t, n, cold, hits in mine:
            if t < oldest:  # (no upper bound: a worker's clock may run a little ahead of serve's)
                continue
            s = sums.setdefault(t, {"clicks": 0, "cold": 0, **dict.fromkeys(SERIES, 0.0)})
            s["clicks"] += n
            s["cold"] += cold
            for name, h in zip(SERIES, hits):
                s[name] += h
            clicks += n
        workers.append({**row, "clicks": clicks})
    total: dict[str, float] = {"clicks": 0, "cold": 0, **dict.fromkeys(SERIES, 0.0)}
    windows = []
    for t in sorted(sums):
        s = sums[t]
        n = int(s["clicks"])
        windows.append({"t": t, "clicks": n, **{f"{name}_hr": _hr(s[name], n) for name in SERIES}})
        for key in total:
            total[key] += s[key]
    n = int(total["clicks"])
    span = WINDOWS * WINDOW_S
    return {
        "k": K,
        "window_s": WINDOW_S,
        "span_s": span,
        "clicks": n,
        **{f"{name}_hr": _hr(total[name], n) for name in SERIES},
        "cold": _hr(total["cold"], n),
        "windows": windows,
        "workers": workers,
        "note": _note(workers, n, span),
    }


def _note(workers: list[dict[str, Any]], clicks: int, span: float) -> str:
    if not workers:
        return (f"live quality is off: no LMF worker published figures in the last {TTL_S:.0f} s (each worker "
                "ranks every ZEROCF_LMF_QUALITY_EVERY-th click; 0 turns it off)")  # fmt: skip
    who = f"{len(workers)} LMF worker{'s' if len(workers) > 1 else ''}"
    if not clicks:
        return f"{who} publish live quality, but ranked no click in the last {span / 60:g} min"
    every = sorted({w["every"] for w in workers})
    return (f"HR@{K} over the last {span / 60:g} min: {clicks} clicks ranked by {who} (ranking every n-th click: "
            f"n = {'/'.join(map(str, every))}), each right before it was learned; the model's figure serves "
            "the decayed-popularity fallback to users without a vector")  # fmt: skip
