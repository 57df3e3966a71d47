"""Side-by-side benchmark: zerocf ALS (CG, exact) vs implicit 0.7.3 ALS (CG). Prints one JSON document.

Run: ``python -m bench.bench_als [--datasets ml-100k,synthetic] [--threads 2] [--no-tune]``

Same problem for both libraries. Counts ``f`` (ml-100k: 1 per rating unless ``--ml-weights rating``;
synthetic: click counts) become confidence ``c = 1 + alpha * f`` (our ``scaling="linear"``). Ours gets the
counts and ``alpha``; implicit gets the CSR ``1 + alpha * f`` with its own ``alpha=1.0`` (implicit uses
the stored value as ``c`` directly), the same ``reg`` (unscaled ``reg * I`` in both), factors, iterations,
CG steps (3) and threads (implicit ``num_threads``, our numba threads). BLAS is pinned to 1 thread for
both (implicit's recommendation; env vars set before numpy is imported, plus threadpoolctl).

Protocol. Per-user temporal 80/20 holdout (seeded random order when there are no timestamps), users
with >= 5 interactions; recall@10 and NDCG@10 with train items excluded, scored for both libraries by
the same code (:func:`workers.kernels.topk.recommend_from_factors`, :func:`bench.data.ranking_metrics`). With
tuning on, alpha (and reg, reported only) are chosen per library on a validation split carved the same
way out of the training part; the timed, reported runs use reg = ``--reg`` and the alpha each library
scored best with at that reg. Seconds per iteration are medians over all iterations of ``--repeats``
fits (seeds seed..seed+repeats-1; two half-sweeps; our loss evaluation excluded, implicit's loss
disabled); recall/NDCG are means over those fits, ``wmf_loss`` is of the first.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported: BLAS single-threaded for both

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from bench.data import Interactions, holdout_mask, load_ml100k, ranking_metrics, subset, synthetic  # noqa: E402
from workers.kernels.als import als_fit, confidence, wmf_loss  # noqa: E402
from workers.kernels.topk import recommend_from_factors  # noqa: E402

log = logging.getLogger("bench.bench_als")

try:  # benchmark-only extras
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None
try:
    from implicit.cpu.als import AlternatingLeastSquares
except ImportError:  # pragma: no cover
    AlternatingLeastSquares = None


def implicit_input(counts: sp.csr_matrix, alpha: float) -> sp.csr_matrix:
    """implicit's input for our problem: stored value = full confidence ``1 + alpha * f``."""
    c = confidence(counts, alpha)
    c.data += np.float32(1.0)
    c.indptr = c.indptr.astype(np.int32)  # implicit wants matching index dtypes
    return c


def fit(
    lib: str, counts: sp.csr_matrix, alpha: float, a: argparse.Namespace, solver: str = "cg", seed: int = 0
) -> dict[str, Any]:
    """One fit; returns factors, per-iteration seconds and whole-fit wall time."""
    t0 = time.perf_counter()
    if lib == "ours":
        U, V, h = als_fit(
            counts,
            a.factors,
            a.reg_now,
            alpha,
            a.iterations,
            solver=solver,
            cg_steps=a.cg_steps,
            rng=np.random.default_rng(seed),
            num_threads=a.threads,
            compute_loss=False,
        )
        secs = h.seconds
    else:
        secs = []
        m = AlternatingLeastSquares(
            factors=a.factors,
            regularization=a.reg_now,
            alpha=1.0,
            iterations=a.iterations,
            use_cg=True,
            num_threads=a.threads,
            random_state=seed,
        )
        m.cg_steps = a.cg_steps
        m.fit(
            implicit_input(counts, alpha), show_progress=False, callback=lambda it, elapsed, loss: secs.append(elapsed)
        )
        U, V = m.user_factors, m.item_factors
    return {"U": U, "V": V, "secs": secs, "wall": time.perf_counter() - t0}


def evaluate(U: np.ndarray, V: np.ndarray, train: sp.csr_matrix, test: sp.csr_matrix) -> dict[str, float]:
    users = np.flatnonzero(np.diff(test.indptr) > 0)
    ids, _ = recommend_from_factors(U[users], V, exclude_csr=train[users], k=10)
    return ranking_metrics(ids, test, users, k=10)


def tune(d: Interactions, train_mask: np.ndarray, a: argparse.Namespace) -> list[dict[str, Any]]:
    """Validation grid over (alpha, reg) for both libraries, on the training part only."""
    dt = subset(d, train_mask)
    val_mask = holdout_mask(dt, seed=a.seed + 1)
    tr, va = subset(dt, ~val_mask).to_csr(binary=a.binary), subset(dt, val_mask).to_csr()
    rows = []
    for reg in a.grid_reg:
        for alpha in a.grid_alpha:
            a.reg_now = reg
            row: dict[str, Any] = {"alpha": alpha, "reg": reg}
            for lib in a.libs:
                r = fit(lib, tr, alpha, a, seed=a.seed)
                row[f"{lib}_val_ndcg10"] = round(evaluate(r["U"], r["V"], tr, va)["ndcg"], 4)
            rows.append(row)
            log.info("grid %s", row)
    return rows


