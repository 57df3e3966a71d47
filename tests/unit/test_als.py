"""Unit tests of workers.kernels.als: confidence, CG/exact solvers against a dense reference, loss, recovery."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from workers.kernels import als
from workers.kernels.als import ALSDiverged, als_fit, confidence, fold_in, wmf_loss
from workers.kernels.als_numba import ALIGN, aligned_empty
from workers.kernels.topk import recommend_from_factors


def _counts(m: int = 40, n: int = 30, density: float = 0.15, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    mask = rng.random((m, n)) < density
    return sp.csr_matrix(np.where(mask, rng.integers(1, 5, (m, n)), 0).astype(np.float32))


def _dense_solve(F: np.ndarray, Y: np.ndarray, reg: float, alpha: float) -> np.ndarray:
    """Textbook per-row solve with dense C_u: (Y^T C_u Y + reg I)^-1 Y^T C_u r_u, float64."""
    Y = Y.astype(np.float64)
    out = np.empty((F.shape[0], Y.shape[1]))
    for u in range(F.shape[0]):
        c = 1.0 + alpha * F[u]
        r = (F[u] > 0).astype(np.float64)
        out[u] = np.linalg.solve(Y.T @ (c[:, None] * Y) + reg * np.eye(Y.shape[1]), Y.T @ (c * r))
    return out


def _init(m: int, n: int, k: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        (rng.standard_normal((m, k)) * 0.1).astype(np.float32),
        (rng.standard_normal((n, k)) * 0.1).astype(np.float32),
    )


# ---- confidence ---------------------------------------------------------------------------------
def test_confidence_linear_and_log_values() -> None:
    F = sp.csr_matrix(np.array([[0, 1, 4], [2, 0, 0]], np.float32))
    lin = confidence(F, alpha=3.0)
    assert lin.dtype == np.float32 and lin.indices.dtype == np.int32
    np.testing.assert_allclose(lin.toarray(), 3.0 * F.toarray())
    lg = confidence(F, alpha=2.0, scaling="log", eps=0.5)
    np.testing.assert_allclose(lg.toarray()[F.toarray() > 0], 2.0 * np.log1p(np.array([1, 4, 2]) / 0.5), rtol=1e-6)
    assert (lg.indptr == lin.indptr).all() and (lg.indices == lin.indices).all()


def test_confidence_sums_duplicates_and_drops_explicit_zeros() -> None:
    F = sp.coo_matrix((np.array([1, 2, 0], np.float32), ([0, 0, 1], [1, 1, 0])), shape=(2, 2))
    c = confidence(F, alpha=1.0)
    assert c.nnz == 1 and c[0, 1] == 3.0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_bad_counts_rejected(bad: float) -> None:
    F = sp.csr_matrix(np.array([[1.0, bad]], np.float32))
    with pytest.raises(ValueError, match="NaN/inf"):
        confidence(F, 1.0)
    with pytest.raises(ValueError):
        als_fit(F, factors=2, iterations=1)


def test_bad_parameters_rejected() -> None:
    F = _counts()
    with pytest.raises(ValueError, match="alpha"):
        confidence(F, 0.0)
    with pytest.raises(ValueError, match="scaling"):
        confidence(F, 1.0, scaling="sqrt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="overflows"):
        confidence(F, 1e38)
    with pytest.raises(ValueError, match="solver"):
        als_fit(F, solver="lu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sparse"):
        als_fit(F.toarray())  # type: ignore[arg-type]


# ---- solvers ------------------------------------------------------------------------------------
def test_exact_solver_matches_dense_reference() -> None:
    F, (U0, V0) = _counts(), _init(40, 30, 5)
    U, V, _ = als_fit(F, factors=5, reg=0.3, alpha=2.0, iterations=1, solver="exact", init=(U0, V0))
    U_ref = _dense_solve(F.toarray(), V0, 0.3, 2.0)
    V_ref = _dense_solve(F.toarray().T, U_ref.astype(np.float32), 0.3, 2.0)
    np.testing.assert_allclose(U, U_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(V, V_ref, rtol=1e-4, atol=1e-5)


def test_cg_agrees_with_exact_after_enough_steps() -> None:
    F, init = _counts(seed=2), _init(40, 30, 6)
    ex = als_fit(F, factors=6, reg=0.1, alpha=3.0, iterations=2, solver="exact", init=init)
    cg = als_fit(F, factors=6, reg=0.1, alpha=3.0, iterations=2, solver="cg", cg_steps=12, init=init)
    np.testing.assert_allclose(cg[0], ex[0], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(cg[1], ex[1], rtol=1e-3, atol=1e-3)


def test_cg_three_steps_reaches_exact_loss_after_iterations() -> None:
    F = _counts(80, 60, seed=4)
    ex = als_fit(F, factors=8, reg=0.1, alpha=5.0, iterations=30, solver="exact")[2].loss
    cg = als_fit(F, factors=8, reg=0.1, alpha=5.0, iterations=30, solver="cg", cg_steps=3)[2].loss
    assert cg[-1] == pytest.approx(ex[-1], rel=0.02)


def test_exact_loss_never_increases() -> None:
    _, _, h = als_fit(
        _counts(60, 50, seed=5),
        factors=8,
        reg=0.05,
        alpha=10.0,
        iterations=12,
        solver="exact",
        rng=np.random.default_rng(3),
    )
    assert len(h.loss) == 12 and len(h.seconds) == 12
    assert all(b <= a * (1 + 1e-6) for a, b in zip(h.loss, h.loss[1:]))
    assert h.loss[-1] < 0.5 * h.loss[0]


def test_wmf_loss_matches_dense_objective() -> None:
    F, (U, V) = _counts(seed=6), _init(40, 30, 4)
    conf = confidence(F, 2.5)
    Fd = F.toarray()
    C, R = 1 + 2.5 * Fd, (Fd > 0).astype(np.float64)
    ref = (C * (R - U.astype(np.float64) @ V.T) ** 2).sum() + 0.7 * ((U**2).sum() + (V**2).sum())
    assert wmf_loss(conf, U, V, 0.7) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("solver", ["cg", "exact"])
def test_planted_block_structure_recovered(solver: str) -> None:
    """3 user groups x 3 item groups; each user's one withheld in-group item must rank first."""
    rng = np.random.default_rng(7)
    m, n, g = 60, 45, 3
    ug, ig = np.arange(m) % g, np.arange(n) % g
    full = (ug[:, None] == ig[None, :]).astype(np.float32)
    held = np.array([rng.choice(np.flatnonzero(full[u])) for u in range(m)])
    train = full.copy()
    train[np.arange(m), held] = 0
    train = sp.csr_matrix(train)
    U, V, _ = als_fit(train, factors=g, reg=0.05, alpha=2.0, iterations=15, solver=solver, rng=np.random.default_rng(0))
    ids, _ = recommend_from_factors(U, V, exclude_csr=train, k=1)
    assert (ids[:, 0] == held).mean() == 1.0


