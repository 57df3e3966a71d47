"""``zerocf ingest`` on the real broker: routing, DLQ, crash replay + Deduper, warm stop."""

from __future__ import annotations

import base64
import json
import logging
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import pytest

from stream import kafka_util
from stream.config import StreamConfig, load
from stream.dedupe import Deduper
from stream.devstack import free_port
from stream.events import encode_click, encode_impression
from stream.ingest import Ingest
from stream.kafka_util import read_topic
from tests.helpers import events_of, finish_zerocf, prestart_zerocf, record_events, stop_process

log = logging.getLogger(__name__)
TS = 1_700_000_000_000


def _cfg(env: dict[str, str]) -> StreamConfig:
    return load(StreamConfig, {**env, "ZEROCF_IDLE_SECONDS": "1"})


def _produce(cfg: StreamConfig, records: list[tuple[str, bytes | None, bytes | None]]) -> list[Any]:
    """Send (kind, key, value) records; returns their RecordMetadata (topic, partition, offset)."""
    kafka_util.ensure_topics(
        cfg.kafka, {cfg.topics.clicks: cfg.events_partitions, cfg.topics.impressions: cfg.events_partitions}
    )
    producer = kafka_util.producer(cfg.kafka, client_id="test-raw")
    try:
        futures = [producer.send(getattr(cfg.topics, kind), key=key, value=value) for kind, key, value in records]
        producer.flush()
        return [f.get(timeout=10) for f in futures]
    finally:
        producer.close()


def _ingest_cmd(*flags: str) -> list[str]:
    return [sys.executable, "-m", "workers.cli", "ingest", *flags]


