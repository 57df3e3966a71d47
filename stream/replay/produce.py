"""``zerocf produce`` replays a dataset as time-ordered clicks (and optional impressions); ``zerocf synth``
writes a synthetic dataset.

Every line of the file is accounted for: sent, or reported as rejected with its line number and reason
(by the reader for unparsable lines, by the same validation ingest applies for out-of-range values).
Timestamps before 2000-01-01 (MovieLens 100K is from 1997) are shifted, gaps kept, so the stream ends now;
``--keep-ts`` disables that (and lets ingest reject them).

The summary is one JSON object on stdout: ``{"lines_read", "clicks_sent", "impressions_sent",
"rejected", "seconds", "rate"}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stream.config import TOP_LEVEL, StreamConfig, add_flags, flag_overrides, load
from stream.errors import ConfigError, InvalidEvent
from stream.events import MIN_TS_MS
from stream.replay.datasets import (
    BadLine,
    Interaction,
    read_interactions,
    synthesize_impressions,
    synthetic_dataset,
    time_ordered,
    write_csv,
)

log = logging.getLogger(__name__)

# ingest-only settings that `zerocf produce` does not use
PRODUCE_SKIPS = (
    "ingest_group",
    "ingest_batch",
    "message_max_bytes",
    "poll_timeout_ms",
    "idle_seconds",
    "metrics_port",
    "metrics_host",
)


class Pacer:
    """Sleep so that ``tick()`` is called at most ``rate`` times per second on average (None = no limit)."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.clock = rate, clock
        self.start = clock()
        self.n = 0

    def tick(self) -> None:
        self.n += 1
        if self.rate and self.n % 100 == 0:
            ahead = self.n / self.rate - (self.clock() - self.start)
            if ahead > 0:
                time.sleep(ahead)


def prepare(rows: Sequence[Interaction], keep_ts: bool, now_ms: int) -> list[Interaction]:
    """Time-order ``rows``; shift timestamps that predate 2000 so the stream ends at ``now_ms``."""
    if not rows:
        return []
    if rows[0].ts_ms is None or keep_ts:
        return time_ordered(rows)
    ordered = time_ordered(rows)
    first, last = ordered[0].ts_ms, ordered[-1].ts_ms
    assert first is not None and last is not None
    if first < MIN_TS_MS:
        base = max(MIN_TS_MS, now_ms - (last - first) - 60_000)
        log.info(
            "timestamps start before 2000-01-01: shifting by %+.1f days (gaps kept); --keep-ts disables",
            (base - first) / 86_400_000,
        )
        ordered = time_ordered(ordered, base_ts_ms=base)
    return ordered


def replay(
    producer: Any,
    rows: Sequence[Interaction],
    impressions: int,
    rate: float | None,
    seed: int = 0,
    report: Callable[[str], None] = log.warning,
    progress: bool = False,
) -> dict[str, int]:
    """Send ``rows`` through an :class:`stream.client.producer.EventProducer`; return counts.

    ``progress`` shows a bar on a terminal (never in logs or pipes)."""
    counts = {"clicks_sent": 0, "impressions_sent": 0, "rejected": 0}
    pacer = Pacer(rate)
    pairs: list[tuple[Any, Any]] | None = None
    if impressions > 0:
        pairs = synthesize_impressions(rows, impressions, np.random.default_rng(seed))
    bar = tqdm(rows, desc="produce", unit="click", disable=None if progress else True)
    for n, row in enumerate(bar):
        try:
            if pairs is not None:
                imp, click = pairs[n]
                producer.send_impression(imp.impression_id, imp.user_id, list(imp.item_ids), imp.ts)
                counts["impressions_sent"] += 1
                producer.send_click(click.user_id, click.item_id, click.ts, click.impression_id, click.count)
            else:
                producer.send_click(row.user_id, row.item_id, row.ts_ms, None, row.count)
            counts["clicks_sent"] += 1
        except InvalidEvent as exc:
            counts["rejected"] += 1
            report(f"line {row.line_no}: rejected: {exc.reason}")
        pacer.tick()
    producer.flush()
    return counts


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("produce", help="replay a dataset file as time-ordered clicks (+ impressions)")
    p.add_argument("file", help="dataset file")
    p.add_argument("--format", required=True, choices=["csv", "movielens", "lastfm"])
    p.add_argument("--rate", type=float, default=None, metavar="EV_PER_S", help="limit the send rate")
    p.add_argument(
        "--impressions",
        type=int,
        default=0,
        metavar="N",
        help="wrap each click in a synthetic impression of N items (popularity-weighted)",
    )
    p.add_argument("--limit", type=int, default=None, help="send only the first N interactions (time order)")
    p.add_argument("--keep-ts", action="store_true", help="do not shift pre-2000 timestamps")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic impressions (default 0)")
    add_flags(p, StreamConfig, skip=TOP_LEVEL + PRODUCE_SKIPS)
    p.set_defaults(func=run)
    s = subparsers.add_parser(
        "synth", help="write a synthetic dataset (power-law popularity, planted structure, timestamps) as csv"
    )
    s.add_argument("out", help="output csv path")
    s.add_argument("--users", type=int, default=2000)
    s.add_argument("--items", type=int, default=1000)
    s.add_argument("--clicks", type=int, default=100_000)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=run_synth)


def run(args: argparse.Namespace) -> int:
    from stream import kafka_util
    from stream.client.producer import EventProducer

    cfg = load(StreamConfig, args.env, flag_overrides(args, StreamConfig))
    path = Path(args.file)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; give the path of a {args.format} file")
    bad: list[BadLine] = []

    def on_bad(line: BadLine) -> None:
        bad.append(line)
        log.warning("%s line %d: rejected: %s", path.name, line.line_no, line.reason)

    t0 = time.monotonic()
    rows = list(read_interactions(path, args.format, on_bad_line=on_bad))
    rows = prepare(rows, args.keep_ts, time.time_ns() // 1_000_000)[: args.limit]
    t = cfg.topics
    kafka_util.ensure_topics(
        cfg.kafka,
        {
            t.clicks: cfg.events_partitions,
            t.impressions: cfg.events_partitions,
            t.events: cfg.events_partitions,
            t.dlq: cfg.events_partitions,
        },
    )
    raw = kafka_util.producer(cfg.kafka, client_id="zerocf-produce")
    with EventProducer(raw, topic_prefix=cfg.topic_prefix) as producer:
        counts = replay(
            producer,
            rows,
            args.impressions,
            args.rate,
            args.seed,
            report=lambda msg: log.warning("%s %s", path.name, msg),
            progress=True,
        )
    secs = time.monotonic() - t0
    summary = {
        "lines_read": len(rows) + len(bad),
        "clicks_sent": counts["clicks_sent"],
        "impressions_sent": counts["impressions_sent"],
        "rejected": counts["rejected"] + len(bad),
        "seconds": round(secs, 2),
        "rate": round(counts["clicks_sent"] / max(secs, 1e-9), 1),
    }
    print(json.dumps(summary))
    sys.stdout.flush()
    return 0


def run_synth(args: argparse.Namespace) -> int:
    rows = synthetic_dataset(args.users, args.items, args.clicks, seed=args.seed)
    n = write_csv(rows, args.out)
    log.info("wrote %d interactions (%d users, %d items) to %s", n, args.users, args.items, args.out)
    return 0
