"""Pure tests of workers/online/model.py: OnlineModel (warm, plan, load_users, absorb_items, train deltas,
rollback, commit, prequential ranks, decayed popularity, exposure negatives) and IdMap. No Kafka, no Redis:
rows are passed in as the store would return them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest

from stream.events import Event
from workers.config import LMFConfig
from workers.kernels.lmf import event_weights
from workers.online.model import BatchPlan, IdMap, OnlineModel, TrainResult, rank_rows
from workers.store import GLOBAL_ROW, SEEN_EXPIRE, SEEN_PRUNE

K = 4
TS = 1_700_000_000_000
HOUR = 3_600_000
_offset = iter(range(10**9))


def _click(user: str, item: str, ts: int = TS, weight: float = 1.0) -> Event:
    off = next(_offset)
    return Event(f"t.clicks:0:{off}:0", "click", user, item, ts, weight, None, None, f"t.clicks/0/{off}")


def _shown(user: str, items: Sequence[str], ts: int, imp: str = "m") -> list[Event]:
    off = next(_offset)
    return [
        Event(f"t.impressions:0:{off}:{n}", "impression", user, item, ts, 0.0, n, imp, f"t.impressions/0/{off}")
        for n, item in enumerate(items)
    ]


def _cfg(**kw: object) -> LMFConfig:
    base: dict[str, object] = {"factors": K, "negatives": 4, "reservoir": 1000}
    base.update(kw)
    return LMFConfig(**base)  # type: ignore[arg-type]


def _rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = (rng.standard_normal((n, K + 1)) * 0.3).astype(np.float32)
    return rows


def _warm_model(cfg: LMFConfig | None = None, n_items: int = 30, seed: int = 0) -> OnlineModel:
    """A model warmed with ``n_items`` items i0.. (random rows, counts 1..n, decayed half of that)."""
    m = OnlineModel(cfg or _cfg(), seed=seed)
    ids = [f"i{j}" for j in range(n_items)]
    counts = {f"i{j}": float(j + 1) for j in range(n_items)}
    pop = {f"i{j}": 0.5 * (j + 1) for j in range(n_items)}
    m.warm(ids, _rows(n_items, seed), -2.0, counts, pop, TS - HOUR, HOUR)
    return m


def _load(m: OnlineModel, plan: BatchPlan, known: dict[str, np.ndarray] | None = None,
          seen: dict[str, list[str]] | None = None) -> None:  # fmt: skip
    """What the worker does with read_batch_state: cache the plan's users (found ones with their rows)."""
    known = known or {}
    users = plan.fetch_users
    rows = np.zeros((len(users), K + 1), np.float32)
    acc = np.zeros((len(users), 2), np.float32)
    found = np.array([u in known for u in users], bool)
    for n, u in enumerate(users):
        if u in known:
            rows[n] = known[u]
            acc[n] = [0.5, 0.25]
    m.load_users(users, rows, found, acc, seen or {}, plan)


def _batch(m: OnlineModel, events: list[Event], partition: int = 0, **kw: object) -> tuple[BatchPlan, TrainResult]:
    plan = m.plan(partition, events)
    _load(m, plan, **kw)  # type: ignore[arg-type]
    return plan, m.train(plan)


def _row(m: OnlineModel, item: str) -> int:
    j = m.items.get(item)
    assert j is not None
    return j


# ------------------------------------------------------------------- IdMap, warm
def test_idmap_is_stable_and_dense() -> None:
    m = IdMap(["x", "y"])
    assert len(m) == 2 and m.get("y") == 1 and m.get("zz") is None
    assert m.index("z") == 2 and m.index("x") == 0
    got = m.index_many(["y", "new", "x", "new"])
    assert got.dtype == np.int32 and got.tolist() == [1, 3, 0, 3]
    assert m.ids == ["x", "y", "z", "new"] and len(m) == 4
    assert m.index_many([]).tolist() == []


def test_warm_loads_rows_counts_popularity_and_seeds_the_sampler() -> None:
    m = OnlineModel(_cfg(), seed=0)
    assert m.n_items == 0 and m.sampler.tables()[2].size == 0  # cold: uniform negatives only
    rows, acc = _rows(3), np.arange(6, dtype=np.float32).reshape(3, 2)
    m.warm(["a", "b", "c"], rows, -3.0, {"a": 5.0, "b": 1.0, "x": 2.0}, {"a": 2.5, "y": 9.0}, 123, 1000, acc)
    assert m.items.ids == ["a", "b", "c", "x"] and m.n_items == 4  # a counted item without a row gets one
    np.testing.assert_array_equal(m.V[:3], rows)
    assert (m.V[3:] == 0).all() and (m.GV[3:] == 0).all() and m.V.shape[0] >= 1024
    np.testing.assert_array_equal(m.GV[:3], acc)
    assert m.glob.tolist() == [-3.0] and m.glob.dtype == np.float64
    assert m.count[:4].tolist() == [5, 1, 0, 2] and m.decayed[:4].tolist() == [2.5, 0, 0, 0]  # y is unknown
    assert (m.pop_ref_ms, m.half_life_ms) == (123, 1000)
    assert m.reservoir.seen == 8 and m.reservoir.counts.tolist() == [5, 1, 0, 2]
    assert m.sampler.tables()[2].tolist() == [0, 1, 3]
    m.warm([], np.zeros((0, K + 1), np.float32), 0.0, {}, {}, 0, 1000)
    assert m.n_items == 0 and m.sampler.tables()[2].size == 0 and m.reservoir.seen == 0


