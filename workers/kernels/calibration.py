"""Handoff calibration (pure): fit ``σ(a·(p·q) + b)`` on held clicks vs sampled negatives.

ALS fits ``r_ui ≈ p·q`` with a squared loss, so its scores are not logits. The online LMF worker reads
``p·q + bias`` as a logit (docs/architecture.md, "Handoff calibration"). At the swap the ALS worker fits a
scale ``a`` and a bias ``b`` by two-parameter logistic regression of

- positives: observed ``(u, i)`` pairs drawn uniformly from the snapshot's click matrix, against
- negatives: for each positive's user, an item drawn ∝ popularity^``power`` (``power=0`` is uniform)
  that the user never clicked (rejection sampling, a few rounds; leftovers are dropped),

then folds ``sqrt(a)`` into both factor sets (:func:`fold_scale`) so the LMF reads
``(sqrt(a) p)·(sqrt(a) q) + b = a·(p·q) + b`` with ``b`` stored in the generation meta.

The regression is solved by Newton's method (IRLS) on two parameters with a tiny ridge and step halving,
deterministic for a given ``rng``. ``a`` is clamped to ``>= MIN_SCALE``: a non-positive slope would mean
ALS scores anti-correlate with clicks (a broken fit) and ``sqrt(a)`` would not exist; the clamp keeps the
fold defined and :attr:`Calibration.clamped` tells the caller to log it.

Everything here takes arrays and a ``np.random.Generator``; no I/O, no logging setup.

>>> rng = np.random.default_rng(0)
>>> s = rng.standard_normal(20000)
>>> y = (rng.random(20000) < 1 / (1 + np.exp(-(2.0 * s - 1.0)))).astype(np.float64)
>>> a, b = fit_scale_bias(s, y)
>>> round(a, 1), round(b, 1)
(2.0, -1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

F32 = npt.NDArray[np.float32]
MIN_SCALE = 1e-3

__all__ = ["Calibration", "MIN_SCALE", "calibrate", "fit_bias_only", "fit_scale_bias", "fold_scale", "sample_pairs"]


@dataclass(frozen=True)
class Calibration:
    """Result of :func:`calibrate`: ``σ(scale·(p·q) + bias)`` is the click probability."""

    scale: float
    bias: float
    n_pos: int
    n_neg: int
    logloss: float
    clamped: bool = False


def _logloss(z: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> float:
    # -[y log σ(z) + (1-y) log(1-σ(z))] = log(1 + e^z) - y z, computed stably
    return float(np.mean(np.logaddexp(0.0, z) - y * z)) if z.size else 0.0


def fit_scale_bias(
    scores: npt.ArrayLike, labels: npt.ArrayLike, iterations: int = 50, ridge: float = 1e-6, tol: float = 1e-10
) -> tuple[float, float]:
    """Logistic regression ``P(y=1) = σ(a·s + b)`` on one feature, by Newton/IRLS; returns ``(a, b)``.

    Parameters
    ----------
    scores : array, shape (n,)
        The feature ``s`` (here ``p·q``).
    labels : array, shape (n,)
        0/1 labels.
    iterations : int
        Newton steps at most (2 parameters: converges in ~5-10).
    ridge : float
        L2 penalty per sample on ``(a, b)``; keeps separable data finite.
    tol : float
        Stop when the squared step is below this.

    Returns
    -------
    (a, b) : floats. ``a`` is not clamped here (see :func:`calibrate`).

    Examples
    --------
    >>> fit_scale_bias([-2.0, -1.0, 1.0, 2.0, -0.5, 0.5], [0, 0, 1, 1, 1, 0])[0] > 0
    True
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if s.shape != y.shape or s.size == 0:
        raise ValueError(f"got {s.size} scores and {y.size} labels; pass one label per score, n >= 1")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN/inf; check the factors before calibrating")
    n = s.size
    X = np.stack([s, np.ones(n)], axis=1)
    theta = np.zeros(2)
    lam = ridge * n

    def objective(t: npt.NDArray[np.float64]) -> float:
        return _logloss(X @ t, y) * n + 0.5 * lam * float(t @ t)

    f = objective(theta)
    for _ in range(iterations):
        z = X @ theta
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z) without overflow
        w = p * (1.0 - p)
        grad = X.T @ (p - y) + lam * theta
        hess = (X * w[:, None]).T @ X + lam * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:  # step halving: Newton can overshoot on nearly separable data
            cand = theta - t * step
            fc = objective(cand)
            if fc <= f:
                break
            t *= 0.5
        else:
            break
        theta, f = cand, fc
        if float((t * step) @ (t * step)) < tol:
            break
    return float(theta[0]), float(theta[1])


