"""The approximate item index (workers/kernels/ann.py) and its use by the Recommender at large catalogues:
recall against exact search, exclusions inside the scan, rows added without retraining, and lookups that
match the exact Recommender (seen, hidden, ``only``, new items, generation change, the exact fallback).

Indexes here are small (2,000-20,000 rows) so that the module runs in a few seconds; the 1M-item figures
come from ``python -m bench.bench_lookup --million``.
"""

from __future__ import annotations

import fakeredis
import numpy as np
import pytest

from workers.kernels import ann
from workers.kernels.ann import ItemIndex, default_nlist
from workers.serving import lookup
from workers.serving.lookup import Recommender
from workers.serving.settings import ServeSettings
from workers.store import GLOBAL_ROW, FactorStore

K = 16
N_ITEMS, N_USERS = 2000, 8
TS = 1_700_000_000_000


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{j}" for j in range(n)]


def rows(rng: np.random.Generator, n: int, k: int = K) -> np.ndarray:
    """Rows as the bench draws them: latent N(0, 0.1^2), bias N(0, 0.5^2)."""
    out = (rng.normal(size=(n, k + 1)) * 0.1).astype(np.float32)
    out[:, -1] *= 5.0
    return out


def exact_top(items: np.ndarray, q: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    s = items @ q
    if exclude is not None:
        s[exclude] = -np.inf
    return np.argsort(-s, kind="stable")[:k]


# ------------------------------------------------------------------ the kernel
def test_recall_at_10_on_20k_rows_is_at_least_095() -> None:
    rng = np.random.default_rng(1)
    items = rows(rng, 20_000, 64)
    idx = ItemIndex.build(items, threads=1)
    assert (idx.n, idx.trained_n, idx.nlist) == (20_000, 20_000, default_nlist(20_000))
    queries = rows(rng, 200, 64)
    queries[:, -1] = 1.0
    hits = [len(set(idx.search(q, 10)[0].tolist()) & set(exact_top(items, q, 10).tolist())) for q in queries]
    assert np.mean(hits) / 10 >= 0.95


def test_every_cell_probed_is_exact_and_excluded_ids_are_skipped_inside_the_scan() -> None:
    rng = np.random.default_rng(2)
    items = rows(rng, 3000)
    idx = ItemIndex.build(items, nlist=8, nprobe=8, threads=1)
    q = np.append(rng.normal(size=K) * 0.1, 1.0).astype(np.float32)
    got, scores = idx.search(q, 20)
    assert got.tolist() == exact_top(items, q, 20).tolist()
    np.testing.assert_allclose(scores, (items @ q)[got], rtol=1e-5)
    excl = exact_top(items, q, 500)  # the 500 best: still 20 answers, the next 20
    got, _ = idx.search(q, 20, exclude=excl)
    assert got.tolist() == exact_top(items, q, 20, excl).tolist()


def test_with_rows_adds_new_ids_and_leaves_the_original_untouched() -> None:
    rng = np.random.default_rng(3)
    items = rows(rng, 2000)
    idx = ItemIndex.build(items, nlist=8, nprobe=8, threads=1)
    q = np.append(rng.normal(size=K) * 0.1, 1.0).astype(np.float32)
    star = (q * 10)[None, :]
    bigger = idx.with_rows(star)
    assert (bigger.n, bigger.trained_n, idx.n) == (2001, 2000, 2000)
    assert bigger.search(q, 1)[0].tolist() == [2000]
    assert 2000 not in idx.search(q, 50)[0].tolist()
    assert idx.with_rows(np.zeros((0, K + 1), np.float32)) is idx


def test_bad_input_and_tiny_catalogues() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        ItemIndex.build(np.zeros((0, 4), np.float32))
    tiny = ItemIndex.build(np.eye(3, dtype=np.float32))
    assert (tiny.nlist, tiny.search(np.array([0, 1, 0], np.float32), 10)[0].tolist()[0]) == (1, 1)
    assert tiny.memory_bytes > 0


# ------------------------------------------------------------------ the Recommender at a "large" catalogue
@pytest.fixture()
def store(monkeypatch: pytest.MonkeyPatch) -> FactorStore:
    monkeypatch.setattr(ann, "NPROBE", 1 << 20)  # every cell probed: the indexed answers must equal the exact
    rng = np.random.default_rng(7)
    s = FactorStore(fakeredis.FakeRedis(), namespace="ann")
    s.ensure_model(K)
    s.write_vectors(1, "user", ids("u", N_USERS), rows(rng, N_USERS) * 5)
    s.write_vectors(1, "item", ids("i", N_ITEMS), rows(rng, N_ITEMS))
    glob = np.zeros((1, K + 1), np.float32)
    glob[0, -1] = -2.0
    s.write_vectors(1, "item", [GLOBAL_ROW], glob)
    s.write_counts(1, {"i1": 5, "i2": 3})
    return s


def pair(store: FactorStore, **kw: object) -> tuple[Recommender, Recommender]:
    """(indexed, exact) recommenders over the same store (every cell probed, see ``store``)."""
    return Recommender(store, ann_min_items=1000, **kw), Recommender(store, ann_min_items=0, **kw)  # type: ignore[arg-type]


def same(a: lookup.Recommendation, b: lookup.Recommendation) -> None:
    assert (a.items, a.fallback, a.generation) == (b.items, b.fallback, b.generation)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)