def test_refresh_items_and_forget_users() -> None:
    m = _warm_model(n_items=3)
    new = np.full((2, K + 1), 7.0, np.float32)
    m.refresh_items(["i2", "unknown"], new, 1.5, ["i0"], np.array([[3.0, 4.0]], np.float32))
    assert (m.V[2] == 7).all() and m.glob[0] == 1.5 and m.GV[0].tolist() == [3, 4] and m.items.get("unknown") is None
    plan, res = _batch(m, [_click("u", "i1")], seen={"u": ["i0"]})
    m.commit(plan, res)
    assert m.user_cache and m.seen
    m.forget_users()
    assert not m.user_cache and not m.seen and not m.exposure
    assert m.plan(0, [_click("u", "i1")]).fetch_users == ["u"]


# ------------------------------------------------------------------- plan
def test_plan_shapes_weights_and_bookkeeping() -> None:
    m = _warm_model()
    n0 = m.n_items
    events = [_click("u1", "i1", TS, 1.0), *_shown("u3", ["i5"], TS), _click("u2", "new-item", TS + 5, 4.0),
              _click("u1", "i2", TS + 9), _click("u2", "new-2", TS + 9)]  # fmt: skip
    plan = m.plan(2, events)
    assert plan.users == ["u1", "u2"] and plan.fetch_users == ["u1", "u2"]
    assert plan.ev_user.tolist() == [0, 1, 0, 1] and plan.ev_user.dtype == np.int32
    assert plan.ev_item.tolist() == [_row(m, i) for i in ("i1", "new-item", "i2", "new-2")]
    assert plan.new_items == ["new-item", "new-2"] and m.n_items == n0 + 2
    assert (m.V[n0 : n0 + 2] == 0).all()  # new items start at zero until the store's rows are absorbed
    np.testing.assert_array_equal(plan.ev_weight, event_weights([1.0, 4.0, 1.0, 1.0]))
    assert plan.ev_weight.dtype == np.float32 and not plan.ev_exposure.any()
    assert plan.ev_ts.tolist() == [TS, TS + 5, TS + 9, TS + 9]
    assert plan.clicks == [("u1", "i1", TS, 1.0), ("u2", "new-item", TS + 5, 4.0), ("u1", "i2", TS + 9, 1.0),
                           ("u2", "new-2", TS + 9, 1.0)]  # fmt: skip
    assert plan.click_users() == ["u1", "u2", "u1", "u2"]
    assert (plan.n_events, plan.n_exposure) == (5, 0)  # the impression counts as an event, not a training one
    _load(m, plan, known={"u1": np.ones(K + 1, np.float32)})
    again = m.plan(2, [_click("u1", "new-item"), _click("u9", "i1")])
    assert again.fetch_users == ["u9"] and again.new_items == []  # cached users and known items are not fetched


def test_plan_of_impressions_only_trains_nothing_without_exposure() -> None:
    m = _warm_model()
    n0 = m.n_items
    plan = m.plan(0, _shown("u", ["i1", "brand-new"], TS))
    assert plan.ev_user.size == plan.ev_item.size == 0 and plan.users == [] and plan.n_events == 2
    assert m.n_items == n0 and not m.exposure  # shown items get no row
    res = m.train(plan)
    assert res.finite and res.loss == 0 and res.item_ids == [GLOBAL_ROW]


def test_new_items_grow_every_per_item_array() -> None:
    m = _warm_model(n_items=1020)
    V0 = m.V[:1020].copy()
    plan = m.plan(0, [_click("u", f"n{j}") for j in range(40)])
    assert len(plan.new_items) == 40 and m.n_items == 1060
    for a in (m.V, m.GV, m.count, m.decayed):
        assert a.shape[0] >= 1060
    np.testing.assert_array_equal(m.V[:1020], V0)
    assert m.count[:1020].tolist() == [float(j + 1) for j in range(1020)] and (m.count[1020:] == 0).all()
    _load(m, plan)
    res = m.train(plan)
    assert res.finite and all(_row(m, f"n{j}") in res.touched.idx for j in range(40))


