"""Pure tests of workers/online/model.py: OnlineModel (plan, init of new users, exposure negatives, prequential
ranks, train deltas, commit) and IdMap. No Kafka, no Redis: vectors are passed in as the store would."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from stream.events import Event
from workers.config import LMFConfig
from workers.online.model import BatchPlan, IdMap, OnlineModel

K = 8
TS = 1_700_000_000_000
_offset = iter(range(10**9))


def _click(user: str, item: str, ts: int = TS, weight: float = 1.0) -> Event:
    off = next(_offset)
    return Event(f"t.clicks:0:{off}:0", "click", user, item, ts, weight, None, None, f"t.clicks/0/{off}")


def _shown(user: str, items: Sequence[str], ts: int, imp: str) -> list[Event]:
    off = next(_offset)
    return [
        Event(f"t.impressions:0:{off}:{n}", "impression", user, item, ts, 0.0, n, imp, f"t.impressions/0/{off}")
        for n, item in enumerate(items)
    ]


def _cfg(**kw: object) -> LMFConfig:
    base: dict[str, object] = {"factors": K, "negatives": 4, "hard_share": 0.0, "reservoir": 1000}
    base.update(kw)
    return LMFConfig(**base)  # type: ignore[arg-type]


def _warm_model(cfg: LMFConfig, n_items: int = 30, seed: int = 0) -> OnlineModel:
    """A model warmed with ``n_items`` items (random vectors, popularity 1..n)."""
    m = OnlineModel(cfg, seed=seed)
    ids = [f"i{j}" for j in range(n_items)]
    vecs = np.random.default_rng(seed).standard_normal((n_items, K)).astype(np.float32) * 0.3
    m.warm(ids, vecs, {f"i{j}": float(j + 1) for j in range(n_items)})
    return m


def _neg_ids(plan: BatchPlan, e: int) -> set[str]:
    return {plan.items[j] for j in plan.ev_neg[e] if j >= 0}


# ------------------------------------------------------------------- IdMap
def test_idmap_is_stable_and_dense() -> None:
    m = IdMap(["x", "y"])
    assert len(m) == 2 and m.get("y") == 1 and m.get("zz") is None
    assert m.index("z") == 2 and m.index("x") == 0
    got = m.index_many(["y", "new", "x", "new"])
    assert got.dtype == np.int32 and got.tolist() == [1, 3, 0, 3]
    assert m.ids == ["x", "y", "z", "new"] and len(m) == 4
    assert m.index_many([]).tolist() == []


# ------------------------------------------------------------------- plan
@pytest.mark.parametrize("hard_share", [0.0, 0.5, 1.0])
def test_plan_never_samples_a_known_positive_as_negative(hard_share: float) -> None:
    """Known positives = the user's seen set (from Redis) + the clicked item; with a small universe
    dominated by the seen items, draws hit them constantly and must all be rejected."""
    m = _warm_model(_cfg(negatives=6, hard_share=hard_share, hard_candidates=4), n_items=12)
    seen = {"a": [f"i{j}" for j in range(8, 12)] + ["i0"], "b": ["i11", "i10"]}  # the most popular items
    m.load_seen(seen)
    events = [_click("a", "i9"), _click("b", "i3"), _click("a", "i1"), _click("c", "i11")]
    for _ in range(30):
        plan = m.plan(0, events)
        assert plan.ev_neg.shape == (4, 6)
        for e, ev in enumerate(events):
            negs = _neg_ids(plan, e)
            assert negs, "every click gets negatives when the universe has non-positives"
            assert not negs & (set(seen.get(ev.user, [])) | {ev.item}), (ev, negs)
            assert plan.items[plan.ev_pos[e]] == ev.item and plan.users[plan.ev_user[e]] == ev.user


def test_plan_shapes_weights_and_bookkeeping() -> None:
    m = _warm_model(_cfg(negatives=3))
    events = [_click("u1", "i1", weight=1.0), _click("u2", "new-item", weight=4.0), _click("u1", "i2")]
    plan = m.plan(2, events)
    assert plan.users == ["u1", "u2"] and plan.n_events == 3 and plan.n_exposure == 0
    assert len(plan.items) == len(set(plan.items)) == plan.item_global.size
    assert [m.items.ids[g] for g in plan.item_global] == plan.items
    assert "new-item" in plan.items and m.items.get("new-item") is not None  # new items get an index
    assert plan.clicks == [("u1", "i1", TS, 1.0), ("u2", "new-item", TS, 4.0), ("u1", "i2", TS, 1.0)]
    assert plan.weights.dtype == np.float32 and plan.weights[1] > plan.weights[0] == pytest.approx(1.0)
    assert (plan.neg_weights == 1.0).all() and plan.ev_neg.dtype == np.int32
    assert plan.ev_neg.max() < len(plan.items)


def test_plan_on_a_cold_model_without_items_has_no_negatives() -> None:
    m = OnlineModel(_cfg(), seed=0)
    plan = m.plan(0, [_click("u", "i1"), _click("v", "i2")])
    assert (plan.ev_neg == -1).all() and plan.items == ["i1", "i2"]


def test_impressions_alone_make_no_training_events_without_exposure() -> None:
    m = _warm_model(_cfg())
    plan = m.plan(0, _shown("u", ["i1", "i2"], TS, "m1"))
    assert plan.ev_user.size == 0 and plan.n_events == 2 and plan.clicks == []


# ------------------------------------------------------------------- exposure negatives
def test_exposure_negatives_appear_only_after_the_window() -> None:
    m = _warm_model(_cfg(exposure_window_s=60.0, exposure_weight=0.25))
    first = m.plan(0, _shown("u", ["i1", "i2", "i3"], TS, "m1") + [_click("u", "i2", TS + 1000)])
    assert first.n_exposure == 0  # nothing is due yet; the clicked pair is never due
    early = m.plan(0, [_click("v", "i5", TS + 59_000)])
    assert early.n_exposure == 0
    late = m.plan(0, [_click("v", "i5", TS + 61_000)])
    assert late.n_exposure == 2
    exp_rows = np.flatnonzero(late.ev_pos == -1)
    assert exp_rows.size == 2
    assert {late.items[late.ev_neg[r, 0]] for r in exp_rows} == {"i1", "i3"}
    assert {late.users[late.ev_user[r]] for r in exp_rows} == {"u"}
    assert (late.neg_weights[exp_rows] == np.float32(0.25)).all() and (late.weights[exp_rows] == 0).all()
    assert (late.ev_neg[exp_rows, 1:] == -1).all()
    assert m.plan(0, [_click("v", "i6", TS + 120_000)]).n_exposure == 0  # emitted once


def test_exposure_disabled_by_default() -> None:
    m = _warm_model(_cfg())
    m.plan(0, _shown("u", ["i1"], TS, "m"))
    assert m.plan(0, [_click("v", "i5", TS + 10**7)]).n_exposure == 0 and not m.exposure


# ------------------------------------------------------------------- new users, train
def _vectors(m: OnlineModel, plan: BatchPlan, known: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """What read_batch_state would return: user rows (zeros if absent), found mask, item rows."""
    U = np.zeros((len(plan.users), K), np.float32)
    found = np.array([u in known for u in plan.users])
    for n, u in enumerate(plan.users):
        if u in known:
            U[n] = known[u]
    V = m.item_cache[plan.item_global].copy()
    return U, found, V


@pytest.mark.parametrize("init", ["foldin", "random"])
def test_new_users_get_an_initial_vector_known_users_keep_theirs(init: str) -> None:
    m = _warm_model(_cfg(init=init, lr=1e-6, reg=0.0, negatives=0))
    old = np.full(K, 0.5, np.float32)
    plan = m.plan(0, [_click("new", "i3"), _click("new", "i4"), _click("old", "i5")])
    U, found, V = _vectors(m, plan, {"old": old})
    res = m.train(plan, U, found, V)
    assert res.finite and res.user_vecs.dtype == np.float32
    new = res.user_vecs[plan.users.index("new")]
    assert np.isfinite(new).all() and np.abs(new).max() > 0
    np.testing.assert_allclose(res.user_vecs[plan.users.index("old")], old, atol=1e-4)  # lr ~ 0
    if init == "foldin":  # least squares p . q_i ~ 1 over the user's clicked items
        q = V[[plan.items.index("i3"), plan.items.index("i4")]]
        assert (q @ new > 0.5).all()
    else:
        assert np.abs(new).max() < 0.1  # N(0, init_scale=0.01)


def test_foldin_falls_back_to_random_when_items_have_no_signal() -> None:
    m = OnlineModel(_cfg(init="foldin", negatives=0, lr=1e-6), seed=0)  # every item vector is zero
    plan = m.plan(0, [_click("u", "brand-new")])
    U, found, V = _vectors(m, plan, {})
    res = m.train(plan, U, found, V)
    assert 0 < np.abs(res.user_vecs[0]).max() < 0.1


def test_train_returns_finite_deltas_equal_to_final_minus_fetched() -> None:
    m = _warm_model(_cfg(negatives=3, hard_share=0.34, lr=0.1))
    events = [_click(f"u{j % 5}", f"i{(7 * j) % 30}") for j in range(40)]
    plan = m.plan(1, events)
    U, found, V = _vectors(m, plan, {"u0": np.ones(K, np.float32) * 0.1})
    V_before, U_before = V.copy(), U.copy()
    res = m.train(plan, U, found, V, bias=-0.5)
    np.testing.assert_array_equal(V, V_before)  # inputs are not mutated
    np.testing.assert_array_equal(U, U_before)
    assert res.finite and np.isfinite(res.loss) and res.loss > 0
    assert res.item_deltas.dtype == np.float32 and res.item_deltas.shape == (len(plan.items), K)
    np.testing.assert_array_equal(res.item_deltas, res.item_final - V)
    assert np.abs(res.item_deltas).max() > 0
    # every positive item moved; the store adds the delta to what it holds: fetched + delta == final
    for e in range(len(events)):
        assert np.abs(res.item_deltas[plan.ev_pos[e]]).max() > 0
    np.testing.assert_allclose(V + res.item_deltas, res.item_final, rtol=0, atol=1e-7)
    assert res.user_acc is None and res.item_acc_deltas is None


def test_train_with_adagrad_returns_accumulators() -> None:
    m = _warm_model(_cfg(adagrad=True, negatives=2))
    plan = m.plan(0, [_click("u", "i1"), _click("v", "i2")])
    U, found, V = _vectors(m, plan, {})
    acc_u = np.zeros_like(U)
    acc_i = np.zeros_like(V)
    res = m.train(plan, U, found, V, user_acc=acc_u, item_acc=acc_i)
    assert res.user_acc is not None and res.item_acc_deltas is not None
    assert (res.user_acc[:, 0] > 0).all() and (res.user_acc[:, 1:] == 0).all()
    assert (res.item_acc_deltas >= 0).all() and res.item_acc_deltas[:, 0].max() > 0


def test_train_flags_non_finite_input() -> None:
    m = _warm_model(_cfg(negatives=1))
    plan = m.plan(0, [_click("u", "i1")])
    U, found, V = _vectors(m, plan, {"u": np.full(K, np.nan, np.float32)})
    res = m.train(plan, U, found, V)
    assert not res.finite and np.isnan(res.loss)


# ------------------------------------------------------------------- ranks, commit
def test_ranks_before_learning_returns_one_rank_per_click() -> None:
    cfg = _cfg(negatives=2)
    m = OnlineModel(cfg, seed=0)
    V = np.random.default_rng(1).uniform(-0.5, 0.5, (20, K)).astype(np.float32)
    V[4] = 0.0
    V[4, 0] = 1.0  # the only item with a large first coordinate
    m.warm([f"i{j}" for j in range(20)], V, {f"i{j}": float(j + 1) for j in range(20)})
    target = np.eye(K, dtype=np.float32)[0]
    m.load_seen({"warm": ["i19"]})
    events = [_click("warm", "i4"), _click("cold", "i19"), _click("warm", "i19")]
    plan = m.plan(0, events)
    U, found, _ = _vectors(m, plan, {"warm": target * 10})
    ranks = m.ranks_before_learning(plan, U, found)
    assert [(u, i) for u, i, _, _ in ranks] == [("warm", "i4"), ("cold", "i19"), ("warm", "i19")]
    by = {(u, i): (mr, pr) for u, i, mr, pr in ranks}
    assert by[("warm", "i4")][0] == 0  # the user's vector points at i4: it ranks first
    assert by[("cold", "i19")][0] == -1  # no vector yet
    assert by[("cold", "i19")][1] == 0  # i19 is the most popular item (warm counts 1..20)
    assert by[("warm", "i4")][1] == 14  # 15 items are more popular, i19 excluded as already seen
    n = m.n_items
    assert all(0 <= mr < n and 0 <= pr < n for _, _, mr, pr in ranks if mr != -1)


def test_commit_updates_caches_seen_and_reservoir() -> None:
    m = _warm_model(_cfg(negatives=2, seen_cap=3))
    before = m.reservoir.counts.copy()
    events = [_click("u", f"i{j}") for j in (1, 2, 3, 4)] + [_click("u", "i2")]
    plan = m.plan(0, events)
    U, found, V = _vectors(m, plan, {})
    res = m.train(plan, U, found, V)
    m.commit(plan, res)
    np.testing.assert_array_equal(m.item_cache[plan.item_global], res.item_final)
    np.testing.assert_array_equal(m.user_cache["u"], res.user_vecs[0])
    assert [m.items.ids[i] for i in m.seen["u"]] == ["i3", "i4", "i2"]  # most recent last, capped
    after = m.reservoir.counts
    assert after[m.items.get("i2")] - before[m.items.get("i2")] == 2
    assert int(after.sum() - before.sum()) == 5
    m.forget_users()
    assert not m.seen and not m.user_cache and m.users_missing_seen(["u", "v", "u"]) == ["u", "v"]


def test_plan_never_samples_a_positive_of_the_same_batch() -> None:
    m = _warm_model(_cfg(negatives=6), n_items=12)
    events = [_click("a", f"i{j}") for j in range(8, 12)]  # the four most popular items, one batch
    clicked = {e.item for e in events}
    hits = 0
    for _ in range(20):
        plan = m.plan(0, events)
        hits += sum(len(_neg_ids(plan, e) & clicked) for e in range(len(events)))
    assert hits == 0, f"{hits} negatives were items the same user clicked in the same batch"
