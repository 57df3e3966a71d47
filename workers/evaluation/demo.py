"""``zerocf demo``: the whole chain on an embedded stack, start to finish, in about a minute.

1. starts a Kafka-protocol broker and a Redis server on free loopback ports (a temporary directory);
2. generates a synthetic data set (power-law popularity, planted latent structure, timestamps) or loads
   ``--dataset``; sends a few malformed records to show the dead-letter topic at work;
3. streams the clicks through ``ingest`` → ``lmf`` (online SGD into Redis) with a periodic ALS re-solve
   (``als --once``) and the generation handoff, recording before each click is learned where the model
   ranked it (prequential evaluation) next to a popularity ranking computed the same way;
4. prints a summary (events/s, HR@10 against popularity, the swaps, a few users' recommendations read back
   through the lookup client) and writes the HR@10 curve as a PNG;
5. stops everything it started, also on Ctrl-C.

The streaming part is :func:`workers.evaluation.cli.prequential`, the same code ``zerocf eval --protocol
prequential`` runs.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_BAD_RECORDS = (
    b'{"user_id": "u1", "item_id": "i1", "ts": "yesterday"}',
    b'{"user_id": "", "item_id": "i1", "ts": 1700000000000}',
    b"\xff\xfe not json at all",
)


def _send_malformed(env: dict[str, str], prefix: str) -> None:
    """Send a few malformed clicks straight to the raw topic (ingest must route them to the DLQ)."""
    from stream import kafka_util
    from stream.config import StreamConfig, load

    cfg = load(StreamConfig, env, {"topic_prefix": prefix})
    t = cfg.topics
    kafka_util.ensure_topics(cfg.kafka, {n: cfg.events_partitions for n in (t.clicks, t.impressions, t.events, t.dlq)})
    producer = kafka_util.producer(cfg.kafka, client_id="zerocf-demo")
    for value in _BAD_RECORDS:
        producer.send(t.clicks, key=b"u1", value=value)
    producer.flush()
    producer.close()


def _dead_letters(env: dict[str, str], prefix: str) -> list[dict[str, Any]]:
    from stream.config import StreamConfig, load
    from stream.kafka_util import read_topic

    cfg = load(StreamConfig, env, {"topic_prefix": prefix})
    return [json.loads(r.value) for r in read_topic(cfg.kafka, cfg.topics.dlq, timeout=10)]


def _recommendations(env: dict[str, str], prefix: str, users: list[str]) -> dict[str, Any]:
    from workers.serving.lookup import Recommender
    from workers.store import FactorStore

    rec = Recommender(FactorStore.connect(env["ZEROCF_REDIS_URL"], prefix))
    out = rec.recommend_many(users + ["a-new-user"], k=5)
    return {
        u: {"items": r.items, "scores": [round(s, 3) for s in r.scores], "fallback": r.fallback} for u, r in out.items()
    }


def quiet_logging() -> None:
    """The demo's default log level: our warnings and errors only, and none of kafka-python's event-loop and
    shutdown chatter (a real Kafka failure surfaces as our own error). ``--log-level INFO`` brings it all back."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)


def run(args: argparse.Namespace) -> int:
    from stream.devstack import LocalStack
    from stream.replay.datasets import read_interactions, synthetic_dataset
    from workers.evaluation.prequential import prequential

    if args.dataset:
        bad: list[Any] = []
        rows = list(read_interactions(args.dataset, args.format, on_bad_line=bad.append))
        for b in bad:
            log.warning("%s line %d skipped: %s", args.dataset, b.line_no, b.reason)
        source = args.dataset
    else:
        rows = synthetic_dataset(args.users, args.items, args.clicks, seed=args.seed)
        source = f"synthetic ({args.users} users, {args.items} items, {args.clicks} clicks, seed {args.seed})"
    rows = rows[: args.limit] if args.limit else rows
    if getattr(args, "log_level", None) is None and "ZEROCF_LOG_LEVEL" not in args.env:
        quiet_logging()
        print(f"zerocf demo: streaming {len(rows)} clicks from {source} (details: zerocf --log-level INFO demo)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zerocf-demo-") as stack_dir:
        stack = LocalStack(stack_dir)
        try:
            stack.up()
            env = {**args.env, **stack.env(), "ZEROCF_TOPIC_PREFIX": "demo"}
            log.info("embedded stack up: %s", " ".join(f"{k}={v}" for k, v in stack.env().items()))
            log.info(
                "streaming %d clicks from %s through ingest -> lmf, ALS re-solve every %d clicks",
                len(rows),
                source,
                args.resolve_every,
            )
            _send_malformed(env, "demo")
            ranks, info = prequential(
                rows,
                "pipeline",
                env,
                chunk=args.chunk,
                resolve_every=args.resolve_every,
                seed=args.seed,
                overrides={"factors": args.factors},
                prefix="demo",
            )
            dlq = _dead_letters(env, "demo")
            users = sorted({r.user_id for r in rows[-200:]})[:3]
            recs = _recommendations(env, "demo", users)
            if args.serve:
                _report_and_serve(env, _summary(args, source, ranks, info, dlq, recs, out_dir))
                return 0
        finally:
            stack.down()
    print(_report(_summary(args, source, ranks, info, dlq, recs, out_dir)))
    print("dashboard       zerocf demo --serve keeps this stack up and serves the dashboard "
          "(http://127.0.0.1:<port>/, printed) until Ctrl-C")  # fmt: skip
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _report_and_serve(env: dict[str, str], summary: dict[str, Any]) -> None:
    """``--serve``: print the summary, then keep the stack up and ``zerocf serve`` on it until Ctrl-C."""
    from workers.serving.server import run as serve

    port = _free_port()
    print(_report(summary))
    print(f"dashboard       http://127.0.0.1:{port}/  (zerocf serve on the demo's stack; Ctrl-C stops it)", flush=True)
    serve(argparse.Namespace(env={**env, "ZEROCF_SERVE_HOST": "127.0.0.1", "ZEROCF_SERVE_PORT": str(port)}))


