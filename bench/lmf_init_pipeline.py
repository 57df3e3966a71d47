"""Which init for new users in the production pipeline (online LMF between ALS re-solves)? Prints JSON.

    python -m bench.lmf_init_pipeline [--dataset ../shared/datasets/ml-100k/u.data]

Replays the training part of the ml-100k holdout's validation split through
:func:`workers.evaluation.offline.replay_pipeline`
(ALS alpha 1 every 25,000 clicks, calibrated handoff, LMF lr 0.02 in between) once with ``init=random`` and once
with ``init=foldin``, and reports validation NDCG@10, next to ALS alone on the same data. This is the measurement
behind the default ``ZEROCF_LMF_INIT=random`` (bench/bench_lmf_kernel.py measures the pure-online case, where
fold-in wins).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workers.evaluation.cli import Holdout, load_data
from workers.evaluation.offline import ALSParams, fit_als, lmf_config, replay_pipeline

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k" / "u.data"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default=str(DATA))
    ap.add_argument("--resolve-every", type=int, default=25_000)
    args = ap.parse_args(argv)
    h = Holdout(load_data(args.dataset, "movielens"), seed=0, k=10)
    fit_mask, train, _, _ = h.split(True)
    out: dict[str, object] = {"metric": "validation NDCG@10", "resolve_every": args.resolve_every}
    for init in ("random", "foldin"):
        U, V, _ = replay_pipeline(
            h.data.stream(fit_mask, 0),
            lmf_config(64, 0, lr=0.02, init=init),
            ALSParams(alpha=1.0),
            args.resolve_every,
            0,
        )
        out[f"pipeline_{init}"] = round(h.score(U, V, True)["ndcg"], 4)
    U, V = fit_als(train, 64, 0.05, 1.0, 15, "linear", 0)
    out["als_alone"] = round(h.score(U, V, True)["ndcg"], 4)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
