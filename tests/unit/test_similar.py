"""Similar items over a fakeredis store: cosine order and scores vs a float64 brute force, the item itself
never returned, biases ignored, the batch form, the flagged popularity fallback, the hidden-items hook,
lost/empty stores, stale answers, and the unit matrix built once per load.

A generation goes live by setting ``live_gen`` (fakeredis cannot run publish's Lua), as in test_lookup.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import fakeredis
import numpy as np
import pytest

from workers.kernels.similarity import cosine_top_k, unit_rows
from workers.serving import lookup
from workers.serving.lookup import EmptyModel, NoModel, Recommender, StoreLost, sigmoid
from workers.store import GLOBAL_ROW, FactorStore

K = 6
N_ITEMS = 200
B = -0.4


@dataclass
class Model:
    store: FactorStore
    items: np.ndarray  # (N_ITEMS, K + 1): latent then bias


def names(n: int) -> list[str]:
    return [f"i{j}" for j in range(n)]


def bias_row(b: float) -> np.ndarray:
    row = np.zeros((1, K + 1), np.float32)
    row[0, -1] = b
    return row


@pytest.fixture()
def model() -> Model:
    rng = np.random.default_rng(11)
    store = FactorStore(fakeredis.FakeRedis(), namespace="sim")
    store.ensure_model(K)
    items = rng.normal(size=(N_ITEMS, K + 1)).astype(np.float32)
    store.write_vectors(1, "item", names(N_ITEMS), items)
    store.write_vectors(1, "item", [GLOBAL_ROW], bias_row(B))
    store.write_vectors(1, "user", ["u0"], rng.normal(size=(1, K + 1)).astype(np.float32))
    store.write_counts(1, {"i5": 50, "i9": 40, "i1": 30, "i3": 10})
    return Model(store, items)


def brute(items: np.ndarray, j: int) -> tuple[list[str], np.ndarray]:
    """Every other item by float64 cosine of the latent parts, best first (ties by index)."""
    lat = items[:, :K].astype(np.float64)
    cos = lat @ lat[j] / (np.linalg.norm(lat, axis=1) * np.linalg.norm(lat[j]))
    order = [int(x) for x in np.argsort(-cos, kind="stable") if x != j]
    return [f"i{x}" for x in order], cos[order]


def test_similar_matches_a_float64_cosine_brute_force(model: Model) -> None:
    rec = Recommender(model.store)
    for j in (0, 17, 199):
        want, cos = brute(model.items, j)
        r = rec.similar(f"i{j}", k=10)
        assert (r.item, r.items, r.fallback, r.generation, r.stale) == (f"i{j}", want[:10], False, 1, False)
        np.testing.assert_allclose(r.scores, cos[:10], atol=1e-5)
        every = rec.similar(f"i{j}", k=N_ITEMS + 5)  # k beyond the catalogue: every other item, once
        assert every.items == want and f"i{j}" not in every.items and len(every.items) == N_ITEMS - 1
        assert all(-1.0 <= s <= 1.0 for s in every.scores)


def test_biases_do_not_move_similarity(model: Model) -> None:
    before = Recommender(model.store).similar("i3", k=20)
    shifted = model.items.copy()
    shifted[:, K] = np.random.default_rng(0).normal(scale=50, size=N_ITEMS)
    model.store.write_vectors(1, "item", names(N_ITEMS), shifted)
    after = Recommender(model.store).similar("i3", k=20)
    assert after.items == before.items
    np.testing.assert_allclose(after.scores, before.scores, rtol=1e-6)


def test_similar_many_equals_single_calls_across_chunks(model: Model) -> None:
    rec = Recommender(model.store)
    asked = ["i4", "ghost", "i4", "i150", "i0"]
    many = rec.similar_many(asked, k=7)
    assert list(many) == ["i4", "ghost", "i150", "i0"]  # request order, duplicates collapse
    assert all(many[i] == rec.similar(i, k=7) for i in many)
    u, _ = unit_rows(model.items[:, :K])
    rows = np.arange(N_ITEMS)
    big = cosine_top_k(u, rows, 9)
    small = cosine_top_k(u, rows, 9, batch_size=7)  # 29 chunks, the last one short
    np.testing.assert_array_equal(big[0], small[0])
    np.testing.assert_array_equal(big[1], small[1])
    assert not (big[0] == rows[:, None]).any()  # no row is its own neighbour


def test_unknown_item_gets_the_flagged_popularity_fallback_of_recommend(model: Model) -> None:
    rec = Recommender(model.store)
    r = rec.similar("never-seen", k=3)
    user = rec.recommend("a-new-user", k=3)  # the cold-start fallback of recommend
    assert (r.items, r.fallback, r.generation) == (["i5", "i9", "i1"], True, 1) and user.fallback
    assert (r.items, r.scores) == (user.items, user.scores)
    want = sigmoid(np.float32(B) + model.items[[5, 9, 1], K])
    np.testing.assert_allclose(r.scores, want, rtol=1e-6)


def test_fallback_never_returns_the_item_itself(model: Model) -> None:
    """An item counted in the popularity but without a vector yet (its row not written)."""
    model.store.write_counts(1, {"fresh": 99})
    r = Recommender(model.store).similar("fresh", k=3)
    assert (r.items, r.fallback) == (["i5", "i9", "i1"], True)


def test_an_all_zero_vector_has_no_direction_and_falls_back(model: Model) -> None:
    model.store.write_vectors(1, "item", ["flat"], bias_row(2.0))
    rec = Recommender(model.store)
    r = rec.similar("flat", k=2)
    assert (r.items, r.fallback) == (["i5", "i9"], True)
    others = rec.similar("i0", k=N_ITEMS + 1)
    assert others.scores[others.items.index("flat")] == 0.0  # a candidate without direction scores 0


def test_the_hidden_hook_applies_to_every_answer(model: Model) -> None:
    hidden: set[str] = set()
    rec = Recommender(model.store, hidden=lambda: hidden)
    top = rec.similar("i0", k=3).items
    best_for_u0 = rec.recommend("u0", k=2).items
    hidden.update({top[0], "i5", best_for_u0[0], "not-an-item"})
    after = rec.similar("i0", k=3).items
    assert after[:2] == top[1:] and top[0] not in after
    assert rec.similar_many(["ghost"], k=2)["ghost"].items == ["i9", "i1"]  # the fallback too
    assert rec.recommend("ghost", k=2).items == ["i9", "i1"]
    assert best_for_u0[0] not in rec.recommend("u0", k=N_ITEMS).items
    assert "i5" not in rec.recommend_stale("u0", k=3).items and "i5" not in rec.similar_stale("x", k=3).items
    assert top[0] not in rec.similar_stale("i0", k=N_ITEMS).items


def test_the_unit_matrix_is_built_once_per_load(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = lookup.unit_rows

    def counting(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(x.shape)
        return real(x)

    monkeypatch.setattr(lookup, "unit_rows", counting)
    rec = Recommender(model.store, refresh_s=3600.0)
    for j in range(5):
        rec.similar(f"i{j}", k=3)
    rec.similar_many(names(50), k=3)
    assert calls == [(N_ITEMS, K)]
    rec.refresh(force=True)
    rec.similar("i0", k=3)
    assert calls == [(N_ITEMS, K)] * 2


def test_missing_empty_and_lost_models_are_errors(model: Model) -> None:
    with pytest.raises(NoModel, match="no model in Redis namespace 'none'"):
        Recommender(FactorStore(fakeredis.FakeRedis(), namespace="none")).similar("i0")
    empty = FactorStore(fakeredis.FakeRedis(), namespace="m")
    empty.ensure_model(K)
    empty.write_vectors(1, "item", [GLOBAL_ROW], bias_row(0.1))
    with pytest.raises(EmptyModel, match="no items yet"):
        Recommender(empty).similar("i0")
    rec = Recommender(model.store, refresh_s=3600.0)
    assert not rec.similar("i0", k=2).fallback
    with pytest.raises(ValueError, match="k=0 must be >= 1"):
        rec.similar("i0", k=0)
    model.store.r.flushall()
    for item in ("i0", "ghost"):  # a known item is answered from memory, yet the loss is reported
        with pytest.raises(StoreLost, match="is gone from Redis"):
            rec.similar(item, k=2)


def test_stale_similar_comes_from_the_cache_alone(model: Model) -> None:
    rec = Recommender(model.store, refresh_s=3600.0)
    with pytest.raises(NoModel, match="no item cache"):
        rec.similar_stale("i0")
    fresh = rec.similar("i0", k=4)
    model.store.r.flushall()
    stale = rec.similar_stale("i0", k=4)
    assert (stale.items, stale.scores, stale.fallback, stale.stale) == (fresh.items, fresh.scores, False, True)
    fb = rec.similar_stale("ghost", k=2)
    assert (fb.items, fb.fallback, fb.stale) == (["i5", "i9"], True, True)


def test_kernel_zero_rows_exclusions_and_short_catalogues() -> None:
    u, ok = unit_rows(np.array([[2, 0], [0, 0], [np.nan, 1], [1, 1]], dtype=np.float32))
    assert ok.tolist() == [True, False, False, True] and not np.isnan(u).any()
    np.testing.assert_allclose(np.linalg.norm(u[ok], axis=1), 1.0, rtol=1e-6)
    ids, s = cosine_top_k(u, [0], 10, exclude=[3])
    assert ids.tolist() == [[1, 2, -1, -1]] and s[0, :2].tolist() == [0.0, 0.0] and np.isneginf(s[0, 2:]).all()
    assert cosine_top_k(u, [], 3)[0].shape == (0, 3)
