"""Live quality (workers/online/quality.py): the tracker's maths against the prequential evaluation's own
(:func:`workers.evaluation.metrics.prequential_summary`), its time windows, the merge of several workers, the
reporter and the store's ``quality`` keys on fakeredis, the setting and the ``zerocf lmf`` wiring."""

from __future__ import annotations

import json
import logging
import random
import time
from types import SimpleNamespace
from typing import Any

import fakeredis
import numpy as np
import pytest
import redis

from stream.config import load
from stream.errors import ConfigError
from workers.cli import build_parser
from workers.config import LMFConfig
from workers.evaluation.metrics import PrequentialLog, prequential_summary
from workers.online.quality import (
    RANK_ITEMS_PER_CLICK,
    TTL_S,
    WINDOW_S,
    WINDOWS,
    K,
    QualityReporter,
    QualityTracker,
    attach,
    expected_hit,
    merge,
)
from workers.online.worker import run as worker_run
from workers.store import FactorStore

T0 = 1_700_000_010.0  # a wall time inside the window that starts at 1_700_000_010 (a multiple of 30)


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def random_ranks(n: int, seed: int, items: int = 60) -> list[tuple[Any, ...]]:
    """Rank rows as the kernel reports them, with many ties (popularity counts tie a lot)."""
    rng = random.Random(seed)
    out = []
    for j in range(n):
        g = [rng.randrange(items) for _ in range(3)]
        t = [rng.choice([0, 0, 1, 3, 12]) for _ in range(3)]
        out.append((f"u{j % 7}", f"i{j % 11}", g[0], t[0], g[1], t[1], g[2], t[2], rng.random() < 0.7))
    return out


def published(tracker: QualityTracker, worker: str = "w1", **kw: Any) -> dict[str, Any]:
    """A worker's document as :class:`QualityReporter` writes it."""
    return {**tracker.snapshot(), "worker": worker, "generation": 1, "every": 1, "published_at": T0, **kw}


@pytest.fixture
def store() -> FactorStore:
    return FactorStore(fakeredis.FakeRedis(), namespace="zq", clock=Clock())


def test_expected_hit_is_a_random_tie_break() -> None:
    assert [expected_hit(g, 0) for g in (0, 9, 10, 50)] == [1.0, 1.0, 0.0, 0.0]
    assert expected_hit(8, 3) == pytest.approx(2 / 4)  # ranks 8..11 equally likely: 8 and 9 hit
    assert expected_hit(0, 99) == pytest.approx(10 / 100)
    assert expected_hit(2, 1, k=1) == 0.0


def test_tracker_figures_equal_the_prequential_summary() -> None:
    """Same ranks, two implementations: the dashboard's HR@10 is the evaluation's HR@10 (model = what is served:
    the model for warm users, the decayed-popularity fallback for cold ones)."""
    rows = random_ranks(500, seed=3)
    tracker = QualityTracker(clock=Clock())
    for lo in range(0, len(rows), 64):  # in batches, as the worker calls its hook
        tracker(rows[lo : lo + 64])
    log = PrequentialLog()
    log([(*r[:8], int(r[8])) for r in rows])
    want = prequential_summary(log, k=K, window=len(rows))
    got = merge([published(tracker)], now=T0)
    assert got["clicks"] == tracker.ranked == len(rows)
    assert got["model_hr"] == pytest.approx(want["model"]["hr"], abs=1e-4)
    assert got["popularity_hr"] == pytest.approx(want["popularity"]["hr"], abs=1e-4)
    assert got["decayed_hr"] == pytest.approx(want["decayed"]["hr"], abs=1e-4)
    assert got["cold"] == pytest.approx(want["model"]["cold"], abs=1e-4)
    assert 0 < got["popularity_hr"] < 1 and got["model_hr"] != got["popularity_hr"]
    assert [w["clicks"] for w in got["windows"]] == [500]


def test_windows_follow_the_clock_and_roll_off() -> None:
    clock = Clock()
    tracker = QualityTracker(clock=clock)
    tracker([("u", "i", 0, 0, 50, 0, 50, 0, 1)])  # a model hit
    clock.t += WINDOW_S
    tracker([("u", "j", 50, 0, 0, 0, 0, 0, 1)] * 3)  # three popularity hits, model misses
    ws = tracker.windows()
    assert [(w["t"], w["clicks"], w["model"], w["popularity"]) for w in ws] == [
        (T0, 1, 1.0, 0.0),
        (T0 + WINDOW_S, 3, 0.0, 3.0),
    ]
    doc = merge([published(tracker)], now=clock.t)
    assert doc["clicks"] == 4 and doc["model_hr"] == 0.25 and doc["popularity_hr"] == 0.75
    assert [(w["t"], w["model_hr"], w["popularity_hr"]) for w in doc["windows"]] == [
        (T0, 1.0, 0.0),
        (T0 + WINDOW_S, 0.0, 1.0),
    ]
    # WINDOWS windows are kept: the first one rolls off when the clock enters window WINDOWS + 1
    clock.t = T0 + (WINDOWS - 1) * WINDOW_S
    assert [w["t"] for w in tracker.windows()] == [T0, T0 + WINDOW_S]
    clock.t += WINDOW_S
    assert [w["t"] for w in tracker.windows()] == [T0 + WINDOW_S]
    assert tracker.ranked == 4  # the count since the start stays
    # serve drops old windows by its own clock too (a worker that stopped publishing them)
    assert merge([published(tracker)], now=clock.t + 10 * WINDOW_S)["clicks"] == 0


