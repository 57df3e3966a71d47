"""``zerocf ingest`` hardening on the real broker (issue 11): poison records, ``--until-idle`` over the whole
group, clear SSL/SASL errors, no topic auto-creation by consumers."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections import Counter
from typing import Any

import pytest

import stream.ingest as ingest_mod
from stream import kafka_util
from stream.config import StreamConfig, load
from stream.events import MAX_MESSAGE_BYTES, encode_click
from stream.ingest import Ingest, IngestStats
from stream.kafka_util import read_topic
from stream.runtime import StopFlag
from tests.helpers import events_of, fresh_group, run_zerocf, wait_until

TS = 1_700_000_000_000
#: Apache Kafka's default ``message.max.bytes``: every dead letter must fit it, whatever the raw record was.
APACHE_DEFAULT_LIMIT = 1_048_588
#: Tansu accepted records of 150 MiB in a probe; kafka-python's consumer cannot receive a fetch response
#: above ``receive_message_max_bytes`` (100 MB), so this is the largest raw record ingest can read at all.
HUGE = 95_000_000
RUN_TIMEOUT_S = 120  # a regression (retry loop, hang) fails here instead of hanging the suite
# the first run's give-up time while the holder sits on its partitions: several of its 1 s lag checks, all
# after its own share is done (300 records: one poll); the production default is 60 s
STALL_S = 4.0


def _cfg(env: dict[str, str], **extra: str) -> StreamConfig:
    return load(StreamConfig, {**env, "ZEROCF_IDLE_SECONDS": "1", "ZEROCF_EVENTS_PARTITIONS": "2", **extra})


def _produce(cfg: StreamConfig, records: list[tuple[str, bytes | None, bytes | None]]) -> list[Any]:
    """Send (kind, key, value) records in order, with client limits raised for huge ones; their metadata."""
    kafka_util.ensure_topics(cfg.kafka, {t: cfg.events_partitions for t in cfg.topics.all()})
    producer = kafka_util.producer(cfg.kafka, client_id="test-raw", max_request_size=HUGE + (4 << 20))
    try:
        futures = [producer.send(getattr(cfg.topics, kind), key=key, value=value) for kind, key, value in records]
        producer.flush()
        return [f.get(timeout=60) for f in futures]
    finally:
        producer.close()


def _run_bounded(ing: Ingest, until_idle: bool = True) -> IngestStats:
    """Run ``ing`` in a thread; fail (after stopping it) if it does not finish within RUN_TIMEOUT_S."""
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("stats", ing.run(until_idle=until_idle)), daemon=True)
    t.start()
    t.join(RUN_TIMEOUT_S)
    if t.is_alive():
        ing.stop.set("test timeout")
        t.join(30)
        pytest.fail(f"ingest did not finish within {RUN_TIMEOUT_S}s: {ing.stats.summary()}")
    return box["stats"]  # type: ignore[no-any-return]


def _poison_stream(n_valid: int) -> tuple[list[tuple[str, bytes | None, bytes | None]], set[int]]:
    """Valid clicks with poison records between them; returns the records and the indices of the poison ones."""
    over = b'{"user_id": "u1", "item_id": "' + b"x" * int(3.3 * (1 << 20)) + b'", "ts": 1700000000000}'
    poison: list[tuple[bytes | None, bytes | None]] = [
        (b"u1", over),  # 3.3 MiB: the reported one (over the 1 MiB message limit)
        (b"u2", b"{" + b"y" * (900 << 10)),  # 0.9 MiB of bad JSON: base64 (1.2 MiB) exceeds Apache's 1 MiB
        (b"u3", b"z" * HUGE),  # as large as the consumer can fetch
        (b"k" * (2 << 20), b"{not json"),  # a 2 MiB key
        (None, b"\xff" * (MAX_MESSAGE_BYTES - 10)),  # just under the message limit, not UTF-8, no key
        (b"u4", b"{oops"),  # an ordinary small one: carried whole
    ]
    records: list[tuple[str, bytes | None, bytes | None]] = []
    bad: set[int] = set()
    step = n_valid // len(poison)
    for i in range(n_valid):
        user = f"u{i % 37}"
        records.append(("clicks", user.encode(), encode_click(user, f"i{i % 11}", TS + i)))
        if i % step == step // 2 and len(bad) < len(poison):
            bad.add(len(records))
            records.append(("clicks", *poison[len(bad) - 1]))
    assert len(bad) == len(poison)
    return records, bad


def _check_dead_letter(d: dict[str, Any], dkey: bytes | None, key: bytes | None, value: bytes | None) -> str:
    """The dead letter describes the original record exactly and carries as much of it as fits; its payload mode."""
    for name, orig in (("key", key), ("value", value)):
        shown = d[f"{name}_b64"]
        if orig is None:
            assert shown is None and d[f"{name}_len"] is None and d[f"{name}_sha256"] is None
            continue
        assert d[f"{name}_len"] == len(orig) and d[f"{name}_sha256"] == hashlib.sha256(orig).hexdigest()
        if shown is not None:
            head = base64.b64decode(shown)
            assert orig.startswith(head)
            if len(head) < len(orig):
                assert d["payload"] == "truncated"
    if d["payload"] == "complete":
        assert base64.b64decode(d["value_b64"] or "") == (value or b"")
    assert dkey == (key if key is None or len(key) <= 1024 else hashlib.sha256(key).hexdigest().encode())
    return str(d["payload"])


def test_poison_records_are_dead_lettered_within_the_broker_limit_and_never_wedge_ingest(
    zerocf_env: dict[str, str],
) -> None:
    cfg = _cfg(zerocf_env)
    records, bad = _poison_stream(400)
    metas = _produce(cfg, records)
    valid = {f"{m.topic}:{m.partition}:{m.offset}:0" for n, m in enumerate(metas) if n not in bad}

    stats = _run_bounded(Ingest(cfg, StopFlag()))

    assert stats.produce_failures == 0 and stats.clean_exit, stats.summary()  # no retry loop
    events = [e.id for e in events_of(read_topic(cfg.kafka, cfg.topics.events, 30))]
    assert not [i for i, c in Counter(events).items() if c > 1]  # each valid event exactly once
    assert set(events) == valid
    dlq = read_topic(cfg.kafka, cfg.topics.dlq, 30)
    assert stats.records_in == len(records) == len(valid) + stats.dlq and stats.dlq == len(bad) == len(dlq)
    by_pos = {(d["topic"], d["partition"], d["offset"]): (r, d) for r in dlq for d in [json.loads(r.value)]}
    modes = []
    for n in sorted(bad):
        _kind, key, value = records[n]
        rec, d = by_pos[(metas[n].topic, metas[n].partition, metas[n].offset)]
        # a batch of this one record (61 bytes of batch header, ~20 of record header) fits a default Kafka
        assert len(rec.value) + len(rec.key or b"") + 128 <= APACHE_DEFAULT_LIMIT
        modes.append(_check_dead_letter(d, rec.key, key, value))
        assert d["reason"]
    assert modes == ["truncated"] * 5 + ["complete"]
    assert json.loads(dlq[0].value).keys() >= {"reason", "topic", "partition", "offset", "key_b64", "value_b64", "ts"}


def test_a_dead_letter_the_producer_rejects_becomes_a_minimal_one(
    zerocf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the limit ingest assumed is above what the client/broker take, the record is still accounted for."""
    cfg = _cfg(zerocf_env)
    over = b"{" + b"q" * (3 << 20)  # its base64 (4 MiB) exceeds the producer's max_request_size
    records = [("clicks", b"u1", encode_click("u1", "i1", TS)), ("clicks", b"u1", over)]
    records += [("clicks", b"u2", encode_click("u2", f"i{i}", TS + i)) for i in range(20)]
    metas = _produce(cfg, records)
    monkeypatch.setattr(ingest_mod, "dead_letter_budget", lambda *_limits: 64 << 20)

    ing = Ingest(cfg, StopFlag())
    stats = _run_bounded(ing)

    assert stats.produce_failures == 0 and stats.dlq == 1 and stats.events_out == len(records) - 1
    [rec] = read_topic(cfg.kafka, cfg.topics.dlq, 30)
    d = json.loads(rec.value)
    assert (d["topic"], d["partition"], d["offset"]) == (metas[1].topic, metas[1].partition, metas[1].offset)
    assert d["payload"] == "omitted" and d["value_b64"] is None and d["key_b64"] is None
    assert d["value_len"] == len(over) and d["value_sha256"] == hashlib.sha256(over).hexdigest()
    assert d["reason"].startswith("message is")
    reg = ing.metrics.registry
    assert reg.get_sample_value("zerocf_ingest_dlq_payload_total", {"payload": "omitted"}) == 1
    assert len({e.id for e in events_of(read_topic(cfg.kafka, cfg.topics.events, 30))}) == 21


