"""The prequential protocol on the real stack: replay a stream through broker, ingest and the LMF worker (and
the ALS worker's re-solves), recording where each clicked item ranked before it was learned.

Used by ``zerocf eval --protocol prequential`` and ``zerocf demo``; see docs/evaluation.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from stream.errors import ConfigError
from stream.replay.datasets import Interaction

log = logging.getLogger(__name__)


def stack_env(env: dict[str, str], stack_dir: str) -> tuple[dict[str, str], Any]:
    """Use the broker/Redis named in ``env``; else start an embedded LocalStack in ``stack_dir``."""
    if env.get("ZEROCF_KAFKA_BOOTSTRAP") and env.get("ZEROCF_REDIS_URL"):
        return dict(env), None
    from stream.devstack import LocalStack

    stack = LocalStack(stack_dir)
    stack.up()
    log.info(
        "started an embedded stack in %s (set ZEROCF_KAFKA_BOOTSTRAP and ZEROCF_REDIS_URL to use yours)", stack_dir
    )
    return {**env, **stack.env()}, stack


def prequential(
    rows: Sequence[Interaction],
    model: str,
    env: dict[str, str],
    *,
    chunk: int = 5000,
    resolve_every: int = 25_000,
    factors: int = 64,
    seed: int = 0,
    lmf_lr: float | None = None,
    als_alpha: float | None = None,
    timeout: float = 120.0,
) -> tuple[Any, dict[str, Any]]:
    """Replay ``rows`` through the real broker, ingest and LMF worker; return (PrequentialLog, info).

    ``env`` must name the broker and Redis (``ZEROCF_KAFKA_BOOTSTRAP``, ``ZEROCF_REDIS_URL``); topics and the
    Redis namespace use ``ZEROCF_TOPIC_PREFIX`` if set, else a fresh ``eval<random>`` prefix. Ingest and the
    LMF worker (with the rank hook) run in threads; the clicks are produced ``chunk`` at a time and each
    chunk is waited for until every click has been ranked and learned. With ``model="pipeline"`` the ALS
    worker (:class:`workers.batch.worker.ALSWorker`, what ``zerocf als --once`` runs) re-solves and publishes
    a generation after every ``resolve_every`` clicks (rounded up to whole chunks), except at the end.
    """
    import tempfile
    import threading
    import uuid

    from stream import kafka_util
    from stream.client.producer import EventProducer
    from stream.config import StreamConfig, load
    from stream.ingest import Ingest
    from stream.replay.produce import prepare, replay
    from stream.runtime import StopFlag
    from workers.config import ALSConfig, LMFConfig
    from workers.evaluation.metrics import PrequentialLog
    from workers.online.worker import LMFWorker
    from workers.store import FactorStore

    if model not in ("lmf", "pipeline"):
        raise ConfigError(f"prequential --model {model}: use lmf or pipeline (popularity is reported alongside)")
    prefix = env.get("ZEROCF_TOPIC_PREFIX") or "eval" + uuid.uuid4().hex[:8]
    tmp = tempfile.TemporaryDirectory(prefix="zerocf-eval-")
    common = {"topic_prefix": prefix, "idle_seconds": 1.0, "factors": factors}
    scfg = load(StreamConfig, env, common)
    lcfg = load(LMFConfig, env, {**common, "seed": seed, "lr": lmf_lr})
    acfg = load(ALSConfig, env, {**common, "checkpoint_dir": tmp.name, "als_alpha": als_alpha, "als_seed": seed})
    kafka_util.ensure_topics(
        scfg.kafka,
        {
            t: scfg.events_partitions
            for t in (scfg.topics.clicks, scfg.topics.impressions, scfg.topics.events, scfg.topics.dlq)
        },
    )
    store = FactorStore.from_url(lcfg.redis_url, prefix, seen_cap=lcfg.seen_cap)
    ranks = PrequentialLog()
    stop = StopFlag()
    ingest, worker = Ingest(scfg, stop), LMFWorker(lcfg, store, stop, rank_hook=ranks)
    threads = [threading.Thread(target=t.run, name=n, daemon=True) for n, t in (("ingest", ingest), ("lmf", worker))]
    kw = scfg.kafka.client_kwargs()
    producer = EventProducer(bootstrap_servers=kw.pop("bootstrap_servers"), topic_prefix=prefix, **kw)
    ordered = prepare(list(rows), keep_ts=False, now_ms=time.time_ns() // 1_000_000)
    every = max(1, -(-resolve_every // chunk))
    info: dict[str, Any] = {"topic_prefix": prefix, "resolves": [], "chunk": chunk, "sent": 0}
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        als = None
        for n, lo in enumerate(range(0, len(ordered), chunk), 1):
            info["sent"] += replay(producer, ordered[lo : lo + chunk], 0, None, seed)["clicks_sent"]
            _wait_ranked(ranks, info["sent"], threads, timeout)
            if model == "pipeline" and n % every == 0 and lo + chunk < len(ordered):
                from workers.batch.worker import ALSWorker

                als = als or ALSWorker(acfg, FactorStore.from_url(acfg.redis_url, prefix), stop)
                res = als.run_once(0)
                info["resolves"].append(
                    {
                        "at": info["sent"],
                        "outcome": res.outcome,
                        "generation": res.generation,
                        "scale": res.scale,
                        "bias": res.bias,
                    }
                )
    finally:
        stop.set("evaluation done")
        producer.close()
        for t in threads:
            t.join(timeout=30)
        tmp.cleanup()
    info["seconds"] = round(time.monotonic() - t0, 1)
    return ranks, info


def _wait_ranked(ranks: Any, expected: int, threads: Sequence[Any], timeout: float) -> None:
    """Block until ``expected`` clicks were ranked; fail if nothing moves for ``timeout`` seconds."""
    last, since = len(ranks), time.monotonic()
    while len(ranks) < expected:
        if not all(t.is_alive() for t in threads):
            raise ConfigError("the ingest or LMF thread stopped early; see the log above")
        if len(ranks) != last:
            last, since = len(ranks), time.monotonic()
        elif time.monotonic() - since > timeout:
            raise ConfigError(
                f"only {len(ranks)} of {expected} clicks were ranked after {timeout:.0f}s without "
                "progress; check the broker/Redis and the ingest DLQ"
            )
        time.sleep(0.05)


def plot_windows(summary: dict[str, Any], path: str, title: str) -> None:
    """HR@k and MRR per window, model vs popularity, as a small PNG."""
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
    axes[0].plot(x, [w["pop_hr"] for w in first["windows"]], "k--", label="popularity")
    axes[1].plot(x, [w["pop_mrr"] for w in first["windows"]], "k--", label="popularity")
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
