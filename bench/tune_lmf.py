"""Why the online learner's defaults are what they are: a one-at-a-time ablation on the validation split.

    python -m bench.tune_lmf [--datasets ml-100k,lastfm-2k] [--seeds 1] [--quick] > bench/results/tune_lmf.json

For each dataset, the training part of the validation split (:class:`workers.evaluation.data.Holdout`, seed 0:
per user the last 20 % of the clicks by time are test, the last 20 % of the rest are validation; the test
clicks are never read) is streamed once, in stream order, through the production online learner
(:func:`workers.evaluation.offline.replay_lmf`: the production ``OnlineModel`` batch by batch, what
``zerocf lmf`` computes) with the production :class:`workers.config.LMFConfig`, then with one knob changed at a
time: learning rate, L2, AdaGrad off (over a few constant rates, since the best rate without AdaGrad is not the
best with it), the bias terms, the number and the mix of negatives (uniform share, popularity exponent, hard
DNS share and candidates), the random init scale and fold-in init. Each model ranks every validation user's
top 10 (training items excluded, :func:`workers.evaluation.offline.recommend`) and is scored on the
validation clicks: NDCG@10, HR@10 (share of users with at least one hit), recall@10, coverage.

References on the same split: most-popular (training users per item), ALS alone with the production
:class:`workers.config.ALSConfig` (``fit`` + ``handoff_rows`` of :mod:`workers.batch.solve`, as
``holdout._als_alone``), and the pipeline (:func:`workers.evaluation.offline.replay_pipeline`: ALS re-solve +
calibrated handoff every ``--resolve-every`` clicks, LMF in between) with ``init=random`` (the default) and
``init=foldin``.

``--seeds N`` repeats every run with model seeds 0..N-1 (the sampler, the init and, for data without
timestamps such as lastfm-2k, the stream order; the split stays the seed-0 split) and reports the mean, the
standard deviation and every seed's NDCG; one run varies by about 0.005 NDCG, so a difference needs several
seeds to mean anything. ``delta`` is the variant's mean NDCG minus the default's (same seeds).

Output: one JSON object, ``{"datasets": {name: {"variants": {...}, "references": {...}, "pipeline": {...}}}}``,
each entry with its overrides, metrics and seconds (wall time of training + scoring, summed over seeds).
Runtime on a shared 2-core machine (scoring included): an LMF run takes ~1.3 s on ml-100k and ~4 s on lastfm-2k
(17,632 items to rank), a pipeline run ~3 s / ~13 s; the full list on both datasets takes ~4 min per seed (the
saved ``bench/results/tune_lmf.json`` is ``--seeds 5``: 14-19 min), ``--quick`` ~1 min per seed.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported: BLAS single-threaded (implicit's advice, fair timing)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from stream.replay.datasets import Format  # noqa: E402
from workers.batch.solve import fit, handoff_rows  # noqa: E402
from workers.config import ALSConfig, LMFConfig  # noqa: E402
from workers.evaluation.data import Data, Holdout, Stream, load_data  # noqa: E402
from workers.evaluation.metrics import hit_matrix, ranking_metrics  # noqa: E402
from workers.evaluation.offline import Factors, popularity, recommend, replay_lmf, replay_pipeline  # noqa: E402

log = logging.getLogger("bench.tune_lmf")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"  # ../shared beside the checkout
DATASETS: dict[str, tuple[str, Format]] = {
    "ml-100k": ("ml-100k/u.data", "movielens"),
    "lastfm-2k": ("lastfm-2k/user_artists.dat", "lastfm"),
}
K = 10

Overrides = dict[str, Any]
Variant = tuple[str, str, Overrides]  # (name, knob, overrides)
# (name, knob, overrides of the production LMFConfig); the first is the default itself
VARIANTS: list[tuple[str, str, Overrides]] = [
    ("default", "default", {}),
    ("lr=0.05", "lr", {"lr": 0.05}),
    ("lr=0.2", "lr", {"lr": 0.2}),
    ("reg=0", "reg", {"reg": 0.0}),
    ("reg=0.01", "reg", {"reg": 0.01}),
    ("adagrad=off lr=0.1", "adagrad", {"adagrad": False}),
    ("adagrad=off lr=0.03 lr_bias=0.01", "adagrad", {"adagrad": False, "lr": 0.03, "lr_bias": 0.01}),
    ("adagrad=off lr=0.1 lr_bias=0.01", "adagrad", {"adagrad": False, "lr": 0.1, "lr_bias": 0.01}),
    ("adagrad=off lr=0.3 lr_bias=0.01", "adagrad", {"adagrad": False, "lr": 0.3, "lr_bias": 0.01}),
    ("adagrad=off lr=0.1 lr_bias=0.003", "adagrad", {"adagrad": False, "lr": 0.1, "lr_bias": 0.003}),
    ("no user/item biases (lr_bias=0)", "biases", {"lr_bias": 0.0}),
    ("lr_bias=0.01", "biases", {"lr_bias": 0.01}),
    ("lr_bias=0.03", "biases", {"lr_bias": 0.03}),
    ("lr_bias=0.3", "biases", {"lr_bias": 0.3}),
    ("reg_bias=0", "biases", {"reg_bias": 0.0}),
    ("reg_bias=0.1", "biases", {"reg_bias": 0.1}),
    ("fixed global bias 0 (lr_global=0)", "global bias", {"lr_global": 0.0}),
    ("lr_global=0.001", "global bias", {"lr_global": 0.001}),
    ("lr_global=0.1", "global bias", {"lr_global": 0.1}),
    ("no biases at all (lr_bias=0, lr_global=0)", "global bias", {"lr_bias": 0.0, "lr_global": 0.0}),
    ("negatives=5", "negatives", {"negatives": 5}),
    ("negatives=20", "negatives", {"negatives": 20}),
    ("uniform_mix=0", "uniform_mix", {"uniform_mix": 0.0}),
    ("uniform_mix=0.5", "uniform_mix", {"uniform_mix": 0.5}),
    ("uniform_mix=1", "uniform_mix", {"uniform_mix": 1.0}),
    ("sample_alpha=0", "sample_alpha", {"sample_alpha": 0.0}),
    ("sample_alpha=0.5", "sample_alpha", {"sample_alpha": 0.5}),
    ("sample_alpha=0.75", "sample_alpha", {"sample_alpha": 0.75}),
    ("hard_share=0", "hard_share", {"hard_share": 0.0}),
    ("hard_share=0.2", "hard_share", {"hard_share": 0.2}),
    ("hard_share=0.8", "hard_share", {"hard_share": 0.8}),
    ("hard_candidates=4", "hard_candidates", {"hard_candidates": 4}),
    ("hard_candidates=16", "hard_candidates", {"hard_candidates": 16}),
    ("init_scale=0.01", "init_scale", {"init_scale": 0.01}),
    ("init_scale=0.1", "init_scale", {"init_scale": 0.1}),
    ("init=foldin", "init", {"init": "foldin"}),
]
QUICK = {"default", "lr=0.05", "lr=0.2", "adagrad=off lr=0.1 lr_bias=0.01", "no user/item biases (lr_bias=0)",
         "fixed global bias 0 (lr_global=0)", "negatives=5", "negatives=20", "uniform_mix=0", "sample_alpha=0.75",
         "hard_share=0", "init=foldin"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Split:
    """The validation split of one dataset: the data, the training mask and csr, the validation csr, users."""

    name: str
    data: Data
    train_mask: npt.NDArray[np.bool_]
    train: sp.csr_matrix
    valid: sp.csr_matrix
    users: npt.NDArray[np.int32]

    def stream(self, seed: int) -> Stream:
        """Training clicks in stream order (by time; a ``seed``-permutation when the data has no timestamps)."""
        return self.data.stream(self.train_mask, seed)

    def score(self, top: npt.NDArray[np.integer]) -> dict[str, float]:
        """NDCG, HR, recall@K and coverage of the top-K lists of ``self.users`` on the validation clicks."""
        m = ranking_metrics(top, self.valid, self.users, K, self.data.n_items)
        hr = float(hit_matrix(np.asarray(top)[:, :K], self.valid, self.users).any(axis=1).mean())
        return {"ndcg": m["ndcg"], "hr": hr, "recall": m["recall"], "coverage": m["coverage"]}

    def score_factors(self, f: Factors) -> dict[str, float]:
        return self.score(recommend(f, self.train, self.users, K))


def load_split(name: str, root: Path, split_seed: int = 0) -> Split:
    """Read ``name`` (a key of :data:`DATASETS`) under ``root`` and carve the validation split."""
    rel, fmt = DATASETS[name]
    data = load_data(str(root / rel), fmt)
    tr, train, valid, users = Holdout(data, split_seed).split(validation=True)
    log.info("%s: %d train clicks, %d validation clicks, %d users, %d items", name, int(tr.sum()), valid.nnz,
             users.size, data.n_items)  # fmt: skip
    return Split(name, data, tr, train, valid, users)


def run_seeds(split: Split, seeds: Sequence[int], train: Callable[[int], Factors]) -> dict[str, Any]:
    """Train with each seed, score each; mean metrics, std and per-seed NDCG, total seconds."""
    runs: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for s in seeds:
        try:
            runs.append(split.score_factors(train(s)))
        except FloatingPointError as e:  # the replay refuses a diverged model (non-finite rows)
            log.warning("seed %d diverged: %s", s, e)
            runs.append({"ndcg": 0.0, "hr": 0.0, "recall": 0.0, "coverage": 0.0, "diverged": 1.0})
    return summarise(runs, time.perf_counter() - t0)


def summarise(runs: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    metrics = ("ndcg", "hr", "recall", "coverage")
    out: dict[str, Any] = {m: round(statistics.fmean(r[m] for r in runs), 4) for m in metrics}
    out["ndcg_std"] = round(statistics.stdev(r["ndcg"] for r in runs), 4) if len(runs) > 1 else None
    out["ndcg_seeds"] = [round(r["ndcg"], 4) for r in runs]
    if any("diverged" in r for r in runs):
        out["diverged_seeds"] = sum(1 for r in runs if "diverged" in r)
    out["seconds"] = round(seconds, 2)
    return out


def popular_factors(train: sp.csr_matrix) -> Factors:
    """Most-popular as a model: no latent values, item 'bias' = training users of the item."""
    pop = popularity(train).astype(np.float32)[:, None]
    return Factors(np.zeros((train.shape[0], 1), np.float32), pop)


def als_alone(stream: Stream, cfg: ALSConfig) -> Factors:
    """One cold ALS fit on the whole training part, published as the ALS worker publishes it."""
    csr = stream.csr()
    U, V, _ = fit(csr, cfg, None)
    Ur, Vr, cal = handoff_rows(U, V, csr, cfg)
    return Factors(Ur, Vr, cal.bias)


def lmf_config(overrides: Overrides, seed: int) -> LMFConfig:
    return LMFConfig(**{**overrides, "seed": seed})


def lmf_trainer(split: Split, ov: Overrides) -> Callable[[int], Factors]:
    """seed -> one production LMF pass over the training stream with ``ov`` on top of the defaults."""

    def train(seed: int) -> Factors:
        return replay_lmf(split.stream(seed), lmf_config(ov, seed), seed)

    return train


def pipeline_trainer(split: Split, ov: Overrides, resolve_every: int) -> Callable[[int], Factors]:
    """seed -> one pipeline pass (production ALS re-solve every ``resolve_every`` clicks, LMF with ``ov``)."""

    def train(seed: int) -> Factors:
        return replay_pipeline(split.stream(seed), lmf_config(ov, seed), ALSConfig(als_seed=seed), resolve_every, seed)

    return train


def warm_up() -> None:
    """Compile the numba kernels (LMF, ALS, calibration) once, so no run's seconds include compilation."""
    s = Stream(np.array([0, 1, 0, 1], np.int32), np.array([1, 0, 2, 1], np.int32), np.ones(4, np.float32), 2, 3)
    for init in ("random", "foldin"):
        replay_lmf(s, LMFConfig(factors=4, init=init))
    for solver in ("cg", "exact"):
        replay_pipeline(s, LMFConfig(factors=4), ALSConfig(factors=4, als_iterations=2, als_solver=solver), 2)


