"""Unit tests of workers.kernels.lmf: the per-click kernel against its numpy specification, in-kernel negative
sampling (exclusion, uniform / alias / DNS frequencies), prequential ranks against a brute force, touched-row
bookkeeping, guards and helpers, and learning on a planted checkerboard.

Counting negatives: with every learning rate 0 the rows never move, so each step on item ``j`` adds the same
``clip(g)²`` to its bias accumulator ``GV[j, 1]``. With global bias +10 every negative has ``σ(x) ≈ 1`` and
``|g| > clip = 0.5``, so a negative adds exactly 0.25 and a positive (``g = 1 - σ ≈ 0``) next to nothing:
``round(GV[:, 1] / 0.25)`` is the number of negative draws of each item (see :func:`_negative_counts`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import chisquare

from workers.kernels.lmf import (
    LMFParams,
    _ref_step,
    check_finite,
    event_weights,
    init_rows,
    lmf_train,
    lmf_train_reference,
    positive_set,
)
from workers.kernels.sampling import PopularitySampler, Reservoir

P_MIN = 1e-3
EMPTY = (np.zeros(0), np.zeros(0, np.int32), np.zeros(0, np.int32))
FROZEN = LMFParams(lr=0.0, lr_bias=0.0, lr_global=0.0, reg_bias=0.0, clip=0.5)  # rows never move


def _state(seed: int, n_users: int, n_items: int, k: int, scale: float = 0.3):
    """Random rows with random biases and non-zero accumulators, and a global bias."""
    rng = np.random.default_rng(seed)
    U, V = init_rows(n_users, k, rng, scale), init_rows(n_items, k, rng, scale)
    U[:, k] = rng.normal(0, 0.5, n_users)
    V[:, k] = rng.normal(0, 0.5, n_items)
    GU = rng.uniform(0, 0.5, (n_users, 2)).astype(np.float32)
    GV = rng.uniform(0, 0.5, (n_items, 2)).astype(np.float32)
    return U, GU, V, GV, np.array([-1.5])


def _copy(state):
    return tuple(a.copy() for a in state)


def _events(seed: int, n_users: int, n_items: int, e: int, exposure_share: float = 0.0):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, e).astype(np.int32)
    items = rng.integers(0, n_items, e).astype(np.int32)
    w = rng.uniform(0.2, 4.0, e).astype(np.float32)
    expo = rng.random(e) < exposure_share
    return users, items, w, expo


def _reference(state, events, neg, params):
    """The numpy specification event by event: clicks by lmf_train_reference, exposure events as one
    negative step of their own weight."""
    U, GU, V, GV, glob = state
    users, items, w, expo = events
    loss = np.zeros(users.size, np.float32)
    k = U.shape[1] - 1
    for e in range(users.size):
        if expo[e]:
            loss[e] = _ref_step(U, GU, V, GV, glob, int(users[e]), int(items[e]), 0.0, float(w[e]), params, k)
        else:
            one = (users[e : e + 1], items[e : e + 1], w[e : e + 1])
            loss[e] = lmf_train_reference(U, GU, V, GV, glob, one, neg[e : e + 1], params)[0]
    return loss


def _train(state, events, params, seed=0, positives=None, n_known=None, sampler=EMPTY, **kw):
    U, GU, V, GV, glob = state
    if positives is None:
        positives = positive_set([], [], V.shape[0], extra=len(events[0]))
    n_known = V.shape[0] if n_known is None else n_known
    return lmf_train(U, GU, V, GV, glob, events, positives, n_known, sampler, params, seed, **kw)


def _assert_state_close(a, b, atol=2e-5):
    for x, y, name in zip(a, b, ("U", "GU", "V", "GV", "glob")):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol, err_msg=name)


# ------------------------------------------------------------------- kernel == specification
SHAPES = [(1, 3, 1, 6, 1), (4, 7, 3, 40, 3), (30, 40, 8, 250, 4)]  # users, items, k, events, negatives


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("adagrad", [True, False])
def test_kernel_matches_reference_with_given_negatives(shape: tuple[int, ...], adagrad: bool) -> None:
    n_u, n_i, k, e, n_neg = shape
    state = _state(1, n_u, n_i, k)
    users, items, w, _ = _events(2, n_u, n_i, e)
    rng = np.random.default_rng(3)
    neg = rng.integers(0, n_i, (e, n_neg)).astype(np.int32)
    neg[rng.random(neg.shape) < 0.25] = -1
    p = LMFParams(negatives=n_neg, adagrad=adagrad, lr=0.2, clip=0.7, lr_global=0.05)
    ref = _copy(state)
    want = lmf_train_reference(*ref, (users, items, w), neg, p)
    loss, touched, ranks = _train(state, (users, items, w), p, given_neg=neg)
    assert loss.dtype == np.float32 and loss.shape == (e,) and ranks is None
    assert set(items.tolist()) <= set(touched.idx.tolist())
    np.testing.assert_allclose(loss, want, rtol=1e-4, atol=1e-5)
    _assert_state_close(state, ref)
    assert not np.allclose(state[4], -1.5)  # the global bias learned
    if not adagrad:  # the accumulators are untouched without AdaGrad
        np.testing.assert_array_equal(state[1], _state(1, n_u, n_i, k)[1])
        np.testing.assert_array_equal(state[3], _state(1, n_u, n_i, k)[3])


@pytest.mark.parametrize("adagrad", [True, False])
def test_kernel_matches_reference_with_exposure_events(adagrad: bool) -> None:
    n_u, n_i, k, e = 12, 20, 4, 120
    state = _state(4, n_u, n_i, k)
    events = _events(5, n_u, n_i, e, exposure_share=0.3)
    assert 10 < events[3].sum() < e - 10
    neg = np.random.default_rng(6).integers(-1, n_i, (e, 3)).astype(np.int32)
    p = LMFParams(negatives=3, adagrad=adagrad)
    ref = _copy(state)
    want = _reference(ref, events, neg, p)
    loss, _, _ = _train(state, events, p, given_neg=neg)
    np.testing.assert_allclose(loss, want, rtol=1e-4, atol=1e-5)
    _assert_state_close(state, ref)
    # an exposure event is exactly one negative step of its weight: the given negatives of its row are ignored
    one = _state(4, n_u, n_i, k)
    U0, V0 = one[0].copy(), one[2].copy()
    ev = (np.array([0], np.int32), np.array([5], np.int32), np.array([0.3], np.float32), np.array([True]))
    loss1, touched, _ = _train(one, ev, p, given_neg=np.array([[1, 2, 3]], np.int32))
    assert touched.idx.tolist() == [5]
    x = -1.5 + float(U0[0, k]) + float(V0[5, k]) + float(U0[0, :k].astype(np.float64) @ V0[5, :k])
    assert loss1[0] == pytest.approx(0.3 * math.log1p(math.exp(x)), rel=1e-5)
    assert one[2][5, k] < V0[5, k] and one[4][0] < -1.5  # pushed down


def test_minus_one_negatives_are_skipped_and_empty_batch() -> None:
    state = _state(7, 2, 4, 3)
    ref = _copy(state)
    ev = (np.array([1], np.int32), np.array([2], np.int32), np.ones(1, np.float32))
    p = LMFParams(negatives=3)
    loss, touched, _ = _train(state, ev, p, given_neg=np.full((1, 3), -1, np.int32))
    want = lmf_train_reference(*ref, ev, np.zeros((1, 0), np.int32), p)  # the positive step alone
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    _assert_state_close(state, ref, atol=1e-7)
    assert touched.idx.tolist() == [2]
    before = _copy(state)
    none = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))
    loss, touched, _ = _train(state, none, p)
    assert loss.shape == (0,) and touched.idx.size == 0
    _assert_state_close(state, before, atol=0)


def test_loss_is_the_weighted_log_loss_and_finite() -> None:
    k = 4
    U, V = np.zeros((2, k + 1), np.float32), np.zeros((10, k + 1), np.float32)
    state = (U, np.zeros((2, 2), np.float32), V, np.zeros((10, 2), np.float32), np.zeros(1))
    ev = (np.array([0, 1], np.int32), np.array([3, 4], np.int32), np.array([2.5, 1.0], np.float32))
    loss, _, _ = _train(state, ev, LMFParams(negatives=0))
    assert loss[0] == pytest.approx(2.5 * math.log(2), rel=1e-6)  # x = 0 at the first step: w · ln 2
    assert 0 < loss[1] < math.log(2)  # the global bias moved towards clicks
    state = _state(8, 20, 50, 8)
    events = _events(9, 20, 50, 400, exposure_share=0.1)
    loss, touched, _ = _train(state, events, LMFParams(), seed=3)
    assert loss.shape == (400,) and loss.dtype == np.float32 and (loss > 0).all()
    assert check_finite(loss, *state)


def test_sampled_training_is_reproducible_given_the_seed() -> None:
    events = _events(10, 10, 30, 100)
    runs = []
    for seed in (5, 5, 6):
        state = _state(11, 10, 30, 4)
        loss, _, _ = _train(state, events, LMFParams(), seed=seed, sampler=EMPTY)
        runs.append((loss, state[2]))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][1], runs[2][1])


# ------------------------------------------------------------------- clamps and clipping
def test_bias_and_global_clamps_hold() -> None:
    k = 3
    state = (np.zeros((3, k + 1), np.float32), np.zeros((3, 2), np.float32), np.zeros((5, k + 1), np.float32),
             np.zeros((5, 2), np.float32), np.zeros(1))  # fmt: skip
    ev = (np.repeat(np.arange(3, dtype=np.int32), 200), np.full(600, 1, np.int32), np.full(600, 10.0, np.float32))
    p = LMFParams(negatives=0, lr_bias=5.0, lr_global=5.0, bias_clamp=0.5, global_clamp=0.75, adagrad=False,
                  reg_bias=0.0, lr=0.0)  # fmt: skip
    _train(state, ev, p)
    U, _, V, _, glob = state
    assert V[1, k] == np.float32(0.5) and (U[:, k] == np.float32(0.5)).all()  # reached and held
    assert glob[0] == 0.75
    # without the clamps the same run goes far beyond them
    free = (np.zeros((3, k + 1), np.float32), np.zeros((3, 2), np.float32), np.zeros((5, k + 1), np.float32),
            np.zeros((5, 2), np.float32), np.zeros(1))  # fmt: skip
    _train(free, (ev[0][:3], ev[1][:3], ev[2][:3]), replace(p, bias_clamp=1e9, global_clamp=1e9))
    assert free[2][1, k] > 5 and free[4][0] > 5
    # negatives pull the other way: the clamps hold at minus the bound too
    state = (np.zeros((1, k + 1), np.float32), np.zeros((1, 2), np.float32), np.zeros((5, k + 1), np.float32),
             np.zeros((5, 2), np.float32), np.zeros(1))  # fmt: skip
    ev = (np.zeros(300, np.int32), np.zeros(300, np.int32), np.full(300, 5.0, np.float32), np.ones(300, bool))
    _train(state, ev, p)
    assert state[2][0, k] == np.float32(-0.5) and state[0][0, k] == np.float32(-0.5) and state[4][0] == -0.75


def test_gradient_clip_bounds_the_latent_step() -> None:
    rng = np.random.default_rng(3)
    k = 16
    U, V = init_rows(1, k, rng, 10.0), init_rows(2, k, rng, 10.0)
    lr, clip = 0.1, 0.5
    ev = (np.zeros(1, np.int32), np.zeros(1, np.int32), np.full(1, 100.0, np.float32))
    steps = []
    for c in (clip, 1e6):
        s = (U.copy(), np.zeros((1, 2), np.float32), V.copy(), np.zeros((2, 2), np.float32), np.zeros(1))
        _train(s, ev, LMFParams(negatives=0, lr=lr, clip=c, adagrad=False))
        steps.append((np.linalg.norm(s[0][0, :k] - U[0, :k]), np.linalg.norm(s[2][0, :k] - V[0, :k])))
    assert max(steps[0]) <= lr * clip * (1 + 1e-5) and min(steps[0]) > 0.9 * lr * clip
    assert min(steps[1]) > 10 * lr * clip  # the clip was what bounded it


def test_adagrad_shrinks_the_steps_and_accumulates_per_row() -> None:
    rng = np.random.default_rng(2)
    k = 8
    state = (init_rows(3, k, rng, 0.5), np.zeros((3, 2), np.float32), init_rows(4, k, rng, 0.5),
             np.zeros((4, 2), np.float32), np.zeros(1))  # fmt: skip
    ev = (np.zeros(1, np.int32), np.ones(1, np.int32), np.ones(1, np.float32))
    steps = []
    for _ in range(5):
        before = state[0][0].copy()
        _train(state, ev, LMFParams(negatives=1, reg=0.0), given_neg=np.array([[2]], np.int32))
        steps.append(np.linalg.norm(state[0][0, :k] - before[:k]))
    GU, GV = state[1], state[3]
    assert (GU[0] > 0).all() and (GU[1:] == 0).all()
    assert (GV[[1, 2]] > 0).all() and (GV[[0, 3]] == 0).all()
    assert steps[-1] < 0.8 * steps[0]


def test_weight_scales_the_positive_step() -> None:
    rng = np.random.default_rng(4)
    k = 8
    U, V = init_rows(1, k, rng), init_rows(1, k, rng)
    deltas = []
    for w in (1.0, 3.0):
        s = (U.copy(), np.zeros((1, 2), np.float32), V.copy(), np.zeros((1, 2), np.float32), np.zeros(1))
        ev = (np.zeros(1, np.int32), np.zeros(1, np.int32), np.full(1, w, np.float32))
        _train(s, ev, LMFParams(negatives=0, reg=0.0, adagrad=False, clip=1e6))
        deltas.append(s[0][0] - U[0])
    np.testing.assert_allclose(deltas[1], 3 * deltas[0], rtol=1e-4)


# ------------------------------------------------------------------- touched rows
def test_touched_rows_reconstruct_the_final_rows() -> None:
    state = _state(12, 15, 60, 6)
    V0, GV0 = state[2].copy(), state[3].copy()
    events = _events(13, 15, 40, 300, exposure_share=0.1)  # items 40..59 only as negatives
    loss, t, _ = _train(state, events, LMFParams(uniform_mix=0.5), seed=1)
    V, GV = state[2], state[3]
    assert t.idx.dtype == np.int32 and len(set(t.idx.tolist())) == t.idx.size  # each row once
    assert t.rows.dtype == np.float32 and t.rows.shape == (t.idx.size, V.shape[1]) and t.acc.shape == (t.idx.size, 2)
    assert set(events[1].tolist()) <= set(t.idx.tolist()) and (t.idx >= 40).any()
    np.testing.assert_array_equal(t.rows, V0[t.idx])  # the values before the batch, bit for bit
    np.testing.assert_array_equal(t.acc, GV0[t.idx])
    rest = np.setdiff1d(np.arange(V.shape[0]), t.idx)
    np.testing.assert_array_equal(V[rest], V0[rest])  # nothing else was written
    np.testing.assert_array_equal(GV[rest], GV0[rest])
    assert (V[t.idx] != V0[t.idx]).any(axis=1).all()
    delta, acc_delta = V[t.idx] - t.rows, GV[t.idx] - t.acc
    np.testing.assert_allclose(t.rows + delta, V[t.idx], rtol=0, atol=1e-6)  # orig + delta == final
    np.testing.assert_allclose(t.acc + acc_delta, GV[t.idx], rtol=0, atol=1e-6)
    assert (acc_delta >= 0).all()  # accumulators only grow


def test_touched_order_is_first_touch_with_given_negatives() -> None:
    state = _state(14, 3, 10, 2)
    ev = (np.array([0, 1, 2], np.int32), np.array([4, 2, 4], np.int32), np.ones(3, np.float32),
          np.array([False, False, True]))  # fmt: skip
    neg = np.array([[7, -1], [4, 9], [1, 1]], np.int32)
    _, t, _ = _train(state, ev, LMFParams(negatives=2), given_neg=neg)
    assert t.idx.tolist() == [4, 7, 2, 9]


# ------------------------------------------------------------------- sampled negatives
def _negative_counts(n_items: int, events, positives=None, n_known=None, sampler=EMPTY, params=FROZEN, seed=0,
                     U=None, V=None):  # fmt: skip
    """Negative draws per item of one sampled batch, by the accumulator trick of the module docstring."""
    k = 3
    U = np.zeros((int(events[0].max()) + 1, k + 1), np.float32) if U is None else U
    V = np.zeros((n_items, k + 1), np.float32) if V is None else V
    state = (U, np.zeros((U.shape[0], 2), np.float32), V, np.zeros((n_items, 2), np.float32), np.array([10.0]))
    _train(state, events, params, seed=seed, positives=positives, n_known=n_known, sampler=sampler)
    return np.rint(state[3][:, 1] / 0.25).astype(np.int64)


def _reservoir(counts) -> Reservoir:
    """A reservoir holding ``counts[i]`` clicks of each item ``i`` (frequency == count)."""
    r = Reservoir(capacity=int(np.sum(counts)) + 10)
    r.add(np.repeat(np.arange(len(counts), dtype=np.int32), counts), np.random.default_rng(0))
    return r


def _clicks(users, items):
    users = np.asarray(users, np.int32)
    return users, np.asarray(items, np.int32), np.ones(users.size, np.float32)


def test_negative_counting_trick_counts_given_negatives() -> None:
    """The counting device of the other sampling tests, checked on negatives we choose."""
    ev = _clicks([0, 0, 1], [5, 5, 6])
    neg = np.array([[1, 2, 2], [3, -1, 1], [2, 2, 2]], np.int32)
    state = (np.zeros((2, 4), np.float32), np.zeros((2, 2), np.float32), np.zeros((8, 4), np.float32),
             np.zeros((8, 2), np.float32), np.array([10.0]))  # fmt: skip
    _train(state, ev, replace(FROZEN, negatives=3), given_neg=neg)
    assert np.rint(state[3][:, 1] / 0.25).astype(int).tolist() == [0, 2, 5, 1, 0, 0, 0, 0]
    assert (state[2] == 0).all() and state[4][0] == 10.0  # frozen


@pytest.mark.parametrize("hard", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_sampled_negatives_are_never_a_known_positive_nor_the_click(hard: float, mix: float) -> None:
    """Known positives are the popular items, so the proposal hits them constantly: every hit is rejected."""
    n = 30
    sampler = PopularitySampler(_reservoir(np.r_[[200] * 6, np.ones(n - 6, int)]), alpha=1.0).tables()
    known = {0: [0, 1, 2, 3], 1: [4, 5]}
    pos = positive_set([u for u, it in known.items() for _ in it], [i for it in known.values() for i in it], n, 2000)
    e = 2000
    users = np.arange(e) % 2
    items = np.where(users == 0, 4, 7)  # user 0 clicks item 4 (user 1's positive), user 1 clicks item 7
    p = replace(FROZEN, negatives=6, hard_share=hard, uniform_mix=mix)
    # one user at a time, so every negative step on an item is that user's draw
    for u in (0, 1):
        mine = users == u
        c = _negative_counts(n, _clicks(users[mine], items[mine]), positives=pos.copy(), sampler=sampler, params=p)
        banned = known[u] + [int(items[mine][0])]
        assert c[banned].sum() == 0, (u, c)
        assert c.sum() == mine.sum() * 6  # every draw found a valid item
    # each click becomes a positive at its time: once items 10..29 were all clicked (after 20 clicks), they are
    # never negatives again
    c = _negative_counts(n, _clicks(np.zeros(1000, int), np.arange(1000) % 20 + 10), params=p, sampler=sampler)
    assert c[10:].sum() <= 19 * 6 and c.sum() == 6000


def test_exhausted_user_gets_the_last_item_or_nothing() -> None:
    n = 10
    pos = positive_set(np.zeros(8, int), np.arange(8), n, extra=500)  # known: 0..7; clicks on 8 leave only 9
    c = _negative_counts(n, _clicks(np.zeros(500, int), np.full(500, 8)), positives=pos,
                         params=replace(FROZEN, negatives=4, hard_share=0.5))  # fmt: skip
    assert c[:9].sum() == 0 and 0.5 * 2000 < c[9] <= 2000  # 20 uniform retries: rarely all miss
    pos = positive_set(np.zeros(9, int), np.arange(9), n, extra=10)
    c = _negative_counts(n, _clicks(np.zeros(10, int), np.full(10, 9)), positives=pos,
                         params=replace(FROZEN, negatives=4))  # fmt: skip
    assert c.sum() == 0  # every item is a positive: the draws give up (-1) and are skipped


def test_uniform_mix_one_is_uniform_over_the_known_items() -> None:
    n, n_known, e = 40, 25, 4000
    sampler = PopularitySampler(_reservoir(np.r_[[500], np.ones(n - 1, int)]), alpha=1.0).tables()
    c = _negative_counts(n, _clicks(np.zeros(e, int), np.full(e, 3)), n_known=n_known, sampler=sampler,
                         params=replace(FROZEN, negatives=5, hard_share=0.0, uniform_mix=1.0), seed=7)  # fmt: skip
    assert c[n_known:].sum() == 0 and c[3] == 0  # never past n_known, never the click
    rest = np.delete(c[:n_known], 3)
    assert rest.sum() == e * 5
    assert chisquare(rest).pvalue > P_MIN  # the alias table (item 0 dominant) is not used


@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_alias_proposal_frequencies_follow_f_alpha(alpha: float) -> None:
    n, e = 30, 5000
    counts = np.r_[np.arange(1, 21) ** 2, np.zeros(n - 20, int)]  # items 20..29 outside the support
    s = PopularitySampler(_reservoir(counts), alpha=alpha)
    c = _negative_counts(n, _clicks(np.zeros(e, int), np.full(e, 25)), sampler=s.tables(),
                         params=replace(FROZEN, negatives=4, hard_share=0.0, uniform_mix=0.0), seed=3)  # fmt: skip
    assert c[20:].sum() == 0 and c.sum() == 4 * e
    assert chisquare(c[:20], 4 * e * s.probabilities()[:20]).pvalue > P_MIN


def test_mixed_proposal_and_empty_table() -> None:
    n, e, mix = 20, 5000, 0.4
    counts = np.r_[np.arange(1, 11) * 10, np.zeros(10, int)]
    s = PopularitySampler(_reservoir(counts), alpha=1.0)
    p = replace(FROZEN, negatives=4, hard_share=0.0, uniform_mix=mix)
    c = _negative_counts(n, _clicks(np.zeros(e, int), np.full(e, 15)), sampler=s.tables(), params=p, seed=4)
    want = mix / n + (1 - mix) * np.r_[s.probabilities(), np.zeros(n - 10)]
    assert c[15] == 0  # the click is rejected, the others renormalised
    want = np.delete(want, 15)
    assert chisquare(np.delete(c, 15), 4 * e * want / want.sum()).pvalue > P_MIN
    c = _negative_counts(n, _clicks(np.zeros(e, int), np.full(e, 15)), params=replace(p, uniform_mix=0.0), seed=4)
    assert c[15] == 0 and chisquare(np.delete(c, 15)).pvalue > P_MIN  # empty table: uniform


def test_dns_picks_the_planted_high_scoring_item() -> None:
    n, k, e, cand = 50, 3, 3000, 8
    rng = np.random.default_rng(5)
    U = np.zeros((1, k + 1), np.float32)
    U[0, 0] = 1.0
    V = init_rows(n, k, rng, 0.1)
    V[17, 0] = 8.0  # score 8 for the user, every other item |score| < 1
    p = replace(FROZEN, negatives=2, hard_share=1.0, hard_candidates=cand, uniform_mix=1.0)
    c = _negative_counts(n, _clicks(np.zeros(e, int), np.full(e, 3)), params=p, U=U, V=V, seed=1)
    share = c[17] / c.sum()
    want = 1 - (1 - 1 / (n - 1)) ** cand  # P(item 17 is among the 8 candidates) = 15%
    assert abs(share - want) < 0.03 and share > 5 / (n - 1)
    easy = _negative_counts(n, _clicks(np.zeros(e, int), np.full(e, 3)), params=replace(p, hard_share=0.0), U=U, V=V)
    assert easy[17] / easy.sum() < 2 / (n - 1)  # the proposal share, without DNS
    # candidates are ranked by p·q_c + b_c: a huge bias plants an item as well
    V2 = V.copy()
    V2[17, 0] = 0.0
    V2[29, k] = 8.0
    c = _negative_counts(n, _clicks(np.zeros(e, int), np.full(e, 3)), params=p, U=U, V=V2, seed=1)
    assert abs(c[29] / c.sum() - want) < 0.03


def test_dns_takes_the_best_of_the_candidates() -> None:
    """With many more candidates than items every item is a candidate: the pick is the best non-positive."""
    n, k = 10, 4
    rng = np.random.default_rng(3)
    U, V = init_rows(3, k, rng, 1.0), init_rows(n, k, rng, 1.0)
    V[:, k] = rng.normal(0, 1, n)
    scores = U[:, :k].astype(np.float64) @ V[:, :k].T.astype(np.float64) + V[:, k]
    known = {0: [int(np.argmax(scores[0]))], 1: [], 2: [5]}
    pos = positive_set([0, 2], [known[0][0], 5], n, extra=10)
    p = replace(FROZEN, negatives=1, hard_share=1.0, hard_candidates=300, uniform_mix=1.0)
    for u in range(3):
        click = 9 if u != 1 else int(np.argmax(scores[1]))
        c = _negative_counts(n, _clicks(np.full(5, u), np.full(5, click)), positives=pos.copy(), params=p,
                             U=U.copy(), V=V.copy(), seed=u)  # fmt: skip
        s = scores[u].copy()
        s[known[u] + [click]] = -np.inf
        assert c[int(np.argmax(s))] == 5 and c.sum() == 5, (u, c)


# ------------------------------------------------------------------- prequential ranks
def _brute_rank(state, u, target, n_known, known, count, decayed) -> list[int]:
    U, _, V, _, _ = state
    k = U.shape[1] - 1
    s = V[:n_known, k].astype(np.float64)
    for d in range(k):  # the kernel's summation order, so equal scores stay equal
        s = s + np.float64(U[u, d]) * V[:n_known, d].astype(np.float64)
    mask = np.ones(n_known, bool)
    mask[list(known)] = False
    mask[target] = False
    out = []
    for vals in (s, count[:n_known], decayed[:n_known]):
        out += [int((vals[mask] > vals[target]).sum()), int((vals[mask] == vals[target]).sum())]
    return out


def test_ranks_equal_a_brute_force_before_each_click() -> None:
    n_u, n_i, n_known, k, e = 4, 14, 12, 3, 30
    state0 = _state(21, n_u, n_i, k)
    V = state0[2]
    V[9] = V[10] = V[11]  # identical rows: model-score ties (no negative below touches them)
    rng = np.random.default_rng(22)
    users = rng.integers(0, n_u, e).astype(np.int32)
    items = rng.integers(0, 9, e).astype(np.int32)
    items[5], items[11] = 10, 10  # two clicks on a tied item (its row moves after its first click)
    expo = np.zeros(e, bool)
    expo[[7, 19]] = True
    w = rng.uniform(0.5, 2.0, e).astype(np.float32)
    neg = rng.integers(0, 9, (e, 2)).astype(np.int32)
    events = (users, items, w, expo)
    init_known = {0: {1, 2}, 2: {7}}
    pu = [u for u, s in init_known.items() for _ in s]
    pi = [i for s in init_known.values() for i in sorted(s)]
    count0 = rng.integers(0, 4, n_i).astype(np.float64)  # many count ties
    decayed0 = rng.uniform(0, 3, n_i)
    add_c = rng.integers(1, 3, e).astype(np.float64)
    add_d = add_c * rng.uniform(0.5, 1.5, e)
    warm0 = np.array([True, False, False, True])
    rank_at = np.ones(e, bool)
    rank_at[[3, 4]] = False
    p = LMFParams(negatives=2)

    def run(n: int, ranked: bool):
        st = _copy(state0)
        pop = (count0.copy(), decayed0.copy(), add_c[:n].copy(), add_d[:n].copy())
        warm = warm0.copy()
        ev = tuple(a[:n] for a in events)
        hs = positive_set(pu, pi, n_i, extra=e)
        _, _, r = _train(st, ev, p, positives=hs, n_known=n_known, given_neg=neg[:n],
                         rank_at=rank_at[:n] if ranked else None, user_warm=warm, popularity=pop)  # fmt: skip
        return st, pop, warm, r

    final, pop, warm, ranks = run(e, True)
    assert ranks.shape == (e, 7) and ranks.dtype == np.int64
    for t in range(e):
        if expo[t] or not rank_at[t]:
            assert (ranks[t] == 0).all()
            continue
        before, pop_b, _, _ = run(t, False)  # the state right before click t, on copies
        known = set(init_known.get(int(users[t]), set()))
        known |= {int(items[s]) for s in range(t) if users[s] == users[t] and not expo[s]}
        want = _brute_rank(before, users[t], items[t], n_known, known, pop_b[0], pop_b[1])
        was_warm = bool(warm0[users[t]]) or any(users[s] == users[t] and not expo[s] for s in range(t))
        assert ranks[t].tolist() == want + [int(was_warm)], t
    assert ranks[:, 1].max() >= 1 and ranks[:, 3].max() >= 1  # ties did occur
    # the popularity arrays and warm flags were updated in place, click by click
    np.testing.assert_allclose(pop[0], count0 + np.bincount(items[~expo], add_c[~expo], n_i))
    np.testing.assert_allclose(pop[1], decayed0 + np.bincount(items[~expo], add_d[~expo], n_i))
    assert warm.tolist() == (warm0 | np.isin(np.arange(n_u), users[~expo])).tolist()
    # ranking does not change training
    plain, _, _, _ = run(e, False)
    _assert_state_close(plain, final, atol=0)


def test_cold_warm_flag_and_exposure_only_users() -> None:
    state = _state(23, 3, 6, 2)
    ev = (np.array([0, 2, 0, 1], np.int32), np.array([1, 2, 3, 4], np.int32), np.ones(4, np.float32),
          np.array([False, True, False, False]))  # fmt: skip
    warm = np.array([False, False, True])
    _, _, r = _train(state, ev, LMFParams(negatives=1), rank_at=np.ones(4, bool), user_warm=warm)
    assert r[:, 6].tolist() == [0, 0, 1, 0]  # user 0 cold then warm; user 1 cold; row 1 is an exposure
    assert warm.tolist() == [True, True, True]
    warm = np.zeros(3, bool)
    _train(_state(23, 3, 6, 2), ev, LMFParams(negatives=1), user_warm=warm)
    assert warm.tolist() == [True, True, False]  # an exposure negative alone does not make a user warm


# ------------------------------------------------------------------- positive_set, helpers, guards
def test_positive_set_holds_the_pairs_and_grows_with_clicks() -> None:
    users, items, n_items = [0, 0, 3, 3, 3], [2, 5, 2, 2, 9], 10
    tab = positive_set(users, items, n_items, extra=4)
    assert tab.dtype == np.int64 and tab.size & (tab.size - 1) == 0 and tab.size >= 2 * (5 + 4) + 16
    assert sorted(tab[tab >= 0].tolist()) == [2, 5, 32, 39]  # user * n_items + item, duplicates once
    assert positive_set([], [], 0, extra=0).size == 16 and (positive_set([], [], 5, 0) == -1).all()
    big = positive_set(np.arange(1000) % 7, np.arange(1000), 1000, extra=100)
    assert (big >= 0).sum() == 1000 and big.size >= 2 * 1100
    # the kernel adds every click at its time; a re-click or a known pair adds nothing
    state = _state(24, 4, 10, 2)
    ev = _clicks([1, 0, 1, 3], [4, 5, 4, 2])
    _train(state, ev, LMFParams(negatives=1), positives=tab)
    assert sorted(tab[tab >= 0].tolist()) == [2, 5, 14, 32, 39]


def test_event_weights() -> None:
    np.testing.assert_allclose(event_weights([1, 3, 50], "linear", cap=10), [1, 3, 10])
    np.testing.assert_allclose(event_weights([1, np.e**2, 1e9], "log", cap=10), [1, 3, 10], rtol=1e-6)
    np.testing.assert_allclose(event_weights([0.25, 0.5, 1]), [0.25, 0.5, 1])  # lighter feedback stays light
    np.testing.assert_allclose(event_weights([100]), [1 + math.log(100)], rtol=1e-6)  # default: log, cap 10
    assert event_weights([2.0]).dtype == np.float32 and event_weights([]).shape == (0,)
    with pytest.raises(ValueError, match="linear"):
        event_weights([1], "sqrt")


def test_init_rows() -> None:
    rows = init_rows(2000, 16, np.random.default_rng(0), scale=0.01)
    assert rows.dtype == np.float32 and rows.shape == (2000, 17)
    assert (rows[:, 16] == 0).all() and abs(rows[:, :16].std() - 0.01) < 5e-4 and abs(rows.mean()) < 1e-3
    np.testing.assert_array_equal(rows, init_rows(2000, 16, np.random.default_rng(0), scale=0.01))
    assert init_rows(0, 4, np.random.default_rng(0)).shape == (0, 5)


def test_check_finite() -> None:
    ok = np.ones((3, 2), np.float32)
    assert check_finite(ok, ok) and check_finite()
    for bad in (np.nan, np.inf, -np.inf):
        arr = ok.copy()
        arr[1, 1] = bad
        assert not check_finite(ok, arr)


def test_rejects_bad_inputs_with_instructions() -> None:
    U, GU, V, GV, glob = _state(0, 2, 3, 4)
    ev = _clicks([0], [1])
    p = LMFParams(negatives=1)

    def call(**kw):
        a = dict(U=U, GU=GU, V=V, GV=GV, glob=glob, events=ev, positives=positive_set([], [], 3, 1), n_known=3,
                 sampler=EMPTY, params=p, seed=0)  # fmt: skip
        a.update(kw)
        return lmf_train(**a)

    with pytest.raises(TypeError, match="float32"):
        call(U=U.astype(np.float64))
    with pytest.raises(TypeError, match="C-contiguous"):
        call(V=np.asfortranarray(V))
    ro = V.copy()
    ro.flags.writeable = False
    with pytest.raises(TypeError, match="writeable"):
        call(V=ro)
    with pytest.raises(TypeError, match=r"\(n, 5\)"):
        call(U=U[:, :4].copy())
    with pytest.raises(ValueError, match="accumulators"):
        call(GV=GV[:2].copy())
    with pytest.raises(ValueError, match="map users"):
        call(events=_clicks([2], [0]))
    with pytest.raises(ValueError, match="grow the item rows"):
        call(events=_clicks([0], [3]))
    with pytest.raises(ValueError, match="n_known"):
        call(n_known=4)
    with pytest.raises(ValueError, match=r"given_neg must be \(1, 1\)"):  # narrower: would read past the rows
        call(given_neg=np.zeros((1, 0), np.int32))
    with pytest.raises(ValueError, match="given_neg"):
        call(given_neg=np.array([[3]], np.int32))
    assert call(given_neg=np.array([[2]], np.int32))[1].idx.tolist() == [1, 2]


# ------------------------------------------------------------------- learning
def _checkerboard(n_per_group: int, block: int, clicked: int, seed: int = 0):
    """Users of group g click ``clicked`` random items of block g; the rest of their block is held out."""
    rng = np.random.default_rng(seed)
    users, items, held = [], [], {}
    for u in range(2 * n_per_group):
        g = u // n_per_group
        own = rng.permutation(block) + g * block
        users += [u] * clicked
        items += own[:clicked].tolist()
        held[u] = own[clicked:]
    return np.array(users, np.int32), np.array(items, np.int32), held


@pytest.mark.parametrize(
    "params",
    [LMFParams(negatives=4), LMFParams(negatives=4, adagrad=False, hard_share=0.0, lr=0.05, lr_bias=0.02)],
    ids=["adagrad-dns", "sgd-proposal"],
)
def test_learns_a_planted_checkerboard(params: LMFParams) -> None:
    """Two user groups x two item blocks; after a few passes each user's unclicked own-block item scores above
    every item of the other block (the collaborative signal beats the negatives drawn on it)."""
    group, block, k = 20, 10, 2
    users, items, held = _checkerboard(group, block, clicked=9)
    n_u, n_i = 2 * group, 2 * block
    rng = np.random.default_rng(7)
    state = (init_rows(n_u, k, rng, 0.1), np.zeros((n_u, 2), np.float32), init_rows(n_i, k, rng, 0.1),
             np.zeros((n_i, 2), np.float32), np.zeros(1))  # fmt: skip
    res = Reservoir(1000)
    res.add(items, rng)
    sampler = PopularitySampler(res, alpha=0.25).tables()
    losses = []
    for epoch in range(12):
        order = rng.permutation(users.size)
        pos = positive_set(users, items, n_i, extra=users.size)  # the users' seen items: never negatives
        loss, _, _ = _train(state, _clicks(users[order], items[order]), params, seed=epoch, positives=pos,
                            sampler=sampler)  # fmt: skip
        losses.append(float(loss.mean()))
    assert np.mean(losses[-3:]) < 0.7 * losses[0]
    U, _, V, _, glob = state
    assert glob[0] < 0  # clicks are rarer than negatives
    scores = U[:, :k] @ V[:, :k].T + V[:, k]
    for u, own in held.items():
        other = np.arange(block) + (0 if u >= group else block)
        assert scores[u, own].min() > scores[u, other].max(), u