def _hold_partitions(cfg: StreamConfig, stop: threading.Event, ready: threading.Event) -> None:
    """A live member of ingest's group that keeps its share of the raw partitions and never commits."""
    member = kafka_util.consumer(cfg.kafka, group_id=cfg.group, client_id="test-holder")
    try:
        member.subscribe([cfg.topics.impressions, cfg.topics.clicks])
        while not stop.is_set():
            member.poll(timeout_ms=100)
            if member.assignment():
                ready.set()
    finally:
        member.close(autocommit=False)  # leaves the group: its partitions go to the others


def test_until_idle_exits_0_only_when_every_partition_of_the_group_is_caught_up(
    zerocf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(zerocf_env, ZEROCF_INGEST_GROUP=fresh_group("idle"))
    records: list[tuple[str, bytes | None, bytes | None]] = [
        ("clicks", f"u{i}".encode(), encode_click(f"u{i}", f"i{i % 7}", TS + i)) for i in range(300)
    ]
    metas = _produce(cfg, records)
    expected = {f"{m.topic}:{m.partition}:{m.offset}:0" for m in metas}
    assert len({m.partition for m in metas}) == cfg.events_partitions  # every partition has records

    stop, ready = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold_partitions, args=(cfg, stop, ready), daemon=True)
    holder.start()
    try:
        assert ready.wait(60), "the holding member never got an assignment"
        monkeypatch.setattr(ingest_mod, "UNTIL_IDLE_STALL_S", STALL_S)
        ing = Ingest(cfg, StopFlag())
        stats = _run_bounded(ing)
        events = {e.id for e in events_of(read_topic(cfg.kafka, cfg.topics.events, 30))}
        assert ing.stats.unfinished, f"--until-idle ended as done with {len(events)} of {len(expected)} events"
        assert "without progress" in stats.unfinished and cfg.group in stats.unfinished
        assert events < expected  # it did its own share, and the held one is still to do

        # a second run joins while the holder is still there; once the holder leaves it gets every partition
        monkeypatch.setattr(ingest_mod, "UNTIL_IDLE_STALL_S", 60.0)
        second = Ingest(cfg, StopFlag())
        box: dict[str, IngestStats] = {}
        run = threading.Thread(target=lambda: box.setdefault("stats", second.run(until_idle=True)), daemon=True)
        run.start()
        wait_until("the second run is assigned partitions", lambda: second.health()[1]["assigned_partitions"] > 0, 60)
    finally:
        stop.set()
        holder.join(30)
    run.join(RUN_TIMEOUT_S)
    if run.is_alive():
        second.stop.set("test timeout")
        run.join(30)
        pytest.fail(f"the second run did not finish: {second.stats.summary()}")
    assert box["stats"].unfinished == "" and box["stats"].clean_exit
    ids = [e.id for e in events_of(read_topic(cfg.kafka, cfg.topics.events, 30))]
    assert set(ids) == expected and len(ids) == len(expected)  # no partition done twice, none missing


