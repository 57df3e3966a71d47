"""Dataset helpers for the benchmarks: loaders, a synthetic generator, a holdout split and top-k metrics.

Benchmark-only: library code never imports this module.

- :func:`load_ml100k` reads MovieLens 100K ``u.data`` (tab: user item rating ts; every rating is one
  interaction, the rating is kept as ``weight``).
- :func:`load_lastfm` reads HetRec Last.fm 2K ``user_artists.dat`` (header, tab, CRLF; ``weight`` =
  play count; no timestamps).
- :func:`synthetic` draws ~1M interactions with power-law item popularity and user activity and a
  planted low-rank affinity.
- :func:`synthetic_large` draws the same kind of data at scale (default 1M users x 200k items, ~12.6M pairs)
  without a dense user x item pass.
- :func:`holdout_split` holds out the last 20% of each user's interactions by time (seeded random when
  there are no timestamps), for users with at least 5 interactions.
- :func:`ranking_metrics` gives recall@k (hits / min(k, |test|)) and NDCG@k (binary gains) of top-k
  lists that already exclude the training items.

The split and the metrics live in :mod:`workers.evaluation.metrics` (``zerocf eval`` uses them too); the two
functions here are thin wrappers kept for the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from workers.evaluation import metrics as evaluation

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"  # ../shared beside the checkout
ML100K = DATASETS / "ml-100k" / "u.data"
LASTFM = DATASETS / "lastfm-2k" / "user_artists.dat"


@dataclass(frozen=True)
class Interactions:
    """One interaction per entry, dense 0-based indices; ``ts`` is None when the data has no time."""

    name: str
    user: npt.NDArray[np.int32]
    item: npt.NDArray[np.int32]
    weight: npt.NDArray[np.float32]
    ts: npt.NDArray[np.int64] | None
    n_users: int
    n_items: int

    def to_csr(self, binary: bool = False) -> sp.csr_matrix:
        """User x item float32 CSR of the weights (or 1.0 each when ``binary``), duplicates summed."""
        w = np.ones_like(self.weight) if binary else self.weight
        m = sp.csr_matrix((w, (self.user, self.item)), shape=(self.n_users, self.n_items), dtype=np.float32)
        m.sum_duplicates()
        return m


def _densify(raw: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int32], int]:
    uniq, inv = np.unique(raw, return_inverse=True)
    return inv.astype(np.int32), int(uniq.size)


def load_ml100k(path: Path = ML100K) -> Interactions:
    """MovieLens 100K: 943 users, 1,682 items, 100,000 rated (user, item) pairs with Unix timestamps.

    >>> d = load_ml100k(); (d.n_users, d.n_items, d.user.size)
    (943, 1682, 100000)
    """
    a = np.loadtxt(path, dtype=np.int64, delimiter="\t")
    u, nu = _densify(a[:, 0])
    i, ni = _densify(a[:, 1])
    return Interactions("ml-100k", u, i, a[:, 2].astype(np.float32), a[:, 3], nu, ni)


def load_lastfm(path: Path = LASTFM) -> Interactions:
    """Last.fm 2K user-artist play counts: 1,892 users, 17,632 artists, 92,834 pairs, no timestamps.

    >>> d = load_lastfm(); (d.n_users, d.n_items, d.user.size, d.ts is None)
    (1892, 17632, 92834, True)
    """
    a = np.loadtxt(path, dtype=np.int64, delimiter="\t", skiprows=1)  # CRLF: trailing \r is whitespace
    u, nu = _densify(a[:, 0])
    i, ni = _densify(a[:, 1])
    return Interactions("lastfm-2k", u, i, a[:, 2].astype(np.float32), None, nu, ni)


def synthetic(
    n_users: int = 25_000,
    n_items: int = 10_000,
    mean_per_user: float = 40.0,
    rank: int = 16,
    pop_exponent: float = 0.8,
    affinity: float = 2.0,
    seed: int = 0,
    batch: int = 1024,
) -> Interactions:
    """Synthetic implicit feedback, ~``n_users * mean_per_user`` distinct pairs (1M by default).

    Item ``i`` has popularity ``(i + 1)^-pop_exponent`` (a random permutation of ids); user activity is
    log-normal, clipped to ``[5, n_items / 4]``. User ``u`` draws its items without replacement with
    probability proportional to ``popularity_i * exp(affinity * a_u . b_i)`` (Gumbel top-k), where
    ``a_u, b_i ~ N(0, I_rank / rank)`` are the planted factors; counts are ``1 + Geometric``.

    >>> d = synthetic(n_users=200, n_items=100, mean_per_user=10, seed=1)
    >>> d.user.size > 1000, d.ts is None, int(d.to_csr().sum(axis=1).min()) >= 5
    (True, True, True)
    """
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((n_users, rank)) / np.sqrt(rank)).astype(np.float32)
    b = (rng.standard_normal((n_items, rank)) / np.sqrt(rank)).astype(np.float32)
    log_pop = (-pop_exponent * np.log1p(rng.permutation(n_items))).astype(np.float32)
    act = rng.lognormal(0.0, 0.8, n_users)
    n_u = np.clip(np.rint(act / act.mean() * mean_per_user), 5, max(5, n_items // 4)).astype(np.int64)
    users, items = [], []
    for lo in range(0, n_users, batch):
        hi = min(n_users, lo + batch)
        g = -np.log(-np.log(rng.random((hi - lo, n_items), dtype=np.float32) + np.float32(1e-12)))
        logits = np.float32(affinity) * (a[lo:hi] @ b.T) + log_pop + g
        top = int(n_u[lo:hi].max())
        cand = (
            np.argpartition(-logits, top - 1, axis=1)[:, :top]
            if top < n_items
            else np.tile(np.arange(n_items), (hi - lo, 1))
        )
        order = np.take_along_axis(cand, np.argsort(-np.take_along_axis(logits, cand, 1), 1), 1)
        for r in range(hi - lo):
            items.append(order[r, : n_u[lo + r]])
        users.append(np.repeat(np.arange(lo, hi), n_u[lo:hi]))
    user = np.concatenate(users).astype(np.int32)
    item = np.concatenate(items).astype(np.int32)
    weight = rng.geometric(0.5, user.size).astype(np.float32)  # 1 + Geometric(0.5) failures
    return Interactions("synthetic", user, item, weight, None, n_users, n_items)


def synthetic_large(
    n_users: int = 1_000_000,
    n_items: int = 200_000,
    mean_per_user: float = 14.0,
    rank: int = 16,
    pop_exponent: float = 0.8,
    affinity: float = 2.0,
    oversample: int = 3,
    seed: int = 0,
    chunk: int = 50_000,
) -> Interactions:
    """:func:`synthetic` at scale: ~``n_users * mean_per_user`` distinct pairs in O(pairs) time and memory.

    Same model (popularity ``(rank + 1)^-pop_exponent`` over permuted ids, log-normal activity clipped to
    ``[5, n_items / 4]``, planted factors ``a_u, b_i ~ N(0, I_rank / rank)``, counts ``1 + Geometric``),
    sampled approximately: user ``u`` draws ``oversample * n_u`` candidates in proportion to popularity,
    scores them ``affinity * a_u . b_i + Gumbel`` and keeps its best ``n_u`` distinct ones (fewer when
    the draws hold fewer distinct items). Rows come out grouped by user; ``chunk`` users are drawn at once.

    >>> d = synthetic_large(n_users=300, n_items=200, mean_per_user=10, seed=1)
    >>> c = d.to_csr(); c.nnz == d.user.size > 2500, int(np.diff(c.indptr).min()) >= 5
    (True, True)
    """
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((n_users, rank)) / np.sqrt(rank)).astype(np.float32)
    b = (rng.standard_normal((n_items, rank)) / np.sqrt(rank)).astype(np.float32)
    cdf = np.cumsum(np.arange(1, n_items + 1, dtype=np.float64) ** -pop_exponent)
    cdf /= cdf[-1]
    item_of_rank = rng.permutation(n_items).astype(np.int32)
    act = rng.lognormal(0.0, 0.8, n_users)
    n_u = np.clip(np.rint(act / act.mean() * mean_per_user), 5, max(5, n_items // 4)).astype(np.int64)
    users, items = [], []
    for lo in range(0, n_users, chunk):
        hi = min(n_users, lo + chunk)
        u = np.repeat(np.arange(lo, hi, dtype=np.int64), oversample * n_u[lo:hi])
        i = item_of_rank[np.minimum(np.searchsorted(cdf, rng.random(u.size)), n_items - 1)]
        gumbel = -np.log(-np.log(rng.random(u.size, dtype=np.float32) + np.float32(1e-12)))
        score = np.float32(affinity) * np.einsum("ij,ij->i", a[u], b[i]) + gumbel
        key = u * n_items + i
        o = np.lexsort((-score, key))  # each distinct pair's best-scored draw first
        o = o[np.r_[True, key[o][1:] != key[o][:-1]]]
        o = o[np.lexsort((-score[o], u[o]))]  # then per user, best first
        uo = u[o]
        rank_in_user = np.arange(o.size) - np.searchsorted(uo, np.arange(lo, hi))[uo - lo]
        keep = rank_in_user < n_u[uo - lo]
        users.append(uo[keep].astype(np.int32))
        items.append(i[o][keep])
    user = np.concatenate(users)
    item = np.concatenate(items).astype(np.int32)
    weight = rng.geometric(0.5, user.size).astype(np.float32)
    return Interactions("synthetic-large", user, item, weight, None, n_users, n_items)


def holdout_split(
    d: Interactions, test_frac: float = 0.2, min_interactions: int = 5, seed: int = 0
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Per-user holdout: the last ``round(test_frac * n_u)`` (>= 1) interactions by time go to test.

    Users with fewer than ``min_interactions`` keep everything in train. Ties in time, and data
    without timestamps, are ordered by a seeded random key. Returns (train, test) weight CSRs of the
    full shape.

    >>> d = Interactions("t", np.zeros(5, np.int32), np.arange(5, dtype=np.int32),
    ...                  np.ones(5, np.float32), np.arange(5), 1, 5)
    >>> tr, te = holdout_split(d); te.indices.tolist(), tr.nnz
    ([4], 4)
    """
    is_test = holdout_mask(d, test_frac, min_interactions, seed)
    return subset(d, ~is_test).to_csr(), subset(d, is_test).to_csr()


