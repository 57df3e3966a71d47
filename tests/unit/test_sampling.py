"""Unit tests of workers.kernels.sampling (reservoir, popularity alias table) and workers.kernels.exposure.

Statistical tests use fixed seeds and a chi-square goodness of fit; they pass when p > 0.001 (with the
fixed seed the outcome is deterministic, the threshold states how surprising a pass would be by chance).
The negatives themselves are drawn inside the LMF kernel: see tests/unit/test_lmf.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from workers.kernels.exposure import ExposureTracker
from workers.kernels.sampling import PopularitySampler, Reservoir

P_MIN = 1e-3
COUNTS = [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 0, 4, 7]


def _reservoir(counts: list[int] | np.ndarray, seed: int = 0) -> Reservoir:
    """A reservoir holding every click of ``counts`` (frequency == count), in random order."""
    rng = np.random.default_rng(seed)
    items = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    rng.shuffle(items)
    r = Reservoir(capacity=len(items) + 10)
    r.add(items, rng)
    return r


def _alias_distribution(prob: np.ndarray, alias: np.ndarray, support: np.ndarray, n_items: int) -> np.ndarray:
    """The exact distribution an alias table draws: column c (1/n) keeps support[c] w.p. prob[c], else alias."""
    n = support.size
    p = np.zeros(n_items)
    np.add.at(p, support, prob / n)
    np.add.at(p, support[alias], (1.0 - prob) / n)
    return p


# ------------------------------------------------------------------- Reservoir
def test_reservoir_fill_phase_counts_and_growth() -> None:
    rng = np.random.default_rng(0)
    r = Reservoir(capacity=10)
    assert (r.size, r.seen, r.n_items) == (0, 0, 0) and r.frequencies().size == 0
    r.add(np.array([3, 1, 3], np.int32), rng)
    assert r.items[: r.size].tolist() == [3, 1, 3]  # below capacity: kept in order
    assert r.counts.tolist() == [0, 1, 0, 2] and r.n_items == 4 and r.seen == 3
    r.add(np.zeros(0, np.int32), rng)  # an empty batch is a no-op
    assert (r.size, r.seen) == (3, 3)
    r.add(np.array([7], np.int64), rng)  # any integer dtype; counts grow to the largest index
    assert r.n_items == 8 and r.counts[7] == 1 and r.frequencies().tolist() == [0, 1, 0, 2, 0, 0, 0, 1]
    assert r.items.dtype == np.int32


def test_reservoir_keeps_capacity_and_all_time_counts() -> None:
    rng = np.random.default_rng(0)
    r = Reservoir(capacity=50)
    stream = rng.integers(0, 30, size=280).astype(np.int32)
    for start in range(0, 280, 40):
        r.add(stream[start : start + 40], rng)
    assert r.size == 50 and r.seen == 280
    np.testing.assert_array_equal(r.counts, np.bincount(stream, minlength=r.n_items))
    assert r.frequencies().sum() == 50 and (r.frequencies() <= r.counts).all()


def test_reservoir_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Reservoir(0)
    r = Reservoir(5)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="negative index"):
        r.add(np.array([1, -2]), rng)
    with pytest.raises(ValueError, match="integer item indices"):
        r.add(np.array([1.5]), rng)
    with pytest.raises(ValueError, match="1-d"):
        r.add(np.zeros((2, 2), np.int32), rng)
    assert (r.size, r.seen) == (0, 0)


@pytest.mark.parametrize("batch", [3, 13, 60])
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


def test_reservoir_last_write_wins_within_a_batch() -> None:
    """Capacity 1: the sequential algorithm keeps position t w.p. 1/t, so the kept item is uniform."""
    rng = np.random.default_rng(3)
    kept = np.zeros(20)
    for _ in range(4000):
        r = Reservoir(1)
        r.add(np.arange(20, dtype=np.int32), rng)  # one batch: many positions hit slot 0
        kept[r.items[0]] += 1
    assert chisquare(kept, np.full(20, 200.0)).pvalue > P_MIN


def test_reservoir_state_round_trip() -> None:
    rng = np.random.default_rng(5)
    r = Reservoir(20)
    r.add(rng.integers(0, 9, size=55).astype(np.int32), rng)
    r2 = Reservoir.from_state(r.state())
    assert (r2.capacity, r2.size, r2.seen) == (r.capacity, r.size, r.seen)
    np.testing.assert_array_equal(r2.items[: r2.size], r.items[: r.size])
    np.testing.assert_array_equal(r2.counts, r.counts)
    # the copy is independent and continues the stream identically
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    more = np.arange(9, 30, dtype=np.int32)
    r.add(more, a)
    r2.add(more, b)
    np.testing.assert_array_equal(r2.items, r.items)
    assert r2.seen == r.seen == 55 + more.size
    with pytest.raises(ValueError, match="lacks"):
        Reservoir.from_state({"items": r.items})
    bad = r.state()
    bad["items"] = np.zeros(21, np.int32)
    with pytest.raises(ValueError, match="corrupt"):
        Reservoir.from_state(bad)


def test_reservoir_from_counts() -> None:
    rng = np.random.default_rng(0)
    counts = np.array([100, 0, 50, 850])
    r = Reservoir.from_counts(counts, capacity=200, rng=rng)
    freq = r.frequencies()
    assert r.size == 200 and r.seen == 1000 and freq[1] == 0 and (freq <= counts).all()
    np.testing.assert_array_equal(r.counts, counts)
    small = Reservoir.from_counts([2, 1], capacity=10, rng=rng)
    assert small.frequencies().tolist() == [2, 1] and small.size == small.seen == 3
    empty = Reservoir.from_counts(np.zeros(3, np.int64), capacity=10, rng=rng)
    assert empty.size == 0 and empty.n_items == 3
    # averaged over rebuilds, the reservoir follows the count distribution (hypergeometric mean)
    mean = np.mean([Reservoir.from_counts(counts, 200, rng).frequencies() for _ in range(300)], axis=0)
    np.testing.assert_allclose(mean, 200 * counts / 1000, atol=2.0)
    with pytest.raises(ValueError, match="non-negative"):
        Reservoir.from_counts([1, -1], 10, rng)


# ------------------------------------------------------------------- PopularitySampler
@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_probabilities_are_f_alpha_and_draws_follow_them(alpha: float) -> None:
    s = PopularitySampler(_reservoir(COUNTS), alpha=alpha)
    f = np.array(COUNTS, float)
    want = np.where(f > 0, f**alpha, 0.0)
    want /= want.sum()
    np.testing.assert_allclose(s.probabilities(), want, rtol=1e-12)
    n = 200_000
    draws = s.sample(n, np.random.default_rng(42))
    assert draws.dtype == np.int32 and draws.shape == (n,)
    obs = np.bincount(draws, minlength=len(COUNTS))
    assert obs[f == 0].sum() == 0  # items absent from the reservoir are never drawn
    present = f > 0
    assert chisquare(obs[present], n * want[present]).pvalue > P_MIN


@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_alias_table_is_exact(alpha: float) -> None:
    """The alias table's implied distribution equals the target exactly (not just statistically)."""
    rng = np.random.default_rng(3)
    counts = rng.zipf(1.3, size=3000).clip(max=10_000)
    counts[rng.random(counts.size) < 0.3] = 0  # gaps: items outside the support
    s = PopularitySampler(Reservoir.from_counts(counts, capacity=int(counts.sum()), rng=rng), alpha=alpha)
    prob, alias, support = s.tables()
    assert support.tolist() == np.flatnonzero(counts).tolist()
    assert prob.dtype == np.float64 and alias.dtype == np.int32 and support.dtype == np.int32
    assert ((prob >= 0) & (prob <= 1 + 1e-12)).all() and alias.min() >= 0 and alias.max() < support.size
    np.testing.assert_allclose(_alias_distribution(prob, alias, support, counts.size), s.probabilities(), atol=1e-12)
    n = 400_000
    obs = np.bincount(s.sample(n, rng), minlength=counts.size)
    exp = n * s.probabilities()
    big = exp > 50  # chi-square needs sizeable expected cells
    assert chisquare(obs[big], exp[big] * obs[big].sum() / exp[big].sum()).pvalue > P_MIN


