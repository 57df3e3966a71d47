"""Unit tests of workers.kernels.sampling: reservoir, popularity alias sampler, exclusion, hard and exposure negatives.

Statistical tests use fixed seeds and a chi-square goodness of fit; they pass when p > 0.001 (with the
fixed seed the outcome is deterministic, the threshold states how surprising a pass-rate would be).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from workers.kernels.exposure import ExposureTracker
from workers.kernels.sampling import (
    PopularitySampler,
    Reservoir,
    positives_csr,
    sample_negatives,
)

P_MIN = 1e-3


def _reservoir(counts: list[int], seed: int = 0) -> Reservoir:
    rng = np.random.default_rng(seed)
    items = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    rng.shuffle(items)
    r = Reservoir(capacity=len(items) + 10)  # holds everything: reservoir frequency == count
    r.add(items, rng)
    return r


COUNTS = [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 0, 4, 7]


@pytest.mark.parametrize("alpha", [0.0, 0.75, 1.0])
def test_popularity_frequencies_match_f_alpha(alpha: float) -> None:
    r = _reservoir(COUNTS)
    s = PopularitySampler(r, alpha=alpha)
    f = np.array(COUNTS, float)
    want = np.where(f > 0, f**alpha, 0.0)
    want /= want.sum()
    np.testing.assert_allclose(s.probabilities(), want, rtol=1e-12)
    n = 200_000
    draws = s.sample(n, np.random.default_rng(42))
    assert draws.dtype == np.int32
    obs = np.bincount(draws, minlength=len(COUNTS))
    assert obs[f == 0].sum() == 0  # items absent from the reservoir are never drawn
    present = f > 0
    assert chisquare(obs[present], n * want[present]).pvalue > P_MIN


def test_alias_table_is_exact_for_skewed_large_support() -> None:
    rng = np.random.default_rng(3)
    counts = rng.zipf(1.3, size=3000).clip(max=10_000)
    s = PopularitySampler(Reservoir.from_counts(counts, capacity=int(counts.sum()), rng=rng), alpha=1.0)
    n = 400_000
    obs = np.bincount(s.sample(n, rng), minlength=counts.size)
    exp = n * counts / counts.sum()
    big = exp > 50  # chi-square needs sizeable expected cells
    assert chisquare(obs[big], exp[big] * obs[big].sum() / exp[big].sum()).pvalue > P_MIN


def test_refresh_is_periodic() -> None:
    rng = np.random.default_rng(0)
    r = Reservoir(1000)
    r.add(np.zeros(10, np.int32), rng)
    s = PopularitySampler(r, alpha=1.0, refresh_every=5)
    r.add(np.ones(4, np.int32), rng)
    assert not s.maybe_refresh() and s.probabilities().tolist() == [1.0]
    r.add(np.ones(1, np.int32), rng)
    assert s.maybe_refresh()
    np.testing.assert_allclose(s.probabilities(), [10 / 15, 5 / 15])


def test_empty_sampler_says_what_to_do() -> None:
    s = PopularitySampler(Reservoir(10))
    with pytest.raises(ValueError, match="add clicks"):
        s.sample(1, np.random.default_rng(0))


def test_reservoir_keeps_capacity_and_counts() -> None:
    rng = np.random.default_rng(0)
    r = Reservoir(capacity=50)
    for _ in range(7):
        r.add(rng.integers(0, 30, size=40).astype(np.int32), rng)
    assert r.size == 50 and r.seen == 280 and r.counts.sum() == 280 and r.n_items <= 30
    assert r.frequencies().sum() == 50


@pytest.mark.parametrize("batch", [2, 7, 60])
def test_reservoir_is_uniform_over_stream(batch: int) -> None:
    """Algorithm R: each of n stream positions is kept with probability cap / n, whatever the batching."""
    n, cap, trials = 60, 12, 3000
    rng = np.random.default_rng(batch)
    kept = np.zeros(n)
    stream = np.arange(n, dtype=np.int32)  # item index == stream position
    for _ in range(trials):
        r = Reservoir(cap)
        for start in range(0, n, batch):
            r.add(stream[start : start + batch], rng)
        assert r.size == cap and len(set(r.items.tolist())) == cap
        kept[r.items] += 1
    assert chisquare(kept, np.full(n, trials * cap / n)).pvalue > P_MIN


def test_reservoir_state_round_trip() -> None:
    rng = np.random.default_rng(5)
    r = Reservoir(20)
    r.add(rng.integers(0, 9, size=55).astype(np.int32), rng)
    r2 = Reservoir.from_state(r.state())
    assert (r2.capacity, r2.size, r2.seen) == (r.capacity, r.size, r.seen)
    np.testing.assert_array_equal(r2.items[: r2.size], r.items[: r.size])
    np.testing.assert_array_equal(r2.counts, r.counts)
    with pytest.raises(ValueError, match="lacks"):
        Reservoir.from_state({"items": r.items})


def test_reservoir_from_counts() -> None:
    rng = np.random.default_rng(0)
    counts = np.array([100, 0, 50, 850])
    r = Reservoir.from_counts(counts, capacity=200, rng=rng)
    freq = r.frequencies()
    assert r.size == 200 and r.seen == 1000 and freq[1] == 0 and (freq <= counts).all()
    np.testing.assert_array_equal(r.counts, counts)
    small = Reservoir.from_counts([2, 1], capacity=10, rng=rng)
    assert small.frequencies().tolist() == [2, 1]
    # averaged over rebuilds, the reservoir follows the count distribution
    mean = np.mean([Reservoir.from_counts(counts, 200, rng).frequencies() for _ in range(300)], axis=0)
    np.testing.assert_allclose(mean, 200 * counts / 1000, atol=2.0)


def test_negatives_never_hit_positives() -> None:
    rng = np.random.default_rng(1)
    r = _reservoir(COUNTS)
    s = PopularitySampler(r, alpha=1.0)
    pos = [[10, 9, 8], [10], [], [9, 4, 12, 13, 1, 2, 3, 5, 6, 7, 8]]  # last: only item 10 is left
    neg = sample_negatives(s, *positives_csr(pos), n_neg=50, rng=rng)
    assert neg.shape == (4, 50) and neg.dtype == np.int32
    for row, p in zip(neg, pos, strict=True):
        assert not np.isin(row, p).any()
        assert (row >= 0).all()
    assert set(neg[3].tolist()) <= {0, 10, 11}  # 0 and 11 only through the uniform fallback


def test_uniform_fallback_and_exhausted_user() -> None:
    rng = np.random.default_rng(2)
    r = _reservoir([5, 5, 5])
    s = PopularitySampler(r)
    # every popular item is a positive: only the uniform fallback over [0, n_items) can answer
    neg = sample_negatives(s, *positives_csr([[0, 1, 2], [0, 1, 2, 3, 4]]), n_neg=2000, rng=rng, n_items=5)
    assert set(neg[0].tolist()) == {3, 4} and abs((neg[0] == 3).mean() - 0.5) < 0.05
    assert (neg[1] == -1).all()  # clicked everything: -1, the kernel skips it


def test_hard_negatives_take_argmax_of_candidates() -> None:
    rng = np.random.default_rng(3)
    n_items, k = 10, 4
    r = _reservoir([3] * n_items)
    s = PopularitySampler(r, alpha=0.0)
    items = rng.standard_normal((n_items, k)).astype(np.float32)
    users = rng.standard_normal((5, k)).astype(np.float32)
    pos = [[0], [1, 2], [], [9], [3]]
    # 400 candidates over 10 items: every item is a candidate, so the pick is the best non-positive
    neg = sample_negatives(
        s, *positives_csr(pos), n_neg=2, rng=rng, hard_share=1.0, m_candidates=400, user_vecs=users, item_vecs=items
    )
    scores = users @ items.T
    for b, p in enumerate(pos):
        sc = scores[b].copy()
        sc[p] = -np.inf
        assert neg[b].tolist() == [int(np.argmax(sc))] * 2


def test_hard_negatives_score_higher_than_popularity_negatives() -> None:
    rng = np.random.default_rng(4)
    n_items, k, b = 200, 8, 500
    r = Reservoir(10_000)
    r.add(rng.integers(0, n_items, 5000).astype(np.int32), rng)
    s = PopularitySampler(r)
    items = rng.standard_normal((n_items, k)).astype(np.float32)
    users = rng.standard_normal((b, k)).astype(np.float32)
    csr = positives_csr([rng.integers(0, n_items, 5) for _ in range(b)])
    kw = dict(user_vecs=users, item_vecs=items, m_candidates=8)
    hard = sample_negatives(s, *csr, n_neg=4, rng=rng, hard_share=0.5, **kw)
    easy = sample_negatives(s, *csr, n_neg=4, rng=rng, hard_share=0.0, **kw)

    def score(neg: np.ndarray) -> np.ndarray:
        return np.einsum("bk,bnk->bn", users, items[neg])

    assert score(hard[:, :2]).mean() > score(easy).mean() + 1.0
    for i, row in enumerate(hard):  # still never a positive
        assert not np.isin(row, csr[1][csr[0][i] : csr[0][i + 1]]).any()


def test_hard_negatives_need_vectors() -> None:
    s = PopularitySampler(_reservoir([1, 1]))
    with pytest.raises(ValueError, match="user_vecs"):
        sample_negatives(s, *positives_csr([[0]]), n_neg=2, rng=np.random.default_rng(0), hard_share=1.0)


def test_exposure_tracker_window_click_and_reshow() -> None:
    t = ExposureTracker()
    t.shown([1, 1, 2, 3], [10, 11, 10, 12], [1000, 1000, 2000, 500])  # out-of-order ts is fine
    assert t.clicked([1, 9], [11, 9]) == 1
    u, i = t.due(now_ts=1500, window_ms=600)  # shown before 900: only (3, 12)
    assert list(zip(u.tolist(), i.tolist(), strict=True)) == [(3, 12)] and u.dtype == np.int32
    t.shown(1, 10, 5000)  # shown again: window restarts
    u, i = t.due(now_ts=3000, window_ms=600)
    assert list(zip(u.tolist(), i.tolist(), strict=True)) == [(2, 10)]
    assert len(t) == 1 and t.due(3000, 600)[0].size == 0  # forgotten once returned
    assert t.due(6000, 600)[0].tolist() == [1]


def test_exposure_tracker_is_bounded() -> None:
    t = ExposureTracker(capacity=100)
    for ts in range(0, 300, 10):
        t.shown(np.arange(10), np.full(10, ts), ts)
    assert len(t) == 100 and t.dropped == 200
    u, i = t.due(now_ts=10_000, window_ms=0)
    assert u.size == 100 and i.min() == 200  # the oldest-shown were dropped
    for ts in range(0, 5000):  # clicks leave stale heap entries; the heap is compacted
        t.shown([1, 2], [ts, ts], ts)
        t.clicked([1], [ts])
    assert len(t) == 99 and len(t._heap) <= 2 * 100 + 1024
