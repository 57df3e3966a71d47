"""Optional ALS backend on Spark MLlib (``pip install 'zerocf[spark]'``, Java 17): the same snapshot in, the same
factor matrices out, so the ALS worker calibrates and publishes them exactly like its own solver's.

``ZEROCF_ALS_BACKEND=spark`` (or ``zerocf als --backend spark``) runs :func:`spark_als_fit` instead of
:func:`workers.kernels.als.als_fit`. Conventions, so the two solve the same problem (docs/als.md):

- MLlib's implicit ALS (``implicitPrefs=True``) uses ``c = 1 + alpha * r`` on the rating ``r``: we pass the
  click count for ``linear`` and ``log(1 + f / eps)`` for ``log`` (MLlib has no log variant), with
  ``alpha`` unchanged. Our stored ``c - 1`` is then exactly MLlib's ``alpha * r``.
- MLlib scales ``regParam`` by the number of ratings of each row (ALS-WR); ours is a plain ``lambda``.
  ``ZEROCF_ALS_REG`` is passed as is, so the same value regularises more on busy rows: tune it per backend.
- MLlib starts from its own random factors: no warm start from the live generation.

A local session (``local[threads]``) serves the single-machine case and the tests; on a cluster, point
``SPARK_*`` settings (spark-submit, ``PYSPARK_SUBMIT_ARGS``) at it — the code does not change.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]


def _ratings(counts: sp.csr_matrix, scaling: str, eps: float) -> sp.coo_matrix:
    coo = sp.coo_matrix(counts)
    if scaling == "log":  # sign kept: MLlib reads a negative rating as preference 0, confidence 1 + alpha |r|
        coo.data = np.sign(coo.data) * np.log1p(np.abs(coo.data.astype(np.float64)) / eps)
    elif scaling != "linear":
        raise ValueError(f"scaling must be 'linear' or 'log', got {scaling!r}")
    return coo


def spark_als_fit(
    counts_csr: sp.spmatrix | sp.sparray,
    factors: int = 64,
    reg: float = 0.05,
    alpha: float = 1.0,
    iterations: int = 15,
    threads: int = 2,
    seed: int = 0,
    scaling: str = "linear",
    eps: float = 1.0,
) -> tuple[F32, F32]:
    """Implicit ALS of ``counts_csr`` (users x items) with Spark MLlib; returns float32 ``(U, V)``.

    Rows or columns without any click get zero vectors (MLlib only returns factors for ids it saw).

    >>> import importlib.util
    >>> importlib.util.find_spec("pyspark") is None or spark_als_fit.__name__ == "spark_als_fit"
    True
    """
    try:
        from pyspark.ml.recommendation import ALS
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise RuntimeError(
            "the spark backend needs pyspark and Java 17: pip install 'zerocf[spark]', or set ZEROCF_ALS_BACKEND=numpy"
        ) from exc
    counts = sp.csr_matrix(counts_csr)
    m, n = counts.shape
    coo = _ratings(counts, scaling, eps)
    t0 = time.perf_counter()
    spark = (
        SparkSession.builder.master(f"local[{max(1, int(threads))}]")
        .appName("zerocf-als")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", str(2 * threads))
        .config("spark.driver.memory", "2g")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    # The session is kept for the next re-solve (`--every`): starting a JVM costs seconds, and a stopped
    # session cannot be restarted cleanly in the same process. It ends with the process.
    rows = list(zip(coo.row.tolist(), coo.col.tolist(), coo.data.astype(float).tolist()))
    df = spark.createDataFrame(rows, schema="u INT, i INT, r DOUBLE")
    als = ALS(
        rank=factors,
        maxIter=iterations,
        regParam=reg,
        alpha=alpha,
        implicitPrefs=True,
        userCol="u",
        itemCol="i",
        ratingCol="r",
        seed=seed,
        nonnegative=False,
        intermediateStorageLevel="MEMORY_ONLY",
        finalStorageLevel="MEMORY_ONLY",
    )
    model = als.fit(df)
    U = np.zeros((m, factors), np.float32)
    V = np.zeros((n, factors), np.float32)
    for row in model.userFactors.collect():
        U[row.id] = row.features
    for row in model.itemFactors.collect():
        V[row.id] = row.features
    log.info(
        "spark ALS: %d x %d, %d pairs, k=%d, %d iterations in %.1fs (session included)",
        m,
        n,
        coo.nnz,
        factors,
        iterations,
        time.perf_counter() - t0,
    )
    return U, V
