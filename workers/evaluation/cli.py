"""``zerocf eval``: holdout and prequential evaluation of our models against baselines (docs/evaluation.md).

``--protocol holdout`` trains in memory (:mod:`workers.evaluation.offline`) on a per-user temporal 80/20 split and
reports precision/recall/NDCG/MAP@k and coverage; hyper-parameters are tuned on a validation split carved
the same way out of the training part (never on test). ``--protocol prequential`` replays the stream
through the real broker, ``Ingest`` and ``LMFWorker`` (and, for ``pipeline``, the ALS worker's re-solve,
``zerocf als --once`` run in-process) and records the rank of each clicked item before it is learned.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from stream.errors import ConfigError
from stream.replay.datasets import BadLine, Format, Interaction, read_interactions
from workers.evaluation.metrics import holdout_mask, ranking_metrics
from workers.evaluation.offline import (
    ALSParams,
    Stream,
    fit_als,
    lmf_config,
    popularity,
    recommend,
    recommend_popular,
    replay_lmf,
    replay_pipeline,
)
from workers.evaluation.prequential import plot_windows, prequential, stack_env
from workers.kernels.als import Scaling

log = logging.getLogger(__name__)
OURS = ("als", "lmf", "pipeline", "popularity")
ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0)
LMF_LRS = (0.05, 0.1, 0.2)
LMF_MAX_EPOCHS = 8
PIPELINE_LRS = (0.005, 0.02, 0.05, 0.2)


@dataclass
class Data:
    """A dataset as dense arrays; ``ts`` is None without timestamps."""

    user: np.ndarray
    item: np.ndarray
    count: np.ndarray
    ts: np.ndarray | None
    n_users: int
    n_items: int
    rows: list[Interaction] = field(default_factory=list)

    def csr(self, mask: np.ndarray) -> sp.csr_matrix:
        m = sp.csr_matrix(
            (self.count[mask], (self.user[mask], self.item[mask])), shape=(self.n_users, self.n_items), dtype=np.float32
        )
        m.sum_duplicates()
        return m

    def stream(self, mask: np.ndarray, seed: int) -> Stream:
        """The rows of ``mask`` in stream order: by time (stable), else a seeded random permutation."""
        idx = np.flatnonzero(mask)
        idx = (
            idx[np.argsort(self.ts[idx], kind="stable")]
            if self.ts is not None
            else idx[np.random.default_rng(seed).permutation(idx.size)]
        )
        return Stream(
            self.user[idx].astype(np.int32),
            self.item[idx].astype(np.int32),
            self.count[idx].astype(np.float32),
            self.n_users,
            self.n_items,
        )


def load_data(path: str, fmt: Format) -> Data:
    """Read a dataset file; bad lines are logged and skipped (counted)."""
    bad: list[BadLine] = []
    rows = list(read_interactions(path, fmt, on_bad_line=bad.append))
    if bad:
        log.warning("%s: %d bad lines skipped (first: line %d, %s)", path, len(bad), bad[0].line_no, bad[0].reason)
    if not rows:
        raise ConfigError(f"{path} holds no interactions in format {fmt!r}; check --format")
    users, u = np.unique([r.user_id for r in rows], return_inverse=True)
    items, i = np.unique([r.item_id for r in rows], return_inverse=True)
    has_ts = rows[0].ts_ms is not None
    ts = np.array([r.ts_ms for r in rows], np.int64) if has_ts else None
    count = np.array([r.count for r in rows], np.float32)
    return Data(u.astype(np.int32), i.astype(np.int32), count, ts, users.size, items.size, rows)


# ---------------------------------------------------------------------- holdout
class Holdout:
    """Train/validation/test masks and the scoring of a model's factors on one of them."""

    def __init__(self, data: Data, seed: int, k: int) -> None:
        self.data, self.seed, self.k = data, seed, k
        self.test = holdout_mask(data.user, data.ts, data.n_users, seed=seed)
        train = ~self.test
        inner = holdout_mask(data.user[train], None if data.ts is None else data.ts[train], data.n_users, seed=seed)
        self.val = np.zeros_like(train)
        self.val[np.flatnonzero(train)[inner]] = True
        self.fit_mask = train & ~self.val

    def split(self, validation: bool) -> tuple[np.ndarray, sp.csr_matrix, sp.csr_matrix, np.ndarray]:
        """(train mask, train csr, eval csr, evaluated users)."""
        tr = self.fit_mask if validation else ~self.test
        ev = self.data.csr(self.val if validation else self.test)
        return tr, self.data.csr(tr), ev, np.flatnonzero(np.diff(ev.indptr))

    def score(self, U: np.ndarray, V: np.ndarray, validation: bool) -> dict[str, float]:
        _, train, ev, users = self.split(validation)
        return ranking_metrics(recommend(U, V, train, users, self.k), ev, users, self.k, self.data.n_items)


