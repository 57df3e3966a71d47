"""The approximate item index (workers/kernels/ann.py) and its use by the Recommender at large catalogues:
recall against exact search (also when the latent part decides), balanced cells, exclusions inside the scan,
rows added without retraining (too long ones in the exactly scanned side list), one OpenMP thread per search,
and lookups that match the exact Recommender (seen, hidden, ``only``, new items, generation change, the
exact fallback, seen items dropped by id or in a second scan).

Indexes here are small (2,000-20,000 rows) so that the module runs in a few seconds; the 1M-item figures
come from ``python -m bench.bench_lookup --million``.
"""

from __future__ import annotations

import dataclasses

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


def test_recall_at_10_when_the_latent_part_decides_is_at_least_095() -> None:
    """Users with 5x longer latent vectors: the ranking is no longer mostly the item bias (the inner-product
    IVF of the first version had recall 0.4 here; the lifted L2 cells do not care which part decides)."""
    rng = np.random.default_rng(4)
    items = rows(rng, 20_000, 64)
    idx = ItemIndex.build(items, threads=1)
    queries = rows(rng, 200, 64) * 5
    queries[:, -1] = 1.0
    hits = [len(set(idx.search(q, 42)[0][:10].tolist()) & set(exact_top(items, q, 10).tolist())) for q in queries]
    assert np.mean(hits) / 10 >= 0.95


def test_cells_are_balanced() -> None:
    rng = np.random.default_rng(5)
    idx = ItemIndex.build(rows(rng, 20_000, 64), threads=1)
    sizes = np.array([idx.index.invlists.list_size(c) for c in range(idx.nlist)])
    assert sizes.sum() == 20_000 and sizes.max() < 4 * sizes.mean()


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


def test_rows_longer_than_the_bound_are_kept_aside_found_and_excluded() -> None:
    rng = np.random.default_rng(6)
    items = rows(rng, 2000)
    idx = ItemIndex.build(items, nlist=8, nprobe=2, threads=1)
    q = np.append(rng.normal(size=K) * 0.1, 1.0).astype(np.float32)
    short = items[:3] * 0.5  # within the bound: lifted into the cells
    long = np.vstack([q * 20, -q * 20, q * 5])  # beyond it: the side list
    bigger = idx.with_rows(np.vstack([short, long]))
    assert (bigger.n, bigger.overflow_n, bigger.trained_n, idx.overflow_n) == (2006, 3, 2000, 0)
    assert bigger.overflow_ids.tolist() == [2003, 2004, 2005]
    got, scores = bigger.search(q, 5)
    assert got[:2].tolist() == [2003, 2005] and 2004 not in got.tolist()
    np.testing.assert_allclose(scores[:2], [float(q @ q) * 20, float(q @ q) * 5], rtol=1e-5)
    got, _ = bigger.search(q, 5, exclude=[2003, 7])
    assert got[0] == 2005 and not {2003, 7} & set(got.tolist())
    everything = ItemIndex.build(items, nlist=8, nprobe=8, threads=1).with_rows(np.vstack([short, long]))
    all_rows = np.vstack([items, short, long])
    assert everything.search(q, 30)[0].tolist() == exact_top(all_rows, q, 30).tolist()
    assert bigger.memory_bytes > idx.memory_bytes


def test_a_search_runs_on_one_openmp_thread_and_restores_the_callers_bound() -> None:
    import faiss

    rng = np.random.default_rng(8)
    idx = ItemIndex.build(rows(rng, 2000), nlist=8, threads=1)
    seen: list[int] = []

    class Spy:
        def search(self, *a: object, **kw: object) -> object:
            seen.append(faiss.omp_get_max_threads())
            return idx.index.search(*a, **kw)

    spied = dataclasses.replace(idx, index=Spy())
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    try:
        spied.search(np.ones(K + 1, np.float32), 5, exclude=[1, 2])
        assert (seen, faiss.omp_get_max_threads()) == ([1], 2)
    finally:
        faiss.omp_set_num_threads(before)


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


def test_seen_items_are_dropped_by_id_without_a_row_lookup_unless_too_many_are_on_top(
    store: FactorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    indexed, exact = pair(store)
    best = exact.recommend("u5", 200).items
    store.add_seen(("u5", i, TS + n) for n, i in enumerate(best[:5] + best[150:160]))  # 5 seen on top
    lookups: list[int] = []
    row_ids = Recommender._row_ids
    monkeypatch.setattr(Recommender, "_row_ids", staticmethod(lambda c, i: lookups.append(len(i)) or row_ids(c, i)))
    r = indexed.recommend("u5", 10)
    assert lookups == [] and not set(r.items) & set(best[:5])
    same(r, exact.recommend("u5", 10))
    store.add_seen(("u5", i, TS + 100 + n) for n, i in enumerate(best[5:120]))  # the 120 best: a second scan
    r = indexed.recommend("u5", 10)
    assert lookups == [130] and not set(r.items) & set(best[:120])
    same(r, exact.recommend("u5", 10))


def test_too_few_candidates_fall_back_to_the_exact_scan(store: FactorStore, monkeypatch: pytest.MonkeyPatch) -> None:
    indexed, exact = pair(store)
    indexed.refresh()
    monkeypatch.setattr(ItemIndex, "search", lambda *a, **kw: (np.zeros(0, np.int64), np.zeros(0, np.float32)))
    same(indexed.recommend("u1", 10), exact.recommend("u1", 10))
    store.add_seen(("u1", i, TS + n) for n, i in enumerate(exact.recommend("u1", 3).items))
    r = indexed.recommend("u1", 10)  # seen items excluded by the exact scan too
    same(r, exact.recommend("u1", 10))
    assert len(r.items) == 10
    k_all = indexed.recommend("u1", N_ITEMS + 5)  # k beyond the catalogue: every item, exactly ranked
    assert len(k_all.items) == N_ITEMS - 3
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


def test_a_long_side_list_makes_the_next_reload_retrain(store: FactorStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lookup, "ANN_MAX_OVERFLOW", 1)
    indexed, exact = pair(store)
    indexed.refresh()
    p, _ = store.get_vectors(1, "user", ["u4"])
    long = np.concatenate([20 * p[0, :K], [30.0]]).astype(np.float32)[None, :]
    store.write_vectors(1, "item", ["far1"], long)
    indexed.refresh(force=True)
    cache = indexed._cache
    assert cache is not None and cache.ann is not None
    assert (cache.ann.overflow_n, cache.ann.trained_n) == (1, N_ITEMS)  # one long row: kept aside
    same(indexed.recommend("u4", 5), exact.recommend("u4", 5))
    assert indexed.recommend("u4", 1).items == ["far1"]
    store.write_vectors(1, "item", ["far2"], long * 1.1)
    indexed.refresh(force=True)
    cache = indexed._cache
    assert cache is not None and cache.ann is not None
    assert (cache.ann.overflow_n, cache.ann.trained_n) == (0, N_ITEMS + 2)  # two would be over: retrained
    exact.refresh(force=True)
    same(indexed.recommend("u4", 5), exact.recommend("u4", 5))
    assert indexed.recommend("u4", 2).items == ["far2", "far1"]


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
