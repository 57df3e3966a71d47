"""The prequential protocol on the real stack: every click is ranked right before it is learned.

The stream goes through the broker, ingest and the LMF worker (and, for ``pipeline``, the ALS worker's
re-solve every ``resolve_every`` clicks); the worker's kernel records, for each click, the clicked item's place
among all known items (the user's earlier clicks excluded) by the model's score with the state just before that
click's own update, and by all-time and time-decayed popularity as of that moment (see
:func:`workers.kernels.lmf.lmf_train`). A user with no vector yet is served the decayed-popularity fallback,
which is what the model's figures count for that click. Used by ``zerocf eval --protocol prequential`` and
``zerocf demo``; see docs/evaluation.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from stream.errors import ConfigError
from stream.replay.datasets import Interaction
from stream.replay.produce import prepare
from workers.evaluation.metrics import PrequentialLog
from workers.evaluation.realpath import RealPath

log = logging.getLogger(__name__)

__all__ = ["plot_windows", "prequential"]


def prequential(rows: Sequence[Interaction], model: str, env: dict[str, str], *, chunk: int = 5000,
                resolve_every: int = 25_000, seed: int = 0, overrides: dict[str, Any] | None = None,
                prefix: str | None = None, rank_every: int = 1,
                progress: bool = True) -> tuple[PrequentialLog, dict[str, Any]]:  # fmt: skip
    """Replay ``rows`` in time order through the real stack; return the ranks and ``info`` (re-solves, time).

    ``env`` names the broker and Redis (``ZEROCF_KAFKA_BOOTSTRAP``, ``ZEROCF_REDIS_URL``); the clicks are
    produced ``chunk`` at a time, each chunk waited for until it is applied. ``pipeline`` runs
    ``zerocf als --once``'s worker after every ``resolve_every`` clicks (rounded up to whole chunks), except
    at the end. ``rank_every`` ranks only every n-th click (a ranked click costs a pass over the catalogue).
    ``progress`` shows a bar on a terminal (never in logs or pipes).
    """
    if model not in ("lmf", "pipeline"):
        raise ConfigError(f"prequential --model {model}: use lmf or pipeline (popularity is reported alongside)")
    ranks = PrequentialLog()
    ordered = prepare(list(rows), keep_ts=False, now_ms=time.time_ns() // 1_000_000)
    every = max(1, -(-resolve_every // chunk))
    info: dict[str, Any] = {"resolves": [], "chunk": chunk}
    t0 = time.monotonic()
    settings = {"seed": seed, "als_seed": seed, **(overrides or {})}
    with RealPath(env, rank_hook=ranks, rank_every=rank_every, overrides=settings, prefix=prefix,
                  progress=len(ordered) if progress else None) as path:  # fmt: skip
        info["topic_prefix"] = path.prefix
        for n, lo in enumerate(range(0, len(ordered), chunk), 1):
            path.send(ordered[lo : lo + chunk])
            if model == "pipeline" and n % every == 0 and lo + chunk < len(ordered):
                res = path.resolve()
                info["resolves"].append({"at": path.sent, "generation": res.generation, "scale": res.scale,
                                         "bias": res.bias})  # fmt: skip
        info["sent"] = path.sent
    info["seconds"] = round(time.monotonic() - t0, 1)
    return ranks, info


def plot_windows(summary: dict[str, Any], path: str, title: str) -> None:
    """HR@k and MRR per window, the model(s) against both popularity baselines, as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    for name, s in summary.items():
        x = [w["start"] + w["clicks"] for w in s["windows"]]
        axes[0].plot(x, [w["model_hr"] for w in s["windows"]], label=name)
        axes[1].plot(x, [w["model_mrr"] for w in s["windows"]], label=name)
    first = next(iter(summary.values()))
    x = [w["start"] + w["clicks"] for w in first["windows"]]
    for key, style, label in (("pop", "k--", "popularity (all-time)"), ("decayed", "k:", "popularity (decayed)")):
        axes[0].plot(x, [w[f"{key}_hr"] for w in first["windows"]], style, label=label)
        axes[1].plot(x, [w[f"{key}_mrr"] for w in first["windows"]], style, label=label)
    axes[0].set_title(f"HR@{first['k']} per {first['window']} clicks", fontsize=9)
    axes[1].set_title(f"MRR per {first['window']} clicks", fontsize=9)
    for ax in axes:
        ax.set_xlabel("clicks", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
