"""``zerocf eval``: holdout and prequential evaluation of our models against baselines (docs/evaluation.md).

Both protocols judge the product: our models are trained by streaming the clicks through the real broker,
``Ingest``, ``LMFWorker`` and ``ALSWorker`` with production defaults (:mod:`workers.evaluation.realpath`),
on the stack the environment names or on an embedded one this command starts and stops.

- ``--protocol holdout`` (:mod:`workers.evaluation.holdout`): per-user temporal 80/20 split; precision,
  recall, NDCG, MAP@k, coverage and the number of recommended slots the user had already clicked; the
  references (most-popular, implicit's ALS and BPR) in memory on the same split. ``--validation`` scores the
  validation split carved out of training instead (for tuning); ``--twin`` trains our models in memory.
- ``--protocol prequential`` (:mod:`workers.evaluation.prequential`): every click ranked right before it is
  learned; HR@k and MRR against all-time and time-decayed popularity, overall, on warm clicks and per window.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from typing import Any

from stream.errors import ConfigError
from stream.replay.datasets import FORMATS
from workers.evaluation.data import Data, load_data
from workers.evaluation.holdout import OURS, REFERENCES, run_holdout
from workers.evaluation.metrics import prequential_summary
from workers.evaluation.prequential import plot_windows, prequential
from workers.evaluation.realpath import stack_env

log = logging.getLogger(__name__)

__all__ = ["register", "run", "table"]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"factors": args.factors, "lr": args.lmf_lr, "als_alpha": args.als_alpha}
    return {k: v for k, v in out.items() if v is not None}


def run_prequential_models(data: Data, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """``--protocol prequential`` for ``lmf``, ``pipeline`` or both (``all``), each on fresh topics."""
    if args.model not in ("lmf", "pipeline", "all"):
        raise ConfigError(f"--protocol prequential evaluates lmf or pipeline (or all), not {args.model!r}; the "
                          "popularity baselines are ranked next to every click anyway")  # fmt: skip
    models = ["lmf", "pipeline"] if args.model == "all" else [args.model]
    out: dict[str, Any] = {}
    summaries: dict[str, Any] = {}
    for name in models:
        ranks, info = prequential(data.rows, name, env, chunk=args.chunk, resolve_every=args.resolve_every,
                                  seed=args.seed, overrides=_overrides(args), rank_every=args.rank_every)  # fmt: skip
        s = prequential_summary(ranks, args.k, args.window)
        summaries[name] = s
        out[name] = {**s["model"], "pop_hr": s["popularity"]["hr"], "pop_mrr": s["popularity"]["mrr"],
                     "decayed_hr": s["decayed"]["hr"], "decayed_mrr": s["decayed"]["mrr"], "warm": s["warm"],
                     "windows": s["windows"], "resolves": info["resolves"], "seconds": info["seconds"]}  # fmt: skip
    if args.plot:
        plot_windows(summaries, args.plot, f"prequential, {len(data.rows)} clicks")
    params = {"k": args.k, "seed": args.seed, "chunk": args.chunk, "window": args.window,
              "resolve_every": args.resolve_every}  # fmt: skip
    return {"protocol": "prequential", "models": out, "params": params}


def table(result: dict[str, Any]) -> str:
    """The result as a fixed-width text table, one row per model."""
    k = result["params"]["k"]
    if result["protocol"] == "holdout":
        cols = [("precision", f"P@{k}"), ("recall", f"R@{k}"), ("ndcg", f"NDCG@{k}"), ("map", f"MAP@{k}"),
                ("coverage", "coverage"), ("seen_slots", "seen"), ("seconds", "s")]  # fmt: skip
    else:
        cols = [("hr", f"HR@{k}"), ("mrr", "MRR"), ("pop_hr", f"pop HR@{k}"), ("decayed_hr", f"dec HR@{k}"),
                ("clicks", "clicks"), ("cold", "cold"), ("seconds", "s")]  # fmt: skip
    lines = ["model".ljust(14) + "".join(h.rjust(11) for _, h in cols)]
    for name, m in result["models"].items():
        cells = [m.get(c, "-") for c, _ in cols]
        lines.append(name.ljust(14) + "".join(f"{v:11.4f}" if isinstance(v, float) else f"{v!s:>11}" for v in cells))
    if result["protocol"] == "prequential":
        for name, m in result["models"].items():
            w = m["warm"]
            lines.append(f"{name} warm clicks: HR@{k} {w['model']['hr']:.4f} (popularity {w['popularity']['hr']:.4f}, "
                         f"decayed {w['decayed']['hr']:.4f}) over {w['model']['clicks']} clicks")  # fmt: skip
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="evaluate models through the real stack: holdout or prequential")
    p.add_argument("--dataset", required=True, metavar="PATH", help="dataset file")
    p.add_argument("--format", required=True, choices=FORMATS, help="file format")
    p.add_argument("--protocol", default="holdout", choices=["holdout", "prequential"], help="protocol")
    p.add_argument("--model", default="all", choices=[*OURS, *REFERENCES, "all"], help="model(s) to evaluate")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", metavar="FILE.png", help="prequential: HR@k/MRR per window, model vs popularity")
    p.add_argument("--k", type=int, default=10, help="cut-off of the metrics")
    p.add_argument("--factors", type=int, default=None, help="latent dimension (default ZEROCF_FACTORS)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split tie-break and of the models")
    p.add_argument("--validation", action="store_true", help="holdout: score the validation split (tuning)")
    p.add_argument("--split", default="user", choices=["user", "time"],
                   help="holdout: last 20%% of each user's clicks, or of all clicks by time")  # fmt: skip
    p.add_argument("--twin", action="store_true", help="holdout: train our models in memory (fast sweeps)")
    p.add_argument("--no-tune", action="store_true",
                   help="accepted for compatibility: the evaluation always runs the production defaults")  # fmt: skip
    p.add_argument("--resolve-every", type=int, default=25_000, metavar="N",
                   help="pipeline: ALS re-solve after every N clicks")  # fmt: skip
    p.add_argument("--chunk", type=int, default=5000, help="clicks produced per step")
    p.add_argument("--window", type=int, default=5000, help="prequential: clicks per reported window")
    p.add_argument(
        "--rank-every",
        type=int,
        default=1,
        metavar="N",
        help="prequential: rank every N-th click (a rank scans the catalogue; raise it for large ones)",
    )
    p.add_argument("--lmf-lr", type=float, default=None, help="LMF learning rate (default ZEROCF_LMF_LR)")
    p.add_argument("--als-alpha", type=float, default=None, help="ALS alpha (default ZEROCF_ALS_ALPHA)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.k < 1 or (args.factors is not None and args.factors < 1):
        raise ConfigError(f"--k {args.k} and --factors {args.factors} must be >= 1")
    if args.plot and args.protocol != "prequential":
        raise ConfigError("--plot applies to --protocol prequential only")
    data = load_data(args.dataset, args.format)
    log.info("%s: %d interactions, %d users, %d items%s", args.dataset, data.user.size, data.n_users, data.n_items,
             "" if data.ts is not None else " (no timestamps)")  # fmt: skip
    env = {k: v for k, v in dict(getattr(args, "env", None) or os.environ).items() if k.startswith("ZEROCF_")}
    with tempfile.TemporaryDirectory(prefix="zerocf-eval-stack-") as stack_dir:
        needs_stack = args.protocol == "prequential" or not args.twin
        env, stack = stack_env(env, stack_dir) if needs_stack else (env, None)
        try:
            if args.protocol == "holdout":
                result = run_holdout(data, [args.model], {**env, **_env_overrides(args)}, k=args.k, seed=args.seed,
                                     resolve_every=args.resolve_every, chunk=args.chunk,
                                     validation=args.validation, twin=args.twin,
                                     split=args.split)  # fmt: skip
            else:
                result = run_prequential_models(data, args, env)
        finally:
            if stack is not None:
                stack.down()
    result["dataset"] = args.dataset
    print(json.dumps(result, indent=1) if args.json else table(result))
    sys.stdout.flush()
    return 0


def _env_overrides(args: argparse.Namespace) -> dict[str, str]:
    names = {"factors": "ZEROCF_FACTORS", "lr": "ZEROCF_LMF_LR", "als_alpha": "ZEROCF_ALS_ALPHA"}
    return {names[k]: str(v) for k, v in _overrides(args).items()}
