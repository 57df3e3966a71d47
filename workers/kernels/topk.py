"""Top-k selection over score matrices (pure): the one implementation the evaluation, the benchmarks and the
lookups share.

Excluded entries carry the score ``-inf``; a slot that only excluded entries could fill gets id ``-1``.
Within the selected items, equal scores are ordered by item index; which of several items tied at the
cut-off is selected is up to ``argpartition``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

F32 = npt.NDArray[np.float32]

__all__ = ["recommend_from_factors", "top_k"]


def top_k(scores: npt.ArrayLike, k: int) -> tuple[npt.NDArray[np.int32], F32]:
    """The ``k`` best entries of every row of ``scores`` (m, n), best first: ``(ids, scores)``, both (m, k').

    ``k' = min(k, n)``. A ``-inf`` (or NaN) entry is never selected ahead of a finite one; slots left to such
    entries get id ``-1`` and score ``-inf``.

    >>> ids, s = top_k(np.array([[0.1, 3.0, -np.inf, 2.0]], dtype=np.float32), 3)
    >>> ids.tolist(), s.tolist()
    ([[1, 3, 0]], [[3.0, 2.0, 0.10000000149011612]])
    >>> top_k(np.array([[1.0, -np.inf]], dtype=np.float32), 2)[0].tolist()
    [[0, -1]]
    """
    s = np.atleast_2d(np.asarray(scores, dtype=np.float32))
    m, n = s.shape
    k = max(0, min(int(k), n))
    s = np.where(np.isnan(s), np.float32(-np.inf), s)
    if k < n:
        cand = np.argpartition(-s, k - 1, axis=1)[:, :k] if k else np.zeros((m, 0), np.intp)
        cand.sort(axis=1)
    else:
        cand = np.tile(np.arange(n), (m, 1))
    cs = np.take_along_axis(s, cand, axis=1)
    order = np.argsort(-cs, axis=1, kind="stable")
    ids, top = np.take_along_axis(cand, order, axis=1), np.take_along_axis(cs, order, axis=1)
    return np.where(np.isneginf(top), -1, ids).astype(np.int32), top


def recommend_from_factors(
    U_rows: F32, V: F32, exclude_csr: sp.spmatrix | sp.sparray | None = None, k: int = 10, batch_size: int = 1024
) -> tuple[npt.NDArray[np.int32], F32]:
    """Top-``k`` items for each row of ``U_rows`` by score ``u . v``, best first.

    Parameters
    ----------
    U_rows : ndarray, shape (b, f)
    V : ndarray, shape (n, f)
    exclude_csr : sparse matrix, shape (b, n), optional
        Row ``j`` lists the items to exclude for ``U_rows[j]`` (e.g. its training items).
    k : int
        Clamped to ``n``. Slots with no eligible item get id ``-1`` and score ``-inf``.
    batch_size : int
        Rows scored per matrix product (memory ``batch_size * n * 4`` bytes).

    Returns
    -------
    ids : ndarray, shape (b, k), int32
    scores : ndarray, shape (b, k), float32

    Examples
    --------
    >>> V = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    >>> ids, s = recommend_from_factors(np.array([[1, 0.5]], np.float32), V, k=2)
    >>> ids.tolist(), s.tolist()
    ([[2, 0]], [[1.5, 1.0]])
    """
    U_rows = np.asarray(U_rows, dtype=np.float32)
    V = np.asarray(V, dtype=np.float32)
    n = V.shape[0]
    k = max(0, min(int(k), n))
    ex = None if exclude_csr is None else sp.csr_matrix(exclude_csr)
    if ex is not None and ex.shape != (U_rows.shape[0], n):
        raise ValueError(
            f"exclude_csr has shape {ex.shape}, expected {(U_rows.shape[0], n)}: "
            "one row per query row, one column per item"
        )
    ids = np.full((U_rows.shape[0], k), -1, dtype=np.int32)
    scores = np.full((U_rows.shape[0], k), -np.inf, dtype=np.float32)
    if k == 0:
        return ids, scores
    for lo in range(0, U_rows.shape[0], batch_size):
        s = U_rows[lo : lo + batch_size] @ V.T
        if ex is not None:
            sub = ex[lo : lo + batch_size]
            s[np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr)), sub.indices] = -np.inf
        ids[lo : lo + len(s)], scores[lo : lo + len(s)] = top_k(s, k)
    return ids, scores
