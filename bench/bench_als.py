"""Side-by-side benchmark: zerocf ALS (CG, exact) vs implicit 0.7.3 ALS (CG). Prints one JSON document.

Run: ``python -m bench.bench_als [--datasets ml-100k,synthetic] [--threads 2] [--no-tune] [--case standard|10m|all]``

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

``--case 10m`` (or ``all``: both; the default ``standard`` is the above alone) runs the large case and writes
``--out-10m``: :func:`bench.data.synthetic_large` (1M users x 200k items, 12.6M pairs, 10.06M train nnz after
the same holdout), generated once, then one subprocess per phase so each phase's peak RSS (``VmHWM``) is its
own: the snapshot (:class:`InteractionMatrix` built from the training events in a shuffled stream order, string
ids, batches of ``--snapshot-batch``), our solve, implicit's (alternating, ``--large-repeats`` each), and on a
user-prefix slice of ``--spark-nnz`` train pairs our solve and Spark's (:func:`workers.batch.spark.spark_als_fit`,
``local[threads]``; seconds per iteration = (fit of ``iterations`` - fit of 1) / (iterations - 1)). Memory is
reported as the peak above the phase's RSS once its inputs are loaded and its code warmed up, per train non-zero.
Quality at equal iterations: the WMF objective of each solution on the same confidence, and NDCG@10 on
``--eval-users`` sampled test users. No tuning at this size: ``--large-alpha`` (10, what both libraries chose on
the 1M synthetic validation) and ``--reg``.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported: BLAS single-threaded for both

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from bench.data import (  # noqa: E402
    Interactions,
    holdout_mask,
    load_ml100k,
    ranking_metrics,
    subset,
    synthetic,
    synthetic_large,
)
from workers.batch.interactions import InteractionMatrix  # noqa: E402
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


# ---- the 10M case: one subprocess per phase, each phase's peak RSS its own ------------------------------------


def _status_kib(pid: int, field: str) -> int:
    """``field`` (VmRSS, VmHWM) of /proc/<pid>/status in KiB; 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                kids.setdefault(int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(p.name))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out += [c]
            todo += [c]
    return out


def _save_csr(path: Path, m: sp.csr_matrix) -> None:
    np.savez(path, data=m.data, indices=m.indices, indptr=m.indptr, shape=np.asarray(m.shape))


def _load_csr(path: Path) -> sp.csr_matrix:
    with np.load(path) as z:
        return sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))


def _mem(base_kib: int, nnz: int) -> dict[str, Any]:
    peak = _status_kib(os.getpid(), "VmHWM")
    delta = (peak - base_kib) * 1024
    return {
        "rss_base_mib": round(base_kib / 1024, 1),
        "rss_peak_mib": round(peak / 1024, 1),
        "peak_above_base_mib": round(delta / 2**20, 1),
        "bytes_per_nnz": round(delta / nnz, 1),
    }


def _quality(
    work: Path, U: np.ndarray, V: np.ndarray, train: sp.csr_matrix, cfg: dict[str, Any], users: str
) -> dict[str, Any]:
    test, ev = _load_csr(work / "test.npz"), np.load(work / f"{users}.npy")
    ids, _ = recommend_from_factors(U[ev], V, exclude_csr=train[ev], k=10)
    m = ranking_metrics(ids, test, ev, k=10)
    loss = wmf_loss(confidence(train, cfg["alpha"]), U, V, cfg["reg"])
    return {
        "wmf_loss": round(loss, 1),
        "ndcg10": round(m["ndcg"], 4),
        "recall10": round(m["recall"], 4),
        "eval_users": int(m["users"]),
    }


