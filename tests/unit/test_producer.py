"""Tests of stream.client.producer.EventProducer against a fake KafkaProducer (no broker)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from stream.client.producer import DeliveryFailed, EventProducer, producer_config
from stream.errors import ConfigError, InvalidEvent, ServiceUnavailable, ZerocfError
from stream.events import parse_click, parse_impression

NOW = 1_700_000_000_000


class FakeFuture:
    """Resolves when the fake producer flushes, like kafka-python's FutureRecordMetadata."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any], None]] = []
        self.errbacks: list[Callable[[BaseException], None]] = []

    def add_callback(self, f: Callable[[Any], None]) -> FakeFuture:
        self.callbacks.append(f)
        return self

    def add_errback(self, f: Callable[[BaseException], None]) -> FakeFuture:
        self.errbacks.append(f)
        return self


class FakeProducer:
    """Records sends; on flush acknowledges them, failing those whose value contains ``fail_marker``."""

    def __init__(self, fail_marker: bytes | None = None, raise_on_send: Exception | None = None) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.pending: list[tuple[bytes, FakeFuture]] = []
        self.fail_marker = fail_marker
        self.raise_on_send = raise_on_send
        self.flushes = 0
        self.closed = False

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> FakeFuture:
        if self.raise_on_send is not None:
            raise self.raise_on_send
        assert isinstance(value, bytes) and isinstance(key, bytes)
        self.sent.append((topic, key, value))
        future = FakeFuture()
        self.pending.append((value, future))
        return future

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1
        for value, future in self.pending:
            if self.fail_marker is not None and self.fail_marker in value:
                for f in future.errbacks:
                    f(TimeoutError("broker gone"))
            else:
                for f in future.callbacks:
                    f(object())
        self.pending = []

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def make(fake: FakeProducer, **kw: Any) -> EventProducer:
    return EventProducer(fake, topic_prefix="t", now_ms=lambda: NOW, **kw)


def test_topics_keys_and_values_match_ingest_parser() -> None:
    fake = FakeProducer()
    p = make(fake)
    p.send_click(42, "i1", ts="2023-11-14T22:13:20Z", impression_id="m", count=3)
    p.send_impression("m", "ü", ["a", 2], ts=NOW - 5)
    (t1, k1, v1), (t2, k2, v2) = fake.sent
    assert (t1, k1) == ("t.clicks", b"42") and (t2, k2) == ("t.impressions", "ü".encode())
    assert parse_click(v1, NOW).count == 3 and parse_click(v1, NOW).ts == NOW
    assert parse_impression(v2, NOW).item_ids == ("a", "2")


def test_default_ts_is_now() -> None:
    fake = FakeProducer()
    make(fake).send_click("u", "i")
    assert json.loads(fake.sent[0][2])["ts"] == NOW


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.send_click("", "i"),
        lambda p: p.send_click("u", "i", count=0),
        lambda p: p.send_click("u", "i", ts=NOW + 2 * 86_400_000),
        lambda p: p.send_click(True, "i"),
        lambda p: p.send_click("\ud800", "i"),
        lambda p: p.send_impression("m", "u", []),
        lambda p: p.send_impression("m", "u", [f"i{i}" for i in range(501)]),
        lambda p: p.send_impression("m", "u", ["a", "a"]),
    ],
)
def test_invalid_records_are_rejected_before_sending(call: Callable[[EventProducer], Any]) -> None:
    fake = FakeProducer()
    p = make(fake)
    with pytest.raises(InvalidEvent):
        call(p)
    assert fake.sent == [] and p.rejected == 1


def test_counts_and_flush_raises_on_delivery_failure() -> None:
    fake = FakeProducer(fail_marker=b'"bad"')
    p = make(fake)
    p.send_click("u", "ok")
    p.send_click("u", "bad")
    p.send_click("u", "bad")
    with pytest.raises(DeliveryFailed) as info:
        p.flush()
    assert info.value.failed == 2 and "2 record(s) failed delivery" in str(info.value)
    assert isinstance(info.value.errors[0], TimeoutError) and info.value.retriable
    assert (p.sent, p.failed) == (1, 2)
    p.send_click("u", "ok")
    p.flush()  # failures are reported once
    assert (p.sent, p.failed) == (2, 2)


def test_close_flushes_and_context_manager() -> None:
    fake = FakeProducer()
    with make(fake) as p:
        p.send_click("u", "i")
        assert p.sent == 0
    assert fake.flushes == 1 and fake.closed and p.sent == 1
    p.close()  # idempotent
    assert fake.flushes == 1
    with pytest.raises(ZerocfError, match="closed"):
        p.send_click("u", "i")


def test_close_still_closes_when_flush_fails() -> None:
    fake = FakeProducer(fail_marker=b"i")
    p = make(fake)
    p.send_click("u", "i")
    with pytest.raises(DeliveryFailed):
        p.close()
    assert fake.closed


def test_context_manager_does_not_mask_the_original_error() -> None:
    fake = FakeProducer(fail_marker=b"i")
    with pytest.raises(KeyError):
        with make(fake) as p:
            p.send_click("u", "i")
            raise KeyError("boom")
    assert fake.closed


def test_send_error_is_surfaced() -> None:
    p = make(FakeProducer(raise_on_send=TimeoutError("metadata")))
    with pytest.raises(ServiceUnavailable, match="could not queue"):
        p.send_click("u", "i")
    assert p.failed == 1


def test_construction_rules() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        EventProducer()
    with pytest.raises(ConfigError, match="only with bootstrap_servers"):
        EventProducer(FakeProducer(), acks="all")
    with pytest.raises(ConfigError, match="topic_prefix"):
        EventProducer(FakeProducer(), topic_prefix="")


def test_producer_config_defaults_and_validation() -> None:
    cfg = producer_config()
    assert cfg["acks"] == 1 and cfg["enable_idempotence"] is False
    from stream.kafka_util import producer_defaults

    assert {k: v for k, v in cfg.items() if k not in ("acks", "enable_idempotence")} == {
        k: v for k, v in producer_defaults().items() if k not in ("acks", "enable_idempotence")
    }
    from kafka.codec import has_lz4

    assert cfg["compression_type"] == ("lz4" if has_lz4() else None)
    assert producer_config(enable_idempotence=True, compression_type="gzip")["compression_type"] == "gzip"
    with pytest.raises(ConfigError, match="value_serializer"):
        producer_config(value_serializer=str.encode)
    with pytest.raises(ConfigError, match="acks"):
        producer_config(acks=2)
