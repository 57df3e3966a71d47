"""Approximate maximum-inner-product search over item rows (pure): a faiss IVF-Flat index over the rows lifted
into a space where the nearest neighbour in L2 is the best inner product, for lookups in catalogues too
large to scan per request.

Rows are ``[q_i, b_i]`` and queries ``[p_u, 1]``, so the inner product is ``p_u . q_i + b_i``: the ranking
score of the model, bias included. The index stores ``x' = [x, sqrt(M^2 - |x|^2)]`` (``M`` the largest row
norm at the build, :data:`NORM_MARGIN` above it) and searches ``q' = [q, 0]``: every stored row has norm
``M``, so ``|q' - x'|^2 = |q|^2 + M^2 - 2 q . x`` and the nearest rows are exactly the best inner products
(Bachrach et al., RecSys 2014). :meth:`ItemIndex.build` clusters the lifted rows into ``nlist`` cells
(k-means on a sample) and files every row under its nearest centroid; :meth:`ItemIndex.search` scans the
``nprobe`` cells nearest to the query. Row ``j`` of the built matrix has id ``j``; :meth:`ItemIndex.with_rows`
returns a copy that also holds new rows (ids following on), filed under the trained centroids, so an index
stays current as items arrive without a new training. A new row longer than ``M`` cannot be lifted: it is
kept in a small side list that every search scans exactly (``overflow_n``; the caller retrains when it
grows). Excluded ids are skipped inside the scan (a faiss bitmap ID selector built per query, 0.04 ms for
1,000 ids), so excluding many seen items does not shrink the answer. Searches run on one OpenMP thread
(a single query gains nothing from a second thread on 2 cores, and waking one costs the other requests).

Why the lifted L2 form rather than IVF in inner-product space (this module's first version). faiss trains
an inner-product IVF with spherical k-means: the centroids are unit directions, so cells are chosen by
direction alone while the best items are often the long rows (large bias, long latent part); the cells come
out unbalanced and the queries pick the largest. Measured at 1M rows as ``bench_lookup`` draws them (k = 64
latent N(0, 0.1^2) + bias N(0, 0.5^2)), 400 queries ``[p_u, 1]`` of the bench's users and 400 whose latent
part is 5x longer ("latent-heavy": their ranking is not mostly the item bias), one thread per query, 2-thread
builds, 42 candidates re-scored exactly, 20 excluded ids, on the 2 shared cores at load 2-3.5:

- inner product, 1,024 cells: the largest cell held 8x the mean (7,772 rows against 977); probing 16 / 32
  cells scanned 76k / 128k rows, recall@10 0.95 / 1.0 for the bench's users but 0.03 / 0.17 for the
  latent-heavy ones, 1.3 / 2.3 ms p50;
- lifted, 1,024 cells (the largest 2.3x the mean): probing 8 / 16 / 32 cells gave recall@10 1.0 / 1.0 / 1.0
  (bench users) and 0.955 / 0.980 / 0.994 (latent-heavy) in 0.16 / 0.25 / 0.46 ms p50; 2,048 cells: 0.93 at
  16 and 0.977 at 32 probed (0.26 ms), 17 s to build. The build took 4.5-15 s with 2 threads (k-means on
  41k rows, then one centroid scan per row; the spread is the load). Chosen: ~sqrt(n) cells, 16 probed.

The bound ``M`` hardly matters (recall was the same with ``M`` 1.1, 3 and 10 times the longest row): the
extra coordinate barely moves the cells, so a generous margin keeps rows that grow later liftable.

Graphs, on the same lifted rows at 200k (M 16, ef_construction 40, 2-thread builds, load 3-3.7): faiss HNSW
took 32 s to build and reached recall@10 0.98-0.99 for the bench's users but 0.64-0.75 for the
latent-heavy ones (ef 64-128, 0.04-0.2 ms); hnswlib 26 s, 0.93-0.97 / 0.66-0.77. An earlier comparison
found hnswlib (ef_construction 100) over 8 minutes to build at 1M, usearch (inner product) 0.91 at 200k
after 26 s and faiss HNSW (inner product) 0.96 with a p99 up to 4 ms. A build runs every generation and
every hour on the cores that serve; IVF-Flat builds in seconds, adds rows at the cost of one centroid scan
each (no graph to repair) and skips excluded ids inside the scan.

Searches are read-only and may run in many threads at once; :meth:`~ItemIndex.with_rows` never changes
the index it is called on.

>>> rng = np.random.default_rng(0)
>>> rows = rng.normal(size=(2000, 9)).astype(np.float32)
>>> idx = ItemIndex.build(rows, nlist=16, nprobe=16)
>>> q = rng.normal(size=9).astype(np.float32)
>>> ids, scores = idx.search(q, 3)
>>> ids.tolist() == np.argsort(-(rows @ q))[:3].tolist()  # every cell probed: exact
True
>>> int(ids[0]) in idx.search(q, 3, exclude=[ids[0]])[0].tolist()
False
>>> bigger = idx.with_rows(q[None, :] * 10)  # longer than every built row: kept aside, scanned exactly
>>> bigger.n, idx.n, bigger.overflow_n, int(bigger.search(q, 1)[0][0])
(2001, 2000, 1, 2000)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

__all__ = ["NPROBE", "ItemIndex", "default_nlist"]

NPROBE = 16  # cells scanned per query: at 1M in 1,024 cells recall@10 1.0 / 0.98 (see the module docstring)
TRAIN_PER_CELL = 40  # k-means sample: rows per cell (faiss warns below 39)
NORM_MARGIN = 2.0  # M = this x the longest row at the build, so rows that grow later still lift (recall is the
# same with 1.1, 3 or 10: the extra coordinate barely moves the cells)
ADD_CHUNK = 1 << 16  # rows lifted and added at a time (bounds the lifted copy to 17 MB at k = 64)


def default_nlist(n: int) -> int:
    """Cells for ``n`` rows: ``sqrt(n)`` rounded to a power of two, at least 1 and at most ``n / 39``.

    >>> default_nlist(1_000_000), default_nlist(200_000), default_nlist(100)
    (1024, 512, 2)
    """
    if n < 39:
        return 1
    cells = 2 ** round(math.log2(math.sqrt(n)))
    return int(max(1, min(cells, n // 39)))


def _faiss() -> Any:
    import faiss  # heavy: imported only by catalogues that use an index

    return faiss


def _norms2(x: F32) -> npt.NDArray[np.float64]:
    return np.einsum("ij,ij->i", x, x, dtype=np.float64)


def _lift(x: F32, norms2: npt.NDArray[np.float64], bound2: float) -> F32:
    """``[x, sqrt(M^2 - |x|^2)]`` of rows that are no longer than ``M``."""
    out = np.empty((x.shape[0], x.shape[1] + 1), dtype=np.float32)
    out[:, :-1] = x
    out[:, -1] = np.sqrt(np.maximum(bound2 - norms2, 0.0))
    return out


@dataclass(frozen=True, eq=False)
class ItemIndex:
    """An immutable IVF-Flat index over ``n`` rows (ids ``0 .. n-1``), searched by inner product.

    ``trained_n`` is the number of rows the centroids were trained on (``n`` grows with
    :meth:`with_rows`), ``build_seconds`` the wall time of :meth:`build`, ``bound2`` the squared norm ``M^2``
    of the lifted rows; ``overflow_ids``/``overflow_rows`` are the rows added later that were longer than
    ``M`` (scanned exactly by every search).
    """

    index: Any  # faiss.IndexIVFFlat over the lifted rows (dim + 1), L2
    dim: int
    n: int
    nlist: int
    nprobe: int
    trained_n: int
    build_seconds: float
    bound2: float
    overflow_ids: I64
    overflow_rows: F32

    @classmethod
    def build(
        cls,
        rows: npt.ArrayLike,
        *,
        nlist: int | None = None,
        nprobe: int | None = None,
        threads: int | None = None,
        seed: int = 0,
    ) -> ItemIndex:
        """Train ``nlist`` cells (:func:`default_nlist`) on a seeded sample of ``rows`` (n, d) and add all rows;
        searches will scan ``nprobe`` of them (None: :data:`NPROBE`).

        ``threads`` bounds faiss's OpenMP threads during the build (None: faiss's default, one per CPU);
        the previous bound is restored afterwards.
        """
        faiss = _faiss()
        x = np.ascontiguousarray(rows, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"rows must be a non-empty (n, d) matrix, got shape {x.shape}")
        n, dim = x.shape
        cells = default_nlist(n) if nlist is None else max(1, min(int(nlist), n))
        started, before = time.perf_counter(), faiss.omp_get_max_threads()
        if threads is not None:
            faiss.omp_set_num_threads(max(1, int(threads)))
        try:
            norms2 = _norms2(x)
            bound2 = float(norms2.max()) * NORM_MARGIN**2 or 1.0  # all-zero rows: any positive bound
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim + 1), dim + 1, cells, faiss.METRIC_L2)
            index.cp.seed = seed
            sample = min(n, TRAIN_PER_CELL * cells)
            pick = slice(None) if sample == n else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
            index.train(_lift(x[pick], norms2[pick], bound2))
            for c in range(0, n, ADD_CHUNK):
                index.add(_lift(x[c : c + ADD_CHUNK], norms2[c : c + ADD_CHUNK], bound2))
        finally:
            faiss.omp_set_num_threads(before)
        took = time.perf_counter() - started
        probe = NPROBE if nprobe is None else int(nprobe)
        none = np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return cls(index, dim, n, cells, max(1, min(probe, cells)), n, took, bound2, *none)

    def with_rows(self, rows: npt.ArrayLike) -> ItemIndex:
        """A copy that also holds ``rows`` (m, d), ids ``n .. n+m-1``, filed under the trained centroids (or
        kept aside when longer than the build's bound)."""
        x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, self.dim)
        if not len(x):
            return self
        ids = np.arange(self.n, self.n + len(x), dtype=np.int64)
        norms2 = _norms2(x)
        fits = norms2 <= self.bound2
        index = self.index
        if fits.any():
            index = _faiss().clone_index(self.index)
            index.add_with_ids(_lift(x[fits], norms2[fits], self.bound2), ids[fits])
        over_ids, over_rows = self.overflow_ids, self.overflow_rows
        if not fits.all():
            over_ids = np.concatenate([over_ids, ids[~fits]])
            over_rows = np.concatenate([over_rows, x[~fits]])
        return ItemIndex(
            index,
            self.dim,
            self.n + len(x),
            self.nlist,
            self.nprobe,
            self.trained_n,
            self.build_seconds,
            self.bound2,
            over_ids,
            over_rows,
        )

    @property
    def overflow_n(self) -> int:
        """Rows added after the build that were too long to lift (scanned exactly by every search)."""
        return int(self.overflow_ids.size)

    def search(self, query: npt.ArrayLike, n: int, exclude: npt.ArrayLike | None = None) -> tuple[I64, F32]:
        """The (up to) ``n`` best ids by inner product with ``query`` (d,), best first, and their scores.

        ``exclude`` ids are never returned. Fewer than ``n`` ids come back when the probed cells hold fewer
        eligible rows (the caller may then scan exactly).
        """
        faiss = _faiss()
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(self.dim)
        lifted = np.zeros((1, self.dim + 1), dtype=np.float32)
        lifted[0, :-1] = q
        want = max(1, min(int(n), self.n))
        params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        ex = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64).reshape(-1)
        ex = ex[(ex >= 0) & (ex < self.n)]
        selectors: tuple[Any, ...] = ()  # referenced until the search returns: faiss does not own them
        if ex.size:  # a bitmap of the excluded ids: 3x cheaper than IDSelectorBatch's hash set for 1,000 ids
            bits = np.zeros((self.n + 7) // 8, dtype=np.uint8)
            np.bitwise_or.at(bits, ex >> 3, np.left_shift(1, ex & 7).astype(np.uint8))
            selectors = (bits, faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(bits)))
            selectors += (faiss.IDSelectorNot(selectors[1]),)
            params.sel = selectors[2]
        threads = faiss.omp_get_max_threads()  # this thread's OpenMP bound: one for the search, then restored
        if threads != 1:
            faiss.omp_set_num_threads(1)
        try:
            dist, found = self.index.search(lifted, want, params=params)
        finally:
            if threads != 1:
                faiss.omp_set_num_threads(threads)
        del selectors
        keep = found[0] >= 0
        ids = found[0][keep].astype(np.int64)
        # |q' - x'|^2 = |q|^2 + M^2 - 2 q.x for every lifted row
        scores = ((float(q @ q) + self.bound2 - dist[0][keep].astype(np.float64)) * 0.5).astype(np.float32)
        if self.overflow_ids.size:
            over = self.overflow_rows @ q
            if ex.size:
                over[np.isin(self.overflow_ids, ex)] = -np.inf
            ids = np.concatenate([ids, self.overflow_ids])
            scores = np.concatenate([scores, over])
            best = np.argsort(-scores, kind="stable")[:want]
            best = best[np.isfinite(scores[best])]
            ids, scores = ids[best], scores[best]
        return ids, scores

    @property
    def memory_bytes(self) -> int:
        """Approximate resident size: the stored (lifted) rows and ids, the centroids and the side list."""
        lifted = self.n - self.overflow_n
        return int(
            lifted * ((self.dim + 1) * 4 + 8) + self.nlist * (self.dim + 1) * 4 + self.overflow_n * (self.dim * 4 + 8)
        )
