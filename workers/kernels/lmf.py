"""Per-click logistic matrix factorisation with biases (pure): ``P(click | u, i) = σ(b + b_u + b_i + p_u · q_i)``.

Rows are ``k + 1`` float32 values: the latent vector, then the row's bias. :func:`lmf_train` runs one
mini-batch of clicks **in stream order**; for each click ``(u, i, w)``:

1. *(prequential)* rank ``i`` among all items with the state right before this click, the user's earlier
   clicks excluded (:func:`rank_of`); also by all-time and time-decayed popularity, for the baselines;
2. the click joins ``u``'s known positives and the popularity counts;
3. one positive step on ``(u, i, y=1, weight w)`` and ``n_neg`` negative steps ``(u, j, y=0, weight 1)``.
   Negatives are drawn per click, here: with probability ``uniform_mix`` uniform over the known items, else
   from the popularity table ``P(j) ∝ f_j^α`` (an alias table over a reservoir of recent clicks, see
   :mod:`workers.kernels.sampling`); never a known positive of ``u``. The first ``n_hard`` are hard
   negatives (Dynamic Negative Sampling, Zhang et al. 2013): the best-scoring (``p_u · q_c + b_c``) of
   ``n_cand`` such draws, scored with ``u``'s current vector.

One step on ``(u, j, y, w)``, ``x = b + b_u + b_j + p·q``, ``g = w (y - σ(x))``::

    gp = g q - reg p,  gq = g p - reg q          each scaled to Euclidean norm <= clip
    G_u += |gp|² / k;  p += lr / sqrt(G_u + eps) · gp     (row-wise AdaGrad; constant lr without AdaGrad)
    G_j += |gq|² / k;  q += lr / sqrt(G_j + eps) · gq
    d = clip(g) - reg_bias · b_u;  H_u += d²;  b_u += lr_bias / sqrt(H_u + eps) · d   (the same for b_j)
    b += lr_global · clip(g)

Biases are clamped to ``±bias_clamp`` and the global bias to ``±global_clamp`` (a divergence guard: an
unclamped global bias has run away to +48 on play-count data at twice the default step). The defaults were
chosen on validation splits of ml-100k and lastfm-2k (docs/evaluation.md); a learned global bias is what
makes one pass work (it converges near the log-odds of a click against its negatives, about -8 for 10).

The accumulators are two values per row, ``(G, H)``. The kernel records the original value of every item row
it writes (``touched``), so the caller can send ``final - original`` as an additive delta. With ``given_neg``
(tests) the negatives are taken from that array instead of being drawn; :func:`lmf_train_reference` is the
plain-numpy specification of that mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numba import njit

__all__ = ["LMFParams", "Touched", "check_finite", "event_weights", "init_rows", "lmf_train",
           "lmf_train_reference", "positive_set", "rank_of"]  # fmt: skip

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
EPS = 1e-8

# indices into the float / int parameter arrays the compiled kernel takes
(P_LR, P_REG, P_LRB, P_REGB, P_LRG, P_CLIP, P_BCLAMP, P_GCLAMP, P_MIX) = range(9)
(Q_NNEG, Q_NHARD, Q_NCAND, Q_ADA, Q_SEED) = range(5)
# LLVM may reorder sums (SIMD dot products) and fuse multiply-adds; NaN/inf semantics stay exact, so a diverging
# batch still comes out non-finite and is refused (check_finite)
_FAST = {"reassoc", "contract"}


@dataclass(frozen=True)
class LMFParams:
    """Hyper-parameters of :func:`lmf_train` (defaults: the validated production configuration).

    >>> LMFParams().n_hard
    5
    """

    lr: float = 0.1
    reg: float = 0.003
    lr_bias: float = 0.1
    reg_bias: float = 0.01
    lr_global: float = 0.01
    clip: float = 5.0
    bias_clamp: float = 20.0
    global_clamp: float = 30.0
    negatives: int = 10
    hard_share: float = 0.5
    hard_candidates: int = 8
    uniform_mix: float = 0.2
    adagrad: bool = True

    @property
    def n_hard(self) -> int:
        return int(math.floor(self.hard_share * self.negatives + 0.5))

    def arrays(self, seed: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        f = np.array([self.lr, self.reg, self.lr_bias, self.reg_bias, self.lr_global, self.clip, self.bias_clamp,
                      self.global_clamp, self.uniform_mix], np.float64)  # fmt: skip
        i = np.array([self.negatives, self.n_hard, self.hard_candidates, int(self.adagrad), seed], np.int64)
        return f, i


@dataclass
class Touched:
    """Item rows the kernel wrote, with their values before the batch: ``idx`` (n,), ``rows``, ``acc``."""

    idx: I32
    rows: F32
    acc: F32


# ------------------------------------------------------------------------------------- known positives
@njit(cache=True, inline="always")
def _slot(key: np.int64, mask: int) -> int:  # pragma: no cover - compiled
    h = (key ^ (key >> 29)) * 0x9E3779B1
    return int((h ^ (h >> 32)) & mask)


@njit(cache=True)
def _hs_add(tab, key):  # pragma: no cover - compiled
    mask = tab.size - 1
    s = _slot(key, mask)
    while tab[s] != -1:
        if tab[s] == key:
            return
        s = (s + 1) & mask
    tab[s] = key


@njit(cache=True)
def _hs_has(tab, key):  # pragma: no cover - compiled
    mask = tab.size - 1
    s = _slot(key, mask)
    while tab[s] != -1:
        if tab[s] == key:
            return True
        s = (s + 1) & mask
    return False


@njit(cache=True)
def _hs_build(users, items, n_items, size):  # pragma: no cover - compiled
    tab = np.full(size, -1, np.int64)
    for n in range(users.size):
        _hs_add(tab, np.int64(users[n]) * n_items + items[n])
    return tab


def positive_set(users: npt.ArrayLike, items: npt.ArrayLike, n_items: int, extra: int) -> npt.NDArray[np.int64]:
    """Open-addressing hash set of ``(user, item)`` pairs for :func:`lmf_train`, with room for ``extra`` more.

    >>> tab = positive_set([0, 1], [3, 4], n_items=10, extra=2)
    >>> tab.size >= 16 and int((tab >= 0).sum())
    2
    """
    u = np.ascontiguousarray(users, np.int64)
    i = np.ascontiguousarray(items, np.int64)
    size = 1 << int(math.ceil(math.log2(max(16, 2 * (u.size + extra) + 16))))
    return _hs_build(u, i, np.int64(max(n_items, 1)), size)


# ------------------------------------------------------------------------------------- one SGD step
@njit(cache=True, inline="always")
def _touch(V, GV, j, first, t_idx, t_rows, t_acc, n_touch):  # pragma: no cover - compiled
    if first[j] < 0:
        n = n_touch[0]
        first[j] = n
        t_idx[n] = j
        t_rows[n] = V[j]
        t_acc[n] = GV[j]
        n_touch[0] = n + 1


@njit(cache=True, inline="always")
def _step(U, GU, V, GV, glob, u, j, label, w, fp, ada):  # pragma: no cover - compiled
    k = U.shape[1] - 1
    x = glob[0] + np.float64(U[u, k]) + np.float64(V[j, k])
    for c in range(k):
        x += np.float64(U[u, c]) * np.float64(V[j, c])
    if x >= 0:
        sig = 1.0 / (1.0 + math.exp(-x))
    else:
        z = math.exp(x)
        sig = z / (1.0 + z)
    g = w * (label - sig)
    lr, reg, clip = fp[P_LR], fp[P_REG], fp[P_CLIP]
    np2 = 0.0
    nq2 = 0.0
    for c in range(k):
        pc = np.float64(U[u, c])
        qc = np.float64(V[j, c])
        a = g * qc - reg * pc
        b = g * pc - reg * qc
        np2 += a * a
        nq2 += b * b
    sp = min(1.0, clip / max(math.sqrt(np2), 1e-30))
    sq = min(1.0, clip / max(math.sqrt(nq2), 1e-30))
    lr_p = lr
    lr_q = lr
    if ada:
        GU[u, 0] += sp * sp * np2 / k
        GV[j, 0] += sq * sq * nq2 / k
        lr_p = lr / math.sqrt(np.float64(GU[u, 0]) + EPS)
        lr_q = lr / math.sqrt(np.float64(GV[j, 0]) + EPS)
    for c in range(k):
        pc = np.float64(U[u, c])
        qc = np.float64(V[j, c])
        U[u, c] = pc + lr_p * sp * (g * qc - reg * pc)
        V[j, c] = qc + lr_q * sq * (g * pc - reg * qc)
    gb = max(-clip, min(clip, g))
    lrb, regb, bmax = fp[P_LRB], fp[P_REGB], fp[P_BCLAMP]
    du = gb - regb * np.float64(U[u, k])
    dj = gb - regb * np.float64(V[j, k])
    eu = lrb
    ej = lrb
    if ada:
        GU[u, 1] += du * du
        GV[j, 1] += dj * dj
        eu = lrb / math.sqrt(np.float64(GU[u, 1]) + EPS)
        ej = lrb / math.sqrt(np.float64(GV[j, 1]) + EPS)
    U[u, k] = max(-bmax, min(bmax, np.float64(U[u, k]) + eu * du))
    V[j, k] = max(-bmax, min(bmax, np.float64(V[j, k]) + ej * dj))
    gmax = fp[P_GCLAMP]
    glob[0] = max(-gmax, min(gmax, glob[0] + fp[P_LRG] * gb))
    xs = -x if label > 0.5 else x
    return w * (max(xs, 0.0) + math.log1p(math.exp(-abs(xs))))


# ------------------------------------------------------------------------------------- sampling
@njit(cache=True, inline="always")
def _proposal(prob, alias, support, n_known, mix):  # pragma: no cover - compiled
    if support.size == 0 or (mix > 0.0 and np.random.random() < mix):
        return np.random.randint(0, n_known)
    col = np.random.randint(0, support.size)
    return support[col] if np.random.random() < prob[col] else support[alias[col]]


@njit(cache=True)
def _draw(u, pos, n_items, hs, prob, alias, support, n_known, mix, banned):  # pragma: no cover - compiled
    """One proposal draw that is neither a known positive of ``u`` nor ``pos`` nor banned (a hidden or expired
    item of the catalogue); -1 if none is found."""
    for attempt in range(26):
        j = _proposal(prob, alias, support, n_known, mix) if attempt < 6 else np.random.randint(0, n_known)
        if j != pos and not banned[j] and not _hs_has(hs, np.int64(u) * n_items + j):
            return j
    return -1


@njit(cache=True, fastmath=_FAST)
def _negative(U, V, u, pos, t, n_items, hs, prob, alias, support, n_known, ip, fp, banned):  # pragma: no cover
    mix = fp[P_MIX]
    if t >= ip[Q_NHARD]:
        return _draw(u, pos, n_items, hs, prob, alias, support, n_known, mix, banned)
    k = U.shape[1] - 1
    best = -np.inf
    j = -1
    for _m in range(ip[Q_NCAND]):
        c = _draw(u, pos, n_items, hs, prob, alias, support, n_known, mix, banned)
        if c < 0:
            continue
        s = np.float64(V[c, k])
        for d in range(k):
            s += np.float64(U[u, d]) * np.float64(V[c, d])
        if s > best:
            best = s
            j = c
    return j


# ------------------------------------------------------------------------------------- ranking
@njit(cache=True)
def rank_of(U, V, u, target, n_known, hs, n_items, count, decayed):  # pragma: no cover - compiled
    """``(greater, ties)`` of ``target`` among items ``0..n_known-1`` not known to ``u`` (the target itself
    aside), by model score ``b_i + p_u·q_i``, by ``count`` and by ``decayed`` popularity: six int64 values."""
    k = U.shape[1] - 1
    st = np.float64(V[target, k])
    for d in range(k):
        st += np.float64(U[u, d]) * np.float64(V[target, d])
    ct, dt = count[target], decayed[target]
    out = np.zeros(6, np.int64)
    for j in range(n_known):
        if j == target or _hs_has(hs, np.int64(u) * n_items + j):
            continue
        s = np.float64(V[j, k])
        for d in range(k):
            s += np.float64(U[u, d]) * np.float64(V[j, d])
        if s > st:
            out[0] += 1
        elif s == st:
            out[1] += 1
        if count[j] > ct:
            out[2] += 1
        elif count[j] == ct:
            out[3] += 1
        if decayed[j] > dt:
            out[4] += 1
        elif decayed[j] == dt:
            out[5] += 1
    return out


# ------------------------------------------------------------------------------------- the batch
@njit(cache=True, nogil=True, fastmath=_FAST)
def _train(ev_u, ev_i, ev_w, ev_neg, ev_count, ev_decay, U, GU, V, GV, glob, hs, n_known, prob, alias, support, fp, ip,
           given_neg, first, t_idx, t_rows, t_acc, n_touch, loss, rank_at, ranks, user_warm, count,
           decayed, banned):  # pragma: no cover - compiled  # fmt: skip
    np.random.seed(ip[Q_SEED])
    n_items = np.int64(V.shape[0])
    n_neg = ip[Q_NNEG]
    ada = ip[Q_ADA] != 0
    use_given = given_neg.shape[0] == ev_u.shape[0] and given_neg.shape[0] > 0
    for e in range(ev_u.shape[0]):
        u, i, w = ev_u[e], ev_i[e], np.float64(ev_w[e])
        if ev_neg[e]:  # an exposure negative: shown, not clicked -- one negative step of its own weight
            _touch(V, GV, i, first, t_idx, t_rows, t_acc, n_touch)
            loss[e] = _step(U, GU, V, GV, glob, u, i, 0.0, w, fp, ada)
            continue
        if rank_at[e]:
            r = rank_of(U, V, u, i, n_known, hs, n_items, count, decayed)
            for c in range(6):
                ranks[e, c] = r[c]
            ranks[e, 6] = 1 if user_warm[u] else 0
        user_warm[u] = True
        _hs_add(hs, np.int64(u) * n_items + i)
        count[i] += ev_count[e]
        decayed[i] += ev_decay[e]
        _touch(V, GV, i, first, t_idx, t_rows, t_acc, n_touch)
        total = _step(U, GU, V, GV, glob, u, i, 1.0, w, fp, ada)
        for t in range(n_neg):
            if use_given:
                j = given_neg[e, t]
            else:
                j = _negative(U, V, u, i, t, n_items, hs, prob, alias, support, n_known, ip, fp, banned)
            if j < 0:
                continue
            _touch(V, GV, j, first, t_idx, t_rows, t_acc, n_touch)
            total += _step(U, GU, V, GV, glob, u, j, 0.0, 1.0, fp, ada)
        loss[e] = total


def lmf_train(
    U: F32,
    GU: F32,
    V: F32,
    GV: F32,
    glob: npt.NDArray[np.float64],
    events: tuple[I32, I32, F32] | tuple[I32, I32, F32, npt.NDArray[np.bool_]],
    positives: npt.NDArray[np.int64],
    n_known: int,
    sampler: tuple[npt.NDArray[np.float64], I32, I32],
    params: LMFParams,
    seed: int,
    *,
    given_neg: I32 | None = None,
    rank_at: npt.NDArray[np.bool_] | None = None,
    user_warm: npt.NDArray[np.bool_] | None = None,
    popularity: tuple[npt.NDArray[np.float64], ...] | None = None,
    banned: npt.NDArray[np.bool_] | None = None,
) -> tuple[F32, Touched, npt.NDArray[np.int64] | None]:
    """Train one mini-batch of clicks in stream order (see the module docstring); arrays are updated in place.

    Parameters
    ----------
    U, GU : (n_users, k + 1) float32 rows and (n_users, 2) float32 accumulators of the batch's users.
    V, GV : (n_items, k + 1) and (n_items, 2) float32: every item row the caller holds (negatives may be any).
    glob : (1,) float64, the global bias.
    events : ``(users, items, weights[, exposure])``, each (E,): local user, item row, weight, and whether
        the event is an exposure negative (shown, not clicked: one negative step with its weight) or a click.
    positives : :func:`positive_set` of the users' known positives (updated with each click).
    n_known : items ``0..n_known-1`` may be sampled or ranked.
    sampler : ``(prob, alias, support)`` of the popularity alias table (empty arrays: uniform only).
    seed : seeds the kernel's random stream (a batch is reproducible given its inputs).
    given_neg : (E, negatives) int32, use these negatives (-1 = skip) instead of drawing (tests).
    rank_at, user_warm, popularity : prequential ranking: which events to rank, which users already have a
        vector (updated), and ``(count, decayed, add_count, add_decayed)`` -- all-time and decayed popularity
        per item, updated with each click by its ``add_*`` (E,) values (count weight, and that times
        ``2^((ts - ref) / half_life)``).
    banned : (n_items,) bool, items never drawn as negatives (hidden or expired in the catalogue); None: none.

    Returns
    -------
    (E,) float32 loss per click, the :class:`Touched` item rows, and (E, 7) int64 ranks or None: model
    greater/ties, count greater/ties, decayed greater/ties, warm flag.

    >>> rng = np.random.default_rng(0)
    >>> U, V = init_rows(2, 4, rng, 0.1), np.zeros((5, 5), np.float32)
    >>> GU, GV, glob = np.zeros((2, 2), np.float32), np.zeros((5, 2), np.float32), np.zeros(1)
    >>> ev = (np.array([0, 1], np.int32), np.array([2, 3], np.int32), np.ones(2, np.float32))
    >>> pos = positive_set([], [], 5, extra=2)
    >>> empty = (np.zeros(0), np.zeros(0, np.int32), np.zeros(0, np.int32))
    >>> loss, touched, _ = lmf_train(U, GU, V, GV, glob, ev, pos, 5, empty, LMFParams(negatives=2), seed=0)
    >>> loss.shape, bool(glob[0] < 0), sorted(touched.idx.tolist())[:1] == [min(touched.idx.tolist())]
    ((2,), True, True)
    """
    ev_u, ev_i, ev_w = (np.ascontiguousarray(a, t) for a, t in zip(events[:3], (np.int32, np.int32, np.float32)))
    E = ev_u.shape[0]
    ev_neg = np.ascontiguousarray(events[3], np.bool_) if len(events) > 3 else np.zeros(E, np.bool_)
    _check(U, GU, V, GV, ev_u.astype(np.int32), ev_i.astype(np.int32), n_known)
    fp, ip = params.arrays(seed)
    gneg = np.zeros((0, 0), np.int32) if given_neg is None else np.ascontiguousarray(given_neg, np.int32)
    if given_neg is not None and (gneg.shape != (E, params.negatives) or (gneg.size and gneg.max() >= V.shape[0])):
        raise ValueError(f"given_neg must be ({E}, {params.negatives}) item rows < {V.shape[0]} or -1, "
                         f"got shape {gneg.shape}")  # fmt: skip
    cap = E * (1 + params.negatives)
    first = np.full(V.shape[0], -1, np.int32)
    t_idx = np.zeros(cap, np.int32)
    t_rows = np.zeros((cap, V.shape[1]), np.float32)
    t_acc = np.zeros((cap, 2), np.float32)
    n_touch = np.zeros(1, np.int64)
    loss = np.zeros(E, np.float32)
    ranking = rank_at is not None
    r_at = np.zeros(E, np.bool_) if rank_at is None else np.ascontiguousarray(rank_at, np.bool_)
    ranks = np.zeros((E if ranking else 0, 7), np.int64)
    warm = np.zeros(U.shape[0], np.bool_) if user_warm is None else user_warm
    if popularity is None:
        count, decayed, add_c, add_d = np.zeros(V.shape[0]), np.zeros(V.shape[0]), np.zeros(E), np.zeros(E)
    else:
        count, decayed, add_c, add_d = popularity
    prob, alias, support = sampler
    add_c, add_d = (np.ascontiguousarray(a, np.float64) for a in (add_c, add_d))
    if banned is None:
        banned = np.zeros(V.shape[0], np.bool_)
    elif banned.shape != (V.shape[0],) or banned.dtype != np.bool_:
        raise ValueError(f"banned must be a ({V.shape[0]},) bool array, one flag per item row; got "
                         f"{banned.dtype} {banned.shape}")  # fmt: skip
    _train(ev_u, ev_i, ev_w, ev_neg, add_c, add_d, U, GU, V, GV, glob, positives, int(n_known),
           prob, alias, support, fp, ip, gneg, first, t_idx, t_rows, t_acc, n_touch, loss, r_at, ranks, warm,
           count, decayed, banned)  # fmt: skip
    n = int(n_touch[0])
    return loss, Touched(t_idx[:n].copy(), t_rows[:n].copy(), t_acc[:n].copy()), (ranks if ranking else None)


def _check(U: F32, GU: F32, V: F32, GV: F32, ev_u: I32, ev_i: I32, n_known: int) -> None:
    for name, m, cols in (("U", U, V.shape[1]), ("V", V, U.shape[1]), ("GU", GU, 2), ("GV", GV, 2)):
        ok = isinstance(m, np.ndarray) and m.dtype == np.float32 and m.ndim == 2 and m.flags.c_contiguous
        if not (ok and m.flags.writeable and m.shape[1] == cols):
            raise TypeError(f"{name} must be a writeable C-contiguous (n, {cols}) float32 array (updated in place); "
                            f"got {type(m).__name__} {getattr(m, 'dtype', '')} {getattr(m, 'shape', '')}")  # fmt: skip
    if GU.shape[0] != U.shape[0] or GV.shape[0] != V.shape[0]:
        raise ValueError(f"accumulators {GU.shape}, {GV.shape} must have one row per row of U {U.shape}, V {V.shape}")
    if ev_u.size and (ev_u.min() < 0 or ev_u.max() >= U.shape[0]):
        raise ValueError(f"event users outside [0, {U.shape[0]}); map users to rows of U first")
    if ev_i.size and (ev_i.min() < 0 or ev_i.max() >= V.shape[0]):
        raise ValueError(f"event items outside [0, {V.shape[0]}); grow the item rows first")
    if not 0 <= n_known <= V.shape[0]:
        raise ValueError(f"n_known={n_known} must be in [0, {V.shape[0]}]")


# ------------------------------------------------------------------------------------- reference
def lmf_train_reference(U: F32, GU: F32, V: F32, GV: F32, glob: npt.NDArray[np.float64],
                        events: tuple[I32, I32, F32], given_neg: I32,
                        params: LMFParams) -> F32:  # fmt: skip
    """Plain-numpy :func:`lmf_train` with given negatives (no sampling, no ranking): the specification.

    >>> rng = np.random.default_rng(0)
    >>> U, V = init_rows(2, 4, rng, 0.1), init_rows(5, 4, rng, 0.1)
    >>> GU, GV, glob = np.zeros((2, 2), np.float32), np.zeros((5, 2), np.float32), np.zeros(1)
    >>> ev = (np.array([0, 1], np.int32), np.array([2, 3], np.int32), np.ones(2, np.float32))
    >>> neg = np.array([[4, -1], [0, 1]], np.int32)
    >>> args = [a.copy() for a in (U, GU, V, GV, glob)]
    >>> a = lmf_train_reference(*args, ev, neg, LMFParams(negatives=2))
    >>> pos = positive_set([], [], 5, extra=2)
    >>> empty = (np.zeros(0), np.zeros(0, np.int32), np.zeros(0, np.int32))
    >>> b, _, _ = lmf_train(U, GU, V, GV, glob, ev, pos, 5, empty, LMFParams(negatives=2), 0, given_neg=neg)
    >>> bool(np.allclose(a, b, atol=1e-6) and np.allclose(args[0], U, atol=1e-6) and np.isclose(args[4], glob))
    True
    """
    p = params
    k = U.shape[1] - 1
    loss = np.zeros(len(events[0]), np.float32)
    for e, (u, i, w) in enumerate(zip(*events)):
        total = _ref_step(U, GU, V, GV, glob, int(u), int(i), 1.0, float(w), p, k)
        for j in given_neg[e]:
            if j >= 0:
                total += _ref_step(U, GU, V, GV, glob, int(u), int(j), 0.0, 1.0, p, k)
        loss[e] = total
    return loss


def _ref_step(U: F32, GU: F32, V: F32, GV: F32, glob: npt.NDArray[np.float64], u: int, j: int, label: float,
              w: float, p: LMFParams, k: int) -> float:  # fmt: skip
    pu, qj = U[u, :k].astype(np.float64), V[j, :k].astype(np.float64)
    x = float(glob[0]) + float(U[u, k]) + float(V[j, k]) + float(pu @ qj)
    sig = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
    g = w * (label - sig)
    gp, gq = g * qj - p.reg * pu, g * pu - p.reg * qj
    gp *= min(1.0, p.clip / max(float(np.linalg.norm(gp)), 1e-30))
    gq *= min(1.0, p.clip / max(float(np.linalg.norm(gq)), 1e-30))
    lr_p = lr_q = p.lr
    if p.adagrad:
        GU[u, 0] += np.float32(gp @ gp / k)
        GV[j, 0] += np.float32(gq @ gq / k)
        lr_p, lr_q = p.lr / math.sqrt(float(GU[u, 0]) + EPS), p.lr / math.sqrt(float(GV[j, 0]) + EPS)
    U[u, :k] = pu + lr_p * gp
    V[j, :k] = qj + lr_q * gq
    gb = max(-p.clip, min(p.clip, g))
    du, dj = gb - p.reg_bias * float(U[u, k]), gb - p.reg_bias * float(V[j, k])
    eu = ej = p.lr_bias
    if p.adagrad:
        GU[u, 1] += np.float32(du * du)
        GV[j, 1] += np.float32(dj * dj)
        eu, ej = p.lr_bias / math.sqrt(float(GU[u, 1]) + EPS), p.lr_bias / math.sqrt(float(GV[j, 1]) + EPS)
    U[u, k] = np.clip(float(U[u, k]) + eu * du, -p.bias_clamp, p.bias_clamp)
    V[j, k] = np.clip(float(V[j, k]) + ej * dj, -p.bias_clamp, p.bias_clamp)
    glob[0] = np.clip(float(glob[0]) + p.lr_global * gb, -p.global_clamp, p.global_clamp)
    xs = -x if label > 0.5 else x
    return w * (max(xs, 0.0) + math.log1p(math.exp(-abs(xs))))


# ------------------------------------------------------------------------------------- helpers
def event_weights(counts: npt.ArrayLike, mode: str = "log", cap: float = 10.0) -> F32:
    """SGD weight per event from its weight ``c`` (count times feedback weight): ``log`` min(1 + ln c, cap)
    (default), ``linear`` min(c, cap); a weight below 1 (a feedback type lighter than a click) stays as it is.

    >>> [round(float(x), 3) for x in event_weights([0.5, 1, 4, 100], "log", cap=4.0)]
    [0.5, 1.0, 2.386, 4.0]
    """
    c = np.asarray(counts, dtype=np.float64)
    if mode == "linear":
        w = c
    elif mode == "log":
        w = 1.0 + np.log(np.maximum(c, 1.0))
    else:
        raise ValueError(f"weight mode {mode!r} is unknown; use 'linear' or 'log'")
    return np.minimum(np.where(c < 1.0, c, w), cap).astype(np.float32)


def check_finite(*arrays: npt.ArrayLike) -> bool:
    """True if every value of every array is finite; run it before writing factors to the store.

    >>> check_finite(np.ones(3, np.float32), np.array([1.0, np.nan], np.float32))
    False
    """
    return all(bool(np.isfinite(a).all()) for a in arrays)


def init_rows(n: int, k: int, rng: np.random.Generator, scale: float = 0.05) -> F32:
    """``n`` new rows of ``k + 1`` values: latent ``N(0, scale²)``, bias 0 (float32).

    >>> init_rows(2, 3, np.random.default_rng(0)).shape
    (2, 4)
    """
    out = np.zeros((n, k + 1), np.float32)
    out[:, :k] = rng.standard_normal((n, k), dtype=np.float32) * np.float32(scale)
    return out
