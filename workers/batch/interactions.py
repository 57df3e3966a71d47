"""Sparse user x item click-count matrix with string id maps and atomic checkpoints.

:class:`InteractionMatrix` accumulates ``(user_id, item_id, weight)`` events into growable COO
buffers (int32 rows, int32 cols, float32 weights) and string -> int32 id maps, and hands ALS a CSR
with duplicates summed. Zero-weight events (impressions) only register their ids: an explicit zero
in the CSR would read as an observed pair to ALS. Negative weights are explicit negatives (a disliked item):
a pair's entry is the signed sum of its events, and ALS reads a negative entry as an observed zero
(:mod:`workers.kernels.als`).

Checkpoint layout (``save(path)``)::

    path/CURRENT            text: name of the live checkpoint directory, replaced atomically
    path/ckpt-<seq>/        matrix.npz (CSR arrays + shape), ids.json, meta.json (metadata + format)

``save`` writes ``path/ckpt-<seq>.tmp``, fsyncs it, renames it to ``ckpt-<seq>``, then replaces
``CURRENT`` via ``os.replace`` of a temp file. A crash at any point leaves ``CURRENT`` naming a
complete older checkpoint; leftovers are removed by the next successful ``save``.

Memory. A buffered entry costs 12 bytes (4 + 4 + 4). The buffer is compacted (duplicates summed)
before it grows and grows (to ``max(2 * capacity, 1.5 * needed)``) only when the compacted fill
exceeds 75%, so capacity stays below 8/3 of the entries: at most 32 bytes per distinct pair, typically
18-24. Repeated pairs cost one entry. A CSR
from :meth:`InteractionMatrix.to_csr` adds 8 bytes per distinct pair plus 8 per user. Each distinct
id costs roughly 150 bytes (str object, dict slot, list slot). See :meth:`InteractionMatrix.estimate_bytes`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BYTES_PER_EVENT = 12  # int32 row + int32 col + float32 weight in the COO buffer
BYTES_PER_ID = 150  # approximate: str object + dict entry + list slot, for ~10-char ids
_INITIAL_CAPACITY = 1024


class InteractionMatrix:
    """Accumulates click counts keyed by string user/item ids.

    Attributes
    ----------
    metadata : dict
        Arbitrary JSON-serialisable data saved with each checkpoint (e.g. Kafka offsets, dedupe
        watermarks).

    Examples
    --------
    >>> m = InteractionMatrix()
    >>> m.add_batch(["u1", "u2", "u1"], ["a", "b", "a"], [1.0, 2.0, 3.0])
    >>> m.shape, m.user_ids, m.item_ids
    ((2, 2), ['u1', 'u2'], ['a', 'b'])
    >>> m.to_csr().toarray()
    array([[4., 0.],
           [0., 2.]], dtype=float32)
    """

    def __init__(self) -> None:
        self._user_index: dict[str, int] = {}
        self._item_index: dict[str, int] = {}
        self._user_ids: list[str] = []
        self._item_ids: list[str] = []
        self._rows = np.empty(_INITIAL_CAPACITY, np.int32)
        self._cols = np.empty(_INITIAL_CAPACITY, np.int32)
        self._vals = np.empty(_INITIAL_CAPACITY, np.float32)
        self._n = 0
        self._dead: list[int] = []  # rows of removed users whose entries are still buffered
        self.metadata: dict[str, Any] = {}
        self.arrays: dict[str, npt.NDArray[Any]] = {}  # saved beside the matrix (see :meth:`save`)

    # ---- ids ---------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(n_users, n_items) seen so far."""
        return len(self._user_ids), len(self._item_ids)

    @property
    def user_ids(self) -> list[str]:
        """User id of each row index (a copy)."""
        return list(self._user_ids)

    @property
    def item_ids(self) -> list[str]:
        """Item id of each column index (a copy)."""
        return list(self._item_ids)

    def user_index(self, ids: Iterable[str]) -> npt.NDArray[np.int32]:
        """Row index of each user id, ``-1`` when unknown."""
        return np.fromiter((self._user_index.get(u, -1) for u in ids), np.int32)

    def item_index(self, ids: Iterable[str]) -> npt.NDArray[np.int32]:
        """Column index of each item id, ``-1`` when unknown."""
        return np.fromiter((self._item_index.get(i, -1) for i in ids), np.int32)

    @staticmethod
    def _intern(ids: Iterable[str], index: dict[str, int], names: list[str], kind: str) -> list[int]:
        out = []
        for x in ids:
            j = index.get(x)
            if j is None:
                if not isinstance(x, str):
                    raise TypeError(f"{kind} id {x!r} is {type(x).__name__}; ids must be str")
                j = index[x] = len(names)
                names.append(x)
            out.append(j)
        return out

    # ---- accumulation ----------------------------------------------------------------------
    def add(self, user: str, item: str, weight: float = 1.0) -> None:
        """Add one event; see :meth:`add_batch`."""
        self.add_batch([user], [item], [weight])

    def add_batch(self, users: Iterable[str], items: Iterable[str], weights: npt.ArrayLike | None = None) -> None:
        """Add events; ``weights`` default to 1.0. Zero weights only register the ids; negative ones are
        explicit negatives (summed with the pair's positive weight).

        Raises ValueError (nothing added) on mismatched lengths or a NaN/inf weight.
        """
        users, items = list(users), list(items)
        w = np.ones(len(users), np.float32) if weights is None else np.asarray(weights, dtype=np.float32).ravel()
        if not len(users) == len(items) == w.size:
            raise ValueError(
                f"got {len(users)} users, {len(items)} items, {w.size} weights; pass one of each per event"
            )
        bad = ~np.isfinite(w)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(
                f"event {j} ({users[j]!r}, {items[j]!r}) has weight {w[j]}; weights must be "
                "finite: send the dedupe/DLQ path bad events, not the matrix"
            )
        rows = np.asarray(self._intern(users, self._user_index, self._user_ids, "user"), np.int32)
        cols = np.asarray(self._intern(items, self._item_index, self._item_ids, "item"), np.int32)
        keep = w != 0
        rows, cols, w = rows[keep], cols[keep], w[keep]
        self._reserve(rows.size)
        s = slice(self._n, self._n + rows.size)
        self._rows[s], self._cols[s], self._vals[s] = rows, cols, w
        self._n += rows.size

    def remove_user(self, user: str) -> bool:
        """Drop every entry of ``user`` (an erased user, ``stream.erasure``); False when unknown.

        The row index stays, its id becomes ``""`` (never a valid id): rows are only ever appended, so the
        ALS warm start stays aligned, and the publisher skips such rows. A later event of the same id gets a
        new row.

        >>> m = InteractionMatrix()
        >>> m.add_batch(["u1", "u2"], ["a", "b"], [1.0, 2.0])
        >>> m.remove_user("u1"), m.user_ids, m.to_csr().toarray().tolist()
        (True, ['', 'u2'], [[0.0, 0.0], [0.0, 2.0]])
        """
        j = self._user_index.pop(user, None)
        if j is None:
            return False
        self._user_ids[j] = ""
        self._dead.append(j)  # its entries leave the buffer at the next to_csr (one pass for many erasures)
        return True

    def _drop_dead(self) -> None:
        if self._dead:
            keep = ~np.isin(self._rows[: self._n], np.asarray(self._dead, np.int32))
            n = int(keep.sum())
            for buf in (self._rows, self._cols, self._vals):
                buf[:n] = buf[: self._n][keep]
            self._n, self._dead = n, []

    def _reserve(self, extra: int) -> None:
        if self._n + extra <= self._rows.size:
            return
        self._compact()  # repeated pairs collapse; grow only when that leaves < 25% headroom
        if self._n + extra <= self._rows.size * 3 // 4:
            return
        cap = max(2 * self._rows.size, (self._n + extra) * 3 // 2, _INITIAL_CAPACITY)
        for name in ("_rows", "_cols", "_vals"):
            old = getattr(self, name)
            new = np.empty(cap, old.dtype)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)

    def _compact(self) -> None:
        """Sum duplicate pairs in the buffer in place (keeps CSR order)."""
        csr = self.to_csr()
        coo = csr.tocoo()
        n = coo.nnz
        self._rows[:n], self._cols[:n], self._vals[:n] = coo.row, coo.col, coo.data
        self._n = n

    @property
    def nnz(self) -> int:
        """Buffered entries (>= distinct pairs until :meth:`to_csr` or a compaction sums duplicates)."""
        return self._n

    def to_csr(self) -> sp.csr_matrix:
        """User x item counts: float32 data, int32 indices and indptr, duplicates summed, sorted."""
        self._drop_dead()
        m = sp.csr_matrix(
            (self._vals[: self._n], (self._rows[: self._n], self._cols[: self._n])), shape=self.shape, dtype=np.float32
        )
        m.sum_duplicates()
        m.indices = m.indices.astype(np.int32, copy=False)
        m.indptr = m.indptr.astype(np.int32, copy=False)
        return m

    # ---- memory -----------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Approximate resident bytes: buffers (capacity) + id maps (measured string sizes)."""
        buf = self._rows.nbytes + self._cols.nbytes + self._vals.nbytes
        ids = sum(sys.getsizeof(s) for s in self._user_ids) + sum(sys.getsizeof(s) for s in self._item_ids)
        maps = sys.getsizeof(self._user_index) + sys.getsizeof(self._item_index)
        lists = sys.getsizeof(self._user_ids) + sys.getsizeof(self._item_ids)
        return int(buf + ids + maps + lists)

    @staticmethod
    def estimate_bytes(n_interactions: int, n_users: int = 0, n_items: int = 0) -> int:
        """Upper estimate for ``n_interactions`` distinct pairs: 32 B each (buffer with growth slack,
        8/3 x 12 B) + 8 B each for a CSR copy + ``BYTES_PER_ID`` per distinct id + 8 B per user (indptr).

        >>> InteractionMatrix.estimate_bytes(1_000_000, 50_000, 10_000) // 2**20
        47
        """
        return int(n_interactions * (32 + 8) + (n_users + n_items) * BYTES_PER_ID + 8 * n_users)

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None,
             arrays: Mapping[str, npt.NDArray[Any]] | None = None) -> Path:  # fmt: skip
        """Atomically write a checkpoint into directory ``path``; returns the checkpoint directory.

        ``metadata`` (default: ``self.metadata``) must be JSON-serialisable; it replaces
        ``self.metadata``. ``arrays`` are saved beside the matrix and come back in :attr:`arrays`. See the
        module docstring for the layout and crash guarantees.
        """
        root = Path(path)
        meta = dict(self.metadata if metadata is None else metadata)
        try:
            meta_json = json.dumps({"format": FORMAT_VERSION, "shape": list(self.shape), "metadata": meta})
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"checkpoint metadata is not JSON-serialisable ({e}); store offsets and "
                "watermarks as str/int/float/list/dict"
            ) from e
        root.mkdir(parents=True, exist_ok=True)
        current = _read_current(root)
        seq = 1 + max([_seq(p.name) for p in root.glob("ckpt-*")] + [0])
        name = f"ckpt-{seq:08d}"
        tmp = root / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        csr = self.to_csr()
        with open(tmp / "matrix.npz", "wb") as fh:
            parts: dict[str, Any] = {"indptr": csr.indptr, "indices": csr.indices, "data": csr.data,
                                     "shape": np.asarray(csr.shape, np.int64)}  # fmt: skip
            parts |= {f"x_{k}": v for k, v in (arrays or {}).items()}
            np.savez(fh, **parts)
        _write_text(tmp / "ids.json", json.dumps({"users": self._user_ids, "items": self._item_ids}))
        _write_text(tmp / "meta.json", meta_json)
        _fsync_path(tmp / "matrix.npz")
        _fsync_path(tmp)
        os.replace(tmp, root / name)
        _write_text(root / "CURRENT.tmp", name)
        os.replace(root / "CURRENT.tmp", root / "CURRENT")
        _fsync_path(root)
        self.metadata = meta
        for p in root.glob("ckpt-*"):  # drop older checkpoints and crash leftovers
            if p.name != name:
                shutil.rmtree(p, ignore_errors=True)
        log.info(
            "saved interaction checkpoint %s (%d users, %d items, %d nnz, replaced %s)",
            root / name,
            *self.shape,
            csr.nnz,
            current,
        )
        return root / name

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> InteractionMatrix:
        """Load the checkpoint that ``path/CURRENT`` names (ids, counts and ``metadata``)."""
        root = Path(path)
        name = _read_current(root)
        if name is None:
            raise FileNotFoundError(
                f"no checkpoint in {root} (missing CURRENT); start empty with "
                "InteractionMatrix() or point to the right directory"
            )
        d = root / name
        meta = json.loads((d / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"checkpoint {d} has format {meta.get('format')}, this code reads "
                f"{FORMAT_VERSION}; rebuild it from the events topic"
            )
        ids = json.loads((d / "ids.json").read_text())
        with np.load(d / "matrix.npz") as z:
            csr = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
            arrays = {name[2:]: z[name].copy() for name in z.files if name.startswith("x_")}
        m = cls()
        m.arrays = arrays
        m._user_ids, m._item_ids = list(ids["users"]), list(ids["items"])
        m._user_index = {u: j for j, u in enumerate(m._user_ids) if u}  # "": an erased user's row
        m._item_index = {i: j for j, i in enumerate(m._item_ids)}
        coo = csr.tocoo()
        m._reserve(coo.nnz)
        m._rows[: coo.nnz], m._cols[: coo.nnz], m._vals[: coo.nnz] = coo.row, coo.col, coo.data
        m._n = coo.nnz
        m.metadata = meta["metadata"]
        return m


def _seq(name: str) -> int:
    try:
        return int(name.split("-", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return 0


def _read_current(root: Path) -> str | None:
    try:
        return (root / "CURRENT").read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_text(p: Path, text: str) -> None:
    with open(p, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
