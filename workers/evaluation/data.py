"""Datasets as dense arrays, the holdout split every evaluation uses, and the training stream order (pure).

:class:`Holdout` carves the test split and a validation split cut the same way out of the training part
(defaults are tuned on validation only, then measured on test). ``split="user"`` (default) is the per-user
temporal split (:func:`workers.evaluation.metrics.holdout_mask`: the last 20 % of each user's clicks with at
least 5, by time); ``split="time"`` holds out the last 20 % of all clicks by time (:func:`time_split_mask`)
and evaluates the returning users (those with training clicks): the right question for a news stream, where
most users click a handful of times and tomorrow's articles do not exist today. :meth:`Data.stream` is the order
clicks are learned in: by time (stable), or a seeded permutation for data without timestamps.

>>> d = Data.from_rows([Interaction("u1", f"i{t}", 946_684_800_000 + t, 1, t) for t in range(10)])
>>> h = Holdout(d, seed=0)
>>> int(h.test.sum()), int(h.val.sum()), d.stream(~h.test, 0).item.tolist()
(2, 2, [0, 1, 2, 3, 4, 5, 6, 7])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from stream.errors import ConfigError
from stream.replay.datasets import BadLine, Format, Interaction, read_interactions
from workers.evaluation.metrics import holdout_mask

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]

__all__ = ["Data", "Holdout", "Split", "Stream", "load_data", "time_split_mask"]

Split = Literal["user", "time"]


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


def time_split_mask(ts: npt.NDArray[np.int64], test_frac: float = 0.2) -> npt.NDArray[np.bool_]:
    """Mask of the last ``test_frac`` of the clicks by time (ties at the cut go by row order).

    >>> time_split_mask(np.array([5, 1, 4, 2, 3]), 0.4).tolist()
    [True, False, True, False, False]
    """
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac={test_frac} must be in (0, 1); 0.2 holds out the last 20 % of the clicks")
    order = np.argsort(ts, kind="stable")
    out = np.zeros(ts.size, np.bool_)
    out[order[int(round(ts.size * (1.0 - test_frac))) :]] = True
    return out


class Holdout:
    """Train / validation / test masks of the holdout (``split`` "user" or "time", see the module doc)."""

    def __init__(self, data: Data, seed: int = 0, split: Split = "user") -> None:
        if split == "time" and data.ts is None:
            raise ConfigError("--split time needs timestamps; this dataset has none (use --split user)")
        self.data, self.seed, self.kind = data, seed, split
        self.test = self._cut(np.ones(data.user.size, np.bool_))
        train = ~self.test
        self.val = self._cut(train)
        self.fit_mask = train & ~self.val

    def _cut(self, rows: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        idx = np.flatnonzero(rows)
        ts = None if self.data.ts is None else self.data.ts[idx]
        if self.kind == "time":
            assert ts is not None
            inner = time_split_mask(ts)
        else:
            inner = holdout_mask(self.data.user[idx], ts, self.data.n_users, seed=self.seed)
        out = np.zeros(rows.size, np.bool_)
        out[idx[inner]] = True
        return out

    def split(self, validation: bool) -> tuple[npt.NDArray[np.bool_], sp.csr_matrix, sp.csr_matrix, I32]:
        """(train mask, train csr, eval csr, evaluated users).

        Pairs the user already clicked in training are dropped from the eval matrix (the lists exclude them, so
        they could never be hit); evaluated users are those left with eval clicks and at least one training
        click.
        """
        tr = self.fit_mask if validation else ~self.test
        train = self.data.csr(tr)
        ev = self.data.csr(self.val if validation else self.test)
        ev = (ev - ev.multiply(train.astype(np.bool_))).tocsr()
        ev.eliminate_zeros()
        users = np.flatnonzero((np.diff(ev.indptr) > 0) & (np.diff(train.indptr) > 0)).astype(np.int32)
        return tr, train, ev, users