def test_the_setting_default_is_the_recommender_default() -> None:
    assert ServeSettings().ann_min_items == lookup.ANN_MIN_ITEMS


def test_index_only_from_the_threshold_on(store: FactorStore) -> None:
    indexed, exact = pair(store)
    indexed.refresh()
    exact.refresh()
    assert indexed._cache is not None and indexed._cache.ann is not None and indexed._cache.ann.n == N_ITEMS
    assert exact._cache is not None and exact._cache.ann is None
    above = Recommender(store, ann_min_items=N_ITEMS + 1)
    above.refresh()
    assert above._cache is not None and above._cache.ann is None


def test_indexed_lookups_match_exact_with_seen_hidden_and_only(store: FactorStore) -> None:
    hidden: set[str] = set()
    indexed, exact = pair(store, hidden=lambda: hidden)
    for u in ids("u", N_USERS):
        same(indexed.recommend(u, 10), exact.recommend(u, 10))
    best = exact.recommend("u0", 300).items
    store.add_seen(("u0", i, TS + n) for n, i in enumerate(best[:250]))  # the 250 best are seen
    hidden |= set(best[250:260])
    r = indexed.recommend("u0", 10)
    assert not set(r.items) & set(best[:260])
    same(r, exact.recommend("u0", 10))
    same(indexed.recommend("u0", 10, exclude_seen=False), exact.recommend("u0", 10, exclude_seen=False))
    only = set(best[:5]) | set(best[250:262]) | {"i7", "i8", "nope"}  # seen, hidden and unseen members
    r = indexed.recommend("u0", 10, only=only)
    assert set(r.items) <= only - set(best[:260])
    same(r, exact.recommend("u0", 10, only=only))
    assert indexed.recommend("u0", 10, only=()).items == []
    same(indexed.recommend("stranger", 5), exact.recommend("stranger", 5))  # the fallback is unchanged
    many = indexed.recommend_many(ids("u", N_USERS), 7)
    for u, r in exact.recommend_many(ids("u", N_USERS), 7).items():
        same(many[u], r)


def test_too_few_candidates_fall_back_to_the_exact_scan(store: FactorStore, monkeypatch: pytest.MonkeyPatch) -> None:
    indexed, exact = pair(store)
    indexed.refresh()
    monkeypatch.setattr(ItemIndex, "search", lambda *a, **kw: (np.zeros(0, np.int64), np.zeros(0, np.float32)))
    same(indexed.recommend("u1", 10), exact.recommend("u1", 10))
    k_all = indexed.recommend("u1", N_ITEMS + 5)  # k beyond the catalogue: every item, exactly ranked
    assert len(k_all.items) == N_ITEMS
    same(k_all, exact.recommend("u1", N_ITEMS + 5))


def test_new_items_are_added_to_the_index_without_retraining(store: FactorStore) -> None:
    clock = [1000.0]
    indexed = Recommender(store, refresh_s=5.0, clock=lambda: clock[0], ann_min_items=1000)
    indexed.recommend("u2", 1)
    first = indexed._cache
    assert first is not None and first.ann is not None
    p, _ = store.get_vectors(1, "user", ["u2"])
    star = np.concatenate([10 * p[0, :K], [50.0]]).astype(np.float32)[None, :]
    store.write_vectors(1, "item", ["star", "star2"], np.vstack([star, star * 0.9]))
    clock[0] += 5.0
    assert indexed.recommend("u2", 2).items == ["star", "star2"]
    now = indexed._cache
    assert now is not None and now.ann is not None and now is not first
    assert (now.ann.n, now.ann.trained_n, now.ann_built_at) == (N_ITEMS + 2, N_ITEMS, first.ann_built_at)
    assert now.ids[:N_ITEMS] == first.ids[:N_ITEMS] and set(now.ids[N_ITEMS:]) == {"star", "star2"}
    assert first.ann.n == N_ITEMS  # readers of the old cache keep their index
    assert indexed.score("u2", ["star"])[0] > 0.99
    clock[0] += lookup.ANN_REBUILD_S + 1  # an old index is retrained at the next reload
    indexed.refresh(force=True)
    assert indexed._cache is not None and indexed._cache.ann is not None
    assert indexed._cache.ann.trained_n == N_ITEMS + 2


def test_without_faiss_lookups_stay_exact(store: FactorStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise ImportError("No module named 'faiss'")

    monkeypatch.setattr(ann, "_faiss", missing)
    indexed, exact = pair(store)
    same(indexed.recommend("u3", 10), exact.recommend("u3", 10))
    assert indexed._cache is not None and indexed._cache.ann is None and indexed.ann_min_items == 0


def test_a_new_generation_gets_its_own_index(store: FactorStore) -> None:
    indexed, _ = pair(store)
    indexed.refresh()
    rng = np.random.default_rng(9)
    g = store.begin_generation("als")
    store.write_vectors(g, "user", ["u0"], rows(rng, 1) * 5)
    store.write_vectors(g, "item", ids("j", 1500), rows(rng, 1500))
    store.r.hset(store.keys.meta, "live_gen", g)
    indexed.refresh(force=True)
    cache = indexed._cache
    assert cache is not None and cache.gen == g and cache.ann is not None
    assert (cache.ann.n, cache.ann.trained_n) == (1500, 1500)
    assert indexed.recommend("u0", 3).items[0].startswith("j")