def run_variants(split: Split, variants: Sequence[Variant], seeds: Sequence[int],
                 trainer: Callable[[Split, Overrides], Callable[[int], Factors]]) -> dict[str, Any]:  # fmt: skip
    """The split's sizes and, under ``variants``, each variant's scores and its delta against ``default``."""
    out: dict[str, Any] = {"train_clicks": int(split.train_mask.sum()), "validation_clicks": int(split.valid.nnz),
                           "users": int(split.users.size), "items": split.data.n_items}  # fmt: skip
    res: dict[str, Any] = {}
    for name, knob, ov in variants:
        r = run_seeds(split, seeds, trainer(split, ov))
        res[name] = {"knob": knob, "overrides": ov, **r}
        log.info("%s %-52s NDCG %.4f HR %.4f (%.1f s)", split.name, name, r["ndcg"], r["hr"], r["seconds"])
    base = res["default"]["ndcg"]
    for r in res.values():
        r["delta"] = round(r["ndcg"] - base, 4)
    out["variants"] = res
    return out


def bench_dataset(
    split: Split, variants: Sequence[Variant], seeds: Sequence[int], resolve_every: int
) -> dict[str, Any]:
    out = run_variants(split, variants, seeds, lmf_trainer)
    refs: dict[str, Any] = {}
    refs["popularity"] = run_seeds(split, seeds[:1], lambda s: popular_factors(split.train))
    refs["als_alone"] = run_seeds(split, seeds, lambda s: als_alone(split.stream(s), ALSConfig(als_seed=s)))
    for n, r in refs.items():
        log.info("%s %-44s NDCG %.4f HR %.4f", split.name, n, r["ndcg"], r["hr"])
    out["references"] = refs
    pipe: dict[str, Any] = {}
    for init in ("random", "foldin"):
        ov = {} if init == "random" else {"init": init}
        r = run_seeds(split, seeds, pipeline_trainer(split, ov, resolve_every))
        pipe["default" if init == "random" else "init=foldin"] = {"overrides": ov, **r}
        log.info("%s pipeline %-35s NDCG %.4f HR %.4f", split.name, init, r["ndcg"], r["hr"])
    pipe["init=foldin"]["delta"] = round(pipe["init=foldin"]["ndcg"] - pipe["default"]["ndcg"], 4)
    out["pipeline"] = pipe
    return out


