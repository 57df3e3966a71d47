"""Logistic matrix factorisation SGD kernels (pure): ``P(click | u, i) = σ(bias + U[u] · V[i])``.

:func:`lmf_sgd` (numba) and :func:`lmf_sgd_reference` (numpy, the spec) have identical semantics.
Each event ``e`` is processed in order:

1. positive step on ``(users[e], pos_items[e])``, skipped if ``pos_items[e] == -1``: gradient of the
   log-likelihood ``weights[e] * (1 - σ(x))``;
2. one step per ``neg_items[e, j]`` (``-1`` entries are skipped): gradient ``-neg_weights[e] * σ(x)``.

Each step updates the user row and the item row with the gradient ``g·q - reg·p`` (resp. ``g·p - reg·q``,
from the values before the step), each clipped to Euclidean norm ``clip``. The user row changes after
every step, so later steps of the event see it.

Exposure negatives (shown, not clicked) are events with ``pos_items[e] = -1``, the exposed item in
``neg_items[e, 0]``, the other columns -1, and their own weight in ``neg_weights[e]``; they can share a
batch with click events.

AdaGrad is *row-wise* (one scalar per row, as FBGEMM's row-wise AdaGrad for embeddings): the
accumulator adds the mean squared (clipped) gradient coordinate, and the step is
``lr / sqrt(G + eps)``. A scalar per row costs 4 bytes instead of 4k in the store and adapts to how
often a row is touched, which is what matters for popular vs. rare rows.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from numba import njit

__all__ = ["check_finite", "event_weights", "fold_in_user", "init_rows", "lmf_sgd", "lmf_sgd_reference"]

F32 = npt.NDArray[np.float32]
ADAGRAD_EPS = 1e-8


def _check(
    U: F32,
    V: F32,
    users: npt.ArrayLike,
    pos_items: npt.ArrayLike,
    neg_items: npt.ArrayLike,
    lr: float,
    reg: float,
    clip: float,
    adagrad: tuple[F32, F32] | None,
    weights: npt.ArrayLike | None,
    neg_weights: npt.ArrayLike | None,
) -> tuple:
    for name, m in (("U", U), ("V", V)):
        if not (
            isinstance(m, np.ndarray)
            and m.dtype == np.float32
            and m.ndim == 2
            and m.flags.c_contiguous
            and m.flags.writeable
        ):
            raise TypeError(
                f"{name} must be a writeable C-contiguous 2-d float32 array (updated in place); "
                f"got {type(m).__name__} {getattr(m, 'dtype', '')}; build it with init_rows()"
            )
    if U.shape[1] != V.shape[1]:
        raise ValueError(f"U has dim {U.shape[1]}, V has dim {V.shape[1]}; both factor sets need one k")
    u = np.ascontiguousarray(users, dtype=np.int32)
    p = np.ascontiguousarray(pos_items, dtype=np.int32)
    n = np.ascontiguousarray(neg_items, dtype=np.int32)
    e = u.shape[0]
    if n.ndim == 1 and n.size == 0:
        n = n.reshape(e, 0)
    if u.ndim != 1 or p.shape != (e,) or n.ndim != 2 or n.shape[0] != e:
        raise ValueError(
            f"users {u.shape}, pos_items {p.shape}, neg_items {n.shape}: expected (E,), (E,) and (E, n_neg)"
        )
    for name, a, lo, hi in (
        ("users", u, 0, U.shape[0]),
        ("pos_items", p, -1, V.shape[0]),
        ("neg_items", n, -1, V.shape[0]),
    ):
        if a.size and (int(a.min()) < lo or int(a.max()) >= hi):
            raise ValueError(f"{name} has indices outside [{lo}, {hi}); grow the factor arrays first")
    if not (lr > 0 and reg >= 0 and clip > 0):
        raise ValueError(f"need lr > 0, reg >= 0, clip > 0 (inf disables); got {lr}, {reg}, {clip}")
    w = np.ones(e, np.float32) if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
    nw = np.ones(e, np.float32) if neg_weights is None else np.ascontiguousarray(neg_weights, np.float32)
    if w.shape != (e,) or nw.shape != (e,):
        raise ValueError(f"weights {w.shape} and neg_weights {nw.shape} must both be ({e},), one per event")
    if adagrad is None:
        gu = gv = np.zeros(0, np.float32)
    else:
        gu, gv = adagrad
        if (
            not all(isinstance(g, np.ndarray) and g.dtype == np.float32 and g.flags.writeable for g in (gu, gv))
            or gu.shape != U.shape[:1]
            or gv.shape != V.shape[:1]
        ):
            raise ValueError(
                f"adagrad must be (GU, GV) float32 arrays of shapes ({U.shape[0]},) and "
                f"({V.shape[0]},), one accumulator per row; build them with np.zeros"
            )
    return u, p, n, w, nw, gu, gv


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _ref_step(
    p: F32, q: F32, label: float, w: float, lr: float, reg: float, bias: float, clip: float, acc: tuple | None
) -> float:
    pd, qd = p.astype(np.float64), q.astype(np.float64)
    x = bias + float(pd @ qd)
    g = w * (label - _sigmoid(x))
    gp, gq = g * qd - reg * pd, g * pd - reg * qd
    gp *= min(1.0, clip / max(float(np.linalg.norm(gp)), 1e-30))
    gq *= min(1.0, clip / max(float(np.linalg.norm(gq)), 1e-30))
    lr_p = lr_q = lr
    if acc is not None:
        gu, u, gv, i = acc
        gu[u] += np.float32(np.mean(gp * gp))
        gv[i] += np.float32(np.mean(gq * gq))
        lr_p, lr_q = lr / math.sqrt(float(gu[u]) + ADAGRAD_EPS), lr / math.sqrt(float(gv[i]) + ADAGRAD_EPS)
    p[:] = pd + lr_p * gp
    q[:] = qd + lr_q * gq
    return w * _softplus(-x if label else x)


def lmf_sgd_reference(
    U: F32,
    V: F32,
    users: npt.ArrayLike,
    pos_items: npt.ArrayLike,
    neg_items: npt.ArrayLike,
    lr: float,
    reg: float,
    bias: float = 0.0,
    clip: float = 5.0,
    adagrad: tuple[F32, F32] | None = None,
    weights: npt.ArrayLike | None = None,
    neg_weights: npt.ArrayLike | None = None,
) -> F32:
    """Plain numpy LMF SGD pass over E events; the specification :func:`lmf_sgd` must match.

    Parameters
    ----------
    U : (n_users, k) float32, updated in place.
    V : (n_items, k) float32, updated in place.
    users : (E,) user indices.
    pos_items : (E,) positive item per event, -1 for none (exposure-negative events).
    neg_items : (E, n_neg) negative items, -1 entries skipped.
    lr, reg : step size and L2 penalty applied to the touched rows at every step.
    bias : fixed scalar added to every logit (from the ALS handoff calibration).
    clip : maximum Euclidean norm of each row gradient; ``np.inf`` disables clipping.
    adagrad : optional ``(GU, GV)`` float32 row-wise accumulators, shapes (n_users,), (n_items,), updated
        in place.
    weights : (E,) weight of each positive, default 1 (see :func:`event_weights`).
    neg_weights : (E,) weight of each event's negatives, default 1.

    Returns
    -------
    (E,) float32 weighted logistic loss of each event, each term evaluated before its step.

    >>> rng = np.random.default_rng(0)
    >>> U, V = init_rows(3, 4, rng, scale=0.1), init_rows(5, 4, rng, scale=0.1)
    >>> loss = lmf_sgd_reference(U, V, [0, 1], [2, 3], [[4, -1], [0, 1]], lr=0.1, reg=0.01)
    >>> loss.shape, loss.dtype, bool(loss[0] > 2 * math.log(2) - 0.1)
    ((2,), dtype('float32'), True)
    """
    u, p, n, w, nw, gu, gv = _check(U, V, users, pos_items, neg_items, lr, reg, clip, adagrad, weights, neg_weights)
    loss = np.zeros(u.size, np.float32)
    for e in range(u.size):
        total = 0.0
        items = [(int(p[e]), 1.0, float(w[e]))] + [(int(j), 0.0, float(nw[e])) for j in n[e]]
        for i, label, wt in items:
            if i < 0:
                continue
            acc = (gu, u[e], gv, i) if adagrad is not None else None
            total += _ref_step(U[u[e]], V[i], label, wt, lr, reg, bias, clip, acc)
        loss[e] = total
    return loss


@njit(cache=True, fastmath=False, inline="always")
def _step(U, V, u, i, label, w, lr, reg, bias, clip, use_ada, GU, GV):  # pragma: no cover - compiled
    k = U.shape[1]
    x = bias
    for c in range(k):
        x += np.float64(U[u, c]) * np.float64(V[i, c])
    if x >= 0:
        sig = 1.0 / (1.0 + math.exp(-x))
    else:
        z = math.exp(x)
        sig = z / (1.0 + z)
    g = w * (label - sig)
    np2 = 0.0
    nq2 = 0.0
    for c in range(k):
        pc = np.float64(U[u, c])
        qc = np.float64(V[i, c])
        a = g * qc - reg * pc
        b = g * pc - reg * qc
        np2 += a * a
        nq2 += b * b
    sp = min(1.0, clip / max(math.sqrt(np2), 1e-30))
    sq = min(1.0, clip / max(math.sqrt(nq2), 1e-30))
    lr_p = lr
    lr_q = lr
    if use_ada:
        GU[u] += sp * sp * np2 / k
        GV[i] += sq * sq * nq2 / k
        lr_p = lr / math.sqrt(np.float64(GU[u]) + 1e-8)
        lr_q = lr / math.sqrt(np.float64(GV[i]) + 1e-8)
    for c in range(k):
        pc = np.float64(U[u, c])
        qc = np.float64(V[i, c])
        U[u, c] = pc + lr_p * sp * (g * qc - reg * pc)
        V[i, c] = qc + lr_q * sq * (g * pc - reg * qc)
    xs = -x if label > 0.5 else x
    return w * (max(xs, 0.0) + math.log1p(math.exp(-abs(xs))))


@njit(cache=True, fastmath=False, nogil=True)
def _sgd_kernel(
    U, V, users, pos, neg, w, nw, lr, reg, bias, clip, use_ada, GU, GV, loss
):  # pragma: no cover - compiled
    for e in range(users.shape[0]):
        u = users[e]
        total = 0.0
        if pos[e] >= 0:
            total += _step(U, V, u, pos[e], 1.0, np.float64(w[e]), lr, reg, bias, clip, use_ada, GU, GV)
        for j in range(neg.shape[1]):
            if neg[e, j] >= 0:
                total += _step(U, V, u, neg[e, j], 0.0, np.float64(nw[e]), lr, reg, bias, clip, use_ada, GU, GV)
        loss[e] = total


def lmf_sgd(
    U: F32,
    V: F32,
    users: npt.ArrayLike,
    pos_items: npt.ArrayLike,
    neg_items: npt.ArrayLike,
    lr: float,
    reg: float,
    bias: float = 0.0,
    clip: float = 5.0,
    adagrad: tuple[F32, F32] | None = None,
    weights: npt.ArrayLike | None = None,
    neg_weights: npt.ArrayLike | None = None,
) -> F32:
    """Numba LMF SGD pass, same parameters and semantics as :func:`lmf_sgd_reference`.

    Mutates ``U``, ``V`` (and the AdaGrad accumulators) in place; returns the (E,) float32 per-event
    loss. Compiled on first call and cached on disk (``cache=True``), no fastmath, so results match the
    reference to float32 round-off.

    >>> rng = np.random.default_rng(0)
    >>> U, V = init_rows(3, 4, rng, scale=0.1), init_rows(5, 4, rng, scale=0.1)
    >>> U2, V2 = U.copy(), V.copy()
    >>> a = lmf_sgd(U, V, [0, 1], [2, -1], [[4, -1], [0, 1]], lr=0.1, reg=0.01)
    >>> b = lmf_sgd_reference(U2, V2, [0, 1], [2, -1], [[4, -1], [0, 1]], lr=0.1, reg=0.01)
    >>> bool(np.allclose(a, b, atol=1e-6) and np.allclose(U, U2, atol=1e-6))
    True
    """
    u, p, n, w, nw, gu, gv = _check(U, V, users, pos_items, neg_items, lr, reg, clip, adagrad, weights, neg_weights)
    loss = np.zeros(u.size, np.float32)
    _sgd_kernel(
        U, V, u, p, n, w, nw, float(lr), float(reg), float(bias), float(clip), adagrad is not None, gu, gv, loss
    )
    return loss


def event_weights(counts: npt.ArrayLike, mode: str = "linear", cap: float = 10.0) -> F32:
    """Positive weight per event from its click count: ``linear`` min(c, cap), ``log`` min(1 + ln c, cap).

    >>> [round(float(x), 3) for x in event_weights([1, 4, 100], "log", cap=4.0)]
    [1.0, 2.386, 4.0]
    """
    c = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    if mode == "linear":
        w = c
    elif mode == "log":
        w = 1.0 + np.log(c)
    else:
        raise ValueError(f"weight mode {mode!r} is unknown; use 'linear' or 'log'")
    return np.minimum(w, cap).astype(np.float32)


def check_finite(*arrays: npt.ArrayLike) -> bool:
    """True if every value of every array is finite; run it before writing factors to the store.

    >>> check_finite(np.ones(3, np.float32), np.array([1.0, np.nan], np.float32))
    False
    """
    return all(bool(np.isfinite(a).all()) for a in arrays)


def init_rows(n: int, k: int, rng: np.random.Generator, scale: float = 0.01) -> F32:
    """``n`` new factor rows of dim ``k``: float32 normal noise with standard deviation ``scale``.

    >>> init_rows(2, 3, np.random.default_rng(0)).dtype
    dtype('float32')
    """
    return rng.standard_normal((n, k), dtype=np.float32) * np.float32(scale)


def fold_in_user(
    V_items: F32,
    item_idx: npt.ArrayLike,
    weights: npt.ArrayLike | None = None,
    reg: float = 0.1,
    gram: npt.NDArray[np.float64] | None = None,
) -> F32:
    """Least-squares vector of a new user from the items they clicked, against fixed item vectors.

    Without ``gram``: ridge fit of ``p · q_i ≈ 1`` on the clicked set S only,
    ``(V_Sᵀ W V_S + reg I) p = V_Sᵀ w``. With ``gram = V.T @ V`` (float64, precomputed once per
    batch): the implicit-ALS fold-in, every other item a 0 target of weight 1,
    ``(VᵀV + V_Sᵀ (W - I) V_S + reg I) p = V_Sᵀ w``. Repeated items add their weights.

    >>> rng = np.random.default_rng(0)
    >>> V = init_rows(10, 4, rng, scale=1.0)
    >>> p = fold_in_user(V, [1, 2], reg=0.01)
    >>> p.shape, p.dtype, bool(np.all(V[[1, 2]] @ p > 0.9))
    ((4,), dtype('float32'), True)
    """
    if reg <= 0:
        raise ValueError(f"fold-in needs reg > 0 to be well posed with few clicks, got {reg}")
    idx = np.asarray(item_idx, dtype=np.int64)
    w_click = np.ones(idx.size) if weights is None else np.asarray(weights, dtype=np.float64)
    items, inv = np.unique(idx, return_inverse=True)
    w = np.bincount(inv, weights=w_click, minlength=items.size).astype(np.float64)
    vs = V_items[items].astype(np.float64)
    k = V_items.shape[1]
    if gram is None:
        a = vs.T @ (vs * w[:, None])
    else:
        a = gram + vs.T @ (vs * (w - 1.0)[:, None])
    p = np.linalg.solve(a + reg * np.eye(k), vs.T @ w)
    return p.astype(np.float32)


def fold_in_users(
    V_items: F32, rows: npt.ArrayLike, item_idx: npt.ArrayLike, n_rows: int, reg: float = 0.1, pad: int = 16
) -> F32:
    """:func:`fold_in_user` (ridge on the clicked items, no gram) for many users at once.

    ``rows[j]`` is the output row that click ``j`` on item ``item_idx[j]`` belongs to; returns
    ``(n_rows, k)`` float32 (rows with no click are zero). Uses the push-through identity
    ``(QᵀQ + λI)⁻¹Qᵀ1 = Qᵀ(QQᵀ + λI)⁻¹1``: a user with s clicks needs an s×s solve instead of k×k, and
    users with at most ``pad`` clicks are solved together, zero-padded (a zero row with target 0 gets
    coefficient 0, so padding is exact). Heavier users fall back to :func:`fold_in_user`.

    >>> rng = np.random.default_rng(0)
    >>> V = init_rows(10, 4, rng, scale=1.0)
    >>> P = fold_in_users(V, [0, 0, 1], [1, 2, 5], 2, reg=0.01)
    >>> bool(np.allclose(P[0], fold_in_user(V, [1, 2], reg=0.01), atol=1e-5))
    True
    """
    if reg <= 0:
        raise ValueError(f"fold-in needs reg > 0 to be well posed with few clicks, got {reg}")
    r = np.asarray(rows, np.int64)
    items = np.asarray(item_idx, np.int64)
    order = np.argsort(r, kind="stable")
    r, items = r[order], items[order]
    k = V_items.shape[1]
    out = np.zeros((n_rows, k), np.float32)
    if not r.size:
        return out
    starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    sizes = np.diff(np.r_[starts, r.size])
    small = sizes <= pad
    if small.any():
        s_max = int(sizes[small].max())
        st, sz = starts[small], sizes[small]
        slot = np.arange(s_max)[None, :]
        valid = slot < sz[:, None]
        idx = np.where(valid, st[:, None] + slot, 0)
        Q = V_items[items[idx]].astype(np.float64) * valid[:, :, None]
        G = Q @ Q.transpose(0, 2, 1) + reg * np.eye(s_max)
        a = np.linalg.solve(G, valid.astype(np.float64)[:, :, None])[:, :, 0]
        out[r[st]] = np.einsum("nsk,ns->nk", Q, a).astype(np.float32)
    for st, sz in zip(starts[~small], sizes[~small]):
        out[r[st]] = fold_in_user(V_items, items[st : st + sz], reg=reg)
    return out