def test_alias_table_single_item_and_uniform() -> None:
    s = PopularitySampler(_reservoir([0, 0, 5]), alpha=1.0)
    prob, alias, support = s.tables()
    assert support.tolist() == [2] and prob.tolist() == [1.0]
    assert set(s.sample(100, np.random.default_rng(0)).tolist()) == {2}
    u = PopularitySampler(_reservoir([1, 3, 9, 27]), alpha=0.0)
    np.testing.assert_allclose(_alias_distribution(*u.tables(), 4), [0.25] * 4, atol=1e-12)


def test_empty_sampler_has_empty_tables_and_says_what_to_do() -> None:
    s = PopularitySampler(Reservoir(10))
    prob, alias, support = s.tables()
    assert prob.size == alias.size == support.size == 0
    assert alias.dtype == np.int32 and support.dtype == np.int32
    assert s.probabilities().size == 0
    with pytest.raises(ValueError, match="add clicks"):
        s.sample(1, np.random.default_rng(0))


def test_sampler_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="alpha"):
        PopularitySampler(Reservoir(10), alpha=1.5)
    with pytest.raises(ValueError, match="refresh_every"):
        PopularitySampler(Reservoir(10), refresh_every=0)


def test_maybe_refresh_cadence() -> None:
    rng = np.random.default_rng(0)
    r = Reservoir(1000)
    r.add(np.zeros(10, np.int32), rng)
    s = PopularitySampler(r, alpha=1.0, refresh_every=5)
    assert s.built_at == 10 and not s.maybe_refresh()
    r.add(np.ones(4, np.int32), rng)  # 4 < 5 clicks since the build: the table stays as it was
    assert not s.maybe_refresh() and s.probabilities().tolist() == [1.0] and s.n_items == 1
    r.add(np.ones(1, np.int32), rng)
    assert s.maybe_refresh() and s.built_at == 15 and s.n_items == 2
    np.testing.assert_allclose(s.probabilities(), [10 / 15, 5 / 15])
    np.testing.assert_allclose(_alias_distribution(*s.tables(), 2), [10 / 15, 5 / 15])
    assert not s.maybe_refresh()  # nothing new since
    r.add(np.full(12, 2, np.int32), rng)
    assert s.maybe_refresh() and not s.maybe_refresh() and s.probabilities()[2] == pytest.approx(12 / 27)


