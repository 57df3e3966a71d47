"""``zerocf demo`` (what ``make demo`` runs): a clean run is quiet, and ``--log-level INFO`` brings the detail back.

The demo starts its own embedded stack (a broker and Redis of its own), so this test does not use the session's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import health_status, wait_until

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


def test_serve_keeps_the_dashboard_up_until_ctrl_c(tmp_path: Path) -> None:
    import json as json_
    import re
    import signal
    import urllib.request

    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROCF_")}
    argv = [sys.executable, "-m", "workers.cli", *DEMO, "--out", str(tmp_path), "--serve"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:  # blocks until the demo prints the URL (bounded by the timeout below)
            m = re.match(r"dashboard\s+(http://127\.0\.0\.1:\d+/)", line)
            if m:
                url = m.group(1)
                break
        assert url, "the demo never printed the dashboard URL"
        wait_until("the demo's serve answers", lambda: health_status(int(url.rsplit(":", 1)[1].strip("/"))) == 200, 60)
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()
        with urllib.request.urlopen(url + "api/dashboard", timeout=10) as resp:
            data = json_.loads(resp.read())
        assert len(data["generations"]) >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