def tune_als(h: Holdout, factors: int, tune: bool) -> ALSParams:
    """Best (confidence scaling, alpha) by validation NDCG@k; reg 0.05 and 15 iterations fixed."""
    if not tune:
        return ALSParams()
    _, train, _, _ = h.split(True)
    scalings: tuple[Scaling, ...] = ("linear",) if np.all(h.data.count == 1) else ("linear", "log")
    best, best_ndcg = ALSParams(), -1.0
    for scaling in scalings:
        for alpha in ALPHAS:
            U, V = fit_als(train, factors, 0.05, alpha, 15, scaling, h.seed)
            ndcg = h.score(U, V, True)["ndcg"]
            log.info("tune als scaling=%s alpha=%g: validation ndcg@%d %.4f", scaling, alpha, h.k, ndcg)
            if ndcg > best_ndcg:
                best, best_ndcg = ALSParams(alpha=alpha, scaling=scaling), ndcg
    return best


def tune_lmf(h: Holdout, factors: int, tune: bool) -> tuple[float, int]:
    """Best (lr, epochs) of the offline LMF replay by validation NDCG@k (epochs 1..8 in one run per lr)."""
    if not tune:
        return 0.2, 4
    tr, _, _, _ = h.split(True)
    stream = h.data.stream(tr, h.seed)
    best, best_ndcg = (0.2, 4), -1.0
    for lr in LMF_LRS:
        scores: list[float] = []

        def record(_epoch: int, U: np.ndarray, V: np.ndarray, scores: list[float] = scores) -> None:
            scores.append(h.score(U, V, True)["ndcg"])

        replay_lmf(stream, lmf_config(factors, h.seed, lr=lr), LMF_MAX_EPOCHS, h.seed, callback=record)
        e = int(np.argmax(scores))
        log.info("tune lmf lr=%g: validation ndcg@%d by epoch %s", lr, h.k, [round(s, 4) for s in scores])
        if scores[e] > best_ndcg:
            best, best_ndcg = (lr, e + 1), scores[e]
    return best


def tune_pipeline(h: Holdout, factors: int, als: ALSParams, resolve_every: int, tune: bool) -> float:
    """Best LMF learning rate of the pipeline (LMF on top of calibrated ALS) by validation NDCG@k."""
    if not tune:
        return 0.02
    tr, _, _, _ = h.split(True)
    best, best_ndcg = 0.02, -1.0
    for lr in PIPELINE_LRS:
        U, V, _ = replay_pipeline(
            h.data.stream(tr, h.seed), lmf_config(factors, h.seed, lr=lr), als, resolve_every, h.seed
        )
        ndcg = h.score(U, V, True)["ndcg"]
        log.info("tune pipeline lmf lr=%g: validation ndcg@%d %.4f", lr, h.k, ndcg)
        if ndcg > best_ndcg:
            best, best_ndcg = lr, ndcg
    return best