# ------------------------------------------------------------------- load_users, absorb_items
def test_load_users_keeps_found_rows_and_initialises_new_ones() -> None:
    m = _warm_model(_cfg(init_scale=0.01))
    plan = m.plan(0, [_click("old", "i3"), _click("new", "i4")])
    old = np.full(K + 1, 0.5, np.float32)
    rows = np.stack([old, np.full(K + 1, 9.0, np.float32)])  # the store's answer for an absent user is ignored
    acc = np.array([[1.0, 2.0], [9.0, 9.0]], np.float32)
    seen = {"old": ["i7", "gone", "i2"], "new": []}  # newest first, as the store returns them
    m.load_users(["old", "new"], rows, np.array([True, False]), acc, seen, plan)
    row, a, warm = m.user_cache["old"]
    np.testing.assert_array_equal(row, old)
    assert a.tolist() == [1, 2] and warm
    rows[0] = -1  # a copy, not a view of the store's buffer
    assert (m.user_cache["old"][0] == 0.5).all()
    row, a, warm = m.user_cache["new"]
    assert not warm and a.tolist() == [0, 0] and row[K] == 0 and 0 < np.abs(row[:K]).max() < 0.05
    assert [m.items.ids[j] for j in m.seen["old"]] == ["i2", "i7"]  # oldest first; unknown items dropped
    assert list(m.seen["new"]) == [] and m.plan(0, [_click("old", "i1")]).fetch_users == []
    m.load_users(["x"], np.zeros((1, K + 1), np.float32), np.array([True]), None, {})
    assert m.user_cache["x"][1].tolist() == [0, 0] and m.user_cache["x"][2]  # found without accumulators


def test_foldin_init_fits_the_first_clicks() -> None:
    m = _warm_model(_cfg(init="foldin"))
    m.V[[3, 8], :K] = [[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 1.0, 0.5]]
    plan = m.plan(0, [_click("new", "i3"), _click("new", "i8"), _click("old", "i5"), *_shown("x", ["i1"], TS)])
    _load(m, plan, known={"old": np.full(K + 1, 0.5, np.float32)})
    p = m.user_cache["new"][0]
    q = m.V[[_row(m, "i3"), _row(m, "i8")], :K]
    Q = q.astype(np.float64)
    want = np.linalg.solve(Q.T @ Q + 0.1 * np.eye(K), Q.T @ np.ones(2))  # ridge fit of p·q_i ≈ 1
    np.testing.assert_allclose(p[:K], want, rtol=1e-5)
    assert (np.abs(q @ p[:K] - 1) < 0.15).all() and p[K] == 0
    assert (m.user_cache["old"][0] == 0.5).all()  # found users keep their row


def test_foldin_falls_back_to_random_without_signal() -> None:
    m = OnlineModel(_cfg(init="foldin", init_scale=0.01), seed=0)  # every item row is zero
    plan = m.plan(0, [_click("u", "brand-new")])
    _load(m, plan)
    assert 0 < np.abs(m.user_cache["u"][0][:K]).max() < 0.05
    m2 = _warm_model(_cfg(init="foldin", init_scale=0.01))
    plan = m2.plan(0, [_click("u", "i1")])
    m2.load_users(["v"], np.zeros((1, K + 1), np.float32), np.array([False]), None, {}, plan)  # no clicks of v
    assert 0 < np.abs(m2.user_cache["v"][0][:K]).max() < 0.05


def test_absorb_items_takes_the_stores_rows_of_new_items() -> None:
    m = _warm_model()
    plan = m.plan(0, [_click("u", "n1"), _click("u", "n2"), _click("u", "i0")])
    assert plan.new_items == ["n1", "n2"]
    rows = np.full((2, K + 1), 3.0, np.float32)
    acc = np.array([[1.0, 2.0], [5.0, 5.0]], np.float32)
    i0 = m.V[_row(m, "i0")].copy()
    m.absorb_items(plan, rows, np.array([True, False]), acc)
    assert (m.V[_row(m, "n1")] == 3).all() and m.GV[_row(m, "n1")].tolist() == [1, 2]
    assert (m.V[_row(m, "n2")] == 0).all() and (m.GV[_row(m, "n2")] == 0).all()  # not in the store: stays zero
    np.testing.assert_array_equal(m.V[_row(m, "i0")], i0)
    m.absorb_items(plan, rows * 2, np.array([False, True]), None)
    assert (m.V[_row(m, "n2")] == 6).all() and (m.GV[_row(m, "n2")] == 0).all()


