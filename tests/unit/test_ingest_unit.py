"""Ingest loop logic on in-process fakes of the Kafka clients (the real broker is in tests/integration)."""

from __future__ import annotations

import dataclasses
import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import MessageSizeTooLargeError
from kafka.partitioner.default import DefaultPartitioner
from kafka.structs import OffsetAndMetadata, TopicPartition

import stream.ingest as ingest
from stream import kafka_util
from stream.config import StreamConfig, load
from stream.events import Event, decode_events, encode_click, encode_impression
from stream.runtime import StopFlag

TS = 1_700_000_000_000
PREFIX = "u1t"
CLICKS, IMPS, EVENTS, DLQ = (f"{PREFIX}.{k}" for k in ("clicks", "impressions", "events", "dlq"))


def _rec(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> Any:
    return ConsumerRecord(
        topic, partition, -1, offset, TS, 0, key, value, [], None, len(key or b""), len(value or b""), -1
    )


class FakeFuture:
    def __init__(self, error: Exception | None) -> None:
        self.is_done, self.exception = True, error

    def failed(self) -> bool:
        return self.exception is not None


@dataclass
class FakeProducer:
    """Records sends; the first ``fail_sends`` sends fail (like a batch that exhausted its retries)."""

    fail_sends: int = 0
    dlq_limit: int | None = None  # dead letters above this many bytes are rejected like a broker's size check
    sent: list[tuple[str, bytes | None, bytes, int | None]] = field(default_factory=list)
    flushes: int = 0
    closed: bool = False

    def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2, 3}

    def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> FakeFuture:
        self.sent.append((topic, key, value, partition))
        if self.fail_sends > 0:
            self.fail_sends -= 1
            return FakeFuture(RuntimeError("NotLeaderForPartition after retries"))
        if topic == DLQ and self.dlq_limit is not None and len(value) > self.dlq_limit:
            return FakeFuture(MessageSizeTooLargeError(f"{len(value)} bytes"))
        return FakeFuture(None)

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


class FakeConsumer:
    """A group consumer over an in-memory log; poll hands out records from each position, seek moves back."""

    def __init__(self, log: dict[TopicPartition, list[Any]], stop_after_polls: tuple[StopFlag, int] | None = None):
        self.log = log
        self.pos = {tp: 0 for tp in log}
        self.commits: list[dict[TopicPartition, int]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.polls = 0
        self.stop_after_polls = stop_after_polls
        self.closed = False
        self.foreign_lag: dict[TopicPartition, int | None] = {}  # partitions another member holds

    def subscribe(self, topics: list[str]) -> None:
        assert sorted(topics) == sorted([CLICKS, IMPS, f"{PREFIX}.erasures"])

    def assignment(self) -> set[TopicPartition]:
        return set(self.log)

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        self.polls += 1
        if self.stop_after_polls and self.polls == self.stop_after_polls[1]:
            self.stop_after_polls[0].set("test")  # a signal arriving while the batch is fetched
        out: dict[TopicPartition, list[Any]] = {}
        for tp in sorted(self.log):
            take = self.log[tp][self.pos[tp] : self.pos[tp] + max_records - sum(map(len, out.values()))]
            if take:
                out[tp] = take
                self.pos[tp] += len(take)
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))
        self.pos[tp] = offset

    def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.commits.append({tp: om.offset for tp, om in offsets.items()})

    def committed(self, tp: TopicPartition) -> int | None:
        done = [c[tp] for c in self.commits if tp in c]
        return done[-1] if done else None

    def group_lag(self) -> dict[TopicPartition, int | None]:
        """What :func:`kafka_util.group_lag` reports: every partition's records beyond the group's commit."""
        return {**self.foreign_lag, **{tp: len(recs) - (self.committed(tp) or 0) for tp, recs in self.log.items()}}

    def highwater(self, tp: TopicPartition) -> int | None:
        return len(self.log[tp]) or None

    def position(self, tp: TopicPartition) -> int:
        return self.pos[tp]

    def close(self, autocommit: bool = True) -> None:
        assert autocommit is False
        self.closed = True