def bench_dataset(d: Interactions, a: argparse.Namespace) -> dict[str, Any]:
    test_mask = holdout_mask(d, seed=a.seed)
    train = subset(d, ~test_mask).to_csr(binary=a.binary)
    test = subset(d, test_mask).to_csr()
    out: dict[str, Any] = {
        "n_users": d.n_users,
        "n_items": d.n_items,
        "train_nnz": int(train.nnz),
        "test_nnz": int(test.nnz),
    }
    best = {lib: a.alpha for lib in a.libs}
    if a.tune:
        grid = tune(d, ~test_mask, a)
        out["grid"] = grid
        at_reg = [r for r in grid if r["reg"] == a.reg] or grid
        best = {lib: max(at_reg, key=lambda r: r[f"{lib}_val_ndcg10"])["alpha"] for lib in a.libs}
        out["best_on_validation"] = {lib: max(grid, key=lambda r: r[f"{lib}_val_ndcg10"]) for lib in a.libs}
    a.reg_now = a.reg
    runs: dict[str, Any] = {}
    plan = [("ours_cg", "ours", "cg"), ("implicit_cg", "implicit", "cg"), ("ours_exact", "ours", "exact")]
    plan = [p for p in plan if p[1] in a.libs and (p[2] == "cg" or a.exact)]
    reps = {name: (a.repeats if solver == "cg" else 1) for name, _, solver in plan}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in plan}
    for rep in range(max(reps.values())):  # interleave libraries so machine noise hits both
        for name, lib, solver in plan:
            if rep < reps[name]:
                results[name].append(fit(lib, train, best[lib], a, solver=solver, seed=a.seed + rep))
    for name, lib, _solver in plan:
        first = results[name][0]
        secs = [s for r in results[name] for s in r["secs"]]
        ms = [evaluate(r["U"], r["V"], train, test) for r in results[name]]  # one per seed
        m = {key: float(np.mean([x[key] for x in ms])) for key in ("recall", "ndcg", "users")}
        runs[name] = {
            "alpha": best[lib],
            "reg": a.reg,
            "sec_per_iter_median": round(float(np.median(secs)), 5),
            "sec_per_iter_min": round(float(np.min(secs)), 5),
            "fit_wall_seconds_median": round(float(np.median([r["wall"] for r in results[name]])), 4),
            "fits_timed": len(results[name]),
            "wmf_loss": round(wmf_loss(confidence(train, best[lib]), first["U"], first["V"], a.reg), 2),
            "recall10": round(m["recall"], 4),
            "ndcg10": round(m["ndcg"], 4),
            "ndcg10_per_seed": [round(x["ndcg"], 4) for x in ms],
            "eval_users": int(m["users"]),
        }
    out["runs"] = runs
    if "ours_cg" in runs and "implicit_cg" in runs:
        o, i = runs["ours_cg"], runs["implicit_cg"]
        out["ratios_ours_cg_over_implicit"] = {
            "sec_per_iter": round(o["sec_per_iter_median"] / i["sec_per_iter_median"], 3),
            "fit_wall": round(o["fit_wall_seconds_median"] / i["fit_wall_seconds_median"], 3),
            "ndcg10": round(o["ndcg10"] / i["ndcg10"], 3),
            "recall10": round(o["recall10"] / i["recall10"], 3),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="ml-100k,synthetic")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--factors", type=int, default=64)
    p.add_argument("--reg", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=1.0, help="used when --no-tune")
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--cg-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ml-weights", choices=["binary", "rating"], default="binary")
    p.add_argument("--no-tune", dest="tune", action="store_false")
    p.add_argument("--no-exact", dest="exact", action="store_false")
    p.add_argument("--grid-alpha", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1, 2, 5, 10])
    p.add_argument("--grid-reg", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.5, 5])
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a.libs = ["ours"] + (["implicit"] if AlternatingLeastSquares is not None else [])
    a.reg_now = a.reg
    if threadpool_limits is not None:
        threadpool_limits(1, "blas")
    t = time.perf_counter()  # numba JIT (cached on disk after the first run), not part of the timings
    warm = sp.random(50, 40, density=0.2, format="csr", random_state=0, dtype=np.float32)
    for solver in ("cg", "exact"):
        als_fit(warm, factors=a.factors, iterations=1, solver=solver, num_threads=a.threads)
    doc: dict[str, Any] = {
        "config": {
            "threads": a.threads,
            "factors": a.factors,
            "reg": a.reg,
            "iterations": a.iterations,
            "cg_steps": a.cg_steps,
            "repeats": a.repeats,
            "ml_weights": a.ml_weights,
            "tuned": a.tune,
            "grid_alpha": a.grid_alpha,
            "grid_reg": a.grid_reg,
            "confidence": "c = 1 + alpha*f; implicit fed 1 + alpha*f with alpha=1.0",
            "blas_threads": 1,
            "implicit_available": AlternatingLeastSquares is not None,
        },
        "jit_warmup_seconds": round(time.perf_counter() - t, 2),
        "datasets": {},
    }
    for name in a.datasets.split(","):
        a.binary = name == "ml-100k" and a.ml_weights == "binary"
        d = load_ml100k() if name == "ml-100k" else synthetic(seed=a.seed)
        doc["datasets"][name] = bench_dataset(d, a)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
