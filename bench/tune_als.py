"""Why the ALS defaults are what they are: a one-at-a-time ablation on the validation split, next to implicit.

    python -m bench.tune_als [--datasets ml-100k,lastfm-2k] [--seeds 1] [--quick] > bench/results/tune_als.json

For each dataset, ALS alone is fitted on the training part of the validation split (the split of
:mod:`bench.tune_lmf`: :class:`workers.evaluation.data.Holdout` seed 0, test clicks never read) through the
production path (``fit`` + ``handoff_rows`` of :mod:`workers.batch.solve`, what ``zerocf als --once``
publishes, as ``holdout._als_alone``) with the production :class:`workers.config.ALSConfig`, then with one knob
changed at a time: linear confidence ``1 + alpha f`` (alpha 1, 10, 40, each over a range of reg, since the
right reg moves with alpha), the log confidence's eps and alpha, reg, iterations, solver (exact Cholesky vs CG)
and CG steps, plus the best joint settings per dataset of the earlier grid study (/tmp/als-lab2) to show what a
single default for both datasets costs. Scores: NDCG@10, HR@10, recall@10, coverage on the validation clicks.

The reference is ``implicit`` 0.7.3's ALS (``pip install -e '.[bench]'``), same k, 15 iterations, CG, at its
best setting on this validation split: a grid over its input (raw counts with implicit's ``alpha`` scaling,
i.e. ``c = alpha f``; our log confidence ``1 + alpha log(1 + f/eps)`` fed as ``c``; BM25-weighted counts, the
recipe of implicit's Last.fm example) x alpha x reg, chosen on seed 0 and re-run with every seed. Also implicit
at our production settings (the same problem as ours, so it should score the same). ``ratio`` = our NDCG /
implicit's best NDCG.

``--seeds N``: init seeds 0..N-1 of every fit (the split stays the seed-0 split); mean, std and per-seed NDCG.
``delta`` = the variant's mean NDCG minus the default's. Output: one JSON object (per dataset: ``variants``,
``implicit``, ``references``, ``ratio``), each entry with its settings, metrics and seconds (fit + scoring, summed
over seeds). Runtime on a shared 2-core machine: ~1 s per CG fit on ml-100k and ~3 s on lastfm-2k (exact: 3-4x),
scoring included; implicit's grid (80 fits, seed 0 only) ~1 min on ml-100k and ~3.5 min on lastfm-2k. In all,
~6 min for one seed; the saved ``bench/results/tune_als.json`` is ``--seeds 3``: 11-14 min (``--quick``: ~1 min).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported: BLAS single-threaded (implicit's advice)

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from bench.tune_lmf import (  # noqa: E402
    Split,
    Variant,
    als_alone,
    defaults_record,
    load_split,
    run_seeds,
    run_variants,
    tune_parser,
    tune_setup,
)
from workers.config import ALSConfig  # noqa: E402
from workers.evaluation.offline import Factors  # noqa: E402
from workers.kernels.als import confidence  # noqa: E402

log = logging.getLogger("bench.tune_als")

Overrides = dict[str, Any]
LINEAR_REGS = (1.0, 5.0, 25.0, 100.0, 400.0, 1000.0)
# (name, knob, overrides of the production ALSConfig); the first is the default itself
VARIANTS: list[tuple[str, str, Overrides]] = [
    ("default", "default", {}),
    *[
        (
            f"linear alpha={a:g} reg={r:g}",
            f"linear alpha={a:g}",
            {"als_confidence": "linear", "als_alpha": a, "als_reg": r},
        )
        for a in (1.0, 10.0, 40.0)
        for r in LINEAR_REGS
    ],
    ("log eps=1", "eps", {"als_eps": 1.0}),
    ("log eps=0.01", "eps", {"als_eps": 0.01}),
    ("log alpha=0.5", "alpha", {"als_alpha": 0.5}),
    ("log alpha=2", "alpha", {"als_alpha": 2.0}),
    ("reg=1", "reg", {"als_reg": 1.0}),
    ("reg=5", "reg", {"als_reg": 5.0}),
    ("reg=50", "reg", {"als_reg": 50.0}),
    ("reg=100", "reg", {"als_reg": 100.0}),
    ("iterations=10", "iterations", {"als_iterations": 10}),
    ("iterations=30", "iterations", {"als_iterations": 30}),
    ("solver=exact", "solver", {"als_solver": "exact"}),
    ("cg_steps=6", "solver", {"als_cg_steps": 6}),
    ("als-lab2 ml-100k best: log eps=1 alpha=1 reg=15", "joint", {"als_eps": 1.0, "als_reg": 15.0}),
    ("als-lab2 lastfm-2k best: log eps=1 alpha=3 reg=75", "joint", {"als_eps": 1.0, "als_alpha": 3.0, "als_reg": 75.0}),
    ("implicit's best on lastfm-2k: log alpha=3 reg=100", "joint", {"als_alpha": 3.0, "als_reg": 100.0}),
]
QUICK = {"default", "linear alpha=1 reg=5", "linear alpha=1 reg=1000", "linear alpha=10 reg=25", "log eps=1",
         "reg=5", "reg=100", "iterations=30", "solver=exact"}  # fmt: skip

# implicit's grid: input kind x alpha x reg
IMPLICIT_KINDS = ("counts", "log eps=0.1", "log eps=1", "bm25")
IMPLICIT_ALPHAS = (1.0, 3.0, 10.0, 40.0)
IMPLICIT_REGS = (1.0, 5.0, 25.0, 100.0, 400.0)
QUICK_IMPLICIT = (("counts", "log eps=0.1"), (1.0, 10.0), (5.0, 25.0, 100.0))


def implicit_input(train: sp.csr_matrix, kind: str, alpha: float) -> tuple[sp.csr_matrix, float]:
    """The matrix implicit is fitted on and its ``alpha`` (implicit's confidence is ``alpha * value``)."""
    if kind == "counts":
        m, a = sp.csr_matrix(train, dtype=np.float32, copy=True), alpha
    elif kind.startswith("log eps="):
        m = sp.csr_matrix(confidence(train, alpha, "log", float(kind.split("=")[1])), dtype=np.float32)
        m.data += np.float32(1.0)  # c itself, implicit alpha 1: exactly our problem
        a = 1.0
    elif kind == "bm25":
        from implicit.nearest_neighbours import bm25_weight

        m, a = sp.csr_matrix(bm25_weight(train, K1=100, B=0.8), dtype=np.float32), alpha
    else:
        raise ValueError(f"implicit input kind {kind!r} is unknown")
    m.indptr, m.indices = m.indptr.astype(np.int32), m.indices.astype(np.int32)
    return m, a


def implicit_trainer(split: Split, kind: str, alpha: float, reg: float, factors: int,
                     iterations: int) -> Callable[[int], Factors]:  # fmt: skip
    """seed -> implicit's ALS (CG, 2 threads) on the training part, as a :class:`Factors` with zero biases."""
    from implicit.cpu.als import AlternatingLeastSquares

    m, a = implicit_input(split.train, kind, alpha)

    def train(seed: int) -> Factors:
        model = AlternatingLeastSquares(factors=factors, regularization=reg, alpha=a, iterations=iterations,
                                        use_cg=True, num_threads=2, random_state=seed)  # fmt: skip
        model.fit(m, show_progress=False)
        U = np.ascontiguousarray(model.user_factors, np.float32)
        V = np.ascontiguousarray(model.item_factors, np.float32)
        zero_u, zero_v = np.zeros((U.shape[0], 1), np.float32), np.zeros((V.shape[0], 1), np.float32)
        return Factors(np.hstack([U, zero_u]), np.hstack([V, zero_v]))

    return train


def ours_trainer(split: Split, ov: Overrides) -> Callable[[int], Factors]:
    def train(seed: int) -> Factors:
        return als_alone(split.stream(seed), ALSConfig(**{**ov, "als_seed": seed}))

    return train


def bench_implicit(split: Split, seeds: Sequence[int], quick: bool) -> dict[str, Any] | None:
    try:
        import implicit  # noqa: F401
    except ImportError:
        log.warning("implicit is not installed (pip install -e '.[bench]'): no reference")
        return None
    prod = ALSConfig()
    k, it = prod.factors, prod.als_iterations
    kinds, alphas, regs = QUICK_IMPLICIT if quick else (IMPLICIT_KINDS, IMPLICIT_ALPHAS, IMPLICIT_REGS)
    grid: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for kind in kinds:
        for alpha in alphas:
            for reg in regs:
                r = run_seeds(split, seeds[:1], implicit_trainer(split, kind, alpha, reg, k, it))
                grid.append({"input": kind, "alpha": alpha, "reg": reg, "ndcg": r["ndcg"], "hr": r["hr"]})
                log.info("%s implicit %-12s alpha %-4g reg %-5g NDCG %.4f", split.name, kind, alpha, reg, r["ndcg"])
    grid_seconds = round(time.perf_counter() - t0, 1)
    top = max(grid, key=lambda g: g["ndcg"])
    best = run_seeds(split, seeds, implicit_trainer(split, top["input"], top["alpha"], top["reg"], k, it))
    same_kind = f"log eps={prod.als_eps:g}" if prod.als_confidence == "log" else "counts"
    same = run_seeds(split, seeds, implicit_trainer(split, same_kind, prod.als_alpha, prod.als_reg, k, it))
    log.info("%s implicit best %s: NDCG %.4f; at our settings %.4f", split.name, top, best["ndcg"], same["ndcg"])
    return {
        "best": {"input": top["input"], "alpha": top["alpha"], "reg": top["reg"], **best},
        "at_our_defaults": {"input": same_kind, "alpha": prod.als_alpha, "reg": prod.als_reg, **same},
        "grid": {"chosen_on_seed": seeds[0], "seconds": grid_seconds, "runs": sorted(grid, key=lambda g: -g["ndcg"])},
    }


def bench_dataset(split: Split, variants: Sequence[Variant], seeds: Sequence[int], quick: bool) -> dict[str, Any]:
    out = run_variants(split, variants, seeds, ours_trainer)
    res, base = out["variants"], out["variants"]["default"]["ndcg"]
    imp = bench_implicit(split, seeds, quick)
    out["implicit"] = imp
    if imp is not None:
        ref = imp["best"]["ndcg"]
        best_name = max(res, key=lambda n: res[n]["ndcg"])
        out["ratio"] = {
            "default / implicit best": round(base / ref, 4),
            f"best variant ({best_name}) / implicit best": round(res[best_name]["ndcg"] / ref, 4),
            "default / implicit at our defaults": round(base / imp["at_our_defaults"]["ndcg"], 4),
        }
        for r in res.values():
            r["ratio"] = round(r["ndcg"] / ref, 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = tune_parser(__doc__, f"{len(QUICK)} of the {len(VARIANTS)} variants, small grid")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    names, seeds, variants = tune_setup(args, VARIANTS, QUICK)
    result: dict[str, Any] = {
        "bench": "tune_als",
        "split": "validation (Holdout seed 0); test clicks never read",
        "metric": "mean over seeds of NDCG@10, HR@10, recall@10, coverage on the validation clicks",
        "seeds": seeds,
        "quick": args.quick,
        "defaults": defaults_record()["als"],
        "datasets": {},
    }
    for n in names:
        result["datasets"][n] = bench_dataset(load_split(n, Path(args.data_dir)), variants, seeds, args.quick)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