@pytest.fixture()
def cfg() -> StreamConfig:
    return load(
        StreamConfig,
        {
            "ZEROCF_TOPIC_PREFIX": PREFIX,
            "ZEROCF_KAFKA_BOOTSTRAP": "127.0.0.1:1",
            "ZEROCF_IDLE_SECONDS": "0.05",
            "ZEROCF_POLL_TIMEOUT_MS": "1",
            "ZEROCF_INGEST_BATCH": "4",
        },
    )


@pytest.fixture()
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Patch topic creation and client construction; fill ``fakes['consumer']``/``['producer']`` first."""
    box: dict[str, Any] = {"topics": None}
    monkeypatch.setattr(ingest.kafka_util, "ensure_topics", lambda s, t: box.__setitem__("topics", dict(t)))
    monkeypatch.setattr(ingest.kafka_util, "consumer", lambda s, **kw: box["consumer"])
    monkeypatch.setattr(ingest.kafka_util, "producer", lambda s, **kw: box["producer"])
    monkeypatch.setattr(ingest.kafka_util, "group_lag", lambda s, group, topics: box["consumer"].group_lag())
    yield box


def _log() -> dict[TopicPartition, list[Any]]:
    c0, c1, i0 = TopicPartition(CLICKS, 0), TopicPartition(CLICKS, 1), TopicPartition(IMPS, 0)
    return {
        c0: [_rec(CLICKS, 0, o, f"u{o}".encode(), encode_click(f"u{o}", f"i{o}", TS)) for o in range(5)],
        c1: [
            _rec(CLICKS, 1, 0, b"u9", b"{oops"),
            _rec(CLICKS, 1, 1, None, None),
            _rec(CLICKS, 1, 2, b"u9", encode_click("u9", "i9", TS, count=2)),
        ],
        i0: [_rec(IMPS, 0, 0, b"u1", encode_impression("m1", "u1", ["a", "b", "c"], TS))],
    }


def test_routes_events_by_user_hash_dead_letters_and_commits_last_plus_one(
    cfg: StreamConfig, fakes: dict[str, Any]
) -> None:
    log = _log()
    fakes["consumer"], fakes["producer"] = FakeConsumer(log), FakeProducer()
    stats = ingest.Ingest(cfg).run(until_idle=True)

    assert fakes["topics"] == {t: cfg.events_partitions for t in (IMPS, CLICKS, EVENTS, DLQ, f"{PREFIX}.erasures")}
    sent = fakes["producer"].sent
    records = [(key, value, part) for topic, key, value, part in sent if topic == EVENTS]
    assert len(records) < 9 and all(key is None and value[:1] == b"[" for key, value, _ in records)  # packs
    events = [(ev.key, ev, part) for _, value, part in records for ev in decode_events(value)[0]]
    assert sorted(e.id for _, e, _ in events) == sorted(
        [f"{CLICKS}:0:{o}:0" for o in range(5)] + [f"{CLICKS}:1:2:0"] + [f"{IMPS}:0:0:{i}" for i in range(3)]
    )
    partitioner = DefaultPartitioner()
    cluster = type(
        "C",
        (),
        {
            "topics": lambda self: {EVENTS},
            "partitions_for_topic": lambda self, t: {0, 1, 2, 3},
            "available_partitions_for_topic": lambda self, t: {0, 1, 2, 3},
        },
    )()
    for key, ev, part in events:
        assert key == ev.key and part == partitioner.partition(EVENTS, key, key, None, None, cluster)

    dlq = [(key, json.loads(value)) for topic, key, value, _ in sent if topic == DLQ]
    assert [(k, d["offset"], d["reason"].split(" ")[0]) for k, d in dlq] == [
        (b"u9", 0, "message"),
        (None, 1, "message"),
    ]
    assert dlq[1][1]["key_b64"] is None and dlq[1][1]["value_b64"] is None

    final: dict[TopicPartition, int] = {}
    for c in fakes["consumer"].commits:
        final.update(c)
    assert final == {tp: len(recs) for tp, recs in log.items()}  # last offset + 1 per partition
    assert stats.records_in == 9 and stats.events_out == 9 and stats.dlq == 2 and stats.clean_exit
    assert fakes["consumer"].closed and fakes["producer"].closed

    ing = ingest.Ingest(cfg)  # the same run again, looking at the Prometheus metrics
    fakes["consumer"], fakes["producer"] = FakeConsumer(_log()), FakeProducer()
    ing.run(until_idle=True)
    reg = ing.metrics.registry
    assert reg.get_sample_value("zerocf_ingest_events_out_total") == 9
    assert reg.get_sample_value("zerocf_ingest_records_in_total", {"kind": "clicks"}) == 8
    assert reg.get_sample_value("zerocf_ingest_dlq_total", {"reason_class": "message"}) == 2
    assert reg.get_sample_value("zerocf_ingest_batch_seconds_count") == ing.stats.batches


def test_pack_1_writes_one_event_per_record_keyed_by_user_and_packs_keep_stream_order(
    cfg: StreamConfig, fakes: dict[str, Any]
) -> None:
    by_pack = {}
    for pack in (1, 2):
        fakes["consumer"], fakes["producer"] = FakeConsumer(_log()), FakeProducer()
        ingest.Ingest(dataclasses.replace(cfg, events_pack=pack)).run(until_idle=True)
        by_pack[pack] = [(k, v, p) for t, k, v, p in fakes["producer"].sent if t == EVENTS]
    single = [(k, Event.from_json(v), p) for k, v, p in by_pack[1]]
    assert len(single) == 9 and all(k == e.key for k, e, _ in single)  # the layout before packs
    packed = [(e, p) for _k, v, p in by_pack[2] for e in decode_events(v)[0]]
    assert all(len(decode_events(v)[0]) <= 2 for _k, v, _p in by_pack[2])
    for part in range(cfg.events_partitions):  # per partition: the same events in the same order
        assert [e for e, p in packed if p == part] == [e for _k, e, p in single if p == part]


def test_failed_send_commits_nothing_seeks_back_and_reprocesses(cfg: StreamConfig, fakes: dict[str, Any]) -> None:
    log = {TopicPartition(CLICKS, 0): _log()[TopicPartition(CLICKS, 0)]}
    fakes["consumer"], fakes["producer"] = FakeConsumer(log), FakeProducer(fail_sends=1)
    stats = ingest.Ingest(cfg).run(until_idle=True)

    consumer, producer = fakes["consumer"], fakes["producer"]
    assert consumer.seeks == [(TopicPartition(CLICKS, 0), 0)]
    assert consumer.commits == [{TopicPartition(CLICKS, 0): 4}, {TopicPartition(CLICKS, 0): 5}]
    ids = [e.id for _, _, v, _ in producer.sent for e in decode_events(v)[0]]
    # the batch was produced again (in packs per events partition, so in partition order)
    assert sorted(ids[:4]) == sorted(ids[4:8]) == [f"{CLICKS}:0:{o}:0" for o in range(4)]
    assert stats.produce_failures == 1 and stats.records_in == 5 and stats.clean_exit


def test_internal_error_on_one_record_goes_to_dlq(
    cfg: StreamConfig, fakes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ingest.event_records

    def buggy(raw: Any, topic: str, partition: int, offset: int, feedback: Any) -> Any:
        if offset == 1:
            raise ZeroDivisionError("division by zero")
        return real(raw, topic, partition, offset, feedback)

    monkeypatch.setattr(ingest, "event_records", buggy)
    fakes["consumer"] = FakeConsumer({TopicPartition(CLICKS, 0): _log()[TopicPartition(CLICKS, 0)]})
    fakes["producer"] = FakeProducer()
    stats = ingest.Ingest(cfg).run(until_idle=True)
    dlq = [json.loads(v) for t, _, v, _ in fakes["producer"].sent if t == DLQ]
    assert [(d["offset"], d["reason"]) for d in dlq] == [(1, "internal error: ZeroDivisionError: division by zero")]
    assert stats.events_out == 4 and stats.dlq == 1 and fakes["consumer"].commits[-1] == {TopicPartition(CLICKS, 0): 5}


@pytest.mark.parametrize(("dlq_limit", "mode"), [(1000, "omitted"), (10, "lost")])
def test_dead_letter_rejected_for_size_is_resent_smaller_or_counted_and_never_blocks(
    cfg: StreamConfig, fakes: dict[str, Any], dlq_limit: int, mode: str
) -> None:
    """The broker refuses the dead letter (then its minimal form too): the partition is committed all the same."""
    tp = TopicPartition(CLICKS, 0)
    log = {tp: [_rec(CLICKS, 0, 0, b"u1", b"{" + b"x" * 5000), _rec(CLICKS, 0, 1, b"u1", encode_click("u1", "i", TS))]}
    fakes["consumer"], fakes["producer"] = FakeConsumer(log), FakeProducer(dlq_limit=dlq_limit)
    ing = ingest.Ingest(cfg)
    stats = ing.run(until_idle=True)

    dlq = [json.loads(v) for t, _, v, _ in fakes["producer"].sent if t == DLQ]
    assert [d["payload"] for d in dlq] == ["complete", "omitted"]  # the full one, then the minimal one
    assert dlq[1]["value_b64"] is None and dlq[1]["value_len"] == 5001 and dlq[1]["offset"] == 0
    assert fakes["consumer"].commits[-1] == {tp: 2} and stats.produce_failures == 0 and stats.events_out == 1
    assert (stats.dlq, stats.dlq_lost) == ((1, 0) if mode == "omitted" else (0, 1))
    assert stats.records_in == stats.events_out + stats.dlq + stats.dlq_lost
    assert ing.metrics.registry.get_sample_value("zerocf_ingest_dlq_payload_total", {"payload": mode}) == 1


def test_an_event_record_over_the_budget_is_dead_lettered_not_sent(cfg: StreamConfig, fakes: dict[str, Any]) -> None:
    tp = TopicPartition(IMPS, 0)
    items = [f"item-{n:03d}" for n in range(40)]
    log = {tp: [_rec(IMPS, 0, 0, b"u1", encode_impression("m1", "u1", items, TS))]}
    fakes["consumer"], fakes["producer"] = FakeConsumer(log), FakeProducer()
    ing = ingest.Ingest(cfg)
    ing._budget = 150  # noqa: SLF001 - today's field limits keep real events far below any record limit
    stats = ing.run(until_idle=True)

    [(topic, _key, value, _part)] = fakes["producer"].sent
    assert topic == DLQ and json.loads(value)["reason"].startswith("event record is ")
    assert stats.events_out == 0 and stats.dlq == 1 and fakes["consumer"].commits == [{tp: 1}]


def test_a_smaller_broker_limit_shrinks_the_dead_letter_budget(cfg: StreamConfig, fakes: dict[str, Any]) -> None:
    """``ZEROCF_MESSAGE_MAX_BYTES``: a broker (or topic) with a lower ``message.max.bytes`` than Kafka's default."""
    small = dataclasses.replace(cfg, message_max_bytes=65_536)
    tp = TopicPartition(CLICKS, 0)
    log = {tp: [_rec(CLICKS, 0, 0, b"u1", b"x" * 200_000)]}  # invalid (not JSON), 200 kB
    fakes["consumer"], fakes["producer"] = FakeConsumer(log), FakeProducer()
    stats = ingest.Ingest(small).run(until_idle=True)

    [(topic, key, value, _part)] = fakes["producer"].sent
    dlq = json.loads(value)
    assert topic == DLQ and dlq["payload"] == "truncated" and dlq["value_len"] == 200_000
    assert len(value) + len(key or b"") <= 65_536 - ingest.RECORD_OVERHEAD
    assert stats.dlq == 1 and fakes["consumer"].commits == [{tp: 1}]


