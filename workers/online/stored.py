"""What Redis holds of each item row, as far as this worker knows: the row, its accumulators and its version.

The worker trains on its own copy of the item rows (``OnlineModel.V``, refreshed every
``ZEROCF_LMF_ITEM_REFRESH_S``); Redis holds the sum of every worker's deltas. To spare Redis the float add
(unpack, add, pack: most of a batch write's time), the worker sends, with each item delta, the row Redis held
at the version it last saw plus that delta, computed here in float32 (the bits Redis's add would give), and the
version. The batch script SETs the row when its stored version is still that one and adds the delta otherwise
(another worker wrote it since), so no delta is lost or applied twice (``FactorStore.apply_batch``).

Invariant: a known version is never newer than the stored one, and when they are equal the row and
accumulators here are the stored bits. Versions are read before the rows they go with; after a write the
version becomes ``sent + 1`` (what Redis stores if the row was SET; if it was added, Redis holds a higher
version and this one never matches again until the next read). Version -1: unknown, always added.

>>> s = StoredRows(width=2, cap=2)
>>> s.set(np.array([0]), np.array([[1.0, 2.0]], np.float32), np.zeros((1, 2), np.float32), np.array([3]))
>>> vers, rows, acc = s.absolute(np.array([0, 1]), np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))
>>> vers.tolist(), rows.tolist()
([3, -1], [[2.0, 3.0], [1.0, 1.0]])
>>> s.wrote(np.array([0, 1]), vers, rows, acc); s.ver.tolist()
[4, -1]
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

__all__ = ["StoredRows"]


class StoredRows:
    """Stored item rows ``(cap, width)``, accumulators ``(cap, 2)`` and versions ``(cap,)`` by model row."""

    def __init__(self, width: int, cap: int) -> None:
        self.rows = np.zeros((cap, width), np.float32)
        self.acc = np.zeros((cap, 2), np.float32)
        self.ver = np.full(cap, -1, np.int64)

    def grow(self, cap: int) -> None:
        """Room for ``cap`` rows; new rows are unknown (version -1)."""
        n = self.ver.shape[0]
        if cap <= n:
            return
        rows, acc = np.zeros((cap, self.rows.shape[1]), np.float32), np.zeros((cap, 2), np.float32)
        ver = np.full(cap, -1, np.int64)
        rows[:n], acc[:n], ver[:n] = self.rows, self.acc, self.ver
        self.rows, self.acc, self.ver = rows, acc, ver

    def set(self, idx: npt.NDArray[np.integer], rows: F32, acc: F32, versions: npt.NDArray[np.integer]) -> None:
        """Rows ``idx`` as read from Redis (``versions`` read before the rows; -1 unknown)."""
        self.rows[idx], self.acc[idx], self.ver[idx] = rows, acc, versions

    def absolute(self, idx: npt.NDArray[np.integer], deltas: F32, acc_deltas: F32) -> tuple[I64, F32, F32]:
        """The versions to send for rows ``idx`` and the stored rows (accumulators) plus the deltas, float32."""
        return self.ver[idx].copy(), self.rows[idx] + deltas, self.acc[idx] + acc_deltas

    def wrote(self, idx: npt.NDArray[np.integer], versions: I64, rows: F32, acc: F32) -> None:
        """The write of :meth:`absolute`'s values was submitted (a refused one reloads everything)."""
        self.rows[idx], self.acc[idx] = rows, acc
        self.ver[idx] = np.where(versions >= 0, versions + 1, -1)
