"""Ingest throughput against a raw kafka-python consume pass; prints one JSON object.

Starts its own LocalStack in a temp dir (stopped at the end), produces N raw clicks (~100 bytes each) to a
fresh topic set, then in the same run measures

1. ``raw``: a kafka-python consumer (no group, same fetch settings as ingest) reading the clicks topic,
   no parsing: records/s from the first non-empty poll to the last record;
2. ``ingest``: :class:`stream.ingest.Ingest` ``until_idle`` in-process over the same topic: records/s from
   the first non-empty poll to the batch after which it was caught up (parse, produce to ``<p>.events``,
   wait for acks, commit);

and ``ratio`` = ingest / raw, each the median of ``--repeat`` alternating passes (ingest in a fresh group
each time); unless ``--no-verify``, it counts ``<p>.events`` with
:func:`stream.ingest.read_topic` (``events_read_rps`` includes that helper's start-up).
``--pack``: events per record of ``<p>.events`` (ingest's default).
Usage: ``python -m bench.bench_ingest [--records 200000] [--batch 5000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

from stream import kafka_util
from stream.config import StreamConfig, load
from stream.devstack import LocalStack
from stream.events import decode_events, encode_click
from stream.ingest import Ingest
from stream.kafka_util import read_topic

log = logging.getLogger("bench.ingest")


def produce_clicks(cfg: StreamConfig, n: int) -> float:
    """Send ``n`` ~100-byte clicks keyed by user; returns records/s."""
    producer = kafka_util.producer(cfg.kafka, client_id="bench-raw")
    ts = int(time.time() * 1000) - 3_600_000
    t0 = time.perf_counter()
    try:
        for i in range(n):
            user = f"user-{(i * 7919) % 50_021:06d}"
            producer.send(
                cfg.topics.clicks,
                key=user.encode(),
                value=encode_click(user, f"item-{i % 20_011:06d}", ts + i, impression_id=f"imp-{i:09d}"),
            )
        producer.flush()
    finally:
        producer.close()
    return n / (time.perf_counter() - t0)


def raw_consume(cfg: StreamConfig, n: int, batch: int) -> float:
    """kafka-python consume-only pass over the clicks topic; returns records/s."""
    from kafka.structs import TopicPartition

    consumer = kafka_util.consumer(cfg.kafka, group_id=None, client_id="bench-raw-consume", max_poll_records=batch)
    try:
        tps = [TopicPartition(cfg.topics.clicks, p) for p in sorted(consumer.partitions_for_topic(cfg.topics.clicks))]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        seen, t0 = 0, None
        deadline = time.monotonic() + 300
        while seen < n and time.monotonic() < deadline:
            start = time.perf_counter()
            polled = consumer.poll(timeout_ms=500, max_records=batch)
            if polled and t0 is None:
                t0 = start
            seen += sum(len(r) for r in polled.values())
        if seen != n or t0 is None:
            raise RuntimeError(f"raw pass read {seen} of {n} records")
        return n / (time.perf_counter() - t0)
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000, help="ingest batch / raw max_poll_records")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3, help="raw + ingest passes (medians are reported)")
    parser.add_argument(
        "--pack",
        type=int,
        default=StreamConfig().events_pack,
        help="events per record of <p>.events (ZEROCF_EVENTS_PACK; 1 = one event per record)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip counting <p>.events afterwards")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    out: dict[str, Any] = {
        "records": args.records,
        "batch": args.batch,
        "partitions": args.partitions,
        "repeat": args.repeat,
        "events_pack": args.pack,
    }
    with tempfile.TemporaryDirectory(prefix="zerocf-bench-") as tmp:
        stack = LocalStack(tmp)
        stack.up()
        try:
            env = {
                **stack.env(),
                "ZEROCF_TOPIC_PREFIX": "bench" + uuid.uuid4().hex[:8],
                "ZEROCF_IDLE_SECONDS": "1",
                "ZEROCF_EVENTS_PARTITIONS": str(args.partitions),
                "ZEROCF_INGEST_BATCH": str(args.batch),
                "ZEROCF_EVENTS_PACK": str(args.pack),
            }
            cfg = load(StreamConfig, env)
            topics = cfg.topics
            kafka_util.ensure_topics(
                cfg.kafka, {t: args.partitions for t in (topics.clicks, topics.impressions, topics.events, topics.dlq)}
            )
            out["produce_rps"] = round(produce_clicks(cfg, args.records))
            raws, ingests, singles = [], [], []
            for rep in range(args.repeat):  # alternate, so load from other processes hits both alike
                raws.append(raw_consume(cfg, args.records, args.batch))
                run_cfg = load(StreamConfig, {**env, "ZEROCF_INGEST_GROUP": f"bench-ingest-{rep}"})
                stats = Ingest(run_cfg).run(until_idle=True)
                if stats.records_in != args.records or stats.seconds <= 0:
                    raise RuntimeError(f"ingest read {stats.records_in} of {args.records} records")
                ingests.append(stats.records_in / stats.seconds)
                if args.pack > 1:  # the layout before packs, same run: one event per record
                    one = load(
                        StreamConfig, {**env, "ZEROCF_INGEST_GROUP": f"bench-one-{rep}", "ZEROCF_EVENTS_PACK": "1"}
                    )
                    single = Ingest(one).run(until_idle=True)
                    singles.append(single.records_in / single.seconds)
            raw, ingest = statistics.median(raws), statistics.median(ingests)
            out.update(
                raw_consume_rps=round(raw),
                ingest_rps=round(ingest),
                ratio=round(ingest / raw, 3),
                raw_runs=[round(r) for r in raws],
                ingest_runs=[round(r) for r in ingests],
                last_ingest=stats.summary(),
            )
            if singles:
                one_rps = statistics.median(singles)
                out.update(
                    ingest_rps_one_event_per_record=round(one_rps), ratio_one_event_per_record=round(one_rps / raw, 3)
                )
            if not args.no_verify:  # also: how fast a consumer reads the (gzip) events back
                t0 = time.perf_counter()
                records = read_topic(cfg.kafka, topics.events, 300)
                out["records_on_topic"] = len(records)
                out["events_on_topic"] = n_events = sum(len(decode_events(r.value)[0]) for r in records)
                out["events_read_rps"] = round(n_events / (time.perf_counter() - t0))
                want = args.records * (len(ingests) + len(singles))
                if n_events != want:
                    raise RuntimeError(f"{n_events} events on {topics.events}, expected {want}")
        finally:
            stack.down()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