def test_merge_sums_workers_per_window_and_says_what_it_shows() -> None:
    clock = Clock()
    a, b = QualityTracker(clock=clock), QualityTracker(clock=clock)
    a([("u", "i", 0, 0, 50, 0, 50, 0, 1)] * 2)  # 2 model hits
    b([("v", "i", 50, 0, 0, 0, 50, 0, 0)] * 2)  # cold: served the decayed fallback, which misses
    clock.t += WINDOW_S
    b([("v", "i", 5, 0, 5, 0, 5, 0, 1)] * 4)  # hits all round
    doc = merge([published(a, "w-a"), published(b, "w-b", every=1000)], now=clock.t)
    assert [(w["t"], w["clicks"], w["model_hr"]) for w in doc["windows"]] == [(T0, 4, 0.5), (T0 + WINDOW_S, 4, 1.0)]
    assert doc["clicks"] == 8 and doc["model_hr"] == 0.75 and doc["cold"] == 0.25
    assert doc["popularity_hr"] == 0.75 and doc["decayed_hr"] == 0.5
    assert [(w["worker"], w["clicks"], w["ranked"], w["every"]) for w in doc["workers"]] == [
        ("w-a", 2, 2, 1),
        ("w-b", 6, 6, 1000),
    ]
    assert "8 clicks ranked by 2 LMF workers (ranking every n-th click: n = 1/1000)" in doc["note"]
    assert doc["k"] == K and doc["span_s"] == WINDOWS * WINDOW_S


def test_merge_without_workers_says_quality_is_off_and_skips_foreign_documents(
    caplog: pytest.LogCaptureFixture,
) -> None:
    off = merge([], now=T0)
    assert off["workers"] == [] and off["clicks"] == 0 and off["windows"] == []
    assert off["model_hr"] is None and off["popularity_hr"] is None and off["cold"] is None
    assert "live quality is off" in off["note"] and "ZEROCF_LMF_QUALITY_EVERY" in off["note"]
    tracker = QualityTracker(clock=Clock())
    tracker([("u", "i", 0, 0, 0, 0, 0, 0, 1)])
    good = published(tracker)
    with caplog.at_level(logging.INFO, logger="workers.online.quality"):
        doc = merge([{"k": 10}, {**good, "k": 20}, {**good, "windows": [{"t": "x"}]}, good], now=T0)
    assert [w["worker"] for w in doc["workers"]] == ["w1"] and doc["clicks"] == 1
    assert len(caplog.records) == 3
    idle = merge([published(QualityTracker(clock=Clock()))], now=T0)
    assert "ranked no click" in idle["note"]


def test_reporter_publishes_through_the_store_with_a_ttl(store: FactorStore) -> None:
    tracker = QualityTracker(clock=Clock())
    rep = QualityReporter(store, tracker, every_n=100, generation=lambda: 4, worker="host:1:ab", ttl_s=TTL_S)
    assert rep.publish() is False and store.read_quality() == []  # nothing before a first ranked click
    assert store.r.keys("*quality*") == []
    tracker([("u", "i", 0, 0, 0, 0, 0, 0, 1)])
    assert rep.publish() is True
    key = store.keys.quality("host:1:ab")
    assert key == "zcf:v2:{zq}:quality:host:1:ab" and store.keys.quality_workers == "zcf:v2:{zq}:quality"
    assert 0 < store.r.ttl(key) <= TTL_S and 0 < store.r.ttl(store.keys.quality_workers) <= TTL_S
    [doc] = store.read_quality()
    assert doc["worker"] == "host:1:ab" and doc["generation"] == 4 and doc["every"] == 100
    assert doc["windows"] == tracker.windows() and doc["ranked"] == 1
    assert merge(store.read_quality(), now=T0)["clicks"] == 1
    assert b"u" not in store.r.get(key).split(b'"')  # no user or item id is published


def test_store_skips_expired_and_malformed_figures_and_prunes_old_workers(store: FactorStore) -> None:
    clock = store._clock
    assert isinstance(clock, Clock)
    store.write_quality("old", {"worker": "old"}, 60)
    clock.t += 30
    store.write_quality("w2", {"worker": "w2"}, 60)
    store.write_quality("w1", {"worker": "w1"}, 60)
    assert [d["worker"] for d in store.read_quality()] == ["old", "w1", "w2"]  # worker-id order
    store.r.delete(store.keys.quality("w1"))  # expired
    store.r.set(store.keys.quality("w2"), b"{not json")
    assert [d["worker"] for d in store.read_quality()] == ["old"]
    clock.t += 31  # "old" published nothing for more than its TTL: the next write drops it from the listing
    store.write_quality("w3", {"worker": "w3"}, 60)
    assert [m.decode() for m in store.r.zrange(store.keys.quality_workers, 0, -1)] == ["w1", "w2", "w3"]
    assert json.loads(store.r.get(store.keys.quality("w3"))) == {"worker": "w3"}


