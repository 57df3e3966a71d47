"""The store's value encoding: float32 little-endian blobs of exactly ``width`` values, no header (pure).

A factor row is ``k`` latent values then the row's bias (``width = k + 1``); an AdaGrad accumulator row is two
values (``width = 2``: the latent block's and the bias's squared-gradient sums).

>>> m, found = decode(encode(np.array([[1.0, -2.0]], dtype=np.float32)) + [None], 2)
>>> m.tolist(), found.tolist()
([[1.0, -2.0], [0.0, 0.0]], [True, False])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from workers.errors import ModelDiverged, StoreSchemaError

DTYPE = "<f4"

__all__ = ["DTYPE", "decode", "encode", "encode_joined"]


def encode(vecs: npt.NDArray[np.float32], width: int | None = None, ids: Sequence[str] | None = None) -> list[bytes]:
    """Encode the rows of an ``(n, width)`` float32 matrix as ``n`` little-endian blobs of ``4*width`` bytes.

    Raises :class:`StoreSchemaError` for a wrong dtype or width (naming ``ids[0]`` when given) and
    :class:`ModelDiverged` for NaN/inf (naming the first bad id).

    >>> encode(np.array([[1.0, -2.0]], dtype=np.float32))
    [b'\\x00\\x00\\x80?\\x00\\x00\\x00\\xc0']
    """
    arr = np.asarray(vecs)
    if arr.dtype != np.float32:
        raise StoreSchemaError(
            f"vectors have dtype {arr.dtype}, the store keeps float32; "
            "cast with .astype(np.float32) where they are computed"
        )
    if arr.ndim != 2 or (width is not None and arr.shape[1] != width):
        first = ids[0] if ids else "row 0"
        raise StoreSchemaError(
            f"vectors have shape {arr.shape} (first id {first!r}), store expects (n, {width}); "
            "check --factors against the model's k"
        )
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ModelDiverged(
            f"vector {ids[i] if ids else i!r} holds NaN/inf; refused, nothing written. "
            "Lower the learning rate or raise regularisation"
        )
    buf = np.ascontiguousarray(arr, dtype=DTYPE).tobytes()
    w = 4 * arr.shape[1]
    return [buf[i * w : (i + 1) * w] for i in range(arr.shape[0])]


def encode_joined(vecs: npt.NDArray[np.float32], width: int, ids: Sequence[str]) -> bytes:
    """:func:`encode` with the same checks, as one buffer of ``len(ids)`` rows (the hot path's format).

    >>> encode_joined(np.zeros((2, 1), np.float32), 1, ["a", "b"])
    b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00'
    """
    if not len(ids):
        return b""
    arr = np.asarray(vecs)
    if arr.dtype == np.float32 and arr.ndim == 2 and arr.shape == (len(ids), width) and np.isfinite(arr).all():
        return np.ascontiguousarray(arr, dtype=DTYPE).tobytes()
    return b"".join(encode(arr, width, ids))  # raises the precise error (or handles a count mismatch below)


def decode(
    blobs: Sequence[bytes | None], width: int, ids: Sequence[str] | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Decode blobs (``None`` = absent) into an ``(n, width)`` float32 matrix (zeros where absent) and a mask.

    >>> m, found = decode([b'\\x00\\x00\\x80?\\x00\\x00\\x00\\xc0', None], 2)
    >>> m.tolist(), found.tolist()
    ([[1.0, -2.0], [0.0, 0.0]], [True, False])
    >>> decode([b'\\x00' * 12], 2, ids=["i7"])
    Traceback (most recent call last):
    ...
    workers.errors.StoreSchemaError: stored vector 'i7' has 3 float32 values (12 bytes), the store expects 2; ...
    """
    n = len(blobs)
    found = np.fromiter((b is not None for b in blobs), dtype=np.bool_, count=n)
    out = np.zeros((n, width), dtype=np.float32)
    present = [b for b in blobs if b is not None]
    if not present:
        return out, found
    lens = np.fromiter((len(b) for b in present), dtype=np.int64, count=len(present))
    if (lens != 4 * width).any():
        j = int(np.flatnonzero(lens != 4 * width)[0])
        i = int(np.flatnonzero(found)[j])
        name = ids[i] if ids is not None else f"row {i}"
        raise StoreSchemaError(
            f"stored vector {name!r} has {lens[j] / 4:g} float32 values ({lens[j]} bytes), the store expects "
            f"{width}; the model was written with another k; set ZEROCF_FACTORS to the model's k or use another "
            "ZEROCF_TOPIC_PREFIX"
        )
    out[found] = np.frombuffer(b"".join(present), dtype=DTYPE).reshape(-1, width)
    return out, found