# ------------------------------------------------------------------- train, rollback, commit
def test_train_deltas_are_final_minus_original_and_the_global_row() -> None:
    m = _warm_model(_cfg(negatives=3))
    m.GV[:30] = 0.1
    events = [_click(f"u{j % 5}", f"i{(7 * j) % 30}", TS + j * 1000, float(1 + j % 3)) for j in range(40)]
    plan = m.plan(1, events)
    _load(m, plan, known={"u0": np.full(K + 1, 0.1, np.float32)})
    V0, GV0, glob0 = m.V.copy(), m.GV.copy(), float(m.glob[0])
    count0, decayed0 = m.count.copy(), m.decayed.copy()
    cached = {u: m.user_cache[u][0].copy() for u in plan.users}
    res = m.train(plan)
    assert res.finite and np.isfinite(res.loss) and res.loss > 0 and res.glob_before == glob0
    idx = res.touched.idx
    n = idx.size
    assert res.item_ids == [m.items.ids[j] for j in idx] + [GLOBAL_ROW]
    assert res.item_deltas.shape == (n + 1, K + 1) and res.item_acc_deltas.shape == (n + 1, 2)
    assert res.item_deltas.dtype == res.item_acc_deltas.dtype == np.float32
    np.testing.assert_array_equal(res.touched.rows, V0[idx])
    np.testing.assert_array_equal(res.item_deltas[:n], m.V[idx] - V0[idx])  # final - original, row by row
    np.testing.assert_allclose(V0[idx] + res.item_deltas[:n], m.V[idx], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(res.item_acc_deltas[:n], m.GV[idx] - GV0[idx])
    assert (res.item_acc_deltas >= 0).all() and res.item_acc_deltas[:n].min(axis=1).max() > 0
    rest = np.setdiff1d(np.arange(m.V.shape[0]), idx)
    np.testing.assert_array_equal(m.V[rest], V0[rest])  # every row written is in the deltas
    assert set(plan.ev_item.tolist()) <= set(idx.tolist())
    # the global row: only its bias moves, by exactly the change of the global bias
    assert (res.item_deltas[n, :K] == 0).all() and (res.item_acc_deltas[n] == 0).all()
    assert res.item_deltas[n, K] == np.float32(m.glob[0] - glob0) and m.glob[0] != glob0
    # user rows are absolute, and the cache changes only at commit
    assert res.user_rows.shape == (len(plan.users), K + 1) and res.user_acc.shape == (len(plan.users), 2)
    for n_u, u in enumerate(plan.users):
        np.testing.assert_array_equal(m.user_cache[u][0], cached[u])
        assert not np.array_equal(res.user_rows[n_u], cached[u]) and (res.user_acc[n_u] > 0).all()
    assert res.user_acc[plan.users.index("u0")].min() > 0.25  # the found accumulators were continued
    # popularity: all-time counts and counts decayed to the reference time
    want_c: dict[str, float] = {}
    want_p: dict[str, float] = {}
    for e in events:
        want_c[e.item] = want_c.get(e.item, 0.0) + e.weight
        want_p[e.item] = want_p.get(e.item, 0.0) + e.weight * 2.0 ** ((e.ts - (TS - HOUR)) / HOUR)
    assert res.counts == pytest.approx(want_c) and res.popularity == pytest.approx(want_p)
    for item, c in want_c.items():
        j = _row(m, item)
        assert m.count[j] == pytest.approx(count0[j] + c) and m.decayed[j] == pytest.approx(decayed0[j] + want_p[item])


def test_rollback_restores_factors_but_keeps_the_click_statistics() -> None:
    """A refused batch's factors are undone; its counts, popularity, seen items and reservoir stand (the worker
    still records them in Redis), and the user cache keeps the users' previous rows."""
    m = _warm_model()
    plan = m.plan(0, [_click(f"u{j % 3}", f"i{j % 11}", TS + j, 2.0) for j in range(30)])
    _load(m, plan)
    V0, GV0, glob0, c0, d0 = m.V.copy(), m.GV.copy(), m.glob.copy(), m.count.copy(), m.decayed.copy()
    res0 = m.reservoir.state()
    res = m.train(plan)
    assert not np.array_equal(m.V, V0) and m.glob[0] != glob0[0] and not np.array_equal(m.count, c0)
    m.rollback(res)
    np.testing.assert_array_equal(m.V, V0)
    np.testing.assert_array_equal(m.GV, GV0)
    assert m.glob[0] == glob0[0]
    for item, c in res.counts.items():
        j = _row(m, item)
        assert m.count[j] == pytest.approx(c0[j] + c) and m.decayed[j] == pytest.approx(d0[j] + res.popularity[item])
    assert m.reservoir.state()["seen"] == res0["seen"]  # the reservoir moves only at commit
    m.commit(plan, replace(res, finite=False))
    assert m.reservoir.state()["seen"] == res0["seen"] + len(plan.clicks)
    assert all(not m.user_cache[u][2] for u in plan.users)  # trained rows never reach the user cache
    assert all(m.seen[u] for u in plan.users)


def test_commit_updates_user_cache_seen_and_reservoir() -> None:
    m = _warm_model(_cfg(seen_cap=3))
    seen0 = m.reservoir.seen
    before = m.reservoir.counts.copy()
    events = [_click("u", f"i{j}") for j in (1, 2, 3, 4)] + [_click("u", "i2"), _click("v", "i5")]
    plan, res = _batch(m, events, seen={"v": ["i9"]})
    m.commit(plan, res)
    for n, u in enumerate(plan.users):
        row, acc, warm = m.user_cache[u]
        np.testing.assert_array_equal(row, res.user_rows[n])
        np.testing.assert_array_equal(acc, res.user_acc[n])
        assert warm
    res.user_rows[:] = 0  # the cache holds copies
    assert np.abs(m.user_cache["u"][0]).max() > 0
    assert [m.items.ids[i] for i in m.seen["u"]] == ["i3", "i4", "i2"]  # newest last, re-click moved, capped
    assert [m.items.ids[i] for i in m.seen["v"]] == ["i9", "i5"]
    assert list(m.seen)[-1] == "v" and list(m.user_cache)[-2:] == ["u", "v"]  # most recently used last
    after = m.reservoir.counts
    assert after[_row(m, "i2")] - before[_row(m, "i2")] == 2 and int(after.sum() - before.sum()) == 6
    assert m.reservoir.seen == seen0 + 6
    plan, res = _batch(m, [_click("x", "i1"), _click("x", "i2"), _click("x", "i3"), _click("x", "i2")])
    m.commit(plan, res)
    assert [m.items.ids[i] for i in m.seen["x"]] == ["i1", "i3", "i2"]  # a re-click is moved, not repeated
    # the next batch never trains a seen item as a negative: with every other item seen, only i0 is left
    m2 = _warm_model(_cfg(negatives=6, hard_share=0.5), n_items=8)
    seen = {"w": [f"i{j}" for j in range(2, 8)]}
    plan, res = _batch(m2, [_click("w", "i1")] * 20, seen=seen)
    assert sorted(m2.items.ids[j] for j in res.touched.idx) == ["i0", "i1"]


def test_cold_start_builds_the_sampler_after_the_first_commit() -> None:
    m = OnlineModel(_cfg(), seed=0)
    plan, res = _batch(m, [_click("u", f"n{j}") for j in range(5)])
    assert res.finite and m.sampler.tables()[2].size == 0
    m.commit(plan, res)
    plan, res = _batch(m, [_click("v", "n1")])
    assert m.sampler.tables()[2].tolist() == [0, 1, 2, 3, 4]  # built at the first non-empty reservoir
    assert m.sampler.built_at == 5


# ------------------------------------------------------------------- prequential ranks
def test_rank_every_selects_the_nth_clicks_across_batches() -> None:
    m = _warm_model(_cfg(exposure_window_s=60.0))
    m.plan(0, _shown("x", ["i3", "i4"], TS - 120_000))  # due in the first batch: exposure events
    b1 = [_click("a", "i1", TS), _click("b", "i2", TS), _click("a", "i5", TS)]
    plan = m.plan(0, b1)
    assert plan.n_exposure == 2 and plan.ev_exposure.tolist() == [False] * 3 + [True] * 2
    _load(m, plan)
    res = m.train(plan, rank_every=2)
    assert res.ranked.tolist() == [False, True, False] and res.ranks.shape == (3, 7)
    assert (res.ranks[[0, 2]] == 0).all()
    m.commit(plan, res)
    plan = m.plan(0, [_click("c", f"i{j}", TS + 1) for j in (6, 7, 8)])
    _load(m, plan)
    res = m.train(plan, rank_every=2)  # the count continues over batches: clicks 4, 5, 6, of which 4 and 6
    assert res.ranked.tolist() == [True, False, True] and m.clicks_trained == 6
    assert rank_rows(plan, res) == [("c", "i6", *map(int, res.ranks[0])), ("c", "i8", *map(int, res.ranks[2]))]
    assert rank_rows(plan, res)[1][-1] == 1 and rank_rows(plan, res)[0][-1] == 0  # c: cold, then warm
    off = m.train(plan)
    assert off.ranks is None and off.ranked is None and rank_rows(plan, off) == []
    res = m.train(plan, rank_every=5)  # clicks 10, 11, 12
    assert res.ranked.tolist() == [True, False, False]


def test_ranks_count_popularity_and_warm_flags() -> None:
    m = _warm_model(n_items=10)  # counts i0..i9 = 1..10
    user_row = np.r_[np.ones(K, np.float32), np.float32(0)]
    plan = m.plan(0, [_click("w", "i4"), _click("c", "i9"), _click("c", "i5")])
    _load(m, plan, known={"w": user_row}, seen={"w": ["i9"]})
    V0 = m.V.copy()
    res = m.train(plan, rank_every=1)
    r = res.ranks
    assert res.ranked.all() and r[:, 6].tolist() == [1, 0, 1]  # w found; c cold, then warm after its click
    assert r[0, 2:4].tolist() == [4, 0]  # counts 6..9 beat i4's 5 (i9 excluded: seen by w)
    assert r[1, 2:4].tolist() == [0, 0]  # i9 is the most popular
    assert r[2, 2:4].tolist() == [3, 1]  # i6..i8 beat i5 (6), i4 ties it (5 + w's click); c's i9 is excluded
    assert r[:2, 4:6].tolist() == r[:2, 2:4].tolist()  # decayed popularity (half the counts) orders alike...
    assert r[2, 4:6].tolist() == [4, 0]  # ...but w's click on i4 weighs 2 (an hour past the reference): 4.5 > 3
    # the model rank of the very first click, with the state before the batch
    s = V0[:10, K].astype(np.float64) + V0[:10, :K].astype(np.float64) @ np.ones(K)
    others = [j for j in range(10) if j not in (4, 9)]
    assert r[0, 0] == int((s[others] > s[4]).sum())


# ------------------------------------------------------------------- decayed popularity
def test_decay_weights_reference_and_rescale() -> None:
    m = OnlineModel(_cfg(), seed=0)
    m.warm(["a"], np.zeros((1, K + 1), np.float32), 0.0, {}, {}, 0, HOUR)
    w = m.decay_weights(np.array([TS + HOUR, TS, TS + 3 * HOUR], np.int64))
    assert m.pop_ref_ms == TS  # unset: the first (earliest) event becomes the reference
    np.testing.assert_allclose(w, [2.0, 1.0, 8.0])
    np.testing.assert_allclose(m.decay_weights(np.array([TS - HOUR], np.int64)), [0.5])
    assert m.pop_ref_ms == TS and m.decay_weights(np.zeros(0, np.int64)).size == 0
    assert m.rescale_due(np.array([TS + 400 * HOUR], np.int64)) is None
    late = TS + 501 * HOUR
    assert m.rescale_due(np.array([TS, late], np.int64)) == late
    m.decayed[0] = 2.0**501
    m.rescale(late)
    assert m.pop_ref_ms == late and m.decayed[0] == pytest.approx(1.0)
    np.testing.assert_allclose(m.decay_weights(np.array([late], np.int64)), [1.0])


def test_train_adds_decayed_click_weight_relative_to_the_reference() -> None:
    m = _warm_model(n_items=5)  # reference TS - 1h, half-life 1h
    d0 = m.decayed.copy()
    plan, res = _batch(m, [_click("u", "i2", TS + HOUR, 3.0), *_shown("u", ["i1"], TS)])
    assert res.popularity == {"i2": pytest.approx(3.0 * 4.0)} and res.counts == {"i2": 3.0}
    assert m.decayed[2] == pytest.approx(d0[2] + 12.0) and m.count[2] == 3 + 3.0


# ------------------------------------------------------------------- exposure negatives
def test_exposure_negatives_appear_after_the_window_once() -> None:
    m = _warm_model(_cfg(exposure_window_s=60.0, exposure_weight=0.25))
    first = m.plan(0, _shown("u", ["i1", "i2", "i3"], TS) + [_click("u", "i2", TS + 1000)])
    assert first.n_exposure == 0 and not first.ev_exposure.any()  # nothing due yet; clicked pairs never are
    assert m.plan(0, [_click("v", "i5", TS + 59_000)]).n_exposure == 0
    late = m.plan(0, [_click("v", "i5", TS + 61_000), _click("w", "i6", TS + 61_000)])
    assert late.n_exposure == 2 and late.ev_exposure.tolist() == [False, False, True, True]
    assert late.users == ["v", "w", "u"] and late.ev_user.tolist() == [0, 1, 2, 2]
    assert {m.items.ids[j] for j in late.ev_item[2:]} == {"i1", "i3"}
    assert (late.ev_weight[2:] == np.float32(0.25)).all() and late.ev_ts[2:].tolist() == [TS + 61_000] * 2
    assert len(late.clicks) == 2 and late.n_events == 2
    _load(m, late)
    V0 = m.V.copy()
    res = m.train(late)
    assert res.finite and {_row(m, "i1"), _row(m, "i3")} <= set(res.touched.idx.tolist())
    for item in ("i1", "i3"):  # shown, not clicked: pushed down
        assert m.V[_row(m, item), K] < V0[_row(m, item), K]
    assert "i1" not in res.counts and res.ranks is None
    assert m.plan(0, [_click("v", "i6", TS + 120_000)]).n_exposure == 0  # emitted once


def test_exposure_of_a_new_item_gets_a_row_only_when_trained() -> None:
    m = _warm_model(_cfg(exposure_window_s=60.0))
    n0 = m.n_items
    plan = m.plan(0, _shown("u", ["fresh", "later", "i1"], TS) + [_click("u", "fresh", TS + 10)])
    assert plan.new_items == ["fresh"] and m.n_items == n0 + 1  # shown-only items get no row
    plan = m.plan(0, [_click("v", "i2", TS + 61_000)])
    assert plan.n_exposure == 2 and plan.new_items == ["later"]  # its row is fetched before it is trained
    assert {m.items.ids[j] for j in plan.ev_item[1:]} == {"later", "i1"}


def test_exposure_disabled_by_default() -> None:
    m = _warm_model()
    m.plan(0, _shown("u", ["i1"], TS))
    assert m.plan(0, [_click("v", "i5", TS + 10**7)]).n_exposure == 0 and not m.exposure


def test_exposure_trackers_are_per_partition() -> None:
    m = _warm_model(_cfg(exposure_window_s=1.0))
    m.plan(0, _shown("u", ["i1"], TS))
    assert m.plan(1, [_click("v", "i5", TS + 10_000)]).n_exposure == 0
    assert m.plan(0, [_click("v", "i5", TS + 10_000)]).n_exposure == 1


# ------------------------------------------------------------------- non-finite values
def test_non_finite_item_row_is_detected_and_rolled_back() -> None:
    m = _warm_model()
    m.V[_row(m, "i3"), 0] = np.inf
    plan = m.plan(0, [_click("u", "i3"), _click("u", "i4")])
    _load(m, plan)
    V0 = m.V.copy()
    res = m.train(plan)
    assert not res.finite and np.isnan(res.loss)
    m.rollback(res)
    np.testing.assert_array_equal(m.V, V0)  # the poisoned row is back as it was, the others untouched


def test_non_finite_user_row_is_detected() -> None:
    m = _warm_model()
    plan = m.plan(0, [_click("u", "i1")])
    _load(m, plan, known={"u": np.full(K + 1, np.nan, np.float32)})
    res = m.train(plan)
    assert not res.finite and np.isnan(res.loss)
    healthy = _warm_model()
    plan = healthy.plan(0, [_click("u", "i1")])
    _load(healthy, plan, known={"u": np.full(K + 1, 0.1, np.float32)})
    assert healthy.train(plan).finite


def test_non_finite_user_accumulator_is_detected() -> None:
    """An infinite accumulator freezes the row (step lr / sqrt(inf) = 0) with a finite loss: still refused."""
    m = _warm_model()
    plan = m.plan(0, [_click("u", "i1")])
    _load(m, plan, known={"u": np.full(K + 1, 0.1, np.float32)})
    row, acc, warm = m.user_cache["u"]
    m.user_cache["u"] = (row, np.array([np.inf, 0.0], np.float32), warm)
    res = m.train(plan)
    assert not res.finite and np.isfinite(res.user_rows).all()


# ------------------------------------------------------------------- versioned item writes (workers/online/stored.py)
class _ItemTable:
    """The batch script's item-row semantics in numpy: a row whose stored version equals the one sent is SET to
    the sent absolute row, any other row gets the delta added; every written row's version goes up by one."""

    def __init__(self, ids: Sequence[str], rows: np.ndarray) -> None:
        self.rows = {i: rows[n].copy() for n, i in enumerate(ids)}
        self.acc = {i: np.zeros(2, np.float32) for i in ids}
        self.ver: dict[str, int] = {}
        self.added = 0

    def apply(self, res: TrainResult, versioned: bool = True) -> None:
        assert res.item_versions is not None and res.item_rows is not None and res.item_acc is not None
        zero = np.zeros(K + 1, np.float32)
        for n, i in enumerate(res.item_ids):
            v = self.ver.get(i, 0)
            if versioned and res.item_versions[n] == v:
                self.rows[i], self.acc[i] = res.item_rows[n].copy(), res.item_acc[n].copy()
            else:
                self.added += 1
                self.rows[i] = self.rows.get(i, zero) + res.item_deltas[n]
                self.acc[i] = self.acc.get(i, zero[:2]) + res.item_acc_deltas[n]
            self.ver[i] = v + 1

    def read(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        zero = np.zeros(K + 1, np.float32)
        return (np.array([self.rows.get(i, zero) for i in ids], np.float32),
                np.array([self.acc.get(i, zero[:2]) for i in ids], np.float32),
                np.array([self.ver.get(i, 0) for i in ids], np.int64))  # fmt: skip


def test_absolute_item_rows_give_the_bits_of_the_add_under_two_writers() -> None:
    """Two models write the same items (one of them refreshes midway, one creates new items the other then
    fetches); the versioned table ends bit-identical to a table that added every delta, and both paths ran."""
    ids = [f"i{j}" for j in range(30)]
    init = _rows(30)
    versioned, plain = _ItemTable(ids, init), _ItemTable(ids, init)
    models = []
    for seed in (0, 1):
        m = OnlineModel(_cfg(), seed=seed)
        m.warm(ids, init, 0.0, {i: 1.0 for i in ids}, {}, TS - HOUR, HOUR, versions={})
        models.append(m)
    rng = np.random.default_rng(0)
    for b in range(12):
        w = b % 3 % 2  # writers 0, 1, 0, 0, 1, 0, ...: some rows stay current, some go stale
        m = models[w]
        items = [f"i{j}" for j in rng.integers(0, 30, 20)] + ([f"n{b}"] if b % 4 == 0 else [])
        plan = m.plan(0, [_click(f"u{w}-{n}", it, TS + b) for n, it in enumerate(items)])
        rows, acc, vers = versioned.read(plan.new_items)
        m.absorb_items(plan, rows, vers > 0, acc, vers)
        _load(m, plan)
        res = m.train(plan)
        assert res.finite and res.item_versions is not None and res.item_versions[-1] == -1  # the global row
        versioned.apply(res)
        plain.apply(res, versioned=False)
        m.commit(plan, res)
        if b == 6:  # writer 0 re-reads every row (versions first): its copy is current again
            vers_now = dict(versioned.ver)
            all_ids = list(versioned.rows)
            rows, acc, _ = versioned.read(all_ids)
            models[0].refresh_items(all_ids, rows, 0.0, all_ids, acc, vers_now)
    for table in ("rows", "acc"):
        a, p = getattr(versioned, table), getattr(plain, table)
        assert a.keys() == p.keys() and all(a[i].tobytes() == p[i].tobytes() for i in a), table
    written = sum(versioned.ver.values())
    assert 0 < versioned.added < written  # rows SET and rows added (stale copies, the global row)


def test_stored_rows_without_versions_are_always_added() -> None:
    m = _warm_model(n_items=3)  # warmed without versions: every row unknown
    plan, res = _batch(m, [_click("u", "i1"), _click("u", "n")])
    assert res.item_versions is not None and (res.item_versions == -1).all()
    m.commit(plan, res)
    assert (m.stored.ver[: m.n_items] == -1).all()


def test_seen_upkeep_asks_for_prune_and_ttl_on_first_write_then_every_percent() -> None:
    cfg = _cfg(seen_ttl_days=100.0)
    m = OnlineModel(cfg, seed=0)
    day_ms, day_s = 86_400_000, 86_400.0

    def plan(*clicks: tuple[str, int]) -> BatchPlan:
        empty = np.zeros(0, np.int32)
        return BatchPlan([], empty, empty, np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, np.int64),
                         clicks=[(u, "i", ts, 1.0) for u, ts in clicks])  # fmt: skip

    both = SEEN_PRUNE | SEEN_EXPIRE
    assert m.seen_upkeep(plan(("a", 0), ("a", 5)), now_s=0.0) == {"a": both}  # first write of the user
    assert m.seen_upkeep(plan(("a", day_ms // 2)), now_s=day_s / 2) == {"a": 0}  # < 1 % of 100 days
    assert m.seen_upkeep(plan(("a", day_ms + 5)), now_s=day_s / 2) == {"a": SEEN_PRUNE}  # 1 day of event time
    assert m.seen_upkeep(plan(("a", day_ms + 5), ("b", 0)), now_s=day_s) == {"a": SEEN_EXPIRE, "b": both}
    m.forget_users()  # a rebalance or a refused write: everything is asked for again
    assert m.seen_upkeep(plan(("a", day_ms)), now_s=day_s) == {"a": both}


def test_hidden_items_are_never_sampled_as_negatives() -> None:
    m = _warm_model(_cfg(negatives=6, hard_share=0.5), n_items=30)
    m.hidden = frozenset(f"i{j}" for j in range(5, 30)) | {"not-a-row"}  # 25 of 30 items withdrawn
    events = [_click(f"u{j % 7}", f"i{j % 5}", TS + j) for j in range(200)]
    plan, res = _batch(m, events)
    assert res.finite and m.banned().sum() == 25 and m.banned()[:5].sum() == 0
    assert set(res.touched.idx.tolist()) <= set(range(5))  # only visible rows: positives and their negatives
    m.hidden = frozenset()
    plan, res = _batch(m, [_click(f"u{j % 7}", f"i{j % 5}", TS + 300 + j) for j in range(200)])
    assert m.banned().sum() == 0 and any(j >= 5 for j in res.touched.idx.tolist())  # sampled again once shown