def test_reporter_thread_publishes_periodically_and_at_close(store: FactorStore) -> None:
    tracker = QualityTracker()
    tracker([("u", "i", 0, 0, 0, 0, 0, 0, 1)])
    rep = QualityReporter(store, tracker, every_n=1, worker="w", every_s=0.05).start()
    deadline = time.monotonic() + 5
    while rep.published < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    n = rep.published
    rep.close()
    assert n >= 2 and rep.published >= n + 1
    assert store.read_quality()[0]["worker"] == "w"


def test_reporter_logs_a_redis_outage_once(caplog: pytest.LogCaptureFixture) -> None:
    class Down:
        owner = "host:1"

        def write_quality(self, *_a: Any) -> None:
            raise redis.ConnectionError("refused")

    tracker = QualityTracker()
    tracker([("u", "i", 0, 0, 0, 0, 0, 0, 1)])
    rep = QualityReporter(Down(), tracker, every_n=1)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="workers.online.quality"):
        for _ in range(3):
            rep._publish_logged()
    assert [r.getMessage()[:27] for r in caplog.records] == ["live quality not published "]
    assert rep.worker.startswith("host:1:") and rep.published == 0


def test_attach_sets_the_rank_hook_only_when_on(store: FactorStore) -> None:
    def worker(every: int) -> Any:
        return SimpleNamespace(cfg=SimpleNamespace(quality_every=every), store=store, g=3, rank_hook=None,
                               rank_every=1, effective_rank_every=every,
                               stats=SimpleNamespace(events=40, loss_ewma=float("nan")), lag_total=7)  # fmt: skip

    off = worker(0)
    assert attach(off) is None and off.rank_hook is None and off.rank_every == 1
    on = worker(250)
    rep = attach(on, every_s=3600)
    assert rep is not None and isinstance(on.rank_hook, QualityTracker) and on.rank_every == 250
    assert on.rank_items_per_click == RANK_ITEMS_PER_CLICK
    on.rank_hook([("u", "i", 0, 0, 0, 0, 0, 0, 1)])
    on.g = 5
    rep.close()  # publishes the last figures
    [doc] = store.read_quality()
    assert doc["generation"] == 5 and doc["every"] == 250 and doc["ranked"] == 1
    assert doc["lag"] == 7 and doc["events_per_s"] is None  # a rate needs two publishes


def test_the_reporter_publishes_the_events_rate_and_lag(store: FactorStore) -> None:
    tracker = QualityTracker()
    tracker([("u", "i", 0, 0, 0, 0, 0, 0, 1)])
    progress = iter([(100, 5, float("nan")), (400, None, 0.25)])
    clock = iter([1000.0, 1002.0])
    rep = QualityReporter(store, tracker, every_n=1, worker="w", progress=lambda: next(progress),
                          clock=lambda: next(clock))  # fmt: skip
    rep.publish()
    first = store.read_quality()[0]
    rep.publish()
    second = store.read_quality()[0]
    assert (first["events_per_s"], first["lag"], first["loss"]) == (None, 5, None)
    assert (second["events_per_s"], second["lag"], second["loss"]) == (150.0, None, 0.25)
    row = merge([second], now=1002.0)["workers"][0]
    assert (row["events_per_s"], row["lag"], row["loss"]) == (150.0, None, 0.25)


def test_the_setting_and_the_lmf_command_wiring() -> None:
    assert LMFConfig().quality_every > 0  # on by default (cost: see the setting's help)
    assert load(LMFConfig, {"ZEROCF_LMF_QUALITY_EVERY": "0"}).quality_every == 0
    with pytest.raises(ConfigError, match="ZEROCF_LMF_QUALITY_EVERY=-1 must be in"):
        load(LMFConfig, {"ZEROCF_LMF_QUALITY_EVERY": "-1"})
    args = build_parser().parse_args(["lmf", "--quality-every", "7"])
    assert args.func is worker_run and args.quality_every == 7


def test_a_worker_ranks_fewer_clicks_on_a_large_catalogue(store: FactorStore) -> None:
    from workers.online.worker import LMFWorker

    w = LMFWorker(LMFConfig(factors=4, quality_every=1000), store)
    rep = attach(w, every_s=3600)
    assert rep is not None and w.effective_rank_every == 1000  # no items yet
    n = 100_000
    w.model.warm([f"i{j}" for j in range(n)], np.zeros((n, 5), np.float32), 0.0, {}, {}, 0, 86_400_000)
    assert w.effective_rank_every == n // RANK_ITEMS_PER_CLICK == rep.every_n  # one rank per 20 items: ~3 % cost
    w.rank_every = 1
    w.model.warm([f"i{j}" for j in range(500)], np.zeros((500, 5), np.float32), 0.0, {}, {}, 0, 86_400_000)
    assert w.effective_rank_every == 1  # a small catalogue: the setting alone decides
    rep.close()
    w._writer.shutdown()
