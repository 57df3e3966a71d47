"""Recommender over a fakeredis store: biased ranking and scores vs brute force, seen exclusion, popularity
fallback, cache refresh rules.

fakeredis cannot run ``publish_generation`` (its Lua packs floats), so a generation goes live here by setting
``live_gen`` in the meta hash, and its global bias is written as the :data:`GLOBAL_ROW` item row, as publish
and the LMF deltas do; tests/integration/test_lookup_redis.py covers the real publish.
"""

from __future__ import annotations

from dataclasses import dataclass

import fakeredis
import numpy as np
import pytest

from workers.kernels.topk import top_k
from workers.serving import lookup
from workers.serving.lookup import RELOAD_SHARE, EmptyModel, NoModel, Recommender, StoreLost, sigmoid
from workers.store import GLOBAL_ROW, FactorStore

K = 8
N_USERS, N_ITEMS = 6, 300
B = -0.7  # global bias of generation 1
TS = 1_700_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Model:
    store: FactorStore
    users: np.ndarray  # (N_USERS, K + 1): latent then bias
    items: np.ndarray  # (N_ITEMS, K + 1)


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{j}" for j in range(n)]


def bias_row(b: float, k: int = K) -> np.ndarray:
    row = np.zeros((1, k + 1), np.float32)
    row[0, -1] = b
    return row


def worst_for(p: np.ndarray) -> np.ndarray:
    """An item row that scores far below every other item for the user row ``p``."""
    return np.concatenate([-10 * p[:K], [-100.0]]).astype(np.float32)[None, :]


def star_for(p: np.ndarray) -> np.ndarray:
    """An item row that scores far above every other item for the user row ``p``."""
    return np.concatenate([10 * p[:K], [100.0]]).astype(np.float32)[None, :]


def go_live(store: FactorStore, g: int) -> None:
    """Flip ``live_gen`` as publish_generation does (its Lua needs real Redis)."""
    store.r.hset(store.keys.meta, "live_gen", g)


@pytest.fixture()
def model() -> Model:
    rng = np.random.default_rng(7)
    store = FactorStore(fakeredis.FakeRedis(), namespace="unit")
    store.ensure_model(K)
    users = rng.normal(size=(N_USERS, K + 1)).astype(np.float32)
    items = rng.normal(size=(N_ITEMS, K + 1)).astype(np.float32)
    items[:, K] *= 2  # item biases as large as the dot products: they move the ranking
    store.write_vectors(1, "user", ids("u", N_USERS), users)
    store.write_vectors(1, "item", ids("i", N_ITEMS), items)
    store.write_vectors(1, "item", [GLOBAL_ROW], bias_row(B))
    store.write_counts(1, {"i5": 50, "i9": 40, "i1": 30, "i200": 20, "i3": 10})
    return Model(store, users, items)


def logits_of(m: Model, u: int, b: float = B) -> np.ndarray:
    """float64 ``b + b_u + b_i + p_u . q_i`` over every item (the reference)."""
    it, p = m.items.astype(np.float64), m.users[u].astype(np.float64)
    return it[:, :K] @ p[:K] + it[:, K] + p[K] + b


def brute_force(m: Model, u: int, k: int, b: float = B, exclude: tuple[str, ...] = ()) -> tuple[list[str], np.ndarray]:
    logits = logits_of(m, u, b)
    logits[[int(i[1:]) for i in exclude]] = -np.inf
    order = np.argsort(-logits, kind="stable")[:k]
    return [f"i{j}" for j in order], 1 / (1 + np.exp(-logits[order]))


def prior(m: Model, items: list[str], b: float = B) -> np.ndarray:
    """The fallback score ``sigmoid(b + b_i)``."""
    return 1 / (1 + np.exp(-(b + m.items[[int(i[1:]) for i in items], K].astype(np.float64))))