def _topics(cfg: StreamConfig) -> set[str]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**cfg.kafka.client_kwargs(), client_id="test-admin")
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_consumers_never_auto_create_topics(zerocf_env: dict[str, str]) -> None:
    """A consumer subscribed to (or looking up) a topic that does not exist must not create it."""
    cfg = _cfg(zerocf_env)
    missing, looked_up = cfg.topics.events, cfg.topics.dlq
    member = kafka_util.consumer(cfg.kafka, group_id=fresh_group("nocreate"), client_id="test-nocreate")
    try:
        member.subscribe([missing])
        for _ in range(10):
            member.poll(timeout_ms=200)
        member.partitions_for_topic(looked_up)
    finally:
        member.close(autocommit=False)
    assert not {missing, looked_up} & _topics(cfg)


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"ZEROCF_KAFKA_SECURITY_PROTOCOL": "SSL"}, "did not complete a TLS handshake"),
        (
            {
                "ZEROCF_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "ZEROCF_KAFKA_SASL_MECHANISM": "PLAIN",
                "ZEROCF_KAFKA_SASL_USERNAME": "app",
                "ZEROCF_KAFKA_SASL_PASSWORD": "secret",
            },
            "no SASL mechanism enabled",
        ),
    ],
    ids=["ssl-to-plaintext", "sasl-to-plaintext"],
)
def test_a_security_protocol_mismatch_fails_fast_naming_the_setting(
    zerocf_env: dict[str, str], settings: dict[str, str], says: str
) -> None:
    """The broker here is plaintext without SASL; a client configured for TLS or SASL is told so (rc 2)."""
    done = run_zerocf({**zerocf_env, **settings}, "ingest", "--until-idle", timeout=90, check=False)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr[-2000:]
    assert says in last and "ZEROCF_KAFKA_SECURITY_PROTOCOL" in last, last
    assert "secret" not in done.stderr
