"""``zerocf ingest``: raw ``<p>.impressions`` / ``<p>.clicks`` -> normalised ``<p>.events`` (+ ``<p>.dlq``).

One consumer group reads the raw topics (and ``<p>.erasures``, written by ``zerocf forget-user``: each
record becomes one ``"erase"`` event, see :mod:`stream.erasure`). Each batch (at most ``--batch`` records)
is parsed with :mod:`stream.events`; every event is produced to ``<p>.events`` keyed by user, every rejected record to
``<p>.dlq`` keyed by its original key. Only when every produced record of the batch is acknowledged are
the source offsets committed (explicitly, ``last + 1`` per partition). A failed send commits nothing: the
batch is re-read from its first offsets after a back-off. So ingest is at-least-once and a crash can leave
a duplicate run on ``<p>.events``, which consumers drop with :class:`stream.dedupe.Deduper`
(docs/architecture.md). A record that makes the parser raise anything but ``InvalidEvent`` (a bug) goes
to the DLQ with reason ``internal error: ...`` instead of killing the worker.

DLQ value (JSON): ``{reason, topic, partition, offset, key_b64, value_b64, ts, key_len, value_len, key_sha256,
value_sha256, payload}``: ``ts`` is the time of rejection (epoch ms); ``*_len`` and ``*_sha256`` describe the
original key/value (null when the record had none); ``payload`` says how much of it ``*_b64`` carry: ``complete``,
``truncated`` (the first bytes only: a dead letter always fits :func:`dead_letter_budget`) or ``omitted`` (both
null: the dead letter with payload was rejected for its size). The DLQ record's key is the original key, or its
sha256 hex when longer than ``DLQ_KEY_MAX``. A record whose minimal dead letter is rejected too is logged and
counted (``zerocf_ingest_dlq_payload_total{payload="lost"}``), never retried: it cannot block its partition.

SIGTERM/SIGINT finish and commit the current batch, then exit 0. ``--until-idle``, once no record came for
``ZEROCF_IDLE_SECONDS``, compares the group's committed offsets of **every** partition of the raw topics (not
only the ones assigned here) with their ends (:func:`stream.kafka_util.group_lag`) and exits 0 when all are
caught up (an empty topic too). It exits 1 with a message naming the lagging partitions when that lag has not
moved for ``UNTIL_IDLE_STALL_S`` (another member holds them without committing), or when nothing was assigned
to it for ``NO_ASSIGNMENT_EXIT_S`` while lag is left (a wedged group).

>>> reason_class("ts 12 is before 2000-01-01T00:00:00Z; ..."), reason_class("internal error: KeyError")
('ts', 'internal')
"""

from __future__ import annotations

import argparse
import base64
import hashlib
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
from stream.events import RawKind, event_records, pack_json, parse_record
from stream.runtime import Backoff, StopFlag, start_http

log = logging.getLogger(__name__)

SUMMARY_EVERY_S = 30.0
UNTIL_IDLE_CHECK_S = 1.0  # --until-idle: how often the group's committed offsets are compared with the ends
_CACHE_LIMIT = 1 << 20  # user -> partition cache entries before it is cleared
_CLASSES = frozenset({"user_id", "item_id", "item_ids", "impression_id", "ts", "count", "message"})
DLQ_KEY_MAX = 1024  # bytes of the original key a dead letter carries (and uses as its own key)
REASON_MAX = 1000  # characters of a reason kept in a dead letter
UNTIL_IDLE_STALL_S = 60.0  # --until-idle gives up (rc 1) after this long with lag left and none of it moving
NO_ASSIGNMENT_EXIT_S = 60.0  # ... or after this long without any partition assigned while lag is left
RECORD_OVERHEAD = 1024  # bytes kept free for the batch and record headers (~80) under a record's limit
Payload = Literal["complete", "truncated", "omitted"]


def reason_class(reason: str) -> str:
    """Low-cardinality label of a DLQ reason: the field it names, ``internal`` or ``other``."""
    if reason.startswith("internal error"):
        return "internal"
    m = re.match(r"[a-z_]+", reason)
    return m.group(0) if m and m.group(0) in _CLASSES else "other"