def implicit_models(h: Holdout, factors: int, als: ALSParams) -> dict[str, dict[str, Any]]:
    """implicit 0.7.3's ALS, BPR and LMF on the same split (k, reg 0.05, 15 iterations); {} if absent."""
    try:
        from implicit.cpu.als import AlternatingLeastSquares
        from implicit.cpu.bpr import BayesianPersonalizedRanking
        from implicit.cpu.lmf import LogisticMatrixFactorization
    except ImportError:
        log.info("implicit is not installed: skipping its models")
        return {}
    from workers.kernels.als import confidence

    tr, train, _, _ = h.split(False)
    conf = confidence(train, als.alpha, als.scaling)
    conf.data += np.float32(1.0)  # implicit reads the stored value as the confidence c itself
    binary = train.copy()
    binary.data[:] = 1.0
    specs = {
        "implicit_als": (
            AlternatingLeastSquares(
                factors=factors, regularization=0.05, alpha=1.0, iterations=15, random_state=h.seed, num_threads=2
            ),
            conf,
        ),
        "implicit_bpr": (
            BayesianPersonalizedRanking(
                factors=factors, regularization=0.05, iterations=15, random_state=h.seed, num_threads=2
            ),
            binary,
        ),
        "implicit_lmf": (
            LogisticMatrixFactorization(
                factors=factors, regularization=0.05, iterations=15, random_state=h.seed, num_threads=2
            ),
            binary,
        ),
    }
    out = {}
    for name, (model, matrix) in specs.items():
        t0 = time.perf_counter()
        m = sp.csr_matrix(matrix, dtype=np.float32)
        m.indptr = m.indptr.astype(np.int32)
        model.fit(m, show_progress=False)
        U = np.ascontiguousarray(model.user_factors, np.float32)
        V = np.ascontiguousarray(model.item_factors, np.float32)
        out[name] = {**h.score(U, V, False), "seconds": round(time.perf_counter() - t0, 2)}
    return out


def run_holdout(
    data: Data, models: Sequence[str], factors: int, k: int, seed: int, tune: bool, resolve_every: int
) -> dict[str, Any]:
    """Every requested model on the holdout split; returns ``{"models": {...}, "params": {...}}``."""
    h = Holdout(data, seed, k)
    tr, train, test, users = h.split(False)
    out: dict[str, Any] = {}
    params: dict[str, Any] = {
        "factors": factors,
        "k": k,
        "seed": seed,
        "train": int(tr.sum()),
        "test": int(h.test.sum()),
        "users": int(users.size),
    }
    als = tune_als(h, factors, tune) if {"als", "pipeline", "all"} & set(models) else ALSParams()
    lr, epochs = tune_lmf(h, factors, tune) if {"lmf", "pipeline", "all"} & set(models) else (0.2, 4)
    pipe_lr = tune_pipeline(h, factors, als, resolve_every, tune) if {"pipeline", "all"} & set(models) else lr
    params.update(
        als_alpha=als.alpha,
        als_confidence=als.scaling,
        als_reg=als.reg,
        als_iterations=als.iterations,
        lmf_lr=lr,
        lmf_epochs=epochs,
        pipeline_lmf_lr=pipe_lr,
        resolve_every=resolve_every,
    )
    want = OURS if "all" in models else models
    for name in want:
        t0 = time.perf_counter()
        if name == "popularity":
            ids = recommend_popular(popularity(train), train, users, k)
            out[name] = ranking_metrics(ids, test, users, k, data.n_items)
        else:
            if name == "als":
                U, V = fit_als(train, factors, als.reg, als.alpha, als.iterations, als.scaling, seed)
            elif name == "lmf":
                U, V = replay_lmf(data.stream(tr, seed), lmf_config(factors, seed, lr=lr), epochs, seed)
            else:
                U, V, info = replay_pipeline(
                    data.stream(tr, seed), lmf_config(factors, seed, lr=pipe_lr), als, resolve_every, seed
                )
                params["pipeline_resolves"] = info["resolves"]
            out[name] = h.score(U, V, False)
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
        log.info("%s: %s", name, out[name])
    if "all" in models:
        out.update(implicit_models(h, factors, als))
    return {"protocol": "holdout", "models": out, "params": params}