def test_results_are_deterministic_per_thread_count_and_agree_across_counts() -> None:
    # The sweeps are compiled with fastmath: a row's dot products may be summed in another order when its
    # scratch buffers sit at another alignment (another thread), so 1 and 2 threads agree to round-off only.
    F = _counts(100, 70, seed=8)
    fits = {
        t: [als_fit(F, factors=8, iterations=3, num_threads=t, rng=np.random.default_rng(0)) for _ in range(2)]
        for t in (1, 2)
    }
    for t in (1, 2):
        np.testing.assert_array_equal(fits[t][0][0], fits[t][1][0])
        assert fits[t][0][2].loss == fits[t][1][2].loss
    (U1, V1, h1), (U2, V2, h2) = fits[1][0], fits[2][0]
    np.testing.assert_allclose(U1 @ V1.T, U2 @ V2.T, atol=0.02)
    np.testing.assert_allclose(h1.loss, h2.loss, rtol=1e-4)


def test_divergence_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(indptr, indices, data, X, Y, G, cg_steps, work):
        X[0, 0] = np.nan

    monkeypatch.setattr(als, "cg_sweep", poisoned)
    with pytest.raises(ALSDiverged, match="lower alpha or raise reg"):
        als_fit(_counts(), factors=4, iterations=2)
    assert issubclass(ALSDiverged, ValueError)


def test_sweeps_are_bit_reproducible() -> None:
    """fastmath dot products sum in an order that depends on where their vectors start in memory; the sweeps'
    scratch and als_fit's matrices are cache-line aligned, so repeating a sweep gives the same bits (with
    numba's own 32-byte-aligned scratch, every other call differed in the last bits)."""
    rng = np.random.default_rng(3)
    conf = confidence(_counts(300, 200, 0.05), 1.0)
    Y = aligned_empty((200, 16))
    Y[:] = rng.random((200, 16), dtype=np.float32)
    X0 = rng.random((300, 16), dtype=np.float32)
    outs = set()
    for solver in ("cg", "cg", "cg", "cg"):
        X = aligned_empty(X0.shape)
        X[:] = X0
        als._half_sweep(conf, X, Y, 0.1, solver, 3)
        outs.add(X.tobytes())
    assert len(outs) == 1
    U, V, _ = als_fit(_counts(), factors=16, iterations=1)
    assert U.ctypes.data % ALIGN == 0 and V.ctypes.data % ALIGN == 0


