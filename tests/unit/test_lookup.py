"""Recommender over a fakeredis store: ranking vs brute force, exclusion, fallback, cache refresh, scores."""

from __future__ import annotations

import dataclasses

import fakeredis
import numpy as np
import pytest

from workers.kernels.topk import top_k
from workers.serving import lookup
from workers.serving.lookup import NoModel, Recommender, sigmoid
from workers.store import FactorStore, GenerationMeta

K = 8


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlippableStore(FactorStore):
    """Test double at the store boundary: fakeredis has no Lua, so publish_generation cannot flip
    live_gen here; this store pretends generation ``live`` is live with calibration ``bias``."""

    live: int | None = None
    bias: float | None = None

    def live_generation(self) -> int:
        return self.live if self.live is not None else super().live_generation()

    def generation_meta(self, g: int) -> GenerationMeta:
        gm = super().generation_meta(g)
        return gm if self.bias is None else dataclasses.replace(gm, bias=self.bias)


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{j}" for j in range(n)]


@pytest.fixture()
def model() -> tuple[FlippableStore, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    store = FlippableStore(fakeredis.FakeRedis(), namespace="unit")
    store.ensure_model(K)
    users = rng.normal(size=(6, K)).astype(np.float32)
    items = rng.normal(size=(300, K)).astype(np.float32)
    store.write_vectors(1, "user", ids("u", 6), users)
    store.write_vectors(1, "item", ids("i", 300), items)
    store.write_counts(1, {"i5": 50, "i9": 40, "i1": 30, "i200": 20, "i3": 10})
    return store, users, items


def brute_force(
    p: np.ndarray, items: np.ndarray, k: int, bias: float = 0.0, exclude: tuple[int, ...] = ()
) -> tuple[list[str], np.ndarray]:
    logits = items.astype(np.float64) @ p.astype(np.float64) + bias
    logits[list(exclude)] = -np.inf
    order = np.argsort(-logits, kind="stable")[:k]
    return [f"i{j}" for j in order], 1 / (1 + np.exp(-logits[order]))


def test_top_k_matches_brute_force(model) -> None:
    store, users, items = model
    rec = Recommender(store)
    for u in range(6):
        r = rec.recommend(f"u{u}", k=10)
        want_items, want_scores = brute_force(users[u], items, 10)
        assert (r.items, r.fallback, r.generation) == (want_items, False, 1)
        np.testing.assert_allclose(r.scores, want_scores, rtol=1e-5)
        assert r.scores == sorted(r.scores, reverse=True)


def test_seen_items_are_excluded_only_when_asked(model) -> None:
    store, users, items = model
    rec = Recommender(store)
    top = rec.recommend("u2", k=5).items
    store.add_seen([("u2", top[0], 1), ("u2", top[3], 2), ("u2", "not-an-item", 3)])
    r = rec.recommend("u2", k=5)
    want, _ = brute_force(users[2], items, 5, exclude=(int(top[0][1:]), int(top[3][1:])))
    assert r.items == want and top[0] not in r.items and top[3] not in r.items
    assert rec.recommend("u2", k=5, exclude_seen=False).items == top


def test_k_larger_than_catalogue_returns_every_unseen_item(model) -> None:
    store, _, _ = model
    store.add_seen([("u0", "i0", 1)])
    r = Recommender(store).recommend("u0", k=1000)
    assert len(r.items) == 299 and "i0" not in r.items and len(set(r.items)) == 299


def test_unknown_user_gets_popularity_fallback(model) -> None:
    store, _, _ = model
    rec = Recommender(store)
    r = rec.recommend("newcomer", k=3)
    assert (r.items, r.fallback, r.generation) == (["i5", "i9", "i1"], True, 1)
    assert r.scores == [0.5, 0.5, 0.5]  # the prior sigmoid(bias) with bias 0: order carries popularity
    store.add_seen([("newcomer", "i9", 1)])
    assert rec.recommend("newcomer", k=3).items == ["i5", "i1", "i200"]
    assert rec.recommend("newcomer", k=3, exclude_seen=False).items == ["i5", "i9", "i1"]


def test_recommend_many_equals_single_calls_across_chunks(model, monkeypatch) -> None:
    store, _, _ = model
    store.add_seen([("u1", "i7", 1), ("u4", "i8", 1)])
    rec = Recommender(store)
    single = {u: rec.recommend(u, k=7) for u in ["u1", "ghost", "u4", "u0", "u5"]}
    monkeypatch.setattr(lookup, "_BATCH_CELLS", 600)  # 2 users per chunk at 300 items
    many = rec.recommend_many(["u1", "ghost", "u4", "u0", "u1", "u5"], k=7)
    assert list(many) == ["u1", "ghost", "u4", "u0", "u5"]
    for u, r in single.items():  # a batched product may round the last float32 bit differently
        assert (many[u].items, many[u].fallback, many[u].generation) == (r.items, r.fallback, r.generation)
        np.testing.assert_allclose(many[u].scores, r.scores, rtol=1e-6)


def test_new_items_appear_after_refresh_interval(model) -> None:
    store, users, _ = model
    clock = FakeClock()
    rec = Recommender(store, refresh_s=5.0, clock=clock)
    rec.recommend("u0", k=1)
    assert (rec.refreshes, rec.n_items) == (1, 300)
    star = (users[0] * 100).astype(np.float32)[None, :]  # scores far above every other item for u0
    store.write_vectors(1, "item", ["star"], star)
    clock.now += 4.9
    assert rec.recommend("u0", k=1).items != ["star"] and rec.refreshes == 1
    clock.now += 0.2
    assert rec.recommend("u0", k=1).items == ["star"]
    assert (rec.refreshes, rec.n_items) == (2, 301)


def test_existing_vectors_refresh_at_most_every_interval(model) -> None:
    store, users, items = model
    clock = FakeClock()
    rec = Recommender(store, refresh_s=5.0, clock=clock)
    before = rec.recommend("u3", k=1).items[0]
    store.write_vectors(1, "item", [before], (-users[3]).astype(np.float32)[None, :])  # online update
    clock.now += 1.0
    assert rec.recommend("u3", k=1).items == [before]  # within the staleness bound: cached
    clock.now += 4.0
    assert rec.recommend("u3", k=1).items != [before] and rec.refreshes == 2


def test_generation_change_reloads_and_uses_its_bias(model) -> None:
    store, _, _ = model
    clock = FakeClock()
    rec = Recommender(store, refresh_s=5.0, clock=clock)
    assert rec.recommend("u0", k=3).generation == 1
    g = store.begin_generation("als")
    store.write_vectors(g, "user", ["u0"], np.ones((1, K), dtype=np.float32))
    store.write_vectors(g, "item", ["x", "y"], np.array([[0.1] * K, [-0.1] * K], dtype=np.float32))
    store.live, store.bias = g, -0.5
    assert rec.recommend("u0", k=3).generation == 1  # not yet checked
    clock.now += 5.0
    r = rec.recommend("u0", k=3)
    assert (r.items, r.generation, rec.n_items) == (["x", "y"], g, 2)
    np.testing.assert_allclose(r.scores, [1 / (1 + np.exp(0.5 - 0.8)), 1 / (1 + np.exp(0.5 + 0.8))], rtol=1e-6)
    assert rec.recommend("u3", k=2).fallback  # u3 has no vector in generation g


def test_score_is_sigmoid_of_bias_plus_dot(model) -> None:
    store, users, items = model
    store.bias = 0.25
    rec = Recommender(store)
    got = rec.score("u1", ["i0", "i42", "missing"])
    assert got.dtype == np.float32
    want = 1 / (1 + np.exp(-(0.25 + items[[0, 42]].astype(np.float64) @ users[1])))
    np.testing.assert_allclose(got[:2], want, rtol=1e-6)
    assert np.isnan(got[2])
    assert np.isnan(rec.score("nobody", ["i0"])).all()
    assert rec.score("u1", []).shape == (0,)


def test_no_model_and_bad_k_raise_instructive_errors() -> None:
    rec = Recommender(FactorStore(fakeredis.FakeRedis(), namespace="empty"))
    with pytest.raises(NoModel, match="no model in Redis namespace 'empty'.*zerocf als --once"):
        rec.recommend("u1")
    store = FactorStore(fakeredis.FakeRedis(), namespace="m")
    store.ensure_model(2)
    with pytest.raises(ValueError, match="k=0 must be >= 1"):
        Recommender(store).recommend("u1", k=0)


def test_empty_model_returns_no_items() -> None:
    store = FactorStore(fakeredis.FakeRedis(), namespace="m")
    store.ensure_model(2)
    store.write_vectors(1, "user", ["u1"], np.ones((1, 2), dtype=np.float32))
    assert Recommender(store).recommend("u1").items == []
    assert Recommender(store).recommend("u2").items == []


def test_top_k_ties_and_exclusions() -> None:
    s = np.array([[1.0, 2.0, 2.0, -np.inf, 0.5]], dtype=np.float32)
    assert top_k(s, 2)[0].tolist() == [[1, 2]]
    assert top_k(s, 10)[0].tolist() == [[1, 2, 0, 4, -1]]
    assert sigmoid(np.array([-1e4, 0, 1e4], dtype=np.float32)).tolist() == [0.0, 0.5, 1.0]
