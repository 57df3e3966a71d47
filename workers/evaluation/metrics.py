"""Offline and prequential evaluation: top-k metrics, the holdout split, prequential summaries (pure).

Definitions (``k`` = cut-off, ``T_u`` = user u's test items, ``L_u`` = the top-k list with u's training
items already removed, ``m_u = min(k, |T_u|)``, ``hit_j = [L_u[j] in T_u]``):

- precision@k = ``sum_j hit_j / k``
- recall@k = ``sum_j hit_j / m_u`` (so a perfect list scores 1 even when ``|T_u| > k``)
- NDCG@k = ``DCG / IDCG`` with binary gains, ``DCG = sum_j hit_j / log2(j + 2)`` (j 0-based) and
  ``IDCG = sum_{j < m_u} 1 / log2(j + 2)``
- MAP@k = mean over users of ``AP@k = sum_j hit_j * precision@(j+1) / m_u``
- coverage = distinct items in all the lists / catalogue size

Each is averaged over the users that have at least one test item. Prequential ranks (the clicked item's
place among the known items right before the click is learned, as items strictly ahead and items tied) give
the expected HR@k and MRR under a random tie-break (:func:`rank_metrics`).

:func:`holdout_mask` is the split every benchmark uses (``bench/data.py`` imports it): per user with at
least ``min_interactions`` interactions, the last ``round(test_frac * n_u)`` (at least 1) by time are test;
ties in time, and data without timestamps, are ordered by a seeded random key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from scipy.special import digamma

__all__ = ["PrequentialLog", "holdout_mask", "prequential_summary", "ranking_metrics", "rank_metrics", "hit_matrix"]

IntArray = npt.NDArray[np.integer]


def holdout_mask(
    user: IntArray,
    ts: npt.NDArray[np.int64] | None,
    n_users: int,
    test_frac: float = 0.2,
    min_interactions: int = 5,
    seed: int = 0,
) -> npt.NDArray[np.bool_]:
    """Boolean mask of the test interactions of the per-user temporal holdout.

    Parameters
    ----------
    user : (N,) int
        Dense user index of each interaction.
    ts : (N,) int or None
        Timestamps; None orders each user's interactions by the seeded random key alone.
    n_users : int
    test_frac, min_interactions, seed
        Share held out per user (rounded, at least 1), eligibility threshold, seed of the tie-break key.

    Examples
    --------
    >>> holdout_mask(np.array([0, 0, 0, 0, 0, 1]), np.array([5, 4, 3, 2, 1, 9]), 2).tolist()
    [True, False, False, False, False, False]
    """
    user = np.asarray(user)
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac={test_frac} must be in (0, 1); 0.2 holds out 20 % per user")
    rng = np.random.default_rng(seed)
    key = np.zeros(user.size) if ts is None else np.asarray(ts)
    order = np.lexsort((rng.random(user.size), key, user))
    n_u = np.bincount(user, minlength=n_users)
    start = np.concatenate([[0], np.cumsum(n_u)[:-1]])
    u_sorted = user[order]
    rank = np.arange(order.size) - start[u_sorted]
    n_test = np.where(n_u >= min_interactions, np.maximum(1, np.rint(test_frac * n_u)), 0).astype(np.int64)
    is_test = np.zeros(order.size, bool)
    is_test[order] = rank >= n_u[u_sorted] - n_test[u_sorted]
    return is_test


def hit_matrix(top_ids: IntArray, test: sp.csr_matrix, users: IntArray) -> npt.NDArray[np.bool_]:
    """``hit[j, r]`` = item ``top_ids[j, r]`` is a test item of ``users[j]`` (-1 slots never hit).

    >>> test = sp.csr_matrix(np.array([[0, 1, 1, 0]], np.float32))
    >>> hit_matrix(np.array([[2, 0, -1]]), test, np.array([0])).tolist()
    [[True, False, False]]
    """
    top = np.asarray(top_ids)
    users = np.asarray(users)
    rows = np.repeat(np.arange(top.shape[0]), top.shape[1])
    cols = np.maximum(top.ravel(), 0)
    sub = test[users]
    sub = sp.csr_matrix((np.ones(sub.nnz, bool), sub.indices, sub.indptr), shape=sub.shape)
    hit = np.asarray(sub[rows, cols]).reshape(top.shape).astype(bool)
    return hit & (top >= 0)


def ranking_metrics(
    top_ids: IntArray, test: sp.csr_matrix, users: IntArray, k: int = 10, n_items: int | None = None
) -> dict[str, float]:
    """Mean precision, recall, NDCG, MAP @k over ``users`` with test items, plus catalogue coverage.

    ``top_ids[j]`` is the ranked list of ``users[j]`` (training items already excluded, -1 = empty slot);
    ``test`` is the user x item test matrix. Coverage (distinct items over all lists / ``n_items``,
    default ``test.shape[1]``) counts the lists of the evaluated users only.

    Examples
    --------
    One user, test items {1, 2}, list [2, 0]: one hit at rank 0, m = 2.

    >>> test = sp.csr_matrix(np.array([[0, 1, 1, 0]], np.float32))
    >>> m = ranking_metrics(np.array([[2, 0]]), test, np.array([0]), k=2)
    >>> [round(m[n], 4) for n in ("precision", "recall", "ndcg", "map", "coverage")], m["users"]
    ([0.5, 0.5, 0.6131, 0.5, 0.5], 1)
    """
    top = np.asarray(top_ids)[:, :k]
    users = np.asarray(users)
    n_test = np.diff(test.indptr)[users]
    keep = n_test > 0
    top, users, n_test = top[keep], users[keep], n_test[keep]
    n_items = test.shape[1] if n_items is None else n_items
    if users.size == 0:
        return {"precision": 0.0, "recall": 0.0, "ndcg": 0.0, "map": 0.0, "coverage": 0.0, "users": 0}
    hit = hit_matrix(top, test, users).astype(np.float64)
    width = top.shape[1]
    m = np.minimum(n_test, k).astype(np.float64)
    disc = 1.0 / np.log2(np.arange(2, width + 2))
    ideal = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))[m.astype(np.int64) - 1]
    prec_at = np.cumsum(hit, axis=1) / np.arange(1, width + 1)
    listed = np.unique(top[top >= 0])
    return {
        "precision": float((hit.sum(axis=1) / k).mean()),
        "recall": float((hit.sum(axis=1) / m).mean()),
        "ndcg": float(((hit * disc).sum(axis=1) / ideal).mean()),
        "map": float(((hit * prec_at).sum(axis=1) / m).mean()),
        "coverage": float(listed.size / max(1, n_items)),
        "users": int(users.size),
    }


def rank_metrics(greater: npt.ArrayLike, ties: npt.ArrayLike | None = None, k: int = 10) -> dict[str, float]:
    """Expected HR@k and MRR of prequential ranks under a random tie-break.

    Click ``n`` had ``greater[n]`` items scored strictly above the clicked item and ``ties[n]`` others equal to
    it, so its rank is uniform on ``greater .. greater + ties`` (0-based): it is a hit with probability
    ``clip((k - greater) / (ties + 1), 0, 1)`` and its expected reciprocal rank is the mean of ``1 / (r + 1)``
    over that range. (Counting ties as ahead of or behind the target would flatter or punish popularity
    counts, which tie a lot.)

    >>> rank_metrics([0, 3, 7], [0, 0, 5], k=5)  # hits: rank 0, rank 3, and rank 7..12 never
    {'hr': 0.6667, 'mrr': 0.4493, 'clicks': 3}
    """
    g = np.asarray(greater, np.float64)
    t = np.zeros_like(g) if ties is None else np.asarray(ties, np.float64)
    if g.size == 0:
        return {"hr": 0.0, "mrr": 0.0, "clicks": 0}
    hr = np.clip((k - g) / (t + 1.0), 0.0, 1.0)
    mrr = (digamma(g + t + 2.0) - digamma(g + 1.0)) / (t + 1.0)  # (H(g + t + 1) - H(g)) / (t + 1)
    return {"hr": round(float(hr.mean()), 4), "mrr": round(float(mrr.mean()), 4), "clicks": int(g.size)}


@dataclass
class PrequentialLog:
    """Ranks recorded right before each click was learned, in arrival order (the LMF worker's ``rank_hook``).

    A row is ``(user, item, model greater, model ties, count greater, count ties, decayed greater, decayed ties,
    warm)``: the clicked item's place among all items (the user's earlier clicks excluded) by the model's score,
    by all-time popularity and by time-decayed popularity, and whether the user had a vector.

    >>> log = PrequentialLog()
    >>> log([("u1", "i1", 0, 0, 4, 1, 2, 0, 1), ("u2", "i1", 9, 0, 0, 0, 1, 0, 0)])
    >>> len(log), log.column("model_greater").tolist(), log.column("warm").tolist()
    (2, [0, 9], [1, 0])
    """

    COLUMNS = ("model_greater", "model_ties", "count_greater", "count_ties", "decayed_greater", "decayed_ties",
               "warm")  # fmt: skip

    def __post_init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    def __call__(self, ranks: Sequence[tuple[Any, ...]]) -> None:
        self.rows.extend(ranks)

    def __len__(self) -> int:
        return len(self.rows)

    def __bool__(self) -> bool:  # an empty log is still a hook (the worker tests ``if rank_hook``)
        return True

    def column(self, name: str) -> npt.NDArray[np.int64]:
        c = 2 + self.COLUMNS.index(name)
        return np.fromiter((r[c] for r in self.rows), np.int64, len(self.rows))


def prequential_summary(log: PrequentialLog, k: int = 10, window: int = 5000) -> dict[str, Any]:
    """Overall, warm and per-window (``window`` consecutive clicks) HR@k / MRR of what the system serves and of
    the two popularity baselines (all-time counts; time-decayed popularity, the fallback's ranking).

    What the system serves is the model's ranking for users with a vector and the decayed-popularity fallback
    for the others (``cold`` is their share), exactly what ``Recommender.recommend`` returns.

    >>> lg = PrequentialLog()
    >>> lg([("a", "x", 0, 0, 20, 0, 30, 0, 1), ("b", "x", 50, 0, 0, 0, 3, 0, 0)])
    >>> s = prequential_summary(lg, k=10, window=1)
    >>> s["model"]["hr"], s["model"]["cold"], s["popularity"]["hr"], s["decayed"]["hr"], s["windows"][1]["model_hr"]
    (1.0, 0.5, 0.5, 0.5, 1.0)
    """
    c = {name: log.column(name) for name in PrequentialLog.COLUMNS}
    warm = c["warm"] > 0
    served_g = np.where(warm, c["model_greater"], c["decayed_greater"])
    served_t = np.where(warm, c["model_ties"], c["decayed_ties"])
    pop = (c["count_greater"], c["count_ties"])
    dec = (c["decayed_greater"], c["decayed_ties"])
    windows = []
    for lo in range(0, served_g.size, window):
        sl = slice(lo, lo + window)
        a, b, d = rank_metrics(served_g[sl], served_t[sl], k), rank_metrics(pop[0][sl], pop[1][sl], k), \
            rank_metrics(dec[0][sl], dec[1][sl], k)  # fmt: skip
        windows.append({"start": lo, "clicks": a["clicks"], "model_hr": a["hr"], "model_mrr": a["mrr"],
                        "pop_hr": b["hr"], "pop_mrr": b["mrr"], "decayed_hr": d["hr"], "decayed_mrr": d["mrr"],
                        "cold": round(float(np.mean(~warm[sl])), 4)})  # fmt: skip
    return {
        "k": k,
        "window": window,
        "model": {**rank_metrics(served_g, served_t, k), "cold": round(float(np.mean(~warm)), 4) if warm.size else 0},
        "popularity": rank_metrics(*pop, k=k),
        "decayed": rank_metrics(*dec, k=k),
        "warm": {
            "model": rank_metrics(c["model_greater"][warm], c["model_ties"][warm], k),
            "popularity": rank_metrics(pop[0][warm], pop[1][warm], k),
            "decayed": rank_metrics(dec[0][warm], dec[1][warm], k),
        },  # fmt: skip
        "windows": windows,
    }