def _summary(args: argparse.Namespace, source: str, ranks: Any, info: dict[str, Any], dlq: list[dict[str, Any]],
             recs: dict[str, Any], out_dir: Path) -> dict[str, Any]:  # fmt: skip
    """Score the run, write the plot and summary.json; the summary as a dict."""
    from workers.evaluation.metrics import prequential_summary
    from workers.evaluation.prequential import plot_windows

    s = prequential_summary(ranks, 10, args.window)
    plot = out_dir / "prequential.png"
    plot_windows({"zerocf (lmf + periodic als)": s}, str(plot), f"zerocf demo: {source}")
    summary = {
        "data": source,
        "clicks": info["sent"],
        "seconds": info["seconds"],
        "events_per_s": round(info["sent"] / max(info["seconds"], 1e-9), 1),
        "prequential_hr10": round(s["model"]["hr"], 4),
        "popularity_hr10": round(s["popularity"]["hr"], 4),
        "decayed_popularity_hr10": round(s["decayed"]["hr"], 4),
        "prequential_mrr": round(s["model"]["mrr"], 4),
        "popularity_mrr": round(s["popularity"]["mrr"], 4),
        "cold_share": round(s["model"]["cold"], 3),
        "warm_hr10": round(s["warm"]["model"]["hr"], 4),
        "warm_popularity_hr10": round(s["warm"]["popularity"]["hr"], 4),
        "als_swaps": info["resolves"],
        "dead_letters": [
            {"reason": d["reason"], "value": base64.b64decode(d["value_b64"] or "")[:60].decode("utf-8", "replace")}
            for d in dlq
        ],
        "recommendations": recs,
        "plot": str(plot),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _report(s: dict[str, Any]) -> str:
    lines = [
        "",
        "zerocf demo summary",
        "===================",
        f"data            {s['data']}",
        f"streamed        {s['clicks']} clicks in {s['seconds']} s ({s['events_per_s']} clicks/s, "
        "produce -> ingest -> lmf, waiting for every chunk to be learned)",
        f"prequential     HR@10 {s['prequential_hr10']:.4f} (popularity {s['popularity_hr10']:.4f}, time-decayed "
        f"{s['decayed_popularity_hr10']:.4f}), "
        f"MRR {s['prequential_mrr']:.4f} (popularity {s['popularity_mrr']:.4f}); "
        f"{100 * s['cold_share']:.1f} % of clicks came from users with no vector yet (served popularity)",
        f"warm users      HR@10 {s['warm_hr10']:.4f} (popularity {s['warm_popularity_hr10']:.4f})",
        f"ALS swaps       {len(s['als_swaps'])}: "
        + ", ".join(f"gen {r['generation']} at {r['at']} clicks" for r in s["als_swaps"]),
        f"dead letters    {len(s['dead_letters'])}: " + "; ".join(d["reason"] for d in s["dead_letters"]),
        "recommendations (top 5, P(click)):",
    ]
    for user, r in s["recommendations"].items():
        tag = " (new user: popularity fallback)" if r["fallback"] else ""
        lines.append(f"  {user:>12}{tag}: " + ", ".join(f"{i} {p:.2f}" for i, p in zip(r["items"], r["scores"])))
    lines.append(f"plot            {s['plot']}")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="the whole chain on an embedded stack, with a summary and a plot")
    p.add_argument("--dataset", default=None, help="a dataset file instead of the synthetic data")
    p.add_argument("--format", default="csv", choices=["csv", "movielens", "lastfm"])
    p.add_argument("--users", type=int, default=1500)
    p.add_argument("--items", type=int, default=800)
    p.add_argument("--clicks", type=int, default=60_000)
    p.add_argument("--limit", type=int, default=None, help="use only the first N interactions")
    p.add_argument("--resolve-every", type=int, default=20_000, metavar="N", help="ALS re-solve every N clicks")
    p.add_argument("--chunk", type=int, default=5000, help="clicks produced per step")
    p.add_argument("--window", type=int, default=5000, help="clicks per point of the curve")
    p.add_argument("--factors", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="zerocf-demo", help="directory for summary.json and prequential.png")
    p.add_argument("--serve", action="store_true", help="then keep the stack up with the dashboard (Ctrl-C stops)")
    p.set_defaults(func=run)
