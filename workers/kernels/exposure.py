"""Exposure negatives: impressions that were shown and not clicked within a window (pure; event time only).

The LMF worker keeps one tracker per events partition; pairs that come due are trained as negatives with
their own weight (``ZEROCF_LMF_EXPOSURE_WEIGHT``). Pending pairs live in memory only: a restart forgets the
impressions shown in the last window (documented trade-off; they are soft evidence).
"""

from __future__ import annotations

import heapq

import numpy as np
import numpy.typing as npt

from workers.kernels.sampling import I32


class ExposureTracker:
    """Impressions waiting for a click; those not clicked within a window become exposure negatives.

    Keys are (user index, item index). Showing a pair again restarts its window; a click on the pair
    forgets it. Uses the events' own timestamps (ms), never the clock. Memory is bounded: beyond
    ``capacity`` pending pairs the oldest-shown are dropped and counted in ``dropped``.

    >>> t = ExposureTracker(capacity=10)
    >>> t.shown([1, 1, 2], [7, 8, 7], [1000, 1000, 1500])
    >>> t.clicked([1], [8])
    1
    >>> [a.tolist() for a in t.due(now_ts=61_200, window_ms=60_000)]
    [[1], [7]]
    >>> len(t)
    1
    """

    def __init__(self, capacity: int = 1_000_000) -> None:
        if capacity < 1:
            raise ValueError(f"exposure capacity must be >= 1 pending pair, got {capacity}")
        self.capacity = int(capacity)
        self.dropped = 0
        self._pending: dict[tuple[int, int], tuple[int, int]] = {}  # key -> (shown_ts, seq)
        self._heap: list[tuple[int, int, int, int]] = []  # (shown_ts, seq, user, item), lazy deletes
        self._seq = 0

    def __len__(self) -> int:
        return len(self._pending)

    def shown(self, users: npt.ArrayLike, items: npt.ArrayLike, ts: npt.ArrayLike) -> None:
        """Record impressions: users, items, shown timestamps (ms); ``ts`` may be a scalar."""
        u, i = np.atleast_1d(users).tolist(), np.atleast_1d(items).tolist()
        t = np.broadcast_to(np.asarray(ts, np.int64), (len(u),)).tolist()
        for uu, ii, tt in zip(u, i, t, strict=True):
            self._seq += 1
            self._pending[(uu, ii)] = (tt, self._seq)
            heapq.heappush(self._heap, (tt, self._seq, uu, ii))
        while len(self._pending) > self.capacity:
            tt, seq, uu, ii = heapq.heappop(self._heap)
            if self._pending.get((uu, ii)) == (tt, seq):
                del self._pending[(uu, ii)]
                self.dropped += 1
        if len(self._heap) > 2 * len(self._pending) + 1024:
            self._heap = [(tt, seq, uu, ii) for (uu, ii), (tt, seq) in self._pending.items()]
            heapq.heapify(self._heap)

    def clicked(self, users: npt.ArrayLike, items: npt.ArrayLike) -> int:
        """Forget clicked pairs; return how many were pending."""
        pend = self._pending
        return sum(
            pend.pop(k, None) is not None
            for k in zip(np.atleast_1d(users).tolist(), np.atleast_1d(items).tolist(), strict=True)
        )

    def forget_user(self, user: int) -> int:
        """Forget every pending pair of ``user`` (an erased user, ``stream.erasure``); return how many."""
        gone = [key for key in self._pending if key[0] == user]
        for key in gone:
            del self._pending[key]
        return len(gone)

    def due(self, now_ts: int, window_ms: int) -> tuple[I32, I32]:
        """Pop pairs shown more than ``window_ms`` before ``now_ts``: (users, items) int32 arrays."""
        out_u: list[int] = []
        out_i: list[int] = []
        limit = now_ts - window_ms
        while self._heap and self._heap[0][0] < limit:
            tt, seq, uu, ii = heapq.heappop(self._heap)
            if self._pending.get((uu, ii)) == (tt, seq):
                del self._pending[(uu, ii)]
                out_u.append(uu)
                out_i.append(ii)
        return np.array(out_u, np.int32), np.array(out_i, np.int32)
