"""Datasets as dense arrays, the holdout split every evaluation uses, and the training stream order (pure).

:class:`Holdout` carves the per-user temporal split (:func:`workers.evaluation.metrics.holdout_mask`: the last
20 % of each user's clicks with at least 5, by time) and a validation split cut the same way out of the
training part: defaults are tuned on validation only, then measured on test. :meth:`Data.stream` is the order
clicks are learned in: by time (stable), or a seeded permutation for data without timestamps.

>>> d = Data.from_rows([Interaction("u1", f"i{t}", 946_684_800_000 + t, 1, t) for t in range(10)])
>>> h = Holdout(d, seed=0)
>>> int(h.test.sum()), int(h.val.sum()), d.stream(~h.test, 0).item.tolist()
(2, 2, [0, 1, 2, 3, 4, 5, 6, 7])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from stream.errors import ConfigError
from stream.replay.datasets import BadLine, Format, Interaction, read_interactions
from workers.evaluation.metrics import holdout_mask

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]

__all__ = ["Data", "Holdout", "Stream", "load_data"]


@dataclass(frozen=True)
class Stream:
    """Clicks in stream order (dense indices), the universe they live in."""

    user: I32
    item: I32
    count: F32
    n_users: int
    n_items: int
    ts: npt.NDArray[np.int64] | None = None

    def csr(self, binary: bool = False) -> sp.csr_matrix:
        """User x item float32 CSR of the counts (1.0 per pair with ``binary``), duplicates summed."""
        m = sp.csr_matrix((self.count, (self.user, self.item)), shape=(self.n_users, self.n_items), dtype=np.float32)
        m.sum_duplicates()
        if binary:
            m.data[:] = 1.0
        return m

    def head(self, n: int) -> Stream:
        ts = None if self.ts is None else self.ts[:n]
        return Stream(self.user[:n], self.item[:n], self.count[:n], self.n_users, self.n_items, ts)

    def __len__(self) -> int:
        return int(self.user.size)


@dataclass
class Data:
    """A dataset as dense arrays; ``ts`` is None without timestamps; ``users``/``items`` name the indices."""

    user: I32
    item: I32
    count: F32
    ts: npt.NDArray[np.int64] | None
    users: list[str]
    items: list[str]
    rows: list[Interaction] = field(default_factory=list)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @classmethod
    def from_rows(cls, rows: list[Interaction]) -> Data:
        if not rows:
            raise ConfigError("the dataset holds no interactions; check the file and --format")
        users, u = np.unique([r.user_id for r in rows], return_inverse=True)
        items, i = np.unique([r.item_id for r in rows], return_inverse=True)
        ts = np.array([r.ts_ms for r in rows], np.int64) if rows[0].ts_ms is not None else None
        count = np.array([r.count for r in rows], np.float32)
        return cls(u.astype(np.int32), i.astype(np.int32), count, ts, users.tolist(), items.tolist(), rows)

    def csr(self, mask: npt.NDArray[np.bool_]) -> sp.csr_matrix:
        m = sp.csr_matrix((self.count[mask], (self.user[mask], self.item[mask])), shape=(self.n_users, self.n_items),
                          dtype=np.float32)  # fmt: skip
        m.sum_duplicates()
        return m

    def order(self, mask: npt.NDArray[np.bool_], seed: int) -> npt.NDArray[np.intp]:
        """Row indices of ``mask`` in stream order: by time (stable), else a seeded random permutation."""
        idx = np.flatnonzero(mask)
        if self.ts is not None:
            return idx[np.argsort(self.ts[idx], kind="stable")]
        return idx[np.random.default_rng(seed).permutation(idx.size)]

    def stream(self, mask: npt.NDArray[np.bool_], seed: int) -> Stream:
        """The rows of ``mask`` in stream order (see :meth:`order`)."""
        idx = self.order(mask, seed)
        ts = None if self.ts is None else self.ts[idx]
        return Stream(self.user[idx].astype(np.int32), self.item[idx].astype(np.int32),
                      self.count[idx].astype(np.float32), self.n_users, self.n_items, ts)  # fmt: skip


def load_data(path: str, fmt: Format) -> Data:
    """Read a dataset file; bad lines are logged and skipped (counted)."""
    bad: list[BadLine] = []
    rows = list(read_interactions(path, fmt, on_bad_line=bad.append))
    if bad:
        log.warning("%s: %d bad lines skipped (first: line %d, %s)", path, len(bad), bad[0].line_no, bad[0].reason)
    if not rows:
        raise ConfigError(f"{path} holds no interactions in format {fmt!r}; check --format")
    return Data.from_rows(rows)


class Holdout:
    """Train / validation / test masks of the per-user temporal holdout."""

    def __init__(self, data: Data, seed: int = 0) -> None:
        self.data, self.seed = data, seed
        self.test = holdout_mask(data.user, data.ts, data.n_users, seed=seed)
        train = ~self.test
        inner = holdout_mask(data.user[train], None if data.ts is None else data.ts[train], data.n_users, seed=seed)
        self.val = np.zeros_like(train)
        self.val[np.flatnonzero(train)[inner]] = True
        self.fit_mask = train & ~self.val

    def split(self, validation: bool) -> tuple[npt.NDArray[np.bool_], sp.csr_matrix, sp.csr_matrix, I32]:
        """(train mask, train csr, eval csr, evaluated users)."""
        tr = self.fit_mask if validation else ~self.test
        ev = self.data.csr(self.val if validation else self.test)
        return tr, self.data.csr(tr), ev, np.flatnonzero(np.diff(ev.indptr)).astype(np.int32)
