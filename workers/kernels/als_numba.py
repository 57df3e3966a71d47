"""Compiled inner loops of :mod:`workers.kernels.als` (numba, parallel over blocks of rows; no Python per user).

Each sweep solves every row of ``X`` against fixed ``Y`` with the Gram trick: ``G = YᵀY + λI`` is computed
once per half-sweep by the caller, and row u only adds ``Y_uᵀ (C_u − I) Y_u`` over its observed items, so a
sweep costs O(nnz·k + n·k²). ``data`` holds ``c − 1`` (negative for an observed zero, ``c = 1 + |data|``;
see :func:`workers.kernels.als.confidence`).
"""

from __future__ import annotations

import numba
import numpy as np

_CHUNK = 32  # rows per parallel work item: amortises scratch allocation, keeps load balanced
_EPS_RS = 1e-20  # CG stops when the squared residual norm drops below this (as implicit does)
ALIGN = 64  # bytes: factor matrices and scratch rows start on a cache line (see aligned_empty)


def aligned_empty(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``ALIGN``-byte boundary.

    With fastmath the compiled dot products are vectorised, and LLVM peels the loop to the first aligned
    element: where the peel starts changes the summation order, hence the last bits of the result. Aligning
    the factor matrices and the kernels' scratch makes a fit bit-for-bit reproducible for a given seed (numpy
    and numba's own allocations guarantee only 16 and 32 bytes).

    >>> a = aligned_empty((3, 5)); a.shape, a.ctypes.data % ALIGN
    ((3, 5), 0)
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(size + ALIGN, np.uint8)
    start = (-buf.ctypes.data) % ALIGN
    return buf[start : start + size].view(dtype).reshape(shape)


def scratch(n_rows: int, vectors: int, k: int) -> np.ndarray:
    """Per-block scratch of the sweeps: (blocks, vectors, k padded to ``ALIGN``), every vector aligned."""
    per = ALIGN // 4
    return aligned_empty(((n_rows + _CHUNK - 1) // _CHUNK, vectors, -(-k // per) * per))


@numba.njit(parallel=True, fastmath=True, cache=True)
def cg_sweep(indptr, indices, data, X, Y, G, cg_steps, work):  # pragma: no cover - numba
    """In place: ``cg_steps`` CG steps on every row of X; ``G = Y^T Y + reg I`` (float32); ``work`` is
    :func:`scratch` ``(n, 4, k)``."""
    n, k = X.shape
    nblocks = (n + _CHUNK - 1) // _CHUNK
    for blk in numba.prange(nblocks):
        x = work[blk, 0, :k]
        r = work[blk, 1, :k]
        p = work[blk, 2, :k]
        ap = work[blk, 3, :k]
        for u in range(blk * _CHUNK, min(n, (blk + 1) * _CHUNK)):
            x[:] = X[u]
            for a in range(k):  # r = b - A x, A x = G x + sum_i d_i (y_i . x) y_i
                s = np.float32(0.0)
                for b in range(k):
                    s += G[a, b] * x[b]
                r[a] = -s
            for j in range(indptr[u], indptr[u + 1]):
                i, d = indices[j], data[j]
                s = np.float32(0.0)
                for f in range(k):
                    s += Y[i, f] * x[f]
                w = np.float32(1.0) + d - d * s if d > 0 else d * s  # d < 0: an observed zero, c = 1 + |d|
                for f in range(k):
                    r[f] += w * Y[i, f]
            rs = np.float32(0.0)
            for f in range(k):
                rs += r[f] * r[f]
                p[f] = r[f]
            for _ in range(cg_steps):
                if rs < _EPS_RS:
                    break
                for a in range(k):
                    s = np.float32(0.0)
                    for b in range(k):
                        s += G[a, b] * p[b]
                    ap[a] = s
                for j in range(indptr[u], indptr[u + 1]):
                    i, d = indices[j], abs(data[j])
                    s = np.float32(0.0)
                    for f in range(k):
                        s += Y[i, f] * p[f]
                    w = d * s
                    for f in range(k):
                        ap[f] += w * Y[i, f]
                pap = np.float32(0.0)
                for f in range(k):
                    pap += p[f] * ap[f]
                step = rs / pap
                rs_new = np.float32(0.0)
                for f in range(k):
                    x[f] += step * p[f]
                    r[f] -= step * ap[f]
                    rs_new += r[f] * r[f]
                beta = rs_new / rs
                for f in range(k):
                    p[f] = r[f] + beta * p[f]
                rs = rs_new
            X[u] = x


@numba.njit(parallel=True, fastmath=True, cache=True)
def exact_sweep(indptr, indices, data, X, Y, G):  # pragma: no cover - numba
    """In place: exact solve of every row of X by Cholesky; ``G = Y^T Y + reg I`` (float64)."""
    n, k = X.shape
    nblocks = (n + _CHUNK - 1) // _CHUNK
    for blk in numba.prange(nblocks):
        A = np.empty((k, k), np.float64)
        b = np.empty(k, np.float64)
        y = np.empty(k, np.float64)
        for u in range(blk * _CHUNK, min(n, (blk + 1) * _CHUNK)):
            A[:, :] = G
            b[:] = 0.0
            for j in range(indptr[u], indptr[u + 1]):  # lower triangle of A, and b
                i, d = indices[j], np.float64(data[j])
                r = 1.0 + d if d > 0.0 else 0.0  # d < 0: an observed zero (preference 0, c = 1 + |d|)
                d = abs(d)
                for f in range(k):
                    y[f] = Y[i, f]
                for a in range(k):
                    b[a] += r * y[a]
                    w = d * y[a]
                    for c in range(a + 1):
                        A[a, c] += w * y[c]
            for jj in range(k):  # in-place Cholesky A = L L^T (lower)
                s = A[jj, jj]
                for q in range(jj):
                    s -= A[jj, q] * A[jj, q]
                s = np.sqrt(s) if s > 0.0 else np.nan  # NaN propagates -> ALSDiverged
                A[jj, jj] = s
                for ii in range(jj + 1, k):
                    t = A[ii, jj]
                    for q in range(jj):
                        t -= A[ii, q] * A[jj, q]
                    A[ii, jj] = t / s
            for a in range(k):  # L z = b
                s = b[a]
                for q in range(a):
                    s -= A[a, q] * b[q]
                b[a] = s / A[a, a]
            for a in range(k - 1, -1, -1):  # L^T x = z
                s = b[a]
                for q in range(a + 1, k):
                    s -= A[q, a] * b[q]
                b[a] = s / A[a, a]
            for f in range(k):
                X[u, f] = b[f]


@numba.njit(parallel=True, fastmath=True, cache=True)
def observed_loss(indptr, indices, data, X, Y):  # pragma: no cover - numba
    """Sum over observed pairs of ``(1 + d)(1 - s)^2 - s^2`` with ``s = x_u . y_i`` (``|d| s^2`` for an observed
    zero, ``d < 0``; deterministic)."""
    n, k = X.shape
    nblocks = (n + _CHUNK - 1) // _CHUNK
    part = np.zeros(nblocks, np.float64)
    for blk in numba.prange(nblocks):
        acc = 0.0
        for u in range(blk * _CHUNK, min(n, (blk + 1) * _CHUNK)):
            for j in range(indptr[u], indptr[u + 1]):
                i = indices[j]
                s = 0.0
                for f in range(k):
                    s += np.float64(X[u, f]) * np.float64(Y[i, f])
                d = data[j]
                acc += (1.0 + d) * (1.0 - s) ** 2 - s * s if d > 0 else -d * s * s  # observed zero: |d| s^2
        part[blk] = acc
    return part.sum()
