"""The popularity proposal of the online LMF's negatives: pure functions over numpy arrays.

Nothing here does I/O, reads the clock or configures logging; randomness comes only from the
``np.random.Generator`` passed in, so a fixed seed gives a fixed result. Items are dense int32 *indices*
(the worker maps string ids to indices). The negatives themselves are drawn inside the training kernel
(:mod:`workers.kernels.lmf`), click by click, from the alias table built here.

- :class:`Reservoir`: Algorithm R sample of the clicked-item stream plus all-time per-item click counts.
- :class:`PopularitySampler`: Vose alias table with ``P(i) ∝ f_i ** alpha`` over reservoir frequencies.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit

__all__ = ["PopularitySampler", "Reservoir"]

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

    def __init__(self, reservoir: Reservoir, alpha: float = 0.25, refresh_every: int = 10_000) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}; 0.25 is the default (docs/evaluation.md)")
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
        """Rebuild if ``refresh_every`` clicks were added since the last build, or if the last build saw an
        empty reservoir and it now holds clicks (so a cold start gets a table after its first batch);
        return whether it did."""
        first = self.support.size == 0 and self.reservoir.size > 0
        if first or self.reservoir.seen - self.built_at >= self.refresh_every:
            self.refresh()
            return True
        return False

    def tables(self) -> tuple[npt.NDArray[np.float64], I32, I32]:
        """``(prob, alias, support)`` of the last build, the form the training kernel draws from (empty
        arrays before the reservoir holds a click: the kernel then draws uniformly)."""
        return self._prob, self._alias.astype(np.int32, copy=False), self.support

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