def dead_letter_budget(
    max_request_size: int, message_max_bytes: int = kafka_util.KAFKA_DEFAULT_MESSAGE_MAX_BYTES
) -> int:
    """Bytes one dead letter or event record (key + value) may take.

    The smaller of the producer's ``max_request_size`` and the brokers' ``message.max.bytes``
    (``ZEROCF_MESSAGE_MAX_BYTES``, by default Apache Kafka's default
    :data:`~stream.kafka_util.KAFKA_DEFAULT_MESSAGE_MAX_BYTES`), less room for the batch and record headers.

    >>> dead_letter_budget(4 << 20), dead_letter_budget(100_000), dead_letter_budget(4 << 20, 65_536)
    (1047564, 98976, 64512)
    """
    return min(max_request_size, message_max_bytes) - RECORD_OVERHEAD


def _clip(text: str, limit: int = REASON_MAX) -> str:
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def dead_letter(reason: str, record: Any, now_ms: int, budget: int | None) -> tuple[bytes | None, bytes, Payload]:
    """``(key, value, payload)`` of the DLQ record for a rejected ``ConsumerRecord``.

    Carries as much of the original key (at most ``DLQ_KEY_MAX`` bytes) and value as fits ``budget`` bytes;
    ``budget=None`` gives the minimal dead letter (no payload, ``payload="omitted"``).

    >>> from collections import namedtuple
    >>> R = namedtuple("R", "topic partition offset key value")
    >>> k, v, mode = dead_letter("bad", R("p.clicks", 1, 7, None, b"x" * 2000), 5, 1000)
    >>> d = json.loads(v)
    >>> mode, d["payload"], d["value_len"], len(base64.b64decode(d["value_b64"])) < 2000, len(v) <= 1000
    ('truncated', 'truncated', 2000, True, True)
    >>> json.loads(dead_letter("bad", R("p.clicks", 1, 7, b"u", b"x"), 5, 1000)[1])["value_b64"]
    'eA=='
    """
    key, value = record.key, record.value
    dkey = key if key is None or len(key) <= DLQ_KEY_MAX else hashlib.sha256(key).hexdigest().encode("ascii")
    doc: dict[str, Any] = {
        "reason": _clip(reason),
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key_b64": None,
        "value_b64": None,
        "ts": now_ms,
        "key_len": None if key is None else len(key),
        "value_len": None if value is None else len(value),
        "key_sha256": None if key is None else hashlib.sha256(key).hexdigest(),
        "value_sha256": None if value is None else hashlib.sha256(value).hexdigest(),
        "payload": "omitted",
    }
    if budget is None:
        return dkey, _compact(doc), "omitted"
    b64 = base64.b64encode
    complete = key is None or len(key) <= DLQ_KEY_MAX
    if key is not None:
        doc["key_b64"] = b64(key[:DLQ_KEY_MAX]).decode("ascii")
    if value is not None:
        doc["value_b64"], doc["payload"] = "", "truncated"
        room = budget - len(_compact(doc)) - len(dkey or b"")
        head = value[: max(0, room) // 4 * 3]  # base64: 4 characters per 3 bytes
        doc["value_b64"] = b64(head).decode("ascii")
        complete = complete and len(head) == len(value)
    mode: Payload = "complete" if complete else "truncated"
    doc["payload"] = mode
    return dkey, _compact(doc), mode


def _compact(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def _size_errors() -> tuple[type[BaseException], ...]:
    """kafka-python's errors for a record too large for the client or the broker (not retriable)."""
    from kafka import errors

    return (errors.MessageSizeTooLargeError, errors.RecordListTooLargeError)


@dataclass
class _DeadLetter:
    """A dead letter sent (``future``) or given up on (``mode == "lost"``), kept to re-send it smaller."""

    record: Any
    reason: str
    mode: Payload | Literal["lost"]
    future: Any = None


@dataclass
class IngestStats:
    """Counters of one ingest run; ``seconds`` spans the first non-empty poll to the last committed batch.

    >>> IngestStats(records_in=3, events_out=4).summary()["events_out"]
    4
    """

    records_in: int = 0
    events_out: int = 0
    dlq: int = 0
    dlq_lost: int = 0
    batches: int = 0
    produce_failures: int = 0
    commit_failures: int = 0
    first_record_at: float | None = field(default=None, repr=False)
    last_batch_at: float | None = field(default=None, repr=False)
    clean_exit: bool = True
    unfinished: str = ""  # why --until-idle gave up before every partition was caught up ("" = it was not)

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
        self.dlq_payload = Counter(
            "zerocf_ingest_dlq_payload",
            "dead letters by payload: complete, truncated, omitted (rejected with it), lost (not dead-lettered)",
            ["payload"],
            registry=r,
        )
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


@dataclass
class IdleWatch:
    """``--until-idle``: done only when every partition of the group is caught up; gives up when that stalls.

    :meth:`verdict` takes the records each partition is behind (:func:`stream.kafka_util.group_lag`; ``None``
    = unknown) and returns ``("done", "")``, ``("wait", "")`` or ``("failed", message)``: lag left that has not
    changed for ``stall_s``, or nothing assigned to this member for ``unassigned_s`` while lag is left.

    >>> w = IdleWatch("g", stall_s=10, unassigned_s=5, started=0.0)
    >>> w.verdict({"t/0": 3}, assigned=True, now=1.0), w.verdict({"t/0": 2}, assigned=True, now=8.0)
    (('wait', ''), ('wait', ''))
    >>> w.verdict({"t/0": 2}, assigned=True, now=19.0)[0], w.verdict({"t/0": 0}, assigned=True, now=20.0)
    ('failed', ('done', ''))
    """

    group: str
    stall_s: float = UNTIL_IDLE_STALL_S
    unassigned_s: float = NO_ASSIGNMENT_EXIT_S
    started: float = field(default_factory=time.monotonic)
    next_check: float = 0.0
    _seen: tuple[Any, ...] | None = field(default=None, repr=False)
    _moved_at: float | None = field(default=None, repr=False)
    _unassigned_since: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._unassigned_since = self.started  # a member starts with nothing assigned

    def verdict(self, behind: Mapping[Any, int | None] | None, assigned: bool, now: float) -> tuple[str, str]:
        lagging = {tp: n for tp, n in (behind or {}).items() if n is None or n > 0}
        if behind is not None and not lagging:
            return "done", ""
        seen = tuple(sorted((str(tp), n) for tp, n in lagging.items())) if behind is not None else None
        if self._moved_at is None or seen != self._seen:
            self._seen, self._moved_at = seen, now
        if assigned:
            self._unassigned_since = None
        else:  # joining (or wedged): the no-assignment bound applies, not the stall one
            self._moved_at = now
            if self._unassigned_since is None:
                self._unassigned_since = now
        worst = sorted(lagging.items(), key=lambda kv: str(kv[0]))[:6]
        shown = ", ".join(f"{_tp_name(tp)}: {'end unknown' if n is None else f'{n} records'}" for tp, n in worst)
        shown = shown or "end offsets unreadable"
        if self._unassigned_since is not None and now - self._unassigned_since >= self.unassigned_s:
            return "failed", (
                f"no partition assigned to this member after {self.unassigned_s:.0f} s while partitions are behind "
                f"({shown}); group {self.group} may be wedged (a member died mid-join) or its other members hold "
                "every partition: stop or finish them, then rerun"
            )
        if now - self._moved_at >= self.stall_s:
            return "failed", (
                f"{len(lagging) or 'the'} partitions of group {self.group} still behind after {self.stall_s:.0f} s "
                f"without progress ({shown}); another member holds them without committing: stop it (or wait for "
                "its session to time out), then rerun"
            )
        return "wait", ""


def _tp_name(tp: Any) -> str:
    return f"{tp.topic}/{tp.partition}" if hasattr(tp, "topic") else str(tp)


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
        self._kinds: dict[str, RawKind] = {
            cfg.topics.clicks: "clicks",
            cfg.topics.impressions: "impressions",
            cfg.topics.erasures: "erasures",  # zerocf forget-user (stream.erasure)
        }
        self._feedback = cfg.feedback  # feedback type -> weight (ZEROCF_FEEDBACK_WEIGHTS)
        self._assigned = 0
        self._failing = False
        self._part_cache: dict[bytes, int] = {}
        self._committed: dict[Any, int] = {}  # offsets this process committed, by partition
        self._partitions: list[int] = []
        self._budget = dead_letter_budget(
            int(kafka_util.producer_defaults()["max_request_size"]), cfg.message_max_bytes
        )

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
            {t: cfg.events_partitions for t in (*self._kinds, topics.events, topics.dlq)},
        )
        server = None
        if cfg.runtime.metrics_port:
            server = start_http(cfg.runtime.metrics_port, self.health, self.metrics.registry, cfg.runtime.metrics_host)
        consumer = producer = None
        try:
            # The raw topics are ingest's own (created above): after a dev broker restart that lost them, its
            # subscription re-creates them (broker default partitions) and the rebalance re-creates the rest.
            consumer = kafka_util.consumer(
                cfg.kafka,
                group_id=cfg.group,
                client_id="zerocf-ingest",
                max_poll_records=cfg.ingest_batch,
                allow_auto_create_topics=True,
            )
            # Unbounded retries (until delivery_timeout_ms): with a small retry count one batch of a partition
            # could fail while a later one succeeds, leaving a gap below the Deduper's mark that the replay
            # cannot fill. No compression: with the crc32c wheel, gzip cost ~12 us/record more CPU.
            producer = kafka_util.producer(
                cfg.kafka, client_id="zerocf-ingest", retries=float("inf"), compression_type=None
            )
            consumer.subscribe(list(self._kinds))
            self._partitions = sorted(producer.partitions_for(topics.events))
            log.info(
                "ingest: group %s reading %s -> %s (%d partitions), batch %d",
                cfg.group,
                ", ".join(self._kinds),
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
        watch = IdleWatch(cfg.group, UNTIL_IDLE_STALL_S, NO_ASSIGNMENT_EXIT_S, started=last_data)
        while not self.stop.is_set():
            t0 = time.monotonic()
            polled = consumer.poll(timeout_ms=cfg.poll_timeout_ms, max_records=cfg.ingest_batch)
            now = time.monotonic()
            if polled:
                log.debug("ingest poll: %.3fs", now - t0)
            current = consumer.assignment()
            if current != assignment:
                lost = bool(assignment) and not current
                assignment, last_data = set(current), now
                self._assigned = len(assignment)
                self.metrics.assigned.set(len(assignment))
                log.info("ingest: assigned %d partitions", len(assignment))
                if assignment:  # a rebalance may follow a broker restart: re-check topics and partitions
                    self._refresh_partitions(producer)
                elif lost:  # perhaps a dev broker restart that lost the topics: give consumers theirs back
                    self._ensure_outputs()
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
            elif until_idle and now - last_data >= cfg.idle_seconds and now >= watch.next_check:
                state = self._idle_state(consumer, assignment, watch)
                if state == "done":
                    log.info(
                        "ingest: every partition caught up, idle for %.1fs; exiting (--until-idle)", now - last_data
                    )
                    break
                if state == "failed":
                    break
            if now >= next_summary + SUMMARY_EVERY_S:
                next_summary = now
                log.info("ingest progress: %s", json.dumps(self.stats.summary()))
        self.stats.clean_exit = not self._failing
        if self.stop.is_set():
            log.info("ingest: stopping (%s)", self.stop.reason)

    def _idle_state(self, consumer: Any, assignment: set[Any], watch: IdleWatch) -> str:
        """``--until-idle`` while idle: compare the whole group's committed offsets with the ends."""
        watch.next_check = time.monotonic() + UNTIL_IDLE_CHECK_S
        behind: dict[Any, int | None] | None
        try:
            self._recommit(consumer, assignment)
            behind = kafka_util.group_lag(self.cfg.kafka, self.cfg.group, list(self._kinds))
        except Exception as exc:  # noqa: BLE001 - broker trouble: no verdict this time; the stall clock runs
            log.info("ingest: could not read the group's offsets (%s: %s)", type(exc).__name__, exc)
            behind = None
        state, message = watch.verdict(behind, bool(assignment), time.monotonic())
        if state == "failed":
            stuck = sorted(_tp_name(tp) for tp, n in (behind or {}).items() if tp in assignment and n != 0)
            if stuck:  # lag on a partition of its own that polls do not advance
                message += (
                    f"; {', '.join(stuck[:6])} assigned here but not advancing: a record too large for the consumer "
                    "(over receive_message_max_bytes)?"
                )
            self.stats.unfinished = message
            log.error("ingest --until-idle: %s", message)
        elif behind:
            log.debug("ingest --until-idle: waiting for %s", {_tp_name(tp): n for tp, n in behind.items() if n != 0})
        return state

    def _recommit(self, consumer: Any, assignment: set[Any]) -> None:
        """Commit the position of each assigned partition whose last commit failed (all of it was acknowledged).

        Compares with what this process committed, not ``consumer.committed()``: fetching committed offsets
        through a member while its group rebalances stalled its join on the dev broker.
        """
        positions = {tp: consumer.position(tp) for tp in assignment}
        stale = {tp: pos for tp, pos in positions.items() if self._committed.get(tp, -1) < pos}
        if stale:
            self._commit(consumer, stale)

    # -- one batch ------------------------------------------------------------------------------
    def _batch(self, consumer: Any, producer: Any, polled: Mapping[Any, list[Any]]) -> bool:
        """Produce, await acks and commit one polled batch; False (nothing committed) if a send failed."""
        started = time.monotonic()
        now_ms = int(time.time() * 1000)
        dead: list[_DeadLetter] = []
        produced = started
        try:
            futures, dead, n_in, n_out = self._produce(producer, polled, now_ms)
            produced = time.monotonic()
            ok = self._acknowledged(producer, futures, dead, now_ms)
        except Exception as exc:  # noqa: BLE001 - a send that cannot even be queued (e.g. a partition
            # that vanished when a dev broker restarted, a full buffer): the batch failed, nothing committed
            log.warning("ingest: could not queue the batch (%s: %s)", type(exc).__name__, exc)
            ok, n_in = False, sum(len(r) for r in polled.values())
        acked = time.monotonic()
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
        self._commit(consumer, {tp: records[-1].offset + 1 for tp, records in polled.items()})
        n_lost = sum(d.mode == "lost" for d in dead)
        stats = self.stats
        stats.records_in += n_in
        stats.events_out += n_out
        stats.dlq += len(dead) - n_lost
        stats.dlq_lost += n_lost
        stats.batches += 1
        m = self.metrics
        for tp, records in polled.items():
            m.records_in.labels(self._kinds.get(tp.topic, "other")).inc(len(records))
        m.events_out.inc(n_out)
        for d in dead:
            m.dlq_payload.labels(d.mode).inc()
            if d.mode != "lost":
                m.dlq.labels(reason_class(d.reason)).inc()
        done = time.monotonic()
        m.batch_seconds.observe(done - started)
        log.debug(
            "ingest batch: %d in, %d events, %d dlq; produce %.3fs, acks %.3fs, commit %.3fs",
            n_in,
            n_out,
            len(dead),
            produced - started,
            acked - produced,
            done - acked,
        )
        return True

    def _produce(
        self, producer: Any, polled: Mapping[Any, list[Any]], now_ms: int
    ) -> tuple[list[Any], list[_DeadLetter], int, int]:
        """Queue every event and dead letter of a batch: (event futures, dead letters, records in, events out)."""
        send, events_topic, limit = producer.send, self.cfg.topics.events, self._budget
        cache, parts = self._part_cache, self._partitions
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        futures: list[Any] = []
        append = futures.append
        pack, feedback = self.cfg.events_pack, self._feedback
        by_partition: dict[int, list[bytes]] = {}  # pack > 1: the batch's events per events partition, in order
        dead: list[_DeadLetter] = []
        n_in = n_out = 0
        for tp, records in polled.items():
            topic, partition = tp.topic, tp.partition
            kind = self._kinds[topic]
            n_in += len(records)
            for rec in records:
                try:
                    raw = parse_record(kind, rec.value, now_ms)
                    out = event_records(raw, topic, partition, rec.offset, feedback)
                    big = max((len(k) + len(v) for k, v in out), default=0)
                    if big > limit:  # unreachable with today's field limits; never let it wedge the batch
                        raise InvalidEvent(f"event record is {big} bytes; ingest writes records of at most {limit}")
                except InvalidEvent as exc:
                    dead.append(self._dead_letter(producer, exc.reason, rec, now_ms))
                    continue
                except Exception as exc:  # a bug must not kill the worker: dead-letter the record
                    log.exception("ingest: internal error on %s/%d@%d", topic, partition, rec.offset)
                    reason = f"internal error: {type(exc).__name__}: {exc}"
                    dead.append(self._dead_letter(producer, reason, rec, now_ms))
                    continue
                for key, value in out:
                    p = cache.get(key)
                    if p is None:
                        p = cache[key] = parts[(_murmur2(key) & 0x7FFFFFFF) % len(parts)]
                    if pack == 1:
                        append(send(events_topic, value=value, key=key, partition=p))
                    else:
                        by_partition.setdefault(p, []).append(value)
                n_out += len(out)
        for p, values in by_partition.items():
            for value in pack_json(values, pack, limit):
                append(send(events_topic, value=value, key=None, partition=p))
        return futures, dead, n_in, n_out

    def _ensure_outputs(self) -> None:
        """Re-create ``<p>.events`` and ``<p>.dlq`` if missing: their consumers no longer create topics."""
        topics = self.cfg.topics
        try:
            kafka_util.ensure_topics(
                self.cfg.kafka, {t: self.cfg.events_partitions for t in (topics.events, topics.dlq)}
            )
        except Exception as exc:  # noqa: BLE001 - broker still away: the rebalance that follows re-checks
            log.info("ingest: could not re-check the output topics (%s)", exc)

    def _refresh_partitions(self, producer: Any) -> None:
        """Re-create missing topics and re-read the events topic's partitions (after a failed batch)."""
        topics = self.cfg.topics
        try:
            kafka_util.ensure_topics(
                self.cfg.kafka,
                {t: self.cfg.events_partitions for t in (*self._kinds, topics.events, topics.dlq)},
            )
            producer._metadata.request_update()  # noqa: SLF001 - force fresh metadata, not the cached layout
            parts = producer.partitions_for(topics.events)
            if parts:
                self._partitions = sorted(parts)
                self._part_cache.clear()
        except Exception as exc:  # noqa: BLE001 - still down: the next failed batch retries
            log.info("ingest: topic refresh failed (%s); retrying after the back-off", exc)

    def _dead_letter(
        self,
        producer: Any,
        reason: str,
        record: Any,
        now_ms: int,
        rejected: Payload | None = None,
        error: BaseException | None = None,
    ) -> _DeadLetter:
        """Send the dead letter of ``record`` with as much payload as fits the budget.

        After a size rejection (``error``) of the dead letter sent in mode ``rejected``, the minimal one is sent
        instead; when even that is rejected the record cannot be dead-lettered at all: it is logged and counted
        as ``lost``, and its partition moves on.
        """
        where = f"{record.topic}/{record.partition}@{record.offset}"
        if rejected == "omitted":
            value = record.value
            log.error(
                "ingest: %s cannot be dead-lettered, not even without payload (%s); dropped: reason %r, "
                "value of %s bytes, sha256 %s; raise the DLQ topic's max.message.bytes",
                where,
                error,
                _clip(reason),
                None if value is None else len(value),
                None if value is None else hashlib.sha256(value).hexdigest(),
            )
            return _DeadLetter(record, reason, "lost")
        if rejected is not None:
            log.warning("ingest: dead letter of %s rejected (%s); sending it without payload", where, error)
        key, value, mode = dead_letter(reason, record, now_ms, None if rejected else self._budget)
        log.debug("ingest: dlq %s (%s payload): %s", where, mode, reason)
        try:
            future = producer.send(self.cfg.topics.dlq, key=key, value=value)
        except _size_errors() as exc:
            return self._dead_letter(producer, reason, record, now_ms, mode, exc)
        return _DeadLetter(record, reason, mode, future)

    def _acknowledged(self, producer: Any, futures: list[Any], dead: list[_DeadLetter], now_ms: int) -> bool:
        """Flush; True when every event and dead letter is acknowledged (or, for a dead letter, given up on).

        A dead letter rejected for its size is replaced in ``dead`` by a smaller one (full -> minimal -> lost)
        and waited for; any other failure fails the batch.
        """
        if not _flushed(producer):
            return False
        for fut in futures:
            if not fut.is_done or fut.failed():
                log.warning("ingest: a send failed: %s", fut.exception if fut.is_done else "not completed")
                return False
        while True:  # ends: every pass moves each rejected dead letter one step down full -> minimal -> lost
            resent = False
            for n, d in enumerate(dead):
                fut = d.future
                if fut is None or (fut.is_done and not fut.failed()):
                    continue
                if not fut.is_done or not isinstance(fut.exception, _size_errors()):
                    log.warning("ingest: a dead letter failed: %s", fut.exception if fut.is_done else "not completed")
                    return False
                mode: Payload = "omitted" if d.mode == "omitted" else "complete"
                dead[n] = self._dead_letter(producer, d.reason, d.record, now_ms, mode, fut.exception)
                resent = resent or dead[n].future is not None
            if not resent:
                return True
            if not _flushed(producer):
                return False

    def _commit(self, consumer: Any, offsets: Mapping[Any, int]) -> None:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        try:
            consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})
            self._committed.update(offsets)
        except KafkaError as exc:  # e.g. a rebalance took the partitions: their new owner replays them
            self.stats.commit_failures += 1
            self.metrics.commit_failures.inc()
            log.warning(
                "ingest: commit of %s failed (%s); the records will be replayed and de-duplicated downstream",
                {f"{tp.topic}/{tp.partition}": o for tp, o in offsets.items()},
                exc,
            )


def _flushed(producer: Any) -> bool:
    from kafka.errors import KafkaError

    try:
        producer.flush()
    except KafkaError as exc:
        log.warning("ingest: flush failed: %s", exc)
        return False
    return True


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
    if stats.unfinished:
        return 1  # --until-idle could not get every partition caught up (logged by the loop)
    return 0
