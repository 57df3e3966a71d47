"""``zerocf demo`` (what ``make demo`` runs): a clean run is quiet, and ``--log-level INFO`` brings the detail back.

The demo starts its own embedded stack (a broker and Redis of its own), so this test does not use the session's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DEMO = ("demo", "--users", "300", "--items", "200", "--clicks", "6000", "--resolve-every", "3000", "--chunk", "1500")


def run_demo(tmp_path: Path, *top: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROCF_")}
    argv = [sys.executable, "-m", "workers.cli", *top, *DEMO, "--out", str(tmp_path)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_a_clean_demo_prints_the_summary_and_no_log_line(tmp_path: Path) -> None:
    done = run_demo(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip() == "", f"a clean run logged:\n{done.stderr[-3000:]}"
    assert "zerocf demo summary" in done.stdout and "ALS swaps       1:" in done.stdout, done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["clicks"] == 6000 and len(summary["dead_letters"]) == 3
    assert (tmp_path / "prequential.png").stat().st_size > 0


def test_log_level_info_brings_the_detail_back(tmp_path: Path) -> None:
    done = run_demo(tmp_path, "--log-level", "INFO")
    assert done.returncode == 0, done.stderr[-3000:]
    assert " INFO stream.ingest" in done.stderr and " INFO workers.batch.worker" in done.stderr
