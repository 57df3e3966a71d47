"""Unit tests of workers.kernels.calibration: recovery of a known (scale, bias), sampling, clamp, fold."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from workers.kernels.calibration import (
    MIN_SCALE,
    calibrate,
    fit_scale_bias,
    fold_scale,
    sample_pairs,
)


def _logits(a: float, b: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.standard_normal(n) * 1.5
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(a * s + b)))).astype(np.float64)
    return s, y


@pytest.mark.parametrize("a,b", [(1.0, 0.0), (3.0, -2.0), (0.4, 1.5)])
def test_recovers_known_scale_and_bias(a: float, b: float) -> None:
    s, y = _logits(a, b, 200_000, seed=7)
    fa, fb = fit_scale_bias(s, y)
    assert fa == pytest.approx(a, abs=0.05)
    assert fb == pytest.approx(b, abs=0.05)


def test_fit_is_deterministic_and_finite_on_separable_data() -> None:
    s = np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
    y = np.array([0, 0, 0, 1, 1, 1.0])
    a1, b1 = fit_scale_bias(s, y)
    assert (a1, b1) == fit_scale_bias(s, y)
    assert np.isfinite([a1, b1]).all() and a1 > 0


def test_sampled_negatives_are_unobserved_and_follow_popularity() -> None:
    rng = np.random.default_rng(0)
    m, n = 300, 50
    dense = (rng.random((m, n)) < 0.1) * rng.integers(1, 4, (m, n))
    dense[:, 0] += 5  # item 0 is by far the most popular
    dense[0] = 0
    dense[0, 1] = 1
    F = sp.csr_matrix(dense.astype(np.float32))
    u, i, y = sample_pairs(F, 1000, np.random.default_rng(1), negatives=2, power=0.75)
    assert int(y.sum()) == 1000 and (y == 0).sum() > 1900
    assert (dense[u[y == 1], i[y == 1]] > 0).all()
    assert (dense[u[y == 0], i[y == 0]] == 0).all()
    # item 0 is clicked by every user but user 0, so it can only be user 0's negative
    assert set(u[(y == 0) & (i == 0)].tolist()) <= {0}
    again = sample_pairs(F, 1000, np.random.default_rng(1), negatives=2, power=0.75)
    assert all((x == z).all() for x, z in zip((u, i, y), again))


def test_calibrate_on_informative_factors_gives_positive_scale() -> None:
    F = sp.csr_matrix(np.kron(np.eye(4), np.ones((10, 5))).astype(np.float32))
    rng = np.random.default_rng(3)
    U = (np.kron(np.eye(4), np.ones((10, 1))) + 0.1 * rng.standard_normal((40, 4))).astype(np.float32)
    V = (np.kron(np.eye(4), np.ones((5, 1))) + 0.1 * rng.standard_normal((20, 4))).astype(np.float32)
    c = calibrate(U, V, F, 500, np.random.default_rng(0))
    assert c.scale > 1.0 and not c.clamped and c.n_pos == 200
    z = c.scale * np.einsum("ij,ij->i", U[:1].repeat(20, 0), V) + c.bias
    assert (z[:5] > 0).all() and (z[5:] < 0).all()


def test_anti_correlated_factors_are_clamped_to_positive_scale() -> None:
    F = sp.csr_matrix(np.kron(np.eye(2), np.ones((5, 5))).astype(np.float32))
    U = np.kron(np.eye(2), np.ones((5, 1))).astype(np.float32)
    V = -np.kron(np.eye(2), np.ones((5, 1))).astype(np.float32)  # clicked pairs score lowest
    c = calibrate(U, V, F, 50, np.random.default_rng(0))
    assert c.clamped and c.scale == MIN_SCALE > 0 and np.isfinite(c.bias)


def test_zero_samples_is_identity() -> None:
    F = sp.csr_matrix(np.eye(3, dtype=np.float32))
    c = calibrate(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), F, 0, np.random.default_rng(0))
    assert (c.scale, c.bias) == (1.0, 0.0)


def test_fold_scale_multiplies_scores_and_keeps_float32() -> None:
    rng = np.random.default_rng(0)
    U = rng.standard_normal((5, 3)).astype(np.float32)
    V = rng.standard_normal((4, 3)).astype(np.float32)
    Uf, Vf = fold_scale(U, V, 2.5)
    assert Uf.dtype == Vf.dtype == np.float32
    np.testing.assert_allclose(Uf @ Vf.T, 2.5 * (U @ V.T), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="> 0"):
        fold_scale(U, V, -1.0)