def defaults_record() -> dict[str, Any]:
    lc, ac = LMFConfig(), ALSConfig()
    lmf_keys = ("factors", "lr", "reg", "lr_bias", "reg_bias", "lr_global", "negatives", "sample_alpha",
                "uniform_mix", "hard_share", "hard_candidates", "adagrad", "clip", "init_scale", "init", "batch",
                "reservoir")  # fmt: skip
    als_keys = ("als_confidence", "als_eps", "als_alpha", "als_reg", "als_iterations", "als_solver", "als_cg_steps")
    return {"lmf": {k: getattr(lc, k) for k in lmf_keys}, "als": {k: getattr(ac, k) for k in als_keys}}


def tune_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The flags both tuning benches share: datasets, data folder, seeds, quick."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of " + ", ".join(DATASETS))
    ap.add_argument("--data-dir", default=str(SHARED), help="folder holding ml-100k/ and lastfm-2k/")
    ap.add_argument("--seeds", type=int, default=1, help="model seeds 0..N-1 per run (averaged)")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap


def tune_setup(
    args: argparse.Namespace, all_variants: Sequence[Variant], quick: set[str]
) -> tuple[list[str], list[int], list[Variant]]:
    """Validate the shared flags, start logging and warm the kernels; return (datasets, seeds, variants)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = args.datasets.split(",")
    for n in names:
        if n not in DATASETS:
            raise SystemExit(f"unknown dataset {n!r}; choose from {', '.join(DATASETS)}")
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    warm_up()
    return names, list(range(args.seeds)), [v for v in all_variants if not args.quick or v[0] in quick]


def main(argv: list[str] | None = None) -> int:
    ap = tune_parser(__doc__, f"{len(QUICK)} of the {len(VARIANTS)} variants")
    ap.add_argument("--resolve-every", type=int, default=25_000, help="pipeline: ALS re-solve every N clicks")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    names, seeds, variants = tune_setup(args, VARIANTS, QUICK)
    result: dict[str, Any] = {
        "bench": "tune_lmf",
        "split": "validation (Holdout seed 0); test clicks never read",
        "metric": f"mean over seeds of NDCG@{K}, HR@{K}, recall@{K}, coverage on the validation clicks",
        "seeds": seeds,
        "quick": args.quick,
        "resolve_every": args.resolve_every,
        "defaults": defaults_record(),
        "datasets": {},
    }
    for n in names:
        result["datasets"][n] = bench_dataset(load_split(n, Path(args.data_dir)), variants, seeds, args.resolve_every)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