def test_stop_finishes_and_commits_the_current_batch(cfg: StreamConfig, fakes: dict[str, Any]) -> None:
    stop = StopFlag()
    fakes["consumer"] = FakeConsumer({TopicPartition(CLICKS, 0): _log()[TopicPartition(CLICKS, 0)]}, (stop, 1))
    fakes["producer"] = FakeProducer()
    stats = ingest.Ingest(cfg, stop).run()  # no --until-idle: only the stop ends it
    assert fakes["consumer"].polls == 1 and fakes["consumer"].commits == [{TopicPartition(CLICKS, 0): 4}]
    assert stats.records_in == 4 and stats.clean_exit


def test_stop_while_sends_fail_is_not_a_clean_exit(cfg: StreamConfig, fakes: dict[str, Any]) -> None:
    stop = StopFlag()
    fakes["consumer"] = FakeConsumer({TopicPartition(CLICKS, 0): _log()[TopicPartition(CLICKS, 0)]}, (stop, 1))
    fakes["producer"] = FakeProducer(fail_sends=100)
    stats = ingest.Ingest(cfg, stop).run()
    assert fakes["consumer"].commits == [] and not stats.clean_exit and stats.records_in == 0


def test_until_idle_ends_on_empty_topics(cfg: StreamConfig, fakes: dict[str, Any]) -> None:
    fakes["consumer"] = FakeConsumer({TopicPartition(CLICKS, 0): [], TopicPartition(IMPS, 0): []})
    fakes["producer"] = FakeProducer()
    stats = ingest.Ingest(cfg).run(until_idle=True)
    assert stats.records_in == 0 and stats.clean_exit and fakes["consumer"].polls > 1


