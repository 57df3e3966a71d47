"""Negative sampling for the online LMF worker: pure functions over numpy arrays.

Nothing here does I/O, reads the clock or configures logging; randomness comes only from the
``np.random.Generator`` passed in, so a fixed seed gives a fixed result. Items are dense int32 *indices*
(the worker maps string ids to indices).

- :class:`Reservoir`: Algorithm R sample of the clicked-item stream plus all-time per-item click counts.
- :class:`PopularitySampler`: Vose alias table with ``P(i) ∝ f_i ** alpha`` over reservoir frequencies.
- :func:`sample_negatives`: per-event negatives that never equal the user's known positives, a share of
  them hard (Dynamic Negative Sampling: best-scoring of ``m_candidates`` popularity draws).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from numba import njit

__all__ = ["PopularitySampler", "Reservoir", "positives_csr", "sample_negatives"]

I32 = npt.NDArray[np.int32]


def _as_indices(items: npt.ArrayLike, name: str) -> I32:
    arr = np.asarray(items)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"{name} must be a 1-d array of integer item indices, got dtype {arr.dtype} "
            f"shape {arr.shape}; map item ids to dense indices first"
        )
    if arr.size and int(arr.min()) < 0:
        raise ValueError(f"{name} contains negative index {int(arr.min())}; only indices >= 0 are items")
    return arr.astype(np.int32, copy=False)


class Reservoir:
    """Uniform sample (Algorithm R) of the last clicks seen, plus per-item all-time click counts.

    After ``seen`` clicks every stream position is in the reservoir with probability
    ``min(1, capacity / seen)``. ``counts[i]`` is the number of clicks on item ``i``; it grows as new
    indices appear, so ``n_items == len(counts) == 1 + largest index seen``.

    >>> rng = np.random.default_rng(0)
    >>> r = Reservoir(capacity=4)
    >>> r.add(np.array([0, 1, 1, 2, 2, 2], dtype=np.int32), rng)
    >>> r.size, r.seen, r.counts.tolist()
    (4, 6, [1, 2, 3])
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}; 100000 is a sane default")
        self.capacity = int(capacity)
        self.items: I32 = np.empty(self.capacity, dtype=np.int32)  # only [:size] is valid
        self.size = 0
        self.seen = 0
        self._counts = np.zeros(0, dtype=np.int64)

    @property
    def counts(self) -> npt.NDArray[np.int64]:
        """All-time click count per item index, shape (n_items,)."""
        return self._counts

    @property
    def n_items(self) -> int:
        """Number of item indices known (largest index seen + 1)."""
        return int(self._counts.size)

    def add(self, items: npt.ArrayLike, rng: np.random.Generator) -> None:
        """Offer a batch of clicked item indices, in stream order (Algorithm R, vectorised).

        Stream position ``t`` (1-based) past the fill phase draws ``j ~ U[0, t)`` and overwrites slot
        ``j`` if ``j < capacity``; when several positions of one batch hit one slot the last one wins,
        exactly as the sequential algorithm.
        """
        items = _as_indices(items, "items")
        if items.size == 0:
            return
        top = int(items.max()) + 1
        if top > self._counts.size:
            self._counts = np.concatenate([self._counts, np.zeros(top - self._counts.size, np.int64)])
        np.add.at(self._counts, items, 1)
        n_fill = min(self.capacity - self.size, items.size)
        self.items[self.size : self.size + n_fill] = items[:n_fill]
        self.size += n_fill
        rest = items[n_fill:]
        if rest.size:
            t = self.seen + n_fill + np.arange(1, rest.size + 1, dtype=np.int64)
            j = rng.integers(0, t)
            keep = j < self.capacity
            slots, vals = j[keep][::-1], rest[keep][::-1]
            uniq, last = np.unique(slots, return_index=True)  # first in reversed order = last write
            self.items[uniq] = vals[last]
        self.seen += int(items.size)

    def frequencies(self) -> npt.NDArray[np.int64]:
        """Occurrences of each item index in the reservoir, shape (n_items,)."""
        return np.bincount(self.items[: self.size], minlength=self.n_items).astype(np.int64)

    def state(self) -> dict[str, np.ndarray]:
        """Checkpoint as a dict of numpy arrays; inverse of :meth:`from_state`."""
        return {
            "capacity": np.array(self.capacity, np.int64),
            "seen": np.array(self.seen, np.int64),
            "items": self.items[: self.size].copy(),
            "counts": self._counts.copy(),
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Reservoir:
        """Rebuild a reservoir saved by :meth:`state`."""
        missing = {"capacity", "seen", "items", "counts"} - set(state)
        if missing:
            raise ValueError(f"reservoir state lacks {sorted(missing)}; pass the dict Reservoir.state() made")
        r = cls(int(state["capacity"]))
        items = _as_indices(state["items"], "state['items']")
        if items.size > r.capacity:
            raise ValueError(f"state holds {items.size} items for capacity {r.capacity}; state is corrupt")
        r.items[: items.size] = items
        r.size, r.seen = int(items.size), int(state["seen"])
        r._counts = np.asarray(state["counts"], dtype=np.int64).copy()
        return r

    @classmethod
    def from_counts(cls, counts: npt.ArrayLike, capacity: int, rng: np.random.Generator) -> Reservoir:
        """Rebuild after a restart from per-item click counts only (what the worker does at restart).

        The reservoir itself is not persisted. A reservoir over a stream of ``N = counts.sum()`` clicks
        is a uniform ``capacity``-subset of the stream positions, so its item histogram is multivariate
        hypergeometric given the counts; we draw exactly that. Having lost the click order, the rebuilt
        reservoir reflects all-time popularity instead of the recent window; new clicks replace it at
        the usual Algorithm R rate.

        >>> r = Reservoir.from_counts(np.array([5, 0, 3]), capacity=4, rng=np.random.default_rng(1))
        >>> r.size, r.seen, int(r.frequencies()[1])
        (4, 8, 0)
        """
        counts = np.asarray(counts, dtype=np.int64)
        if counts.ndim != 1 or (counts.size and counts.min() < 0):
            raise ValueError("counts must be a 1-d array of non-negative click counts per item index")
        r = cls(capacity)
        total = int(counts.sum())
        take = counts if total <= capacity else rng.multivariate_hypergeometric(counts, capacity)
        items = np.repeat(np.arange(counts.size, dtype=np.int32), take)
        rng.shuffle(items)
        r.items[: items.size] = items
        r.size, r.seen, r._counts = int(items.size), total, counts.copy()
        return r


@njit(cache=True)
def _vose(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    n = p.size
    prob = np.ones(n, np.float64)
    alias = np.arange(n).astype(np.int32)
    scaled = p * n
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns = nl = 0
    for i in range(n):
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        g = large[nl - 1]
        prob[s] = scaled[s]
        alias[s] = g
        scaled[g] = (scaled[g] + scaled[s]) - 1.0
        if scaled[g] < 1.0:
            nl -= 1
            small[ns] = g
            ns += 1
    return prob, alias  # leftovers keep prob 1 (round-off only)


class PopularitySampler:
    """Draw item indices with ``P(i) ∝ f_i ** alpha``, ``f_i`` = occurrences of ``i`` in the reservoir.

    ``alpha=1`` is plain popularity, ``alpha=0`` uniform over items present in the reservoir. Sampling
    uses a Vose alias table: O(1) per draw. Building it costs O(#distinct items) (bincount of the
    reservoir plus one pass), so it is rebuilt *periodically* by :meth:`maybe_refresh`, every
    ``refresh_every`` clicks added to the reservoir, not on every click: an incremental alias table
    would need a tree (O(log n) per draw and update), and a reservoir of ~1e5 clicks moves too slowly
    for per-click freshness to change the negatives noticeably.

    >>> rng = np.random.default_rng(0)
    >>> r = Reservoir(100)
    >>> r.add(np.array([0, 0, 0, 2], dtype=np.int32), rng)
    >>> s = PopularitySampler(r, alpha=1.0)
    >>> s.probabilities().tolist()
    [0.75, 0.0, 0.25]
    >>> sorted(set(s.sample(50, rng).tolist()))
    [0, 2]
    """

    def __init__(self, reservoir: Reservoir, alpha: float = 0.75, refresh_every: int = 10_000) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}; 0.75 is the usual choice")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1 click, got {refresh_every}")
        self.reservoir, self.alpha, self.refresh_every = reservoir, float(alpha), int(refresh_every)
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the alias table from the reservoir now (O(#distinct items))."""
        freq = self.reservoir.frequencies()
        self.support: I32 = np.flatnonzero(freq).astype(np.int32)
        w = freq[self.support].astype(np.float64) ** self.alpha
        self._prob: npt.NDArray[np.float64]
        self._alias: I32
        self._prob, self._alias = _vose(w / w.sum()) if w.size else (np.ones(0), np.zeros(0, np.int32))
        self._weights = w
        self.n_items = self.reservoir.n_items
        self.built_at = self.reservoir.seen

    def maybe_refresh(self) -> bool:
        """Rebuild if ``refresh_every`` clicks were added since the last build; return whether it did."""
        if self.reservoir.seen - self.built_at >= self.refresh_every:
            self.refresh()
            return True
        return False

    def probabilities(self) -> npt.NDArray[np.float64]:
        """Sampling probability of every item index as of the last build, shape (n_items,)."""
        p = np.zeros(self.n_items, np.float64)
        if self.support.size:
            p[self.support] = self._weights / self._weights.sum()
        return p

    def sample(self, n: int, rng: np.random.Generator) -> I32:
        """Draw ``n`` item indices (with replacement), shape (n,), int32."""
        if self.support.size == 0:
            raise ValueError("the reservoir was empty at the last refresh; add clicks, then call refresh()")
        col = rng.integers(0, self.support.size, size=n)
        pick = np.where(rng.random(n) < self._prob[col], col, self._alias[col])
        return self.support[pick]


def positives_csr(per_event: Sequence[npt.ArrayLike]) -> tuple[npt.NDArray[np.int64], I32]:
    """Pack each event's known-positive item indices as CSR ``(indptr, items)`` for :func:`sample_negatives`.

    >>> indptr, items = positives_csr([[3, 1], [], [2]])
    >>> indptr.tolist(), items.tolist()
    ([0, 2, 2, 3], [3, 1, 2])
    """
    lens = np.array([np.size(p) for p in per_event], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    parts = [np.asarray(p, dtype=np.int32).ravel() for p in per_event if np.size(p)]
    return indptr, (np.concatenate(parts) if parts else np.zeros(0, np.int32))


class _PositiveIndex:
    """Membership test "is item i a known positive of event b", vectorised via sorted int64 keys."""

    def __init__(self, indptr: np.ndarray, items: np.ndarray, n_events: int) -> None:
        rows = np.repeat(np.arange(n_events, dtype=np.int64), np.diff(indptr))
        self.base = np.int64(max(int(items.max()) + 1 if items.size else 1, 1))
        self.keys = np.sort(rows * self.base + items)

    def contains(self, rows: np.ndarray, cand: np.ndarray) -> npt.NDArray[np.bool_]:
        if self.keys.size == 0:
            return np.zeros(np.shape(cand), bool)
        q = rows.astype(np.int64) * self.base + cand
        idx = np.minimum(np.searchsorted(self.keys, q), self.keys.size - 1)
        return (self.keys[idx] == q) & (cand < self.base)


@njit(cache=True)
def _pick_hard(
    users: np.ndarray, items: np.ndarray, cand: np.ndarray, is_pos: np.ndarray
) -> np.ndarray:  # pragma: no cover - compiled
    b_n, h_n, m_n = cand.shape
    out = np.full((b_n, h_n), -1, np.int32)
    for b in range(b_n):
        for h in range(h_n):
            best = -np.inf
            for m in range(m_n):
                if is_pos[b, h, m]:
                    continue
                c = cand[b, h, m]
                s = 0.0
                for d in range(users.shape[1]):
                    s += users[b, d] * items[c, d]
                if s > best:
                    best, out[b, h] = s, c
    return out


def _uniform_non_positive(
    out: I32,
    bad_r: np.ndarray,
    bad_c: np.ndarray,
    indptr: np.ndarray,
    pos_items: np.ndarray,
    n_items: int,
    rng: np.random.Generator,
) -> None:
    """Fill ``out[bad_r, bad_c]`` uniformly from [0, n_items) minus each row's positives; -1 if none left."""
    for r in np.unique(bad_r):
        cols = bad_c[bad_r == r]
        s = np.unique(pos_items[indptr[r] : indptr[r + 1]])
        s = s[s < n_items]
        free = n_items - s.size
        if free <= 0:
            out[r, cols] = -1
            continue
        draw = rng.integers(0, free, size=cols.size)  # draw-th non-positive index:
        out[r, cols] = draw + np.searchsorted(s - np.arange(s.size), draw, side="right")


def sample_negatives(
    sampler: PopularitySampler,
    pos_indptr: npt.ArrayLike,
    pos_items: npt.ArrayLike,
    n_neg: int,
    rng: np.random.Generator,
    *,
    hard_share: float = 0.0,
    m_candidates: int = 8,
    user_vecs: npt.NDArray[np.float32] | None = None,
    item_vecs: npt.NDArray[np.float32] | None = None,
    max_attempts: int = 4,
    n_items: int | None = None,
) -> I32:
    """Draw ``n_neg`` negatives per event, none equal to that event's known positives.

    Parameters
    ----------
    sampler : popularity sampler; its draws are the proposal for every negative.
    pos_indptr, pos_items : CSR of each event's known positives (see :func:`positives_csr`), B events.
    n_neg : negatives per event.
    rng : the only source of randomness.
    hard_share : share of each event's negatives that are hard, ``round(hard_share * n_neg)`` of them,
        in the first columns. A hard negative (Dynamic Negative Sampling, Zhang et al. 2013) is the
        candidate with the highest score ``user_vecs[b] @ item_vecs[c]`` among ``m_candidates``
        popularity draws that are not positives.
    user_vecs : (B, k) float32, the event users' current vectors; needed if the share is > 0.
    item_vecs : (n, k) float32, current item vectors, n >= sampler.n_items.
    max_attempts : redraw rounds from the sampler for draws that hit a positive (or hard slots whose
        candidates all did); what is left is drawn uniformly from the non-positives of [0, n_items).
    n_items : size of the item universe for that fallback, default ``sampler.n_items``.

    Returns
    -------
    (B, n_neg) int32. -1 only when the user's positives cover every item of the universe; the LMF
    kernel skips -1 entries.

    >>> rng = np.random.default_rng(0)
    >>> r = Reservoir(100)
    >>> r.add(np.array([0, 1, 2, 3, 3], dtype=np.int32), rng)
    >>> s = PopularitySampler(r, alpha=1.0)
    >>> neg = sample_negatives(s, *positives_csr([[3], [0, 1, 2]]), n_neg=4, rng=rng)
    >>> bool((neg[0] != 3).all()), neg[1].tolist()
    (True, [3, 3, 3, 3])
    """
    indptr = np.asarray(pos_indptr, dtype=np.int64)
    items = _as_indices(pos_items, "pos_items")
    if not 0.0 <= hard_share <= 1.0 or n_neg < 0 or m_candidates < 1:
        raise ValueError(
            f"need 0 <= hard_share <= 1, n_neg >= 0, m_candidates >= 1; got {hard_share}, {n_neg}, {m_candidates}"
        )
    b_n = indptr.size - 1
    index = _PositiveIndex(indptr, items, b_n)
    rows = np.arange(b_n)[:, None]
    n_hard = int(np.floor(hard_share * n_neg + 0.5))
    out = sampler.sample(b_n * n_neg, rng).reshape(b_n, n_neg)
    bad = np.zeros((b_n, n_neg), bool)
    if n_hard:
        if user_vecs is None or item_vecs is None:
            raise ValueError("hard_share > 0 needs user_vecs (B, k) and item_vecs (n_items, k)")
        if user_vecs.shape[0] != b_n or item_vecs.shape[0] < sampler.n_items:
            raise ValueError(
                f"user_vecs has {user_vecs.shape[0]} rows for {b_n} events, item_vecs "
                f"{item_vecs.shape[0]} rows for {sampler.n_items} items; pass matching arrays"
            )
        cand = sampler.sample(b_n * n_hard * m_candidates, rng).reshape(b_n, n_hard, m_candidates)
        is_pos = index.contains(rows[:, :, None], cand)
        out[:, :n_hard] = _pick_hard(
            np.ascontiguousarray(user_vecs, np.float32), np.ascontiguousarray(item_vecs, np.float32), cand, is_pos
        )
        bad[:, :n_hard] = out[:, :n_hard] < 0
    bad[:, n_hard:] = index.contains(rows, out[:, n_hard:])
    for _ in range(max_attempts):
        r, c = np.nonzero(bad)
        if r.size == 0:
            return out
        out[r, c] = sampler.sample(r.size, rng)
        bad[r, c] = index.contains(r, out[r, c])
    r, c = np.nonzero(bad)
    if r.size:
        _uniform_non_positive(out, r, c, indptr, items, sampler.n_items if n_items is None else n_items, rng)
    return out
