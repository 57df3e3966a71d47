"""The optional Spark MLlib backend (extra ``spark``): same snapshot in, same generation out.

Skipped when pyspark or Java is missing (the default install has neither requirement); with the extra
installed (``pip install -e '.[spark]'``) it runs here like every other integration test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("pyspark", reason="the spark backend is an optional extra: pip install -e '.[spark]'")
if shutil.which("java") is None:
    pytest.skip("the spark backend needs Java (17)", allow_module_level=True)

from stream.ingest import Ingest  # noqa: E402
from stream.replay.datasets import synthetic_dataset  # noqa: E402
from tests.helpers import (  # noqa: E402
    als_stream_cfg,
    assert_published,
    last_offsets,
    produce_clicks,
    wait_until,
)
from workers.batch.spark import spark_als_fit  # noqa: E402

K = 16
# A one-shot local JVM: C1 compiles only (no C2 pass over Spark's hot code) and the serial GC; on a 2-core machine
# this halves the wall time of `als --once` (~45 s -> ~23 s, session start included). Same Spark, same ALS.
JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


@pytest.mark.skipif(
    os.environ.get("ZEROCF_TEST_SPARK_FULL") != "1",
    reason="~50 s of Spark local[2]: set ZEROCF_TEST_SPARK_FULL=1 (CI runs the `als --once` Spark test only, "
    "to keep `make test` under 15 minutes)",
)
def test_spark_recovers_planted_blocks_and_zero_rows_for_unseen_ids() -> None:
    # 3 user groups x 3 item blocks; each user clicked all but one item of its block
    rng = np.random.default_rng(0)
    users, items, held = [], [], {}
    for u in range(60):
        block = u % 3
        mine = list(range(block * 10, block * 10 + 10))
        held[u] = mine.pop(int(rng.integers(10)))
        users += [u] * len(mine)
        items += mine
    counts = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(61, 31))
    U, V = spark_als_fit(counts, factors=8, reg=0.01, alpha=5.0, iterations=10, threads=2)
    assert U.shape == (61, 8) and V.shape == (31, 8) and U.dtype == np.float32
    assert not U[60].any() and not V[30].any()  # ids without clicks: zero rows
    scores = U[:60] @ V[:30].T
    scores[counts[:60, :30].toarray() > 0] = -np.inf  # seen items excluded
    top3 = np.argsort(-scores, axis=1)[:, :3]
    hits = np.mean([held[u] in top3[u] for u in range(60)])
    assert hits > 0.8, hits


def test_als_once_with_spark_backend_publishes_the_same_generation_format(
    zerocf_env: dict[str, str], ingest_thread: Ingest, tmp_path: Path
) -> None:
    rows = synthetic_dataset(80, 40, 1000, seed=3)
    produce_clicks(zerocf_env, rows)
    wait_until("ingest", lambda: ingest_thread.stats.events_out >= len(rows), 30)
    last = last_offsets(als_stream_cfg(zerocf_env))
    submit = os.environ.get("PYSPARK_SUBMIT_ARGS") or f"--driver-java-options '{JVM_OPTIONS}' pyspark-shell"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "als",
            "--once",
            "--backend",
            "spark",
            "--factors",
            str(K),
            "--iterations",
            "5",
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
        ],
        env={**zerocf_env, "PYSPARK_SUBMIT_ARGS": submit},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_published(zerocf_env, rows, last)