def test_maybe_refresh_builds_on_the_first_non_empty_reservoir() -> None:
    """A cold start: the table built on an empty reservoir is rebuilt as soon as a click arrives."""
    rng = np.random.default_rng(0)
    r = Reservoir(1000)
    s = PopularitySampler(r, alpha=1.0, refresh_every=10_000)
    assert not s.maybe_refresh()  # still empty: nothing to build
    r.add(np.array([4, 4, 1], np.int32), rng)
    assert s.maybe_refresh()  # long before refresh_every clicks
    assert s.tables()[2].tolist() == [1, 4] and s.probabilities().tolist() == pytest.approx([0, 1 / 3, 0, 0, 2 / 3])
    r.add(np.array([2], np.int32), rng)
    assert not s.maybe_refresh()  # from now on the normal cadence


def test_tables_are_the_last_build_not_the_live_reservoir() -> None:
    rng = np.random.default_rng(0)
    r = Reservoir(100)
    r.add(np.array([0, 0, 1], np.int32), rng)
    s = PopularitySampler(r, alpha=1.0, refresh_every=100)
    before = [a.copy() for a in s.tables()]
    r.add(np.full(5, 3, np.int32), rng)
    for a, b in zip(before, s.tables()):
        np.testing.assert_array_equal(a, b)
    s.refresh()
    assert s.tables()[2].tolist() == [0, 1, 3]


# ------------------------------------------------------------------- ExposureTracker
def test_exposure_tracker_window_click_and_reshow() -> None:
    t = ExposureTracker()
    t.shown([1, 1, 2, 3], [10, 11, 10, 12], [1000, 1000, 2000, 500])  # out-of-order ts is fine
    assert t.clicked([1, 9], [11, 9]) == 1
    u, i = t.due(now_ts=1500, window_ms=600)  # shown before 900: only (3, 12)
    assert list(zip(u.tolist(), i.tolist())) == [(3, 12)] and u.dtype == np.int32
    t.shown(1, 10, 5000)  # shown again: window restarts
    u, i = t.due(now_ts=3000, window_ms=600)
    assert list(zip(u.tolist(), i.tolist())) == [(2, 10)]
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
