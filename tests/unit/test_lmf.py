"""Unit tests of workers.kernels.lmf: numba kernel vs reference, learning on a planted problem, guards."""

from __future__ import annotations

import numpy as np
import pytest

from workers.kernels.lmf import (
    check_finite,
    event_weights,
    fold_in_user,
    init_rows,
    lmf_sgd,
    lmf_sgd_reference,
)


def _random_batch(seed: int, n_users: int = 30, n_items: int = 40, k: int = 8, e: int = 200):
    rng = np.random.default_rng(seed)
    U, V = init_rows(n_users, k, rng, scale=0.3), init_rows(n_items, k, rng, scale=0.3)
    users = rng.integers(0, n_users, e)
    pos = rng.integers(0, n_items, e)
    pos[::7] = -1  # exposure-negative events
    neg = rng.integers(0, n_items, (e, 3))
    neg[rng.random((e, 3)) < 0.2] = -1
    w = rng.uniform(0.5, 4.0, e).astype(np.float32)
    nw = rng.uniform(0.1, 1.0, e).astype(np.float32)
    return U, V, users, pos, neg, w, nw


@pytest.mark.parametrize("adagrad", [False, True])
@pytest.mark.parametrize("clip", [np.inf, 0.05])
def test_numba_matches_reference(adagrad: bool, clip: float) -> None:
    U, V, users, pos, neg, w, nw = _random_batch(0)
    U2, V2 = U.copy(), V.copy()
    acc = (np.zeros(len(U), np.float32), np.zeros(len(V), np.float32)) if adagrad else None
    acc2 = (acc[0].copy(), acc[1].copy()) if adagrad else None
    kw = dict(lr=0.05, reg=0.01, bias=-0.5, clip=clip, weights=w, neg_weights=nw)
    a = lmf_sgd(U, V, users, pos, neg, adagrad=acc, **kw)
    b = lmf_sgd_reference(U2, V2, users, pos, neg, adagrad=acc2, **kw)
    assert a.dtype == np.float32 and U.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(U, U2, atol=1e-5)
    np.testing.assert_allclose(V, V2, atol=1e-5)
    if adagrad:
        np.testing.assert_allclose(acc[0], acc2[0], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(acc[1], acc2[1], rtol=1e-5, atol=1e-9)


def test_skips_minus_one_and_empty_batch() -> None:
    rng = np.random.default_rng(1)
    U, V = init_rows(2, 4, rng), init_rows(3, 4, rng)
    U0, V0 = U.copy(), V.copy()
    loss = lmf_sgd(U, V, [0], [-1], [[-1, -1]], lr=0.1, reg=0.1)
    assert loss.tolist() == [0.0] and (U == U0).all() and (V == V0).all()
    assert lmf_sgd(U, V, np.zeros(0, int), np.zeros(0, int), np.zeros((0, 5), int), lr=0.1, reg=0).size == 0


def _checkerboard():
    """Users 0-9 like items 0-9, users 10-19 like items 10-19; one liked item per user is withheld."""
    n, half = 20, 10
    users, items, held = [], [], {}
    for u in range(n):
        group = np.arange(half) + (half if u >= half else 0)
        held[u] = int(group[u % half])
        for i in group:
            if i != held[u]:
                users.append(u)
                items.append(int(i))
    return np.array(users), np.array(items), held


@pytest.mark.parametrize("adagrad", [False, True])
def test_learns_checkerboard(adagrad: bool) -> None:
    rng = np.random.default_rng(7)
    users, items, held = _checkerboard()
    U, V = init_rows(20, 4, rng, scale=0.1), init_rows(20, 4, rng, scale=0.1)
    acc = (np.zeros(20, np.float32), np.zeros(20, np.float32)) if adagrad else None
    train = set(zip(users.tolist(), items.tolist(), strict=True))
    losses = []
    for _ in range(60):
        order = rng.permutation(users.size)
        neg = rng.integers(0, 20, (users.size, 3))
        # uniform negatives, with the user's training positives removed
        bad = np.array([[(u, j) in train for j in row] for u, row in zip(users[order], neg, strict=True)])
        neg[bad] = -1
        losses.append(
            lmf_sgd(U, V, users[order], items[order], neg, lr=0.3 if adagrad else 0.1, reg=0.01, adagrad=acc).mean()
        )
    assert losses[-1] < 0.5 * losses[0]
    assert np.mean(losses[-5:]) < np.mean(losses[5:10])
    scores = U @ V.T
    for u, h in held.items():
        s = scores[u].copy()
        s[[i for (uu, i) in train if uu == u]] = -np.inf  # rank among items the user has not clicked
        assert int(np.argmax(s)) == h
    if adagrad:
        assert (acc[0] > 0).all() and (acc[1] > 0).all()


def test_adagrad_touches_only_used_rows_and_shrinks_steps() -> None:
    rng = np.random.default_rng(2)
    U, V = init_rows(4, 8, rng, scale=0.5), init_rows(5, 8, rng, scale=0.5)
    gu, gv = np.zeros(4, np.float32), np.zeros(5, np.float32)
    steps = []
    for _ in range(5):
        before = U[0].copy()
        lmf_sgd(U, V, [0], [1], [[2]], lr=0.1, reg=0.0, adagrad=(gu, gv))
        steps.append(np.linalg.norm(U[0] - before))
    assert gu[0] > 0 and gu[1:].sum() == 0 and gv[[1, 2]].min() > 0 and gv[[0, 3, 4]].sum() == 0
    assert steps[-1] < steps[0]


def test_clipping_bounds_the_update() -> None:
    rng = np.random.default_rng(3)
    U, V = init_rows(1, 16, rng, scale=10.0), init_rows(2, 16, rng, scale=10.0)
    U0, V0 = U.copy(), V.copy()
    lr, clip = 0.1, 0.5
    lmf_sgd(U, V, [0], [0], [[-1]], lr=lr, reg=0.0, clip=clip, weights=[100.0])
    assert np.linalg.norm(U[0] - U0[0]) <= lr * clip * (1 + 1e-5)
    assert np.linalg.norm(V[0] - V0[0]) <= lr * clip * (1 + 1e-5)
    U1 = U0.copy()
    lmf_sgd(U1, V0.copy(), [0], [0], [[-1]], lr=lr, reg=0.0, clip=np.inf, weights=[100.0])
    assert np.linalg.norm(U1[0] - U0[0]) > 10 * lr * clip  # the clip was what bounded it


def test_weights_scale_the_positive_step() -> None:
    rng = np.random.default_rng(4)
    U, V = init_rows(1, 8, rng), init_rows(1, 8, rng)
    deltas = []
    for w in (1.0, 3.0):
        U1 = U.copy()
        lmf_sgd(U1, V.copy(), [0], [0], [[-1]], lr=0.1, reg=0.0, clip=np.inf, weights=[w])
        deltas.append(U1[0] - U[0])
    np.testing.assert_allclose(deltas[1], 3 * deltas[0], rtol=1e-4)


def test_check_finite_detects_nan_and_inf() -> None:
    ok = np.ones((3, 2), np.float32)
    assert check_finite(ok, ok)
    for bad in (np.nan, np.inf, -np.inf):
        arr = ok.copy()
        arr[1, 1] = bad
        assert not check_finite(ok, arr)


def test_rejects_bad_inputs_with_instructions() -> None:
    rng = np.random.default_rng(0)
    U, V = init_rows(2, 4, rng), init_rows(3, 4, rng)
    with pytest.raises(TypeError, match="float32"):
        lmf_sgd(U.astype(np.float64), V, [0], [0], [[1]], lr=0.1, reg=0.0)
    with pytest.raises(ValueError, match="grow the factor arrays"):
        lmf_sgd(U, V, [0], [3], [[1]], lr=0.1, reg=0.0)
    with pytest.raises(ValueError, match="one accumulator per row"):
        lmf_sgd(U, V, [0], [0], [[1]], lr=0.1, reg=0.0, adagrad=(np.zeros(2), np.zeros(3)))


def test_event_weights() -> None:
    np.testing.assert_allclose(event_weights([1, 3, 50], "linear", cap=10), [1, 3, 10])
    np.testing.assert_allclose(event_weights([1, np.e**2], "log", cap=10), [1, 3], rtol=1e-6)
    with pytest.raises(ValueError, match="linear"):
        event_weights([1], "sqrt")


def test_init_rows_scale() -> None:
    rows = init_rows(1000, 16, np.random.default_rng(0), scale=0.01)
    assert rows.dtype == np.float32 and rows.shape == (1000, 16) and abs(rows.std() - 0.01) < 1e-3


def test_fold_in_solves_normal_equations() -> None:
    rng = np.random.default_rng(5)
    V = init_rows(30, 4, rng, scale=1.0)
    idx, w, reg = np.array([3, 7, 7, 11]), np.array([1.0, 2.0, 1.0, 4.0]), 0.1
    V64 = V.astype(np.float64)
    # clicked-set only: item 7 twice adds weights (3.0)
    vs, ws = V64[[3, 7, 11]], np.array([1.0, 3.0, 4.0])
    want = np.linalg.solve(vs.T @ (vs * ws[:, None]) + reg * np.eye(4), vs.T @ ws)
    np.testing.assert_allclose(fold_in_user(V, idx, w, reg=reg), want, rtol=1e-5)
    # implicit-ALS fold-in: confidence ws on clicked, 1 on all others, targets 1 / 0
    c = np.ones(30)
    c[[3, 7, 11]] = ws
    t = np.zeros(30)
    t[[3, 7, 11]] = 1.0
    want = np.linalg.solve(V64.T @ (V64 * c[:, None]) + reg * np.eye(4), V64.T @ (c * t))
    got = fold_in_user(V, idx, w, reg=reg, gram=V64.T @ V64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reg > 0"):
        fold_in_user(V, idx, reg=0.0)


def test_fold_in_users_matches_one_by_one_including_heavy_users() -> None:
    from workers.kernels.lmf import fold_in_user, fold_in_users

    rng = np.random.default_rng(3)
    V = init_rows(300, 16, rng, scale=1.0)
    rows = np.r_[rng.integers(0, 50, 120), np.full(30, 7)]  # user 7 has > pad clicks: the fallback path
    items = rng.integers(0, 300, rows.size)
    P = fold_in_users(V, rows, items, 50, reg=0.05)
    for u in range(50):
        mine = items[rows == u]
        expected = fold_in_user(V, mine, reg=0.05) if mine.size else np.zeros(16, np.float32)
        np.testing.assert_allclose(P[u], expected, atol=1e-4)
