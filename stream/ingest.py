"""``zerocf ingest``: raw ``<p>.impressions`` / ``<p>.clicks`` -> normalised ``<p>.events`` (+ ``<p>.dlq``).

One consumer group reads both raw topics. Each batch (at most ``--batch`` records) is parsed with
:mod:`stream.events`; every event is produced to ``<p>.events`` keyed by user, every rejected record to
``<p>.dlq`` keyed by its original key. Only when every produced record of the batch is acknowledged are
the source offsets committed (explicitly, ``last + 1`` per partition). A failed send commits nothing: the
batch is re-read from its first offsets after a back-off. So ingest is at-least-once and a crash can leave
a duplicate run on ``<p>.events``, which consumers drop with :class:`stream.dedupe.Deduper`
(docs/architecture.md). A record that makes the parser raise anything but ``InvalidEvent`` (a bug) goes
to the DLQ with reason ``internal error: ...`` instead of killing the worker.

DLQ value (JSON): ``{reason, topic, partition, offset, key_b64, value_b64, ts}``, ``ts`` being the time
of rejection (epoch ms) and ``key_b64``/``value_b64`` null when the record had no key/value.

SIGTERM/SIGINT finish and commit the current batch, then exit 0. ``--until-idle`` exits 0 once every
assigned partition is caught up (high watermark of the last fetch, never ``end_offsets``) and no record
came for ``ZEROCF_IDLE_SECONDS``; an empty topic ends the same way.

>>> reason_class("ts 12 is before 2000-01-01T00:00:00Z; ..."), reason_class("internal error: KeyError")
('ts', 'internal')
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from stream import kafka_util
from stream.config import TOP_LEVEL, StreamConfig, add_flags, flag_overrides, load
from stream.errors import InvalidEvent
from stream.events import parse_record, to_events
from stream.runtime import Backoff, StopFlag, start_http

log = logging.getLogger(__name__)

SUMMARY_EVERY_S = 30.0
_CACHE_LIMIT = 1 << 20  # user -> partition cache entries before it is cleared
_CLASSES = frozenset({"user_id", "item_id", "item_ids", "impression_id", "ts", "count", "message"})


def reason_class(reason: str) -> str:
    """Low-cardinality label of a DLQ reason: the field it names, ``internal`` or ``other``."""
    if reason.startswith("internal error"):
        return "internal"
    m = re.match(r"[a-z_]+", reason)
    return m.group(0) if m and m.group(0) in _CLASSES else "other"


def dlq_value(reason: str, record: Any, now_ms: int) -> bytes:
    """The DLQ JSON for a rejected ``ConsumerRecord``.

    >>> from collections import namedtuple
    >>> R = namedtuple("R", "topic partition offset key value")
    >>> json.loads(dlq_value("bad", R("p.clicks", 1, 7, None, b"x"), 5))["value_b64"]
    'eA=='
    """
    b64 = base64.b64encode
    return json.dumps(
        {
            "reason": reason,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "key_b64": None if record.key is None else b64(record.key).decode("ascii"),
            "value_b64": None if record.value is None else b64(record.value).decode("ascii"),
            "ts": now_ms,
        },
        separators=(",", ":"),
    ).encode("utf-8")


@dataclass
class IngestStats:
    """Counters of one ingest run; ``seconds`` spans the first non-empty poll to the last committed batch.

    >>> IngestStats(records_in=3, events_out=4).summary()["events_out"]
    4
    """

    records_in: int = 0
    events_out: int = 0
    dlq: int = 0
    batches: int = 0
    produce_failures: int = 0
    commit_failures: int = 0
    first_record_at: float | None = field(default=None, repr=False)
    last_batch_at: float | None = field(default=None, repr=False)
    clean_exit: bool = True

    @property
    def seconds(self) -> float:
        if self.first_record_at is None or self.last_batch_at is None:
            return 0.0
        return self.last_batch_at - self.first_record_at

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("first_record_at", "last_batch_at")}
        out["seconds"] = round(self.seconds, 3)
        return out


class IngestMetrics:
    """Prometheus metrics of one ingest process, in their own registry (served by ``start_http``)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.records_in = Counter("zerocf_ingest_records_in", "raw records read", ["kind"], registry=r)
        self.events_out = Counter("zerocf_ingest_events_out", "events produced to <p>.events", registry=r)
        self.dlq = Counter("zerocf_ingest_dlq", "records sent to <p>.dlq", ["reason_class"], registry=r)
        self.batch_seconds = Histogram(
            "zerocf_ingest_batch_seconds",
            "parse+produce+ack+commit per batch",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.commit_failures = Counter("zerocf_ingest_commit_failures", "failed offset commits", registry=r)
        self.produce_failures = Counter(
            "zerocf_ingest_produce_failures", "batches not acknowledged (re-processed)", registry=r
        )
        self.assigned = Gauge("zerocf_ingest_assigned_partitions", "raw partitions assigned", registry=r)
        self.lag = Gauge(
            "zerocf_ingest_lag", "raw records behind the high watermark", ["topic", "partition"], registry=r
        )


def _reachable(bootstrap: str, timeout: float = 0.5) -> bool:
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
                return True
        except (OSError, ValueError):
            continue
    return False


class Ingest:
    """The ingest loop; :meth:`run` returns its :class:`IngestStats`.

    Parameters
    ----------
    cfg
        The process config (topics, group, batch size, timeouts, metrics port).
    stop
        Warm-stop flag (installed on signals by the entry point); a fresh one by default.
    """

    def __init__(self, cfg: StreamConfig, stop: StopFlag | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or StopFlag()
        self.stats = IngestStats()
        self.metrics = IngestMetrics()
        self._kinds: dict[str, Literal["clicks", "impressions"]] = {
            cfg.topics.clicks: "clicks",
            cfg.topics.impressions: "impressions",
        }
        self._assigned = 0
        self._failing = False
        self._part_cache: dict[bytes, int] = {}
        self._partitions: list[int] = []

    # -- health ---------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        """Ready when partitions are assigned, the broker answers and the last batch was acknowledged."""
        reachable = _reachable(self.cfg.kafka.bootstrap)
        detail = {
            "assigned_partitions": self._assigned,
            "broker_reachable": reachable,
            "producing": not self._failing,
            **self.stats.summary(),
        }
        return self._assigned > 0 and reachable and not self._failing, detail

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self, until_idle: bool = False) -> IngestStats:
        """Ingest until stopped (or, with ``until_idle``, until caught up and idle)."""
        cfg, topics = self.cfg, self.cfg.topics
        kafka_util.ensure_topics(
            cfg.kafka,
            {t: cfg.events_partitions for t in (topics.impressions, topics.clicks, topics.events, topics.dlq)},
        )
        server = None
        if cfg.runtime.metrics_port:
            server = start_http(cfg.runtime.metrics_port, self.health, self.metrics.registry, cfg.runtime.metrics_host)
        consumer = producer = None
        try:
            consumer = kafka_util.consumer(
                cfg.kafka, group_id=cfg.group, client_id="zerocf-ingest", max_poll_records=cfg.ingest_batch
            )
            # Unbounded retries (until delivery_timeout_ms): with a small retry count one batch of a partition
            # could fail while a later one succeeds, leaving a gap below the Deduper's mark that the replay
            # cannot fill. No compression: with the crc32c wheel, gzip cost ~12 us/record more CPU.
            producer = kafka_util.producer(
                cfg.kafka, client_id="zerocf-ingest", retries=float("inf"), compression_type=None
            )
            consumer.subscribe([topics.impressions, topics.clicks])
            self._partitions = sorted(producer.partitions_for(topics.events))
            log.info(
                "ingest: group %s reading %s, %s -> %s (%d partitions), batch %d",
                cfg.group,
                topics.impressions,
                topics.clicks,
                topics.events,
                len(self._partitions),
                cfg.ingest_batch,
            )
            self._loop(consumer, producer, until_idle)
        finally:
            if consumer is not None:
                consumer.close(autocommit=False)
            if producer is not None:
                producer.close()
            if server is not None:
                server.shutdown()
            log.info("ingest stopped: %s", json.dumps(self.stats.summary()))
        return self.stats

    def _loop(self, consumer: Any, producer: Any, until_idle: bool) -> None:
        cfg, stats = self.cfg, self.stats
        backoff = Backoff()
        assignment: set[Any] = set()
        last_data = next_summary = time.monotonic()
        while not self.stop.is_set():
            t0 = time.monotonic()
            polled = consumer.poll(timeout_ms=cfg.poll_timeout_ms, max_records=cfg.ingest_batch)
            now = time.monotonic()
            if polled:
                log.debug("ingest poll: %.3fs", now - t0)
            current = consumer.assignment()
            if current != assignment:
                assignment, last_data = set(current), now
                self._assigned = len(assignment)
                self.metrics.assigned.set(len(assignment))
                log.info("ingest: assigned %d partitions", len(assignment))
                if assignment:  # a rebalance may follow a broker restart: re-check topics and partitions
                    self._refresh_partitions(producer)
            if polled:
                if stats.first_record_at is None:
                    stats.first_record_at = t0
                if not self._batch(consumer, producer, polled):
                    backoff.sleep(self.stop)
                    continue
                backoff.reset()
                last_data = stats.last_batch_at = time.monotonic()
                for tp, behind in kafka_util.lag(consumer).items():
                    self.metrics.lag.labels(tp.topic, str(tp.partition)).set(behind)
            elif (
                until_idle
                and assignment
                and now - last_data >= cfg.idle_seconds
                and kafka_util.caught_up(consumer, unknown_is_done=True)
            ):
                log.info("ingest: caught up and idle for %.1fs; exiting (--until-idle)", now - last_data)
                break
            if now >= next_summary + SUMMARY_EVERY_S:
                next_summary = now
                log.info("ingest progress: %s", json.dumps(self.stats.summary()))
        self.stats.clean_exit = not self._failing
        if self.stop.is_set():
            log.info("ingest: stopping (%s)", self.stop.reason)

    # -- one batch ------------------------------------------------------------------------------
    def _batch(self, consumer: Any, producer: Any, polled: Mapping[Any, list[Any]]) -> bool:
        """Produce, await acks and commit one polled batch; False (nothing committed) if a send failed."""
        started = time.monotonic()
        now_ms = int(time.time() * 1000)
        try:
            futures, n_in, n_out, n_dlq = self._produce(producer, polled, now_ms)
            ok = self._acknowledged(producer, futures)
        except Exception as exc:  # noqa: BLE001 - a send that cannot even be queued (e.g. a partition
            # that vanished when a dev broker restarted, a full buffer): the batch failed, nothing committed
            log.warning("ingest: could not queue the batch (%s: %s)", type(exc).__name__, exc)
            ok, n_in = False, sum(len(r) for r in polled.values())
        produced = time.monotonic()
        if not ok:
            self._refresh_partitions(producer)
            self._failing = True
            self.stats.produce_failures += 1
            self.metrics.produce_failures.inc()
            assigned = consumer.assignment()
            for tp, records in polled.items():
                if tp in assigned:  # a revoked partition is re-read by its new owner from the committed offset
                    consumer.seek(tp, records[0].offset)
            log.warning(
                "ingest: %d records (%s) will be re-processed after a back-off; offsets not committed",
                n_in,
                ", ".join(f"{tp.topic}/{tp.partition}@{r[0].offset}" for tp, r in polled.items()),
            )
            return False
        self._failing = False
        acked = time.monotonic()
        self._commit(consumer, {tp: records[-1].offset + 1 for tp, records in polled.items()})
        stats = self.stats
        stats.records_in += n_in
        stats.events_out += n_out
        stats.dlq += n_dlq
        stats.batches += 1
        m = self.metrics
        for tp, records in polled.items():
            m.records_in.labels(self._kinds.get(tp.topic, "other")).inc(len(records))
        m.events_out.inc(n_out)
        done = time.monotonic()
        m.batch_seconds.observe(done - started)
        log.debug(
            "ingest batch: %d in, %d events, %d dlq; produce %.3fs, acks %.3fs, commit %.3fs",
            n_in,
            n_out,
            n_dlq,
            produced - started,
            acked - produced,
            done - acked,
        )
        return True

    def _produce(self, producer: Any, polled: Mapping[Any, list[Any]], now_ms: int) -> tuple[list[Any], int, int, int]:
        send, events_topic = producer.send, self.cfg.topics.events
        cache, parts = self._part_cache, self._partitions
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        futures: list[Any] = []
        append = futures.append
        n_in = n_out = n_dlq = 0
        for tp, records in polled.items():
            topic, partition = tp.topic, tp.partition
            kind = self._kinds[topic]
            n_in += len(records)
            for rec in records:
                try:
                    events = to_events(parse_record(kind, rec.value, now_ms), topic, partition, rec.offset)
                    out = [(e.user.encode("utf-8"), e.to_json()) for e in events]
                except InvalidEvent as exc:
                    append(self._dead_letter(producer, exc.reason, rec, now_ms))
                    n_dlq += 1
                    continue
                except Exception as exc:  # a bug must not kill the worker: dead-letter the record
                    log.exception("ingest: internal error on %s/%d@%d", topic, partition, rec.offset)
                    append(self._dead_letter(producer, f"internal error: {type(exc).__name__}: {exc}", rec, now_ms))
                    n_dlq += 1
                    continue
                for key, value in out:
                    p = cache.get(key)
                    if p is None:
                        p = cache[key] = parts[(_murmur2(key) & 0x7FFFFFFF) % len(parts)]
                    append(send(events_topic, value=value, key=key, partition=p))
                n_out += len(out)
        return futures, n_in, n_out, n_dlq

    def _refresh_partitions(self, producer: Any) -> None:
        """Re-create missing topics and re-read the events topic's partitions (after a failed batch)."""
        topics = self.cfg.topics
        try:
            kafka_util.ensure_topics(
                self.cfg.kafka,
                {t: self.cfg.events_partitions for t in (topics.impressions, topics.clicks, topics.events, topics.dlq)},
            )
            producer._metadata.request_update()  # noqa: SLF001 - force fresh metadata, not the cached layout
            parts = producer.partitions_for(topics.events)
            if parts:
                self._partitions = sorted(parts)
                self._part_cache.clear()
        except Exception as exc:  # noqa: BLE001 - still down: the next failed batch retries
            log.info("ingest: topic refresh failed (%s); retrying after the back-off", exc)

    def _dead_letter(self, producer: Any, reason: str, record: Any, now_ms: int) -> Any:
        self.metrics.dlq.labels(reason_class(reason)).inc()
        log.debug("ingest: dlq %s/%d@%d: %s", record.topic, record.partition, record.offset, reason)
        return producer.send(self.cfg.topics.dlq, key=record.key, value=dlq_value(reason, record, now_ms))

    def _acknowledged(self, producer: Any, futures: list[Any]) -> bool:
        from kafka.errors import KafkaError

        try:
            producer.flush()
        except KafkaError as exc:
            log.warning("ingest: flush failed: %s", exc)
            return False
        for fut in futures:
            if not fut.is_done or fut.failed():
                log.warning("ingest: a send failed: %s", fut.exception if fut.is_done else "not completed")
                return False
        return True

    def _commit(self, consumer: Any, offsets: Mapping[Any, int]) -> None:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        try:
            consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
        except KafkaError as exc:  # e.g. a rebalance took the partitions: their new owner replays them
            self.stats.commit_failures += 1
            self.metrics.commit_failures.inc()
            log.warning(
                "ingest: commit of %s failed (%s); the records will be replayed and de-duplicated downstream",
                {f"{tp.topic}/{tp.partition}": o for tp, o in offsets.items()},
                exc,
            )


def _murmur2(key: bytes) -> int:
    from kafka.partitioner.default import murmur2

    return int(murmur2(key))


# -- CLI ---------------------------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    """Add ``zerocf ingest`` to the ``zerocf`` command."""
    p = subparsers.add_parser(
        "ingest", help="raw impressions/clicks -> <p>.events (rejects -> <p>.dlq)", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--until-idle",
        action="store_true",
        help="exit 0 once caught up and idle for ZEROCF_IDLE_SECONDS (batch runs, tests)",
    )
    add_flags(p, StreamConfig, skip=TOP_LEVEL)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``zerocf ingest``: 0 on a clean stop, 1 if the last batch could not be produced."""
    cfg = load(StreamConfig, args.env, flag_overrides(args, StreamConfig))
    stop = StopFlag().install()
    stats = Ingest(cfg, stop).run(until_idle=args.until_idle)
    if not stats.clean_exit:
        log.error("ingest: stopped with an unacknowledged batch; it will be re-processed on the next start")
        return 1
    return 0
