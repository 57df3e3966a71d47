"""One re-solve on a snapshot, without I/O: the implicit-ALS fit and the handoff rows the LMF reads.

The ALS worker (:mod:`workers.batch.worker`) and the in-memory twin of the pipeline
(:mod:`workers.evaluation.offline`) both call these, so the twin publishes exactly what the worker publishes.

>>> import scipy.sparse as sp
>>> from workers.config import ALSConfig
>>> F = sp.csr_matrix(np.kron(np.eye(2), np.ones((3, 3))).astype(np.float32))
>>> cfg = ALSConfig(factors=2, als_iterations=5, calib_samples=100)
>>> U, V, loss = fit(F, cfg, None)
>>> Urows, Vrows, cal = handoff_rows(U, V, F, cfg)
>>> Urows.shape, bool(cal.scale > 0), float(Urows[0, -1])
((6, 3), True, 0.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from workers.config import ALSConfig
from workers.kernels.als import als_fit
from workers.kernels.calibration import Calibration, calibrate, fold_scale

F32 = npt.NDArray[np.float32]

__all__ = ["fit", "handoff_rows"]


def fit(csr: Any, cfg: ALSConfig, init: tuple[F32, F32] | None,
        callback: Callable[[int, float, float | None], None] | None = None) -> tuple[F32, F32, float]:  # fmt: skip
    """Implicit ALS with the config's solver settings; ``init`` warm-starts (None: cold, seeded by ``als_seed``).

    A warm start adds the cold start's small random rows to ``init``: zero is a fixed point of ALS (a user row
    solved against zero item rows stays zero), so a previous solve that had shrunk to nearly zero (heavy
    regularisation on little data) would otherwise never recover. Returns the raw (uncalibrated) ``U``, ``V``
    and the last WMF loss.
    """
    if init is not None:
        rng = np.random.default_rng([cfg.als_seed, 7])
        init = tuple(a + rng.random(a.shape, dtype=np.float32) * np.float32(0.01) for a in init)  # type: ignore[assignment]
    U, V, hist = als_fit(csr, factors=cfg.factors, reg=cfg.als_reg, alpha=cfg.als_alpha,
                         iterations=cfg.als_iterations, solver=cfg.als_solver, cg_steps=cfg.als_cg_steps, init=init,
                         rng=np.random.default_rng(cfg.als_seed), callback=callback, num_threads=cfg.als_threads,
                         scaling=cfg.als_confidence, eps=cfg.als_eps)  # fmt: skip
    return U, V, float(hist.loss[-1]) if hist.loss else float("nan")


def handoff_rows(U: F32, V: F32, csr: Any, cfg: ALSConfig) -> tuple[F32, F32, Calibration]:
    """Calibrate ``σ(a·p·q + b)`` (``cfg.calib_negatives`` per held click), fold ``sqrt(a)`` into both factor
    sets and append a zero bias column: the rows a new generation holds; ``b`` becomes its global bias."""
    cal = calibrate(U, V, csr, cfg.calib_samples, np.random.default_rng([cfg.als_seed, 1]),
                    negatives=cfg.calib_negatives)  # fmt: skip
    Uf, Vf = fold_scale(U, V, cal.scale)
    return _with_bias(Uf), _with_bias(Vf), cal


def _with_bias(rows: F32) -> F32:
    """ALS rows as store rows: the latent values, then a zero bias (the LMF learns the biases online)."""
    return np.hstack([rows, np.zeros((rows.shape[0], 1), np.float32)]).astype(np.float32)