def _prestart_until_idle(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``zerocf ingest --until-idle`` started ahead (imports done while the test runs), output captured; it runs
    when :func:`tests.helpers.finish_zerocf` releases it."""
    return prestart_zerocf(env, subprocess.PIPE, "ingest", "--until-idle", stdout=subprocess.PIPE)


def _expected_ids(
    records: list[tuple[str, bytes | None, bytes | None]], metas: list[Any], items_per_imp: int
) -> set[str]:
    out = set()
    for (kind, _k, _v), m in zip(records, metas):
        n = 1 if kind == "clicks" else items_per_imp
        out.update(f"{m.topic}:{m.partition}:{m.offset}:{i}" for i in range(n))
    return out


def _wait_for_events(cfg: StreamConfig, at_least: int, timeout: float) -> int:
    """Count events on <p>.events (no group) until at least ``at_least`` are there."""
    from kafka.structs import TopicPartition

    consumer = kafka_util.consumer(cfg.kafka, group_id=None, client_id="test-watch")
    try:
        deadline = time.monotonic() + timeout
        parts = None
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(cfg.topics.events)
            time.sleep(0.05)
        assert parts, "ingest never created the events topic"
        consumer.assign([TopicPartition(cfg.topics.events, p) for p in parts])
        seen = 0
        while seen < at_least and time.monotonic() < deadline:
            seen += sum(len(record_events(r)) for recs in consumer.poll(timeout_ms=100).values() for r in recs)
        return seen
    finally:
        consumer.close()


def _get_until_ok(url: str, timeout: float) -> dict[str, Any]:
    """GET a JSON health endpoint until it answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _dedupe(events: list[Any]) -> tuple[list[str], list[str]]:
    """(accepted ids, dropped ids) running one Deduper per events partition, as a consumer would."""
    dedupers: dict[int, Deduper] = {}
    accepted, dropped = [], []
    for rec in events:
        for ev in record_events(rec):
            assert rec.key in (None, ev.key)  # a pack has no key; a single event is keyed by its user
            (accepted if dedupers.setdefault(rec.partition, Deduper()).accept(ev) else dropped).append(ev.id)
    return accepted, dropped


def test_mixed_stream_routes_valid_events_and_dead_letters_the_rest(
    zerocf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(zerocf_env)
    valid = [
        ("clicks", b"u1", encode_click("u1", "i1", TS, impression_id="m1", count=3)),
        ("impressions", b"u1", encode_impression("m1", "u1", ["i1", "i2", "i3"], TS)),
        ("clicks", b"u2", encode_click("u2", 42, "2023-11-14T22:13:20Z")),
    ]
    invalid = [
        ("clicks", b"u3", b"{not json", "message"),
        ("clicks", b"u3", encode_click("u3", "i1", 1_000), "ts"),
        ("impressions", b"u4", encode_impression("m2", "u4", [], TS), "item_ids"),
        ("clicks", None, json.dumps({"item_id": "i", "ts": TS}).encode(), "user_id"),
        ("clicks", b"u5", b'{"boom": 1}', "internal error"),
    ]
    records = valid + [(k, key, v) for k, key, v, _ in invalid]
    metas = _produce(cfg, records)

    import stream.ingest as ingest_mod

    real_parse = ingest_mod.parse_record

    def buggy_parse(kind: Any, value: bytes, now_ms: int) -> Any:  # a parser bug on one record
        if value == b'{"boom": 1}':
            raise KeyError("boom")
        return real_parse(kind, value, now_ms)

    monkeypatch.setattr(ingest_mod, "parse_record", buggy_parse)
    stats = Ingest(cfg).run(until_idle=True)

    events = events_of(read_topic(cfg.kafka, cfg.topics.events, 20))
    by_id = {e.id: e for e in events}
    assert len(by_id) == len(events) == 1 + 3 + 1
    click = by_id[f"{metas[0].topic}:{metas[0].partition}:{metas[0].offset}:0"]
    assert (click.type, click.user, click.item, click.ts, click.weight, click.pos, click.imp) == (
        "click",
        "u1",
        "i1",
        TS,
        3.0,
        None,
        "m1",
    )
    m = metas[1]
    shown = [by_id[f"{m.topic}:{m.partition}:{m.offset}:{i}"] for i in range(3)]
    assert [(e.item, e.pos, e.weight, e.imp, e.src) for e in shown] == [
        (f"i{i + 1}", i, 0.0, "m1", f"{m.topic}/{m.partition}/{m.offset}") for i in range(3)
    ]
    iso = by_id[f"{metas[2].topic}:{metas[2].partition}:{metas[2].offset}:0"]
    assert (iso.user, iso.item, iso.ts) == ("u2", "42", TS)

    dlq = [(r.key, json.loads(r.value)) for r in read_topic(cfg.kafka, cfg.topics.dlq, 20)]
    assert len(dlq) == len(invalid)
    by_offset = {(d["topic"], d["partition"], d["offset"]): (key, d) for key, d in dlq}
    for (_kind, key, value, reason), meta in zip(invalid, metas[len(valid) :]):
        dkey, d = by_offset[(meta.topic, meta.partition, meta.offset)]
        assert dkey == key and d["reason"].startswith(reason), d["reason"]
        assert base64.b64decode(d["value_b64"]) == value
        assert d["key_b64"] == (None if key is None else base64.b64encode(key).decode())
        assert set(d) == {"reason", "topic", "partition", "offset", "key_b64", "value_b64", "ts"} | {
            "key_len",
            "value_len",
            "key_sha256",
            "value_sha256",
            "payload",
        }
        assert d["payload"] == "complete" and d["value_len"] == len(value)

    # counts reconcile: records in = event-producing records + dlq; impressions expand per item
    assert stats.records_in == len(records) == len(valid) + stats.dlq
    assert stats.events_out == len(events) and stats.dlq == len(invalid)
    assert stats.produce_failures == 0 and stats.clean_exit


def _mixed_stream(n: int) -> list[tuple[str, bytes | None, bytes | None]]:
    """n records: 4/5 clicks, 1/5 impressions of 2 items, every 50th invalid; ~500 users."""
    out: list[tuple[str, bytes | None, bytes | None]] = []
    for i in range(n):
        user = f"u{(i * 7919) % 503}"
        if i % 50 == 49:
            out.append(("clicks", user.encode(), b"garbage %d" % i))
        elif i % 5 == 4:
            out.append(("impressions", user.encode(), encode_impression(f"m{i}", user, [f"i{i % 97}", f"j{i}"], TS)))
        else:
            out.append(("clicks", user.encode(), encode_click(user, f"i{i % 211}", TS + i)))
    return out


@pytest.mark.slow
def test_kill_9_mid_stream_then_restart_loses_nothing_and_dedupe_removes_replays(
    zerocf_env: dict[str, str], record_property: Any, tmp_path: Any
) -> None:
    cfg = _cfg(zerocf_env)
    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "1"}
    records = _mixed_stream(30_000)
    metas = _produce(cfg, records)
    valid = [(r, m) for r, m in zip(records, metas) if not r[2].startswith(b"garbage")]  # type: ignore[union-attr]
    expected = _expected_ids([r for r, _ in valid], [m for _, m in valid], items_per_imp=2)

    log_file = open(tmp_path / "ingest-killed.log", "wb")
    proc = subprocess.Popen(_ingest_cmd(), env=env, stderr=log_file)
    restart = _prestart_until_idle(env)  # the run after the kill; it does nothing until released
    try:
        try:
            seen = _wait_for_events(cfg, at_least=2000, timeout=30)
            proc.kill()  # SIGKILL: no flush, no commit
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log_file.close()
        assert seen >= 2000, "ingest produced no events before the kill"
        before = len(events_of(read_topic(cfg.kafka, cfg.topics.events, 20)))
        assert before < len(expected), "ingest finished before the kill; the test needs a bigger stream"

        done = finish_zerocf(restart, timeout=60, check=False)  # `zerocf ingest --until-idle` from here
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        stop_process(restart, 5)

    raw = read_topic(cfg.kafka, cfg.topics.events, 30)
    accepted, dropped = _dedupe(raw)
    assert len(accepted) == len(set(accepted)) and set(accepted) == expected  # each exactly once, none missing
    assert set(dropped) <= set(accepted) and len(events_of(raw)) == len(expected) + len(dropped)
    record_property("events_before_kill", before)
    record_property("raw_duplicates", len(dropped))
    log.warning(
        "kill -9 replay: %d events before the kill, %d expected, %d raw duplicates removed by Deduper",
        before,
        len(expected),
        len(dropped),
    )
    dlq = [json.loads(r.value) for r in read_topic(cfg.kafka, cfg.topics.dlq, 20)]
    garbage = {(m.partition, m.offset) for r, m in zip(records, metas) if r[2].startswith(b"garbage")}  # type: ignore
    assert {(d["partition"], d["offset"]) for d in dlq} == garbage  # replayed DLQ records are allowed too


def test_sigterm_finishes_batch_commits_and_exits_0(zerocf_env: dict[str, str], tmp_path: Any) -> None:
    cfg = _cfg(zerocf_env)
    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "1"}
    records = [r for r in _mixed_stream(10_000) if not r[2].startswith(b"garbage")]  # type: ignore[union-attr]
    metas = _produce(cfg, records)
    expected = _expected_ids(records, metas, items_per_imp=2)

    log_path = tmp_path / "ingest-term.log"
    port = free_port()
    restart, again_ = _prestart_until_idle(env), _prestart_until_idle(env)  # the two runs after the stop
    try:
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                _ingest_cmd("--batch", "500", "--metrics-port", str(port)), env=env, stderr=log_file
            )
            try:
                assert _wait_for_events(cfg, at_least=1, timeout=30) >= 1
                health = _get_until_ok(f"http://127.0.0.1:{port}/healthz", timeout=20)
                assert health["ok"] is True and health["assigned_partitions"] > 0 and health["broker_reachable"]
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    metrics = resp.read().decode()
                assert "zerocf_ingest_events_out_total" in metrics and "zerocf_ingest_batch_seconds_bucket" in metrics
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        err = log_path.read_bytes()
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b"SIGTERM received" in err and b"ingest stopped" in err
        first = read_topic(cfg.kafka, cfg.topics.events, 20)

        done = finish_zerocf(restart, timeout=60, check=False)  # `zerocf ingest --until-idle`
        assert done.returncode == 0, done.stderr[-2000:]
        raw = read_topic(cfg.kafka, cfg.topics.events, 20)
        ids = [e.id for e in events_of(raw)]
        # everything produced before the stop was committed: the restart adds only the rest, no replays
        assert not [i for i, c in Counter(ids).items() if c > 1]
        assert set(ids) == expected and len(raw) >= len(first)

        again = finish_zerocf(again_, timeout=60, check=False)  # and once more: nothing left to do
        assert again.returncode == 0 and len(read_topic(cfg.kafka, cfg.topics.events, 20)) == len(raw)
    finally:
        for p in (restart, again_):
            stop_process(p, 5)
