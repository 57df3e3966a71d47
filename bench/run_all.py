"""Run every benchmark, one after the other, and keep each one's JSON in ``bench/results/``.

    python -m bench.run_all [--only ingest,lmf_e2e,...] [--out bench/results]

Each benchmark starts (and stops) whatever services it needs and compares against its reference in the
same run (raw consume, bare numpy, ``implicit``), so the ratios are the figures to read; absolute times on
a shared 2-core machine move by +-30 %. ``implicit`` comes from the ``bench`` extra
(``pip install -e '.[bench]'``); the ALS benchmark reports ours alone when it is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bench.run_all")

BENCHES = {
    "store": ["bench.bench_store"],
    "lmf_kernel": ["bench.bench_lmf_kernel"],
    "ingest": ["bench.bench_ingest"],
    "lmf_e2e": ["bench.bench_lmf_e2e"],
    "als": ["bench.bench_als"],
    "lookup": ["bench.bench_lookup"],
    "serve": ["bench.bench_serve"],
    "cluster": ["bench.bench_cluster"],
    # on request only (--only als_10m,lookup_1m): tens of minutes and GBs of memory each
    "als_10m": ["bench.bench_als", "--case", "10m"],
}
DEFAULT = [name for name in BENCHES if name not in ("als_10m",)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(DEFAULT), help="comma-separated subset of " + ", ".join(BENCHES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {}
    for name in args.only.split(","):
        if name not in BENCHES:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}")
        t0 = time.monotonic()
        log.info("running %s", name)
        proc = subprocess.run([sys.executable, "-m", *BENCHES[name]], capture_output=True, text=True)
        if proc.returncode != 0:
            log.error("%s failed (exit %d):\n%s", name, proc.returncode, proc.stderr[-3000:])
            summary[name] = {"error": proc.returncode}
            continue
        result = json.loads(proc.stdout)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        summary[name] = {"seconds": round(time.monotonic() - t0, 1), "file": str(out / f"{name}.json")}
    print(json.dumps(summary, indent=1))
    return 0 if all("error" not in v for v in summary.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