@pytest.fixture()
def quick_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "UNTIL_IDLE_CHECK_S", 0.01)
    monkeypatch.setattr(ingest, "UNTIL_IDLE_STALL_S", 0.3)
    monkeypatch.setattr(ingest, "NO_ASSIGNMENT_EXIT_S", 0.5)


def test_until_idle_waits_for_partitions_held_by_another_member_then_gives_up(
    cfg: StreamConfig, fakes: dict[str, Any], quick_idle: None
) -> None:
    tp = TopicPartition(CLICKS, 0)
    fakes["consumer"], fakes["producer"] = FakeConsumer({tp: _log()[tp]}), FakeProducer()
    fakes["consumer"].foreign_lag = {TopicPartition(CLICKS, 1): 7, TopicPartition(IMPS, 0): None}
    stats = ingest.Ingest(cfg).run(until_idle=True)

    assert fakes["consumer"].commits[-1] == {tp: 5} and stats.events_out == 5  # its own share is done
    assert "without progress" in stats.unfinished and f"{CLICKS}/1: 7 records" in stats.unfinished
    assert f"{IMPS}/0: end unknown" in stats.unfinished and stats.clean_exit


def test_until_idle_keeps_waiting_while_the_lag_moves(
    cfg: StreamConfig, fakes: dict[str, Any], quick_idle: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another member working through its share is progress: wait for it, then exit 0."""
    tp, other = TopicPartition(CLICKS, 0), TopicPartition(CLICKS, 1)
    fakes["consumer"], fakes["producer"] = FakeConsumer({tp: _log()[tp]}), FakeProducer()
    left = iter([40, 30, 30, 20, 20, 10, 10, 0])
    real = fakes["consumer"].group_lag
    fakes["consumer"].group_lag = lambda: {**real(), other: next(left, 0)}
    monkeypatch.setattr(ingest, "UNTIL_IDLE_STALL_S", 0.05)  # below two checks: only moving lag keeps it waiting
    monkeypatch.setattr(ingest, "UNTIL_IDLE_CHECK_S", 0.03)
    stats = ingest.Ingest(cfg).run(until_idle=True)
    assert stats.unfinished == "" and next(left, None) is None


@pytest.mark.parametrize(("foreign", "unfinished"), [({}, ""), ({TopicPartition(CLICKS, 3): 2}, "no partition")])
def test_until_idle_with_nothing_assigned_ends_by_the_group_lag(
    cfg: StreamConfig,
    fakes: dict[str, Any],
    quick_idle: None,
    monkeypatch: pytest.MonkeyPatch,
    foreign: dict[Any, int],
    unfinished: str,
) -> None:
    fakes["consumer"], fakes["producer"] = FakeConsumer({}), FakeProducer()
    fakes["consumer"].foreign_lag = foreign
    monkeypatch.setattr(ingest, "UNTIL_IDLE_STALL_S", 60.0)  # the no-assignment bound must end it, not the stall
    stats = ingest.Ingest(cfg).run(until_idle=True)
    assert stats.unfinished.startswith(unfinished) and stats.records_in == 0


def test_caught_up_waits_for_lagging_partitions() -> None:
    log = _log()
    consumer = FakeConsumer(log)
    assert not kafka_util.caught_up(consumer, unknown_is_done=True)  # positions 0, watermarks > 0
    for tp in log:
        consumer.seek(tp, len(log[tp]))
    assert kafka_util.caught_up(consumer, unknown_is_done=True)


def test_health_needs_assignment_and_a_reachable_broker(cfg: StreamConfig) -> None:
    ing = ingest.Ingest(cfg)
    ok, detail = ing.health()
    assert not ok and detail["assigned_partitions"] == 0 and detail["broker_reachable"] is False


@pytest.mark.parametrize(
    "reason, cls",
    [
        ("item_ids[3] 'x' contains a control character", "item_ids"),
        ("message is not valid JSON", "message"),
        ("internal error: KeyError: 'x'", "internal"),
        ("Something new", "other"),
    ],
)
def test_reason_class_is_bounded(reason: str, cls: str) -> None:
    assert ingest.reason_class(reason) == cls


def test_cli_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.cli import build_parser

    seen: dict[str, Any] = {}

    class FakeIngest:
        def __init__(self, cfg: StreamConfig, stop: StopFlag) -> None:
            seen["cfg"] = cfg

        def run(self, until_idle: bool) -> ingest.IngestStats:
            seen["until_idle"] = until_idle
            return ingest.IngestStats()

    monkeypatch.setattr(ingest, "Ingest", FakeIngest)
    args = build_parser().parse_args(
        [
            "ingest",
            "--until-idle",
            "--group",
            "g2",
            "--batch",
            "7",
            "--events-partitions",
            "3",
            "--metrics-port",
            "9123",
        ]
    )
    args.env = {"ZEROCF_INGEST_BATCH": "99", "ZEROCF_TOPIC_PREFIX": "shop"}
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert args.func(args) == 0
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    c = seen["cfg"]
    assert (c.group, c.ingest_batch, c.events_partitions, c.runtime.metrics_port, c.topic_prefix) == (
        "g2",
        7,
        3,
        9123,
        "shop",
    ) and seen["until_idle"] is True


def test_busy_metrics_port_is_a_config_error(cfg: StreamConfig, fakes: dict[str, Any]) -> None:
    import dataclasses
    import socket

    from stream.errors import ConfigError

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, metrics_port=port))
        fakes["consumer"], fakes["producer"] = FakeConsumer({}), FakeProducer()
        with pytest.raises(ConfigError, match=f"{port}.*pick a free port.*--metrics-port"):
            ingest.Ingest(cfg).run(until_idle=True)


def test_until_idle_that_gave_up_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.cli import build_parser

    class GaveUp:
        def __init__(self, cfg: StreamConfig, stop: StopFlag) -> None:
            pass

        def run(self, until_idle: bool) -> ingest.IngestStats:
            return ingest.IngestStats(unfinished="2 partitions of group g still behind")

    monkeypatch.setattr(ingest, "Ingest", GaveUp)
    args = build_parser().parse_args(["ingest", "--until-idle"])
    args.env = {}
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert args.func(args) == 1
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