# ---------------------------------------------------------------------- prequential
def run_prequential_models(rows: Sequence[Interaction], args: argparse.Namespace) -> dict[str, Any]:
    """``--protocol prequential`` for ``lmf``, ``pipeline`` or both (``all``), each on fresh topics."""
    import os
    import tempfile

    from workers.evaluation.metrics import prequential_summary

    models = ["lmf", "pipeline"] if args.model == "all" else [args.model]
    env = dict(getattr(args, "env", None) or os.environ)
    env.pop("ZEROCF_TOPIC_PREFIX", None)  # each model gets fresh topics and a fresh Redis namespace
    out: dict[str, Any] = {}
    summaries: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="zerocf-eval-stack-") as stack_dir:
        env, stack = stack_env(env, stack_dir)
        try:
            for name in models:
                ranks, info = prequential(
                    rows,
                    name,
                    env,
                    chunk=args.chunk,
                    resolve_every=args.resolve_every,
                    factors=args.factors,
                    seed=args.seed,
                    lmf_lr=args.lmf_lr,
                    als_alpha=args.als_alpha,
                )
                s = prequential_summary(ranks.model_ranks(), ranks.pop_ranks(), args.k, args.window)
                summaries[name] = s
                out[name] = {
                    **s["model"],
                    "pop_hr": s["popularity"]["hr"],
                    "pop_mrr": s["popularity"]["mrr"],
                    "seconds": info["seconds"],
                    "warm": s["warm"],
                    "windows": s["windows"],
                    "resolves": info["resolves"],
                }
        finally:
            if stack is not None:
                stack.down()
    if args.plot:
        plot_windows(summaries, args.plot, f"prequential, {len(rows)} clicks")
    return {
        "protocol": "prequential",
        "models": out,
        "params": {
            "k": args.k,
            "factors": args.factors,
            "seed": args.seed,
            "chunk": args.chunk,
            "window": args.window,
            "resolve_every": args.resolve_every,
        },
    }


# ---------------------------------------------------------------------- output
def table(result: dict[str, Any]) -> str:
    """The result as a fixed-width text table, one row per model."""
    k = result["params"]["k"]
    if result["protocol"] == "holdout":
        cols = [
            ("precision", f"P@{k}"),
            ("recall", f"R@{k}"),
            ("ndcg", f"NDCG@{k}"),
            ("map", f"MAP@{k}"),
            ("coverage", "coverage"),
            ("seconds", "s"),
        ]
    else:
        cols = [
            ("hr", f"HR@{k}"),
            ("mrr", "MRR"),
            ("pop_hr", f"pop HR@{k}"),
            ("pop_mrr", "pop MRR"),
            ("clicks", "clicks"),
            ("cold", "cold"),
            ("seconds", "s"),
        ]
    lines = ["model".ljust(14) + "".join(h.rjust(11) for _, h in cols)]
    for name, m in result["models"].items():
        cells = [m.get(c, float("nan")) for c, _ in cols]
        lines.append(name.ljust(14) + "".join((f"{v:11.4f}" if isinstance(v, float) else f"{v:11d}") for v in cells))
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="evaluate models: holdout (in memory) or prequential (real stack)")
    p.add_argument("--dataset", required=True, metavar="PATH", help="dataset file")
    p.add_argument("--format", required=True, choices=["csv", "movielens", "lastfm"])
    p.add_argument("--protocol", default="holdout", choices=["holdout", "prequential"])
    p.add_argument("--model", default="all", choices=[*OURS, "all"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", metavar="FILE.png", help="prequential: HR@k/MRR per window, model vs popularity")
    p.add_argument("--k", type=int, default=10, help="cut-off of the metrics")
    p.add_argument("--factors", type=int, default=64, help="latent dimension of every model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tune", action="store_true", help="holdout: skip validation tuning (defaults)")
    p.add_argument(
        "--resolve-every", type=int, default=25_000, metavar="N", help="pipeline: ALS re-solve after every N clicks"
    )
    p.add_argument("--chunk", type=int, default=5000, help="prequential: clicks produced per step")
    p.add_argument("--window", type=int, default=5000, help="prequential: clicks per reported window")
    p.add_argument("--lmf-lr", type=float, default=None, help="prequential: LMF learning rate (env ZEROCF_LMF_LR)")
    p.add_argument("--als-alpha", type=float, default=None, help="prequential: ALS alpha (env ZEROCF_ALS_ALPHA)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.k < 1 or args.factors < 1:
        raise ConfigError(f"--k {args.k} and --factors {args.factors} must be >= 1")
    data = load_data(args.dataset, args.format)
    log.info(
        "%s: %d interactions, %d users, %d items%s",
        args.dataset,
        data.user.size,
        data.n_users,
        data.n_items,
        "" if data.ts is not None else " (no timestamps)",
    )
    if args.protocol == "holdout":
        if args.plot:
            raise ConfigError("--plot applies to --protocol prequential only")
        result = run_holdout(data, [args.model], args.factors, args.k, args.seed, not args.no_tune, args.resolve_every)
    else:
        result = run_prequential_models(data.rows, args)
    result["dataset"] = args.dataset
    print(json.dumps(result, indent=1) if args.json else table(result))
    sys.stdout.flush()
    return 0
