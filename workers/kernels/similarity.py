"""Item-to-item cosine similarity over factor rows (pure): unit-normalise once, then rank with the shared
:func:`~workers.kernels.topk.top_k`.

Callers normalise the item matrix once per load (:func:`unit_rows`) and rank any number of queries against
it (:func:`cosine_top_k`); a query never ranks itself. A row without a direction (all zeros, or not finite)
becomes the zero row: its cosine with every row is 0, and :func:`unit_rows` reports it so that a caller can
treat it as "no vector".
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from workers.kernels.topk import top_k

F32 = npt.NDArray[np.float32]

__all__ = ["cosine_top_k", "unit_rows"]


def unit_rows(x: npt.ArrayLike) -> tuple[F32, npt.NDArray[np.bool_]]:
    """Rows of ``x`` (n, f) scaled to unit L2 norm, float32, and a mask of the rows that have a direction.

    Zero and non-finite rows come back as zeros with ``False`` in the mask.

    >>> u, ok = unit_rows(np.array([[3, 4], [0, 0]], dtype=np.float32))
    >>> u.tolist(), ok.tolist()
    ([[0.6000000238418579, 0.800000011920929], [0.0, 0.0]], [True, False])
    """
    a = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(a, axis=1) if a.size else np.zeros(a.shape[0], np.float32)
    ok = np.isfinite(norms) & (norms > 0)
    inv = np.zeros(a.shape[0], np.float32)
    inv[ok] = np.float32(1.0) / norms[ok]
    out = a * inv[:, None]
    out[~ok] = 0.0
    return np.ascontiguousarray(out, dtype=np.float32), ok


def cosine_top_k(
    unit: F32,
    rows: npt.ArrayLike,
    k: int,
    exclude: npt.ArrayLike | None = None,
    batch_size: int = 1024,
) -> tuple[npt.NDArray[np.int32], F32]:
    """The ``k`` rows of ``unit`` most cosine-similar to each of ``unit[rows]``, best first.

    Parameters
    ----------
    unit : ndarray, shape (n, f)
        Unit rows, from :func:`unit_rows` (the dot product of two of them is their cosine).
    rows : ndarray of int, shape (m,)
        The query rows. A query is never among its own results.
    k : int
        Clamped to ``n``. Slots no eligible row can fill get id ``-1`` and score ``-inf`` (as
        :func:`~workers.kernels.topk.top_k`).
    exclude : ndarray of int, optional
        Rows excluded from every query's results (e.g. hidden items).
    batch_size : int
        Queries scored per matrix product (memory ``batch_size * n * 4`` bytes).

    Returns
    -------
    ids : ndarray, shape (m, k'), int32
    scores : ndarray, shape (m, k'), float32
        Cosines, clipped to [-1, 1] (float32 rounding may otherwise step just outside).

    Examples
    --------
    >>> u, _ = unit_rows(np.array([[1, 0], [1, 1], [0, 1], [-1, 0]], dtype=np.float32))
    >>> ids, s = cosine_top_k(u, [0], 3)
    >>> ids.tolist(), [round(float(x), 3) for x in s[0]]
    ([[1, 2, 3]], [0.707, 0.0, -1.0])
    >>> cosine_top_k(u, [0], 3, exclude=[1])[0].tolist()
    [[2, 3, -1]]
    """
    q = np.asarray(rows, dtype=np.intp).reshape(-1)
    n = unit.shape[0]
    k = max(0, min(int(k), n))
    ids = np.full((q.size, k), -1, dtype=np.int32)
    scores = np.full((q.size, k), -np.inf, dtype=np.float32)
    ex = None if exclude is None else np.asarray(exclude, dtype=np.intp).reshape(-1)
    if k == 0 or q.size == 0:
        return ids, scores
    for lo in range(0, q.size, batch_size):
        chunk = q[lo : lo + batch_size]
        s = unit[chunk] @ unit.T  # (b, n) cosines
        if ex is not None and ex.size:
            s[:, ex] = -np.inf
        s[np.arange(chunk.size), chunk] = -np.inf  # never the query itself
        ids[lo : lo + chunk.size], top = top_k(s, k)
        scores[lo : lo + chunk.size] = np.where(np.isneginf(top), top, np.clip(top, -1.0, 1.0))
    return ids, scores