def sample_pairs(
    counts_csr: sp.spmatrix | sp.sparray,
    n_pos: int,
    rng: np.random.Generator,
    negatives: int = 1,
    power: float = 0.75,
    rounds: int = 8,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Positive and negative ``(user, item)`` pairs for calibration.

    Parameters
    ----------
    counts_csr : sparse matrix, shape (m, n)
        Click counts; every stored non-zero is an observed pair.
    n_pos : int
        Positives drawn uniformly without replacement from the observed pairs (all when ``>= nnz``).
    negatives : int
        Negatives drawn per positive, for the same user.
    power : float
        Negative items are drawn ∝ (column sum)^power; 0 gives uniform over items.
    rounds : int
        Rejection rounds for negatives that hit an observed pair; remaining hits are dropped.

    Returns
    -------
    users, items : int64 arrays; labels : float64 array (1 positive, 0 negative).

    Examples
    --------
    >>> F = sp.csr_matrix(np.eye(4, dtype=np.float32))
    >>> u, i, y = sample_pairs(F, 4, np.random.default_rng(0), power=0.0)
    >>> int(y.sum()), bool((F[u[y == 0], i[y == 0]] == 0).all())
    (4, True)
    """
    C = sp.csr_matrix(counts_csr, copy=True)
    C.sum_duplicates()
    C.data[C.data < 0] = 0  # explicit negatives (ALS's observed zeros) are no positives; they may be drawn
    C.eliminate_zeros()
    m, n = C.shape
    rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(C.indptr))
    cols = C.indices.astype(np.int64)
    nnz = rows.size
    take = np.sort(rng.choice(nnz, size=min(int(n_pos), nnz), replace=False)) if nnz else np.zeros(0, np.int64)
    pu, pi = rows[take], cols[take]
    observed = np.sort(rows * n + cols)  # sorted keys of observed pairs
    pop = np.asarray(C.sum(axis=0), dtype=np.float64).ravel() ** float(power) if n else np.zeros(0)
    pop = np.where(np.isfinite(pop), pop, 0.0)
    cdf = np.cumsum(pop)
    nu = np.repeat(pu, max(0, int(negatives)))
    ni = np.full(nu.size, -1, np.int64)
    todo = np.arange(nu.size)
    for _ in range(rounds):
        if todo.size == 0 or n == 0 or cdf[-1] <= 0:
            break
        draw = np.minimum(np.searchsorted(cdf, rng.random(todo.size) * cdf[-1], side="right"), n - 1)
        key = nu[todo] * n + draw
        pos = np.minimum(np.searchsorted(observed, key), max(observed.size - 1, 0))
        hit = observed[pos] == key if observed.size else np.zeros(todo.size, bool)
        ni[todo[~hit]] = draw[~hit]
        todo = todo[hit]
    ok = ni >= 0
    users = np.concatenate([pu, nu[ok]])
    items = np.concatenate([pi, ni[ok]])
    labels = np.concatenate([np.ones(pu.size), np.zeros(int(ok.sum()))])
    return users, items, labels


def calibrate(
    U: F32,
    V: F32,
    counts_csr: sp.spmatrix | sp.sparray,
    n_samples: int,
    rng: np.random.Generator,
    negatives: int = 1,
    power: float = 0.75,
) -> Calibration:
    """Fit ``(scale, bias)`` so that ``σ(scale·(U[u]·V[i]) + bias)`` is calibrated; see the module doc.

    Parameters
    ----------
    U : ndarray, shape (m, k), float32
    V : ndarray, shape (n, k), float32
    counts_csr : sparse matrix, shape (m, n)
        The clicks the factors were fitted on (positives and the "not observed" test for negatives).
    n_samples : int
        Positives to draw (``negatives`` negatives each). ``0`` returns ``scale=1, bias=0``.
    rng : numpy Generator
        Makes the sampling, hence the result, deterministic.

    Returns
    -------
    Calibration
        ``scale >= MIN_SCALE`` (``clamped`` says whether the clamp applied).

    Examples
    --------
    >>> F = sp.csr_matrix(np.kron(np.eye(2), np.ones((3, 3))).astype(np.float32))
    >>> U = V = np.kron(np.eye(2), np.ones((3, 1))).astype(np.float32)  # p.q = 1 observed, 0 not
    >>> c = calibrate(U, V, F, 100, np.random.default_rng(0))
    >>> c.scale > 1, c.bias < 0, c.n_pos
    (True, True, 18)
    """
    if n_samples <= 0:
        return Calibration(1.0, 0.0, 0, 0, float("nan"))
    U = np.asarray(U, dtype=np.float32)
    V = np.asarray(V, dtype=np.float32)
    if U.shape[0] != counts_csr.shape[0] or V.shape[0] != counts_csr.shape[1] or U.shape[1] != V.shape[1]:
        raise ValueError(
            f"U {U.shape} and V {V.shape} do not match counts {counts_csr.shape}; "
            "pass the factors fitted on this matrix"
        )
    users, items, labels = sample_pairs(counts_csr, n_samples, rng, negatives, power)
    if labels.size == 0 or labels.min() == labels.max():
        return Calibration(1.0, 0.0, int(labels.sum()), int((labels == 0).sum()), float("nan"))
    scores = np.einsum("ij,ij->i", U[users].astype(np.float64), V[items].astype(np.float64))
    a, b = fit_scale_bias(scores, labels)
    clamped = not a >= MIN_SCALE
    if clamped:
        a = MIN_SCALE
        b = fit_bias_only(scores * a, labels)
    loss = _logloss(a * scores + b, labels)
    return Calibration(float(a), float(b), int(labels.sum()), int((labels == 0).sum()), loss, clamped)


def fit_bias_only(offsets: npt.ArrayLike, labels: npt.ArrayLike, iterations: int = 50) -> float:
    """Newton fit of ``b`` in ``σ(offset + b)`` (used after clamping the scale).

    >>> round(fit_bias_only([0.0] * 4, [1, 0, 0, 0]), 4)  # log(1/3)
    -1.0986
    """
    o = np.asarray(offsets, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    b = 0.0
    for _ in range(iterations):
        p = 0.5 * (1.0 + np.tanh(0.5 * (o + b)))
        h = float((p * (1 - p)).sum()) + 1e-9
        step = float((p - y).sum()) / h
        b -= float(np.clip(step, -5.0, 5.0))
        if abs(step) < 1e-12:
            break
    return b


def fold_scale(U: F32, V: F32, scale: float) -> tuple[F32, F32]:
    """Return ``(sqrt(scale)·U, sqrt(scale)·V)`` as new float32 arrays (inputs untouched).

    >>> U, V = fold_scale(np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), 4.0)
    >>> (U @ V.T).tolist(), U.dtype
    ([[8.0]], dtype('float32'))
    """
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale {scale} must be finite and > 0; calibrate() clamps it to >= {MIN_SCALE}")
    r = np.float32(np.sqrt(scale))
    return (np.asarray(U, np.float32) * r).astype(np.float32), (np.asarray(V, np.float32) * r).astype(np.float32)