def close(got: list[float], want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ ranking and scores
def test_top_k_matches_brute_force(model: Model) -> None:
    rec = Recommender(model.store)
    for u in range(N_USERS):
        r = rec.recommend(f"u{u}", k=10)
        want_items, want_scores = brute_force(model, u, 10)
        assert (r.items, r.fallback, r.generation) == (want_items, False, 1)
        close(r.scores, want_scores)
        assert r.scores == sorted(r.scores, reverse=True)


def test_item_bias_changes_the_ranking(model: Model) -> None:
    store, items = model.store, model.items
    rec = Recommender(store)
    biased = rec.recommend("u0", k=10).items
    logits = logits_of(model, 0)
    low = int(np.argsort(-logits)[50])  # the 51st item; raise its bias just past the best logit
    lifted = items[low : low + 1].copy()
    lifted[0, K] += np.float32(logits.max() - logits[low] + 1.0)
    store.write_vectors(1, "item", [f"i{low}"], lifted)
    rec.refresh(force=True)
    r = rec.recommend("u0", k=2)
    assert r.items == [f"i{low}", biased[0]]
    close(r.scores, 1 / (1 + np.exp(-np.array([logits.max() + 1.0, logits.max()]))))

    flat = items.copy()
    flat[:, K] = 0.0
    store.write_vectors(1, "item", ids("i", N_ITEMS), flat)
    rec.refresh(force=True)
    unbiased = rec.recommend("u0", k=10).items
    assert unbiased == brute_force(Model(store, model.users, flat), 0, 10)[0]
    assert unbiased != biased  # the fixture's item biases matter


def test_user_and_global_bias_change_scores_not_the_ranking(model: Model) -> None:
    store, users = model.store, model.users
    rec = Recommender(store)
    before = rec.recommend("u3", k=20)
    users[3, K] += np.float32(1.5)
    store.write_vectors(1, "user", ["u3"], users[3:4])  # user rows are read fresh: no refresh needed
    after = rec.recommend("u3", k=20)
    assert after.items == before.items
    close(after.scores, brute_force(model, 3, 20)[1])
    assert all(a > b for a, b in zip(after.scores, before.scores))

    store.write_vectors(1, "item", [GLOBAL_ROW], bias_row(B - 3.0))
    rec.refresh(force=True)
    shifted = rec.recommend("u3", k=20)
    assert shifted.items == before.items
    close(shifted.scores, brute_force(model, 3, 20, b=B - 3.0)[1])
    assert all(a < b for a, b in zip(shifted.scores, after.scores))


def test_score_is_sigmoid_of_biases_plus_dot(model: Model) -> None:
    rec = Recommender(model.store)
    got = rec.score("u1", ["i0", "i42", "missing", GLOBAL_ROW])
    assert got.dtype == np.float32
    close(got[:2].tolist(), 1 / (1 + np.exp(-logits_of(model, 1)[[0, 42]])))
    assert np.isnan(got[2:]).all()  # no item vector; the global row is not an item
    r = rec.recommend("u1", k=5)
    close(rec.score("u1", r.items).tolist(), np.array(r.scores))
    assert np.isnan(rec.score("nobody", ["i0"])).all()
    assert rec.score("u1", []).shape == (0,)


# ------------------------------------------------------------------ seen items
def test_seen_items_are_excluded_only_when_asked(model: Model) -> None:
    store = model.store
    rec = Recommender(store)
    top = rec.recommend("u2", k=5).items
    store.add_seen([("u2", top[0], TS), ("u2", top[3], TS + 1), ("u2", "not-an-item", TS + 2)])
    r = rec.recommend("u2", k=5)
    want, want_scores = brute_force(model, 2, 5, exclude=(top[0], top[3]))
    assert r.items == want and top[0] not in r.items and top[3] not in r.items
    close(r.scores, want_scores)
    assert rec.recommend("u2", k=5, exclude_seen=False).items == top


def test_every_seen_item_is_excluded_beyond_a_thousand() -> None:
    n, n_seen, k = 1500, 1200, 2
    rng = np.random.default_rng(3)
    store = FactorStore(fakeredis.FakeRedis(), namespace="many")
    store.ensure_model(k)
    items = rng.normal(size=(n, k + 1)).astype(np.float32)
    user = rng.normal(size=(1, k + 1)).astype(np.float32)
    store.write_vectors(1, "item", ids("i", n), items)
    store.write_vectors(1, "user", ["u"], user)
    store.write_popularity(1, {f"i{j}": float(n - j) for j in range(n)}, ref_ms=TS)  # i0 most popular
    order = np.argsort(-(items[:, :k] @ user[0, :k] + items[:, k]), kind="stable")
    seen = [f"i{j}" for j in order[:n_seen]]  # the user's best 1200 items
    store.add_seen([("u", i, TS + t) for t, i in enumerate(seen)])
    store.add_seen([("visitor", f"i{j}", TS + j) for j in range(n_seen)])  # the 1200 most popular
    assert len(store.seen_items("u")) == len(store.seen_items("visitor")) == n_seen

    rec = Recommender(store)
    r = rec.recommend("u", k=n)
    assert r.items == [f"i{j}" for j in order[n_seen:]]
    fb = rec.recommend("visitor", k=10)
    assert (fb.items, fb.fallback) == ([f"i{j}" for j in range(n_seen, n_seen + 10)], True)
    many = rec.recommend_many(["u", "visitor"], k=n)
    assert many["u"].items == r.items and many["visitor"].items == [f"i{j}" for j in range(n_seen, n)]


def test_k_larger_than_catalogue_returns_every_unseen_item(model: Model) -> None:
    store = model.store
    store.add_seen([("u0", "i0", TS), ("newcomer", "i9", TS)])
    rec = Recommender(store)
    r = rec.recommend("u0", k=1000)
    assert len(r.items) == N_ITEMS - 1 and "i0" not in r.items and len(set(r.items)) == N_ITEMS - 1
    assert GLOBAL_ROW not in r.items and rec.n_items == N_ITEMS
    assert np.isfinite(r.scores).all() and r.scores == sorted(r.scores, reverse=True)
    assert rec.recommend("newcomer", k=1000).items == ["i5", "i1", "i200", "i3"]


# ------------------------------------------------------------------ fallback
def test_fallback_ranks_by_decayed_popularity_and_scores_by_item_bias(model: Model) -> None:
    store = model.store
    by_bias = [f"i{j}" for j in np.argsort(model.items[:, K])[[0, 100, 200, 299]]]  # ascending item bias
    store.write_popularity(1, {i: 4.0 - n for n, i in enumerate(by_bias)}, ref_ms=TS)  # least biased most popular
    rec = Recommender(store)
    r = rec.recommend("newcomer", k=3)
    assert (r.items, r.fallback, r.generation) == (by_bias[:3], True, 1)  # popularity, not counts or bias
    close(r.scores, prior(model, by_bias[:3]))
    assert r.scores == sorted(r.scores)  # the ranking is popularity's, the scores the user-free P(click)
    store.add_seen([("newcomer", by_bias[1], TS)])
    assert rec.recommend("newcomer", k=3).items == [by_bias[0], by_bias[2], by_bias[3]]
    assert rec.recommend("newcomer", k=3, exclude_seen=False).items == by_bias[:3]


def test_fallback_uses_counts_without_popularity(model: Model) -> None:
    store = model.store
    rec = Recommender(store)
    r = rec.recommend("newcomer", k=3)
    assert (r.items, r.fallback, r.generation) == (["i5", "i9", "i1"], True, 1)
    close(r.scores, prior(model, ["i5", "i9", "i1"]))
    store.add_seen([("newcomer", "i9", TS)])
    assert rec.recommend("newcomer", k=3).items == ["i5", "i1", "i200"]
    assert rec.recommend("newcomer", k=3, exclude_seen=False).items == ["i5", "i9", "i1"]


def test_recommend_many_equals_single_calls_across_chunks(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    store = model.store
    store.add_seen([("u1", "i7", TS), ("u4", "i8", TS), ("ghost", "i5", TS)])
    rec = Recommender(store)
    users = ["u1", "ghost", "u4", "u0", "u5", "u2"]
    single = {u: rec.recommend(u, k=7) for u in users}
    monkeypatch.setattr(lookup, "_BATCH_CELLS", 2 * N_ITEMS)  # 2 users per chunk
    many = rec.recommend_many(["u1", "ghost", "u4", "u0", "u1", "u5", "u2"], k=7)
    assert list(many) == users
    for u, r in single.items():  # a batched product may round the last float32 bit differently
        assert (many[u].items, many[u].fallback, many[u].generation) == (r.items, r.fallback, r.generation)
        np.testing.assert_allclose(many[u].scores, r.scores, rtol=1e-6)
    assert many["ghost"].fallback and "i5" not in many["ghost"].items
    assert rec.recommend_many([], k=3) == {}


# ------------------------------------------------------------------ cache refresh
def test_new_items_appear_after_refresh_interval(model: Model) -> None:
    store, users = model.store, model.users
    clock = FakeClock()
    rec = Recommender(store, refresh_s=5.0, clock=clock)
    rec.recommend("u0", k=1)
    assert (rec.refreshes, rec.n_items) == (1, N_ITEMS)
    store.write_vectors(1, "item", ["star"], star_for(users[0]))
    clock.now += 4.9
    assert rec.recommend("u0", k=1).items != ["star"] and rec.refreshes == 1
    clock.now += 0.2
    assert rec.recommend("u0", k=1).items == ["star"]
    assert (rec.refreshes, rec.n_items) == (2, N_ITEMS + 1)


def test_existing_vectors_refresh_at_most_every_interval(model: Model) -> None:
    store, users = model.store, model.users
    clock = FakeClock()
    rec = Recommender(store, refresh_s=5.0, clock=clock)
    before = rec.recommend("u3", k=1).items[0]
    store.write_vectors(1, "item", [before], worst_for(users[3]))  # an online update, item count unchanged
    clock.now += 1.0
    assert rec.recommend("u3", k=1).items == [before]  # within the staleness bound: cached
    clock.now += 4.0
    assert rec.recommend("u3", k=1).items != [before] and rec.refreshes == 2


def test_slow_load_spaces_content_reloads_not_new_items_or_generations(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, users = model.store, model.users
    clock = FakeClock()
    load = store.get_all_items

    def slow_load(g: int) -> tuple[list[str], np.ndarray, float]:
        clock.now += 1.0  # every full load takes 1 s
        return load(g)

    monkeypatch.setattr(store, "get_all_items", slow_load)
    rec = Recommender(store, refresh_s=5.0, clock=clock)
    before = rec.recommend("u3", k=1).items[0]
    loaded_at = clock.now
    store.write_vectors(1, "item", [before], worst_for(users[3]))
    limit = 1.0 / RELOAD_SHARE  # 20 s > refresh_s
    for dt in (5.0, 10.0, limit - 0.1):  # checked every refresh_s, content age below the limit: no reload
        clock.now = loaded_at + dt
        assert rec.recommend("u3", k=1).items == [before] and rec.refreshes == 1
    clock.now += 5.0  # the next check: the content is older than the limit
    assert rec.recommend("u3", k=1).items != [before] and rec.refreshes == 2
    store.write_vectors(1, "item", ["star"], star_for(users[3]))
    clock.now += 5.0  # a changed item count reloads at the next check despite the slow load
    assert rec.recommend("u3", k=1).items == ["star"] and rec.refreshes == 3
    g = store.begin_generation("als")
    store.write_vectors(g, "user", ["u3"], users[3:4])
    store.write_vectors(g, "item", ids("n", N_ITEMS + 1), -model.items[[0] * (N_ITEMS + 1)])  # same count
    go_live(store, g)
    clock.now += 5.0  # a new generation reloads at the next check, whatever its item count
    r = rec.recommend("u3", k=1)
    assert (r.generation, r.items[0][0], rec.refreshes) == (g, "n", 4)


@pytest.mark.parametrize("global_row", [True, False], ids=["global-row", "meta-bias"])
def test_generation_change_reloads_and_uses_its_global_bias(model: Model, global_row: bool) -> None:
    store = model.store
    clock = FakeClock()
    rec = Recommender(store, refresh_s=5.0, clock=clock)
    assert rec.recommend("u0", k=3).generation == 1
    g = store.begin_generation("als")
    store.write_vectors(g, "user", ["u0"], np.array([[1.0] * K + [0.3]], np.float32))
    rows = np.array([[0.1] * K + [1.0], [0.2] * K + [0.0], [-0.1] * K + [0.0]], np.float32)
    store.write_vectors(g, "item", ["x", "y", "z"], rows)  # x ranks first by its bias
    store.write_counts(g, {"z": 5, "y": 2})
    if global_row:
        store.write_vectors(g, "item", [GLOBAL_ROW], bias_row(-0.5))
        store.r.hset(store.keys.gen_meta(g), "bias", "3.0")  # the row wins over the meta
    else:
        store.r.hset(store.keys.gen_meta(g), "bias", "-0.5")  # the fallback where no global row exists
    go_live(store, g)
    r = rec.recommend("u0", k=3)
    assert r.generation == 1 and r.items == brute_force(model, 0, 3)[0]  # not yet checked
    assert np.isnan(rec.score("u0", ["x"])).all()  # scores stay in the cached generation
    clock.now += 5.0
    r = rec.recommend("u0", k=3)
    assert (r.items, r.generation, rec.n_items) == (["x", "y", "z"], g, 3)
    close(r.scores, 1 / (1 + np.exp(-np.array([0.8 + 1.0 + 0.3 - 0.5, 1.6 + 0.3 - 0.5, -0.8 + 0.3 - 0.5]))))
    close(rec.score("u0", ["y"]).tolist(), np.array([1 / (1 + np.exp(-1.4))]))
    fb = rec.recommend("u3", k=3)  # u3 has no vector in generation g: g's popularity (counts)
    assert (fb.items, fb.fallback, fb.generation) == (["z", "y"], True, g)
    close(fb.scores, 1 / (1 + np.exp(-np.array([-0.5, -0.5]))))


def test_auto_refresh_off_reloads_only_on_refresh(model: Model) -> None:
    store, users = model.store, model.users
    clock = FakeClock()
    rec = Recommender(store, refresh_s=5.0, clock=clock, auto_refresh=False)
    assert rec.recommend("u0", k=1).items != ["star"] and rec.refreshes == 1  # the first request loads
    store.write_vectors(1, "item", ["star"], star_for(users[0]))
    clock.now += 60.0
    assert rec.recommend("u0", k=1).items != ["star"] and rec.refreshes == 1
    assert rec.refresh() is True
    assert rec.recommend("u0", k=1).items == ["star"]


def test_refresh_not_due_asks_redis_nothing(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    store = model.store
    clock = FakeClock()
    rec = Recommender(store, refresh_s=5.0, clock=clock)
    assert rec.refresh() is True and rec.generation == 1
    calls: list[str] = []
    for name in ("live_generation", "item_count", "get_all_items"):
        real = getattr(store, name)
        monkeypatch.setattr(store, name, lambda *a, _f=real, _n=name: calls.append(_n) or _f(*a))
    clock.now += 4.9
    assert rec.refresh() is False and calls == []
    clock.now += 0.1  # due: checked and, the content being refresh_s old, reloaded
    assert rec.refresh() is True and calls == ["live_generation", "item_count", "get_all_items"]
    calls.clear()
    assert rec.refresh() is False and calls == []
    assert rec.refresh(force=True) is True and calls == ["live_generation", "get_all_items"] and rec.refreshes == 3
    with pytest.raises(ValueError, match="refresh_s=-1 must be >= 0"):
        Recommender(store, refresh_s=-1)


# ------------------------------------------------------------------ edge cases
def test_no_model_and_bad_k_raise_instructive_errors() -> None:
    rec = Recommender(FactorStore(fakeredis.FakeRedis(), namespace="empty"))
    with pytest.raises(NoModel, match="no model in Redis namespace 'empty'.*zerocf als --once"):
        rec.recommend("u1")
    store = FactorStore(fakeredis.FakeRedis(), namespace="m")
    store.ensure_model(2)
    with pytest.raises(ValueError, match="k=0 must be >= 1"):
        Recommender(store).recommend("u1", k=0)


def test_empty_model_is_an_error_not_an_empty_answer() -> None:
    """Issue 11.4: a model without items used to answer ``items: []`` (a success) to every user."""
    store = FactorStore(fakeredis.FakeRedis(), namespace="m")
    store.ensure_model(2)
    store.write_vectors(1, "user", ["u1"], np.ones((1, 3), dtype=np.float32))
    store.write_vectors(1, "item", [GLOBAL_ROW], bias_row(0.4, k=2))  # a global bias but no item
    rec = Recommender(store)
    for user in ("u1", "u2"):  # with and without a vector
        with pytest.raises(EmptyModel, match="generation 1 has no items yet; feed clicks"):
            rec.recommend(user)
    assert rec.n_items == 0 and np.isnan(rec.score("u1", [GLOBAL_ROW])).all()


def test_a_lost_or_reset_store_is_an_error_for_known_and_unknown_users(model: Model) -> None:
    """Issue 11.4: after Redis lost its data every user got the (empty) popularity fallback as a success."""
    store = model.store
    rec = Recommender(store, refresh_s=3600.0)
    assert rec.recommend("u0", k=2).items and rec.recommend("ghost", k=2).fallback
    store.r.flushall()  # an empty restart, as the cache sees it
    for user in ("u0", "ghost"):
        with pytest.raises(StoreLost, match="model 'unit' .generation 1 was being served. is gone from Redis"):
            rec.recommend(user, k=2)
    with pytest.raises(StoreLost, match="is gone from Redis"):
        rec.refresh(force=True)


def test_a_store_reset_under_a_newer_generation_is_an_error(model: Model) -> None:
    store = model.store
    store.write_vectors(3, "item", ids("i", N_ITEMS) + [GLOBAL_ROW], np.vstack([model.items, bias_row(B)]))
    go_live(store, 3)
    rec = Recommender(store, refresh_s=3600.0)
    assert rec.recommend("ghost", k=2).generation == 3
    store.r.flushall()
    other = FactorStore(store.r, namespace="unit")  # another process, after Redis restarted empty ...
    other.ensure_model(K)  # ... starts a new model at generation 1
    with pytest.raises(StoreLost, match="generation 3"):
        rec.recommend("u0", k=2)


def test_stale_answers_come_from_the_cache_alone(model: Model) -> None:
    rec = Recommender(model.store, refresh_s=3600.0)
    with pytest.raises(NoModel, match="no item cache"):
        rec.recommend_stale("u0")
    rec.refresh()
    model.store.r.flushall()
    r = rec.recommend_stale("u0", k=3)
    assert (r.items, r.fallback, r.stale, r.generation) == (["i5", "i9", "i1"], True, True, 1)  # by counts
    close(r.scores, prior(model, r.items))


def test_a_generation_without_popularity_falls_back_to_item_bias(model: Model) -> None:
    store = model.store
    store.r.delete(store.keys.counts(1), store.keys.popularity(1))
    r = Recommender(store).recommend("ghost", k=3)
    by_bias = [f"i{j}" for j in np.argsort(-model.items[:, K], kind="stable")[:3]]
    assert (r.items, r.fallback) == (by_bias, True)
    close(r.scores, prior(model, r.items))


def test_top_k_ties_and_exclusions() -> None:
    s = np.array([[1.0, 2.0, 2.0, -np.inf, 0.5]], dtype=np.float32)
    assert top_k(s, 2)[0].tolist() == [[1, 2]]
    assert top_k(s, 10)[0].tolist() == [[1, 2, 0, 4, -1]]
    assert sigmoid(np.array([-1e4, 0, 1e4], dtype=np.float32)).tolist() == [0.0, 0.5, 1.0]
