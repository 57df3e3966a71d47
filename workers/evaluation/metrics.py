"""Offline and prequential evaluation: top-k metrics, the holdout split, prequential summaries (pure).

Definitions (``k`` = cut-off, ``T_u`` = user u's test items, ``L_u`` = the top-k list with u's training
items already removed, ``m_u = min(k, |T_u|)``, ``hit_j = [L_u[j] in T_u]``):

- precision@k = ``sum_j hit_j / k``
- recall@k = ``sum_j hit_j / m_u`` (so a perfect list scores 1 even when ``|T_u| > k``)
- NDCG@k = ``DCG / IDCG`` with binary gains, ``DCG = sum_j hit_j / log2(j + 2)`` (j 0-based) and
  ``IDCG = sum_{j < m_u} 1 / log2(j + 2)``
- MAP@k = mean over users of ``AP@k = sum_j hit_j * precision@(j+1) / m_u``
- coverage = distinct items in all the lists / catalogue size

Each is averaged over the users that have at least one test item. Prequential ranks (0-based rank of the
clicked item among the known items, before the click is learned; -1 = no user vector yet) give
HR@k = share of clicks with ``0 <= rank < k`` and MRR = mean of ``1 / (rank + 1)`` (0 for rank -1).

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


def rank_metrics(ranks: npt.ArrayLike, k: int = 10) -> dict[str, float]:
    """HR@k and MRR of 0-based prequential ranks (-1 = the model could not score: a miss, reciprocal 0).

    >>> rank_metrics([0, 3, 7, -1], k=5)  # hits: ranks 0 and 3; MRR = (1 + 1/4 + 1/8 + 0) / 4
    {'hr': 0.5, 'mrr': 0.34375, 'clicks': 4, 'cold': 0.25}
    """
    r = np.asarray(ranks, dtype=np.int64)
    if r.size == 0:
        return {"hr": 0.0, "mrr": 0.0, "clicks": 0, "cold": 0.0}
    ok = r >= 0
    rr = np.where(ok, 1.0 / (np.maximum(r, 0) + 1.0), 0.0)
    return {
        "hr": float(np.mean(ok & (r < k))),
        "mrr": float(rr.mean()),
        "clicks": int(r.size),
        "cold": float(np.mean(~ok)),
    }


@dataclass
class PrequentialLog:
    """Ranks recorded before each click was learned, in arrival order (``rank_hook`` target).

    >>> log = PrequentialLog()
    >>> log([("u1", "i1", 0, 4), ("u2", "i1", -1, 0)])
    >>> len(log), log.model_ranks().tolist(), log.pop_ranks().tolist()
    (2, [0, -1], [4, 0])
    """

    def __post_init__(self) -> None:
        self.rows: list[tuple[str, str, int, int]] = []

    def __call__(self, ranks: Sequence[tuple[str, str, int, int]]) -> None:
        self.rows.extend(ranks)

    def __len__(self) -> int:
        return len(self.rows)

    def __bool__(self) -> bool:  # an empty log is still a hook (the worker tests ``if rank_hook``)
        return True

    def model_ranks(self) -> npt.NDArray[np.int64]:
        return np.fromiter((r[2] for r in self.rows), np.int64, len(self.rows))

    def pop_ranks(self) -> npt.NDArray[np.int64]:
        return np.fromiter((r[3] for r in self.rows), np.int64, len(self.rows))


def prequential_summary(
    model_ranks: npt.ArrayLike, pop_ranks: npt.ArrayLike, k: int = 10, window: int = 5000
) -> dict[str, Any]:
    """Overall and per-window (``window`` consecutive clicks) HR@k / MRR of the model and of popularity.

    The model's figures are what the system serves: its own rank for users with a vector, the popularity
    rank for cold users (model rank -1; ``cold`` is their share). ``warm`` restricts both to the clicks
    the model itself could score.

    >>> s = prequential_summary([0, 20, 1, -1], [5, 0, 30, 3], k=10, window=2)
    >>> s["model"]["hr"], s["model"]["cold"], s["popularity"]["hr"], [w["model_hr"] for w in s["windows"]]
    (0.75, 0.25, 0.75, [0.5, 1.0])
    """
    raw = np.asarray(model_ranks, np.int64)
    p = np.asarray(pop_ranks, np.int64)
    if raw.shape != p.shape:
        raise ValueError(f"{raw.size} model ranks but {p.size} popularity ranks; record both per click")
    # What the system serves: the model's ranking for users with a vector, the popularity fallback for
    # cold users (exactly what Recommender.recommend returns for an unknown user).
    m = np.where(raw < 0, p, raw)
    cold = float(np.mean(raw < 0)) if raw.size else 0.0
    windows = []
    for lo in range(0, m.size, window):
        a, b = rank_metrics(m[lo : lo + window], k), rank_metrics(p[lo : lo + window], k)
        windows.append(
            {
                "start": lo,
                "clicks": a["clicks"],
                "model_hr": a["hr"],
                "model_mrr": a["mrr"],
                "pop_hr": b["hr"],
                "pop_mrr": b["mrr"],
                "cold": float(np.mean(raw[lo : lo + window] < 0)),
            }
        )
    warm = raw >= 0
    return {
        "k": k,
        "window": window,
        "model": {**rank_metrics(m, k), "cold": cold},
        "popularity": rank_metrics(p, k),
        "warm": {"model": rank_metrics(raw[warm], k), "popularity": rank_metrics(p[warm], k)},
        "windows": windows,
    }
