"""Implicit ALS / weighted matrix factorisation (Hu, Koren & Volinsky 2008): CG and exact solvers.

Pure kernels: arrays, scalars and a ``np.random.Generator`` in, arrays out. No I/O, no logging setup.

Problem solved. For a user x item count matrix ``F`` (CSR) every observed pair with ``f_ui > 0`` has
preference ``r_ui = 1`` and confidence ``c_ui = 1 + d_ui`` with

- ``scaling="linear"``: ``d_ui = alpha * f_ui``
- ``scaling="log"``:    ``d_ui = alpha * log(1 + f_ui / eps)``

every unobserved pair has ``r_ui = 0``, ``c_ui = 1``, and a pair with ``f_ui < 0`` (explicit negatives such
as dislikes outweigh the positives) is an **observed zero**: ``r_ui = 0`` with confidence ``1 + |d_ui|``, the
same transform of ``|f_ui|`` (stored as ``d_ui < 0``; MLlib's implicit ALS and ``implicit`` read a negative
value the same way). ALS minimises the WMF objective ::

    L(P, Q) = sum_{all u, i} c_ui (r_ui - p_u . q_i)^2 + reg (||P||^2 + ||Q||^2)

**Stored-value convention.** :func:`confidence` returns a CSR whose stored values are ``d_ui = c_ui - 1``
(the extra weight over an unobserved pair). The ``implicit`` library (0.7.x,
``implicit.cpu.als.AlternatingLeastSquares``) instead reads its stored value ``v`` as the confidence
itself after multiplying by its own ``alpha``: ``c = alpha_implicit * v`` (and ``A += (c - 1) y y^T``,
``b += c y``; a negative ``v`` means preference 0). To make implicit solve exactly our problem, feed it
``C = confidence(F, alpha, scaling)`` with ``C.data + 1`` as values and ``alpha=1.0``, the same ``reg``
(both add ``reg * I`` unscaled to the Gram matrix). Passing raw counts with ``alpha=a`` to implicit is
*not* the same problem: it gives ``c = a * f`` (no ``+1``).

Half-sweep (users; items are symmetric with ``F^T``), with ``G = Q^T Q`` computed once per half-sweep::

    p_u = (G + Q^T (C_u - I) Q + reg I)^-1 Q^T C_u r_u

costing ``O(nnz k + (m + n) k^2)`` per CG step. ``solver="cg"`` runs ``cg_steps`` conjugate-gradient
steps warm-started from the current factors (float32, like implicit); ``solver="exact"`` builds each
``A_u`` and solves it by an in-kernel Cholesky in float64 (``O(nnz k^2 + (m + n) k^3)``). Both kernels
are numba ``prange`` loops over blocks of rows, no Python loop over users.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numba
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from workers.kernels.als_numba import aligned_empty, cg_sweep, exact_sweep, observed_loss, scratch

F32 = npt.NDArray[np.float32]
Scaling = Literal["linear", "log"]  # how a count becomes confidence (see the module docstring)

__all__ = [
    "ALSDiverged",
    "Scaling",
    "FitHistory",
    "als_fit",
    "confidence",
    "fold_in",
    "wmf_loss",
]


class ALSDiverged(ValueError):
    """A factor became NaN/inf during an ALS sweep; lower ``alpha`` or raise ``reg`` and refit."""


@dataclass
class FitHistory:
    """Per-iteration record of :func:`als_fit`.

    ``loss[t]`` is the WMF objective after iteration ``t`` (empty when ``compute_loss=False``);
    ``seconds[t]`` the wall time of its two half-sweeps, excluding the loss evaluation.
    """

    loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def _check_counts(counts: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    if not sp.issparse(counts):
        raise TypeError(
            f"counts must be a scipy sparse matrix, got {type(counts).__name__}; "
            "build one with InteractionMatrix.to_csr()"
        )
    c = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    c.sum_duplicates()
    if not np.isfinite(c.data).all():
        bad = int((~np.isfinite(c.data)).sum())
        raise ValueError(f"counts hold {bad} NaN/inf values; drop or clip them before fitting")
    c.eliminate_zeros()
    return c


def confidence(
    counts_csr: sp.spmatrix | sp.sparray, alpha: float, scaling: Scaling = "linear", eps: float = 1.0
) -> sp.csr_matrix:
    """Return the extra confidence ``d = c - 1`` of every observed pair, as float32 CSR (negative for an
    observed zero: ``c = 1 + |d|``, preference 0).

    Parameters
    ----------
    counts_csr : sparse matrix, shape (n_users, n_items)
        Signed click counts ``f_ui`` (negative: explicit negatives outweigh); duplicates are summed, explicit
        zeros dropped.
    alpha : float
        Confidence scale, ``> 0``.
    scaling : {"linear", "log"}
        ``d = alpha * f`` or ``d = alpha * log(1 + f / eps)``.
    eps : float
        Count scale of the log variant, ``> 0``.

    Returns
    -------
    scipy.sparse.csr_matrix, float32, int32 indices
        Same sparsity as ``counts_csr``. The full confidence is ``1 + value``; feed implicit with
        ``value + 1`` and ``alpha=1.0`` (see the module docstring).

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> f = sp.csr_matrix(np.array([[0, 1, 3]], dtype=np.float32))
    >>> confidence(f, alpha=2.0).toarray()
    array([[0., 2., 6.]], dtype=float32)
    >>> np.round(confidence(f, alpha=2.0, scaling="log").data, 3)
    array([1.386, 2.773], dtype=float32)
    >>> confidence(sp.csr_matrix(np.array([[-1, 3]], dtype=np.float32)), alpha=2.0).toarray()
    array([[-2.,  6.]], dtype=float32)
    """
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    c = _check_counts(counts_csr)
    if scaling == "linear":
        with np.errstate(over="ignore"):  # overflow is reported below
            c.data = (np.float32(alpha) * c.data).astype(np.float32)
    elif scaling == "log":
        if not eps > 0:
            raise ValueError(f"eps must be > 0 for scaling='log', got {eps}")
        with np.errstate(over="ignore"):
            f = c.data.astype(np.float64)
            c.data = (np.sign(f) * alpha * np.log1p(np.abs(f) / eps)).astype(np.float32)
    else:
        raise ValueError(f"scaling must be 'linear' or 'log', got {scaling!r}")
    if not np.isfinite(c.data).all():
        raise ValueError(f"confidence alpha * f overflows float32 (alpha={alpha}); lower alpha or use scaling='log'")
    c.indices = c.indices.astype(np.int32, copy=False)
    c.indptr = c.indptr.astype(np.int64, copy=False)
    return c


def wmf_loss(conf: sp.csr_matrix, U: F32, V: F32, reg: float) -> float:
    """WMF objective ``sum_ui c_ui (r_ui - u.v)^2 + reg (||U||^2 + ||V||^2)`` in O(nnz k + (m+n) k^2).

    Uses ``sum_{all u,i} (u.v)^2 = sum(U^T U * V^T V)`` plus a correction on the observed pairs.

    Parameters
    ----------
    conf : csr_matrix, shape (m, n)
        Extra confidence ``d = c - 1`` as returned by :func:`confidence`.
    U : ndarray, shape (m, k), float32
    V : ndarray, shape (n, k), float32
    reg : float

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> conf = confidence(sp.csr_matrix(np.eye(2, dtype=np.float32)), alpha=1.0)
    >>> U = V = np.eye(2, dtype=np.float32)
    >>> wmf_loss(conf, U, V, reg=0.5)  # perfect fit: only the penalty 0.5 * (2 + 2)
    2.0
    """
    U64, V64 = U.astype(np.float64), V.astype(np.float64)
    base = float(((U64.T @ U64) * (V64.T @ V64)).sum())
    obs = float(observed_loss(conf.indptr, conf.indices, conf.data, U, V))
    return base + obs + reg * float((U64 * U64).sum() + (V64 * V64).sum())


def _init_factors(n: int, k: int, init: F32 | None, rng: np.random.Generator, name: str) -> F32:
    """Return an (n, k) float32 C-contiguous copy of ``init``, seeding missing (new) rows."""
    # small, positive (the first direction ~ popularity), drawn in float32 as implicit draws its own init
    new = aligned_empty((n, k))
    new[:] = rng.random((n, k), dtype=np.float32) * np.float32(0.01)
    if init is None:
        return new
    init = np.asarray(init, dtype=np.float32)
    if init.ndim != 2 or init.shape[1] != k or init.shape[0] > n:
        raise ValueError(
            f"init {name} has shape {init.shape}, expected (<= {n}, {k}); "
            f"pass factors={init.shape[-1]} or refit from scratch with init=None"
        )
    if not np.isfinite(init).all():
        raise ValueError(f"init {name} holds NaN/inf; refit from scratch with init=None")
    new[: init.shape[0]] = init
    return new


def _half_sweep(conf: sp.csr_matrix, X: F32, Y: F32, reg: float, solver: str, cg_steps: int) -> None:
    k = X.shape[1]
    if solver == "cg":
        G = aligned_empty((k, k))
        G[:] = Y.T @ Y
        G[np.diag_indices(k)] += np.float32(reg)
        cg_sweep(conf.indptr, conf.indices, conf.data, X, Y, G, cg_steps, scratch(X.shape[0], 4, k))
    else:
        Y64 = Y.astype(np.float64)
        G = Y64.T @ Y64 + reg * np.eye(k)
        exact_sweep(conf.indptr, conf.indices, conf.data, X, Y, G)


def als_fit(
    counts_csr: sp.spmatrix | sp.sparray,
    factors: int = 64,
    reg: float = 0.05,
    alpha: float = 2.0,
    iterations: int = 15,
    solver: Literal["cg", "exact"] = "cg",
    cg_steps: int = 3,
    init: tuple[F32 | None, F32 | None] | None = None,
    rng: np.random.Generator | None = None,
    callback: Callable[[int, float, float | None], None] | None = None,
    num_threads: int | None = None,
    scaling: Scaling = "linear",
    eps: float = 1.0,
    compute_loss: bool = True,
) -> tuple[F32, F32, FitHistory]:
    """Fit implicit ALS on a user x item count matrix.

    Parameters
    ----------
    counts_csr : sparse matrix, shape (m, n)
        Non-negative counts; turned into confidence by :func:`confidence` (``alpha``, ``scaling``, ``eps``).
    factors, reg, alpha, iterations : int, float, float, int
        Rank ``k``, L2 penalty, confidence scale, number of (user, item) sweep pairs.
    solver : {"cg", "exact"}
        ``cg_steps`` warm-started CG steps per row, or an exact Cholesky solve per row.
    init : (U0, V0) or None
        Warm start. Each may be None or have fewer rows than the matrix (new users/items): missing
        rows get a small random init ``U[0, 0.01)`` (as for a cold start; same scheme as implicit).
    rng : numpy Generator
        Seeds the random init (default ``np.random.default_rng(0)``).
    callback : callable(iteration, seconds, loss) or None
        Called after every iteration; ``loss`` is None when ``compute_loss=False``.
    num_threads : int or None
        numba threads for the sweeps (clamped to ``numba.config.NUMBA_NUM_THREADS``); None keeps
        numba's current setting. Restored on return.

    Returns
    -------
    U : ndarray, shape (m, k), float32
    V : ndarray, shape (n, k), float32
    history : FitHistory

    Raises
    ------
    ALSDiverged
        A factor is NaN/inf after a sweep.

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> F = sp.csr_matrix(np.kron(np.eye(2), np.ones((3, 3))).astype(np.float32))
    >>> U, V, h = als_fit(F, factors=2, reg=0.01, iterations=5, rng=np.random.default_rng(0))
    >>> S = U @ V.T  # each user's own block of items scores above the other block
    >>> bool(S[:3, :3].min() > S[:3, 3:].max() and S[3:, 3:].min() > S[3:, :3].max()), len(h.loss)
    (True, 5)
    """
    if solver not in ("cg", "exact"):
        raise ValueError(f"solver must be 'cg' or 'exact', got {solver!r}")
    if factors < 1 or iterations < 0 or cg_steps < 1 or not reg >= 0:
        raise ValueError(
            f"need factors >= 1, iterations >= 0, cg_steps >= 1, reg >= 0; got "
            f"{factors}, {iterations}, {cg_steps}, {reg}"
        )
    cui = confidence(counts_csr, alpha, scaling, eps)
    ciu = cui.T.tocsr()
    ciu.indices = ciu.indices.astype(np.int32, copy=False)
    ciu.indptr = ciu.indptr.astype(np.int64, copy=False)
    rng = np.random.default_rng(0) if rng is None else rng
    u0, v0 = (None, None) if init is None else init
    U = _init_factors(cui.shape[0], factors, u0, rng, "U")
    V = _init_factors(cui.shape[1], factors, v0, rng, "V")
    history = FitHistory()
    prev_threads = numba.get_num_threads()
    if num_threads is not None:
        cap = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]  # set at import, not in the stubs
        numba.set_num_threads(max(1, min(int(num_threads), cap)))
    try:
        for it in range(iterations):
            t0 = time.perf_counter()
            _half_sweep(cui, U, V, reg, solver, cg_steps)
            _half_sweep(ciu, V, U, reg, solver, cg_steps)
            seconds = time.perf_counter() - t0
            if not (np.isfinite(U).all() and np.isfinite(V).all()):
                raise ALSDiverged(
                    f"ALS factors became NaN/inf at iteration {it} (alpha={alpha}, "
                    f"reg={reg}, solver={solver}); lower alpha or raise reg and refit"
                )
            loss = wmf_loss(cui, U, V, reg) if compute_loss else None
            history.seconds.append(seconds)
            if loss is not None:
                history.loss.append(loss)
            if callback is not None:
                callback(it, seconds, loss)
    finally:
        numba.set_num_threads(prev_threads)
    return U, V, history


def fold_in(
    V: F32,
    item_idx: npt.ArrayLike,
    counts: npt.ArrayLike,
    reg: float,
    alpha: float,
    scaling: Scaling = "linear",
    eps: float = 1.0,
    gram: npt.NDArray[np.floating] | None = None,
) -> F32:
    """Exact factor of one (cold) user against fixed item factors.

    Solves ``(V^T V + V_I^T |D| V_I + reg I) p = V_I^T r (1 + d)`` with ``d`` from :func:`confidence` and
    ``r`` the preference (1, or 0 for an observed zero: a negative ``d``).

    Parameters
    ----------
    V : ndarray, shape (n, k), float32
    item_idx : array of int, shape (t,)
        Item rows the user interacted with (duplicates are summed).
    counts : array of float, shape (t,)
        Their signed counts ``f`` (negative: an observed zero).
    gram : ndarray, shape (k, k), optional
        Precomputed ``V^T V`` (saves ``O(n k^2)`` per call when folding in many users).

    Returns
    -------
    ndarray, shape (k,), float32

    Examples
    --------
    >>> V = np.array([[1, 0], [0, 1], [0, 0]], dtype=np.float32)
    >>> fold_in(V, [0], [1.0], reg=0.0, alpha=1.0).tolist()  # (1 + 1) p0 = 2
    [1.0, 0.0]
    """
    V = np.asarray(V, dtype=np.float32)
    idx = np.asarray(item_idx, dtype=np.int64).ravel()
    f = np.asarray(counts, dtype=np.float32).ravel()
    if idx.shape != f.shape:
        raise ValueError(f"item_idx has {idx.size} entries but counts has {f.size}; pass one count per item")
    if idx.size and (idx.min() < 0 or idx.max() >= V.shape[0]):
        raise ValueError(f"item_idx out of range [0, {V.shape[0]}); map unknown items before fold_in")
    row = sp.csr_matrix((f, idx, [0, idx.size]), shape=(1, V.shape[0]))
    d = confidence(row, alpha, scaling, eps)
    Vi = V[d.indices].astype(np.float64)
    V64 = V.astype(np.float64)
    A = (V64.T @ V64 if gram is None else np.asarray(gram, np.float64)) + reg * np.eye(V.shape[1])
    dd = d.data.astype(np.float64)
    A += (Vi * np.abs(dd)[:, None]).T @ Vi
    b = Vi.T @ np.where(dd > 0, 1.0 + dd, 0.0)
    return np.linalg.solve(A, b).astype(np.float32)