def _phase_snapshot(work: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The snapshot's matrix build: string-id events into :class:`InteractionMatrix`, then its CSR."""
    with np.load(work / "events.npz") as z:
        user, item, weight = z["user"], z["item"], z["weight"]
    base, b, t0 = _status_kib(os.getpid(), "VmRSS"), cfg["snapshot_batch"], time.perf_counter()
    m = InteractionMatrix()
    for lo in range(0, user.size, b):
        m.add_batch(
            [f"u{x}" for x in user[lo : lo + b].tolist()],
            [f"i{x}" for x in item[lo : lo + b].tolist()],
            weight[lo : lo + b],
        )
    csr = m.to_csr()
    secs = time.perf_counter() - t0
    out = {
        "events": int(user.size),
        "nnz": int(csr.nnz),
        "seconds": round(secs, 1),
        "events_per_s": round(user.size / secs),
        "matrix_nbytes_mib": round(m.nbytes() / 2**20, 1),
        "estimate_bytes_mib": round(InteractionMatrix.estimate_bytes(csr.nnz, *csr.shape) / 2**20, 1),
    }
    return out | _mem(base, csr.nnz)


def _phase_solve(work: Path, cfg: dict[str, Any], lib: str, data: str) -> dict[str, Any]:
    """One timed fit of ``lib`` on ``data`` (train / slice), its memory, then its quality."""
    train = _load_csr(work / f"{data}.npz")
    a = argparse.Namespace(**cfg, reg_now=cfg["reg"])
    if threadpool_limits is not None:
        threadpool_limits(1, "blas")
    fit(lib, train[:64, :], cfg["alpha"], argparse.Namespace(**(vars(a) | {"iterations": 1})))  # warm (JIT, imports)
    base = _status_kib(os.getpid(), "VmRSS")
    r = fit(lib, train, cfg["alpha"], a, seed=cfg["seed"])
    out = {
        "nnz": int(train.nnz),
        "shape": list(train.shape),
        "sec_per_iter_median": round(float(np.median(r["secs"])), 3),
        "sec_per_iter": [round(x, 3) for x in r["secs"]],
        "fit_wall_seconds": round(r["wall"], 2),
    }
    out |= _mem(base, train.nnz)
    return out | _quality(work, r["U"], r["V"], train, cfg, "eval_slice" if data == "slice" else "eval")


def _phase_spark(work: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Spark MLlib on the slice through :func:`spark_als_fit`: warm session, a 1-iteration fit, the full fit."""
    from workers.batch.spark import spark_als_fit

    train = _load_csr(work / "slice.npz")
    kw = {
        "factors": cfg["factors"],
        "reg": cfg["reg"],
        "alpha": cfg["alpha"],
        "threads": cfg["threads"],
        "seed": cfg["seed"],
    }
    spark_als_fit(train[:2000], iterations=1, **kw)  # session start and JVM warm-up, untimed
    jvms = [p for p in _descendants(os.getpid()) if Path(f"/proc/{p}/comm").read_text().strip() == "java"]
    base, jvm_base = _status_kib(os.getpid(), "VmRSS"), sum(_status_kib(p, "VmRSS") for p in jvms)
    t0 = time.perf_counter()
    spark_als_fit(train, iterations=1, **kw)
    t1 = time.perf_counter()
    U, V = spark_als_fit(train, iterations=cfg["iterations"], **kw)
    t2 = time.perf_counter()
    jvm_peak = sum(_status_kib(p, "VmHWM") for p in jvms)
    per = (t2 - t1 - (t1 - t0)) / max(1, cfg["iterations"] - 1)
    out = {
        "nnz": int(train.nnz),
        "shape": list(train.shape),
        "master": f"local[{cfg['threads']}]",
        "sec_per_iter": round(per, 3),
        "fit_1_iter_seconds": round(t1 - t0, 1),
        "fit_wall_seconds": round(t2 - t1, 1),
        "python": _mem(base, train.nnz),
        "jvm": {
            "rss_base_mib": round(jvm_base / 1024, 1),
            "rss_peak_mib": round(jvm_peak / 1024, 1),
            "peak_above_base_mib": round((jvm_peak - jvm_base) / 1024, 1),
            "bytes_per_nnz": round((jvm_peak - jvm_base) * 1024 / train.nnz, 1),
        },
    }
    return out | _quality(work, U, V, train, cfg, "eval_slice")


def _prepare_large(work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """Generate the data once; write the phases' inputs (events, train, test, slice, eval users)."""
    t0 = time.perf_counter()
    d = synthetic_large(n_users=a.large_users, n_items=a.large_items, mean_per_user=a.large_mean, seed=a.seed)
    gen = time.perf_counter() - t0
    test_mask = holdout_mask(d, seed=a.seed)
    tr = subset(d, ~test_mask)
    rng = np.random.default_rng(a.seed)
    order = rng.permutation(tr.user.size)  # a stream interleaves users
    np.savez(work / "events.npz", user=tr.user[order], item=tr.item[order], weight=tr.weight[order])
    train, test = tr.to_csr(), subset(d, test_mask).to_csr()
    del d, tr, order
    cut = min(int(np.searchsorted(train.indptr, a.spark_nnz)), train.shape[0])  # users up to ~spark_nnz pairs
    _save_csr(work / "train.npz", train)
    _save_csr(work / "test.npz", test)
    _save_csr(work / "slice.npz", train[:cut])
    has_test = np.flatnonzero(np.diff(test.indptr) > 0)
    np.save(work / "eval.npy", np.sort(rng.choice(has_test, min(a.eval_users, has_test.size), replace=False)))
    in_slice = has_test[has_test < cut]
    np.save(work / "eval_slice.npy", np.sort(rng.choice(in_slice, min(a.eval_users, in_slice.size), replace=False)))
    return {
        "generator": "bench.data.synthetic_large",
        "n_users": a.large_users,
        "n_items": a.large_items,
        "mean_per_user": a.large_mean,
        "pairs": int(train.nnz + test.nnz),
        "train_nnz": int(train.nnz),
        "test_nnz": int(test.nnz),
        "items_with_clicks": int((np.diff(train.tocsc().indptr) > 0).sum()),
        "generate_seconds": round(gen, 1),
        "slice": {"users": cut, "train_nnz": int(train.indptr[cut])},
    }


def _run_phase(work: Path, phase: str) -> dict[str, Any]:
    log.info("10m case: phase %s (load %.2f)", phase, os.getloadavg()[0])
    load0 = os.getloadavg()[0]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_als", "--phase", phase, "--workdir", str(work)],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    out: dict[str, Any] = json.loads(proc.stdout)
    return out | {"load_avg_1m_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def _ratios(ours: list[dict[str, Any]], imp: list[dict[str, Any]]) -> dict[str, Any]:
    """Ours over implicit: seconds per iteration pooled over all timed fits (median), whole fits, quality."""
    o, i = (float(np.median([s for r in runs for s in r["sec_per_iter"]])) for runs in (ours, imp))
    wall = [float(np.median([r["fit_wall_seconds"] for r in runs])) for runs in (ours, imp)]
    return {
        "ours_sec_per_iter_median": round(o, 3),
        "implicit_sec_per_iter_median": round(i, 3),
        "sec_per_iter": round(o / i, 3),
        "fit_wall": round(wall[0] / wall[1], 3),
        "ndcg10": round(ours[0]["ndcg10"] / imp[0]["ndcg10"], 3),
        "wmf_loss": round(ours[0]["wmf_loss"] / imp[0]["wmf_loss"], 6),
    }


def _spark_note(doc: dict[str, Any]) -> str:
    """Why Spark ran on the slice, with the full-size time its measured rate implies."""
    sl, full = doc["spark_slice"]["spark_local"], doc["data"]["train_nnz"]
    est = sl["sec_per_iter"] * doc["config"]["iterations"] * full / sl["nnz"] / 60
    return (
        f"Spark ran on a user-prefix slice of {sl['nnz']:,} train pairs, not the full {full:,}: at its measured "
        f"{sl['sec_per_iter']} s/iteration the full matrix would take ~{est:.0f} min for the fit alone (linear in "
        f"nnz assumed). ours_cg here is our solve of the same slice. MLlib scales regParam per row (ALS-WR), so "
        f"its loss and NDCG are not at the same objective: for the record only."
    )


def case_10m(a: argparse.Namespace) -> dict[str, Any]:
    """The ≥ 10M-non-zero case (see the module docstring); returns its JSON document."""
    cfg = {
        "factors": a.factors,
        "reg": a.reg,
        "alpha": a.large_alpha,
        "iterations": a.iterations,
        "cg_steps": a.cg_steps,
        "threads": a.threads,
        "seed": a.seed,
        "snapshot_batch": a.snapshot_batch,
    }
    with tempfile.TemporaryDirectory(prefix="zerocf-als10m-") as tmp:
        work = Path(tmp)
        (work / "cfg.json").write_text(json.dumps(cfg))
        doc: dict[str, Any] = {
            "config": cfg | {"confidence": "linear, c = 1 + alpha*f", "blas_threads": 1},
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
            "data": _prepare_large(work, a),
        }
        doc["snapshot"] = _run_phase(work, "snapshot")
        runs: dict[str, list[dict[str, Any]]] = {"ours_cg": [], "implicit_cg": []}
        for _ in range(a.large_repeats):  # alternate, so machine noise hits both
            runs["ours_cg"].append(_run_phase(work, "ours"))
            if AlternatingLeastSquares is not None:
                runs["implicit_cg"].append(_run_phase(work, "implicit"))
        doc["solve"] = {k: v[0] if len(v) == 1 else v for k, v in runs.items() if v}
        if runs["implicit_cg"]:
            doc["ratios_ours_cg_over_implicit"] = _ratios(runs["ours_cg"], runs["implicit_cg"])
        if not a.no_spark:
            doc["spark_slice"] = {"ours_cg": _run_phase(work, "ours_slice")}
            try:  # for the record only: a JVM failure must not lose the figures above
                doc["spark_slice"]["spark_local"] = _run_phase(work, "spark")
                doc["spark_slice"]["note"] = _spark_note(doc)
            except subprocess.CalledProcessError as exc:
                log.error("10m case: spark phase failed (exit %d); recorded as an error", exc.returncode)
                doc["spark_slice"]["spark_local"] = {"error": f"exit {exc.returncode}, see the log"}
        doc["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return doc


def run_phase(phase: str, work: Path) -> None:
    cfg = json.loads((work / "cfg.json").read_text())
    if phase == "snapshot":
        out = _phase_snapshot(work, cfg)
    elif phase == "spark":
        out = _phase_spark(work, cfg)
    else:
        lib, _, data = phase.partition("_")
        out = _phase_solve(work, cfg, lib, data or "train")
    print(json.dumps(out))


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
    p.add_argument(
        "--case",
        choices=["standard", "10m", "all"],
        default="standard",
        help="standard: --datasets (stdout); 10m: the large case (stdout and --out-10m); all: both",
    )
    p.add_argument("--out-10m", default=str(Path(__file__).parent / "results" / "als_10m.json"))
    p.add_argument("--large-users", type=int, default=1_000_000)
    p.add_argument("--large-items", type=int, default=200_000)
    p.add_argument("--large-mean", type=float, default=14.0, help="mean distinct items per user (before the holdout)")
    p.add_argument("--large-alpha", type=float, default=10.0)
    p.add_argument("--large-repeats", type=int, default=1, help="timed fits per library in the 10m case")
    p.add_argument("--snapshot-batch", type=int, default=10_000, help="events per add_batch in the snapshot phase")
    p.add_argument("--spark-nnz", type=int, default=2_000_000, help="train pairs of the slice ours and Spark solve")
    p.add_argument("--no-spark", action="store_true")
    p.add_argument("--eval-users", type=int, default=10_000, help="test users sampled for NDCG in the 10m case")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # internal: one phase of the 10m case, in a subprocess
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.phase:
        run_phase(a.phase, Path(a.workdir))
        return
    if a.case in ("standard", "all"):
        print(json.dumps(standard(a), indent=1))
    if a.case in ("10m", "all"):
        doc = case_10m(a)
        Path(a.out_10m).write_text(json.dumps(doc, indent=1) + "\n")
        if a.case == "10m":
            print(json.dumps(doc, indent=1))


def standard(a: argparse.Namespace) -> dict[str, Any]:
    """The ``--datasets`` comparison (see the module docstring)."""
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
    return doc


if __name__ == "__main__":
    main()