def subset(d: Interactions, mask: npt.NDArray[np.bool_]) -> Interactions:
    """The interactions selected by ``mask``, same index space."""
    return Interactions(
        d.name, d.user[mask], d.item[mask], d.weight[mask], None if d.ts is None else d.ts[mask], d.n_users, d.n_items
    )


def holdout_mask(
    d: Interactions, test_frac: float = 0.2, min_interactions: int = 5, seed: int = 0
) -> npt.NDArray[np.bool_]:
    """Boolean mask of the test interactions of :func:`holdout_split`
    (:func:`workers.evaluation.metrics.holdout_mask`)."""
    return evaluation.holdout_mask(d.user, d.ts, d.n_users, test_frac, min_interactions, seed)


def ranking_metrics(
    top_ids: npt.NDArray[np.integer], test: sp.csr_matrix, users: npt.NDArray[np.integer], k: int = 10
) -> dict[str, float]:
    """Mean recall@k and NDCG@k over ``users`` (rows of ``top_ids``) that have test items.

    ``top_ids[j]`` is the ranked list for user ``users[j]``, training items already excluded.
    recall@k = hits / min(k, |test_u|); NDCG@k with binary gains, ideal DCG over min(k, |test_u|).

    >>> test = sp.csr_matrix(np.array([[0, 1, 1, 0]], np.float32))
    >>> ranking_metrics(np.array([[2, 0]]), test, np.array([0]), k=2)
    {'recall': 0.5, 'ndcg': 0.6131471927654584, 'users': 1}
    """
    m = evaluation.ranking_metrics(top_ids, test, users, k)
    return {"recall": m["recall"], "ndcg": m["ndcg"], "users": m["users"]}