def test_callback_and_no_loss_mode() -> None:
    seen: list[tuple[int, float, float | None]] = []
    _, _, h = als_fit(
        _counts(), factors=4, iterations=3, compute_loss=False, callback=lambda i, s, loss: seen.append((i, s, loss))
    )
    assert [s[0] for s in seen] == [0, 1, 2] and all(s[2] is None for s in seen)
    assert h.loss == [] and len(h.seconds) == 3


# ---- warm start ---------------------------------------------------------------------------------
def test_warm_start_seeds_new_rows_and_continues() -> None:
    F = _counts(50, 40, seed=9)
    U, V, h = als_fit(F[:45, :35], factors=6, iterations=10, solver="exact")
    U2, V2, h2 = als_fit(F, factors=6, iterations=1, solver="exact", init=(U, V))
    assert U2.shape == (50, 6) and V2.shape == (40, 6)
    assert np.isfinite(U2).all() and np.isfinite(V2).all()
    cold = als_fit(F, factors=6, iterations=1, solver="exact")[2].loss[0]
    assert h2.loss[0] < cold  # starting from the old solution beats a cold start
    with pytest.raises(ValueError, match="factors=6"):
        als_fit(F, factors=8, iterations=1, init=(U, V))
    with pytest.raises(ValueError, match="expected"):
        als_fit(F[:10], factors=6, iterations=1, init=(U, None))
    with pytest.raises(ValueError, match="NaN"):
        als_fit(F, factors=6, iterations=1, init=(np.full_like(U, np.nan), None))


# ---- fold-in and recommend ----------------------------------------------------------------------
def test_fold_in_matches_dense_solve() -> None:
    F, (_, V) = _counts(seed=10), _init(40, 30, 5)
    u = int(np.argmax(np.diff(F.indptr)))
    row = F[u]
    p = fold_in(V, row.indices, row.data, reg=0.2, alpha=4.0)
    ref = _dense_solve(F.toarray()[u : u + 1], V, 0.2, 4.0)[0]
    np.testing.assert_allclose(p, ref, rtol=1e-4, atol=1e-6)
    p2 = fold_in(V, row.indices, row.data, reg=0.2, alpha=4.0, gram=V.T @ V)
    np.testing.assert_allclose(p2, p, rtol=1e-4, atol=1e-6)
    assert fold_in(V, [], [], reg=0.2, alpha=4.0).tolist() == [0.0] * 5
    with pytest.raises(ValueError, match="out of range"):
        fold_in(V, [30], [1.0], reg=0.2, alpha=4.0)


def test_recommend_excludes_orders_and_batches() -> None:
    rng = np.random.default_rng(11)
    U = rng.standard_normal((7, 3)).astype(np.float32)
    V = rng.standard_normal((12, 3)).astype(np.float32)
    ex = sp.csr_matrix((rng.random((7, 12)) < 0.3).astype(np.float32))
    ids, scores = recommend_from_factors(U, V, exclude_csr=ex, k=4, batch_size=3)
    S = U @ V.T
    S[ex.toarray() > 0] = -np.inf
    ref = np.argsort(-S, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(S, ref, 1))
    assert (np.diff(scores, axis=1) <= 0).all()


def test_recommend_pads_when_too_few_items() -> None:
    V = np.eye(3, dtype=np.float32)
    ex = sp.csr_matrix(np.array([[1, 1, 0]], np.float32))
    ids, scores = recommend_from_factors(np.ones((1, 3), np.float32), V, ex, k=5)
    assert ids.tolist() == [[2, -1, -1]] and np.isneginf(scores[0, 1:]).all()
    with pytest.raises(ValueError, match="exclude_csr"):
        recommend_from_factors(np.ones((2, 3), np.float32), V, ex)


# ---- against implicit (optional) ----------------------------------------------------------------
def test_matches_implicit_with_matched_conventions() -> None:
    """Same init, same problem (implicit fed 1 + d with alpha=1): the CG iterates agree."""
    ials = pytest.importorskip("implicit.cpu.als")
    F, (U0, V0) = _counts(120, 80, seed=12), _init(120, 80, 8)
    U, V, h = als_fit(F, factors=8, reg=0.05, alpha=4.0, iterations=5, cg_steps=3, init=(U0, V0), num_threads=1)
    c = confidence(F, 4.0)
    c.data += 1
    c.indptr = c.indptr.astype(np.int32)
    model = ials.AlternatingLeastSquares(
        factors=8, regularization=0.05, alpha=1.0, iterations=5, use_cg=True, num_threads=1, random_state=0
    )
    model.user_factors, model.item_factors = U0.copy(), V0.copy()
    model.fit(c, show_progress=False)
    loss_imp = wmf_loss(confidence(F, 4.0), model.user_factors, model.item_factors, 0.05)
    assert h.loss[-1] == pytest.approx(loss_imp, rel=1e-3)
    np.testing.assert_allclose(U @ V.T, model.user_factors @ model.item_factors.T, atol=2e-2)
