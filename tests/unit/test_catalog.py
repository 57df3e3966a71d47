"""The catalogue record format and :class:`CatalogView` (in memory, and following a fake consumer)."""

from __future__ import annotations

import json
import threading
import time
from collections import namedtuple
from typing import Any

import pytest
from kafka.structs import TopicPartition

from stream.catalog import (
    MAX_CATEGORIES,
    MAX_CATEGORY_BYTES,
    MAX_RECORD_BYTES,
    CatalogView,
    ItemState,
    encode_record,
    parse_record,
)
from stream.errors import ConfigError, InvalidEvent
from workers.serving.items_cli import build_records, parse_categories, parse_until

Rec = namedtuple("Rec", "key value offset")
NOW_MS = 1_800_000_000_000


def test_round_trip_and_defaults() -> None:
    for state in (
        ItemState("i1"),
        ItemState("i1", hidden=True),
        ItemState("é", available_until=NOW_MS, categories=("books", "sale")),
    ):
        assert parse_record(*encode_record(state)) == state
    assert parse_record(b"i1", None) == ItemState("i1")  # a tombstone is the default state
    assert parse_record(b"i1", b"null") == ItemState("i1")
    assert parse_record(b"i1", b"{}") == ItemState("i1")
    # unknown fields are ignored; null optionals are absent; duplicates collapse in order
    doc = {"hidden": None, "available_until": None, "categories": ["b", "a", "b"], "future": 1}
    assert parse_record(b"i1", json.dumps(doc).encode()) == ItemState("i1", categories=("b", "a"))
    assert parse_record(b"i1", b'{"available_until": 1.8e12}').available_until == 1_800_000_000_000


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        (None, b"{}", "without a key"),
        (b"", b"{}", "is empty"),
        (b"x" * 257, b"{}", "the limit is 256"),
        (b"\xff", b"{}", "key is not valid UTF-8"),
        (b"i1", b"oops", "not UTF-8 JSON"),
        (b"i1", b"\xff", "not UTF-8 JSON"),
        (b"i1", b"[1]", "a JSON list"),
        (b"i1", b'{"available_until": NaN}', "not UTF-8 JSON"),
        (b"i1", b'{"item": "i2"}', "must equal the key"),
        (b"i1", b'{"hidden": 1}', "send true or false"),
        (b"i1", b'{"available_until": "tomorrow"}', "not epoch milliseconds"),
        (b"i1", b'{"available_until": -5}', "not epoch milliseconds"),
        (b"i1", b'{"available_until": true}', "not epoch milliseconds"),
        (b"i1", b'{"categories": "books"}', "send a list of strings"),
        (b"i1", b'{"categories": [3]}', "send strings"),
        (b"i1", b'{"categories": [""]}', "1..64 UTF-8 bytes"),
        (b"i1", json.dumps({"categories": ["x" * (MAX_CATEGORY_BYTES + 1)]}).encode(), "1..64 UTF-8 bytes"),
        (b"i1", b'{"categories": ["a\\u0001"]}', "control character"),
        (b"i1", b'{"categories": ["a,b"]}', "comma"),
        (b"i1", json.dumps({"categories": [f"c{n}" for n in range(MAX_CATEGORIES + 1)]}).encode(), "limit is 32"),
        (b"i1", b" " * (MAX_RECORD_BYTES + 1), "the limit is 65536"),
    ],
)
def test_bad_records_name_the_rule(key: bytes | None, value: bytes, fragment: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_record(key, value)
    assert fragment in err.value.reason


def test_expiry_boundary_and_hidden_now_cache() -> None:
    now = [NOW_MS / 1000]
    view = CatalogView(None, "p.items", clock=lambda: now[0])
    view.apply_many(
        [
            ItemState("soon", available_until=NOW_MS + 1000),
            ItemState("later", available_until=NOW_MS + 5000),
            ItemState("gone", available_until=NOW_MS - 1),
            ItemState("off", hidden=True),
        ]
    )
    first = view.hidden_now()
    assert first == {"gone", "off"} and isinstance(first, frozenset)
    assert view.hidden_now() is first  # cached until the state changes or the next expiry passes
    now[0] = (NOW_MS + 999) / 1000
    assert view.hidden_now() is first
    now[0] = (NOW_MS + 1000) / 1000  # available_until is the first instant it is hidden
    assert view.hidden_now() == {"gone", "off", "soon"}
    now[0] = (NOW_MS + 5000) / 1000
    assert view.hidden_now() == {"gone", "off", "soon", "later"}
    view.apply(b"later", json.dumps({"available_until": NOW_MS + 10_000}).encode())  # extended: visible again
    assert "later" not in view.hidden_now()


def test_latest_state_wins_categories_and_tombstones() -> None:
    view = CatalogView(None, "p.items", clock=lambda: NOW_MS / 1000)
    view.apply(b"a", b'{"categories": ["books", "sale"]}')
    view.apply(b"b", b'{"hidden": true, "categories": ["books"]}')
    assert view.items_of("books") == {"a", "b"} and view.items_of("sale") == {"a"}
    assert view.items_of("nope") == frozenset() and view.in_category("a", "sale")
    view.apply(b"a", b'{"categories": ["toys"]}')  # the whole state: a leaves books and sale
    assert view.items_of("books") == {"b"} and view.items_of("sale") == frozenset() and view.items_of("toys") == {"a"}
    assert view.hidden_now() == {"b"}
    view.apply(b"b", None)  # tombstone: back to the default
    assert view.hidden_now() == frozenset() and view.items_of("books") == frozenset()
    assert view.state("b") == ItemState("b") and view.status()["items"] == 1
    view.apply(b"a", b"not json")  # a bad record keeps the previous state and is counted
    assert view.items_of("toys") == {"a"} and view.bad_records == 1 and view.records == 4
    assert "not UTF-8 JSON" in view.status()["last_bad_record"]


class FakeConsumer:
    """The slice of KafkaConsumer that CatalogView uses; ``feed`` appends records to a partition."""

    def __init__(self, topic: str, partitions: int) -> None:
        self.topic = topic
        self.logs: dict[int, list[Rec]] = {p: [] for p in range(partitions)}
        self.pos: dict[int, int] = {}
        self.lock = threading.Lock()
        self.closed = False

    def feed(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        with self.lock:
            log = self.logs.setdefault(partition, [])
            log.append(Rec(key, value, len(log)))

    def partitions_for_topic(self, topic: str) -> set[int]:
        assert topic == self.topic
        with self.lock:
            return set(self.logs)

    def assign(self, tps: list[TopicPartition]) -> None:
        with self.lock:
            self.pos = {tp.partition: self.pos.get(tp.partition, 0) for tp in tps}

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        with self.lock:
            for tp in tps:
                self.pos[tp.partition] = 0

    def poll(self, timeout_ms: int) -> dict[TopicPartition, list[Rec]]:
        with self.lock:
            out = {}
            for p, at in self.pos.items():
                new = self.logs[p][at : at + 2]  # two at a time: several polls to catch up
                if new:
                    out[TopicPartition(self.topic, p)] = new
                    self.pos[p] = at + len(new)
        if not out:
            time.sleep(timeout_ms / 1000)
        return out

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(self.topic, p) for p in self.pos}

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.logs[tp.partition])

    def position(self, tp: TopicPartition) -> int:
        return self.pos[tp.partition]

    def close(self, **_kw: Any) -> None:
        self.closed = True


def wait(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "not within the bounded wait"
        time.sleep(0.01)


def test_view_follows_every_partition_from_the_beginning_and_new_ones() -> None:
    fake = FakeConsumer("p.items", 2)
    fake.feed(0, b"a", b'{"hidden": true}')
    fake.feed(1, b"b", b'{"hidden": true}')
    fake.feed(1, b"b", b"{broken")
    fake.feed(0, b"a", b'{"hidden": false, "categories": ["x"]}')
    fake.feed(0, b"c", b'{"hidden": true}')
    view = CatalogView(lambda: fake, "p.items", poll_ms=5, metadata_s=0.05).start()
    try:
        assert view.wait_loaded(10)
        assert view.hidden_now() == {"b", "c"} and view.items_of("x") == {"a"}
        assert (view.bad_records, view.records) == (1, 4) and view.status()["state"] == "following"
        fake.feed(0, b"c", None)  # followed after the load too
        wait(lambda: "c" not in view.hidden_now())
        fake.feed(2, b"d", b'{"hidden": true}')  # a partition added later is read from its beginning
        wait(lambda: "d" in view.hidden_now())
    finally:
        view.stop()
    assert fake.closed and view.status()["state"] == "stopped"


def test_broker_errors_are_retried_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def factory() -> FakeConsumer:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("no broker answers")
        fake = FakeConsumer("p.items", 1)
        fake.feed(0, b"a", b'{"hidden": true}')
        return fake

    view = CatalogView(factory, "p.items", poll_ms=5, retry_s=0.05).start()
    try:
        wait(lambda: view.status()["state"] == "unavailable" or view.loaded)
        assert view.hidden_now() == frozenset() or view.loaded  # empty while away: nothing hidden
        assert view.wait_loaded(10) and view.hidden_now() == {"a"}
    finally:
        view.stop()
    assert sum("not followed" in r.getMessage() for r in caplog.records) == 1  # logged once, not per retry


def test_items_cli_records() -> None:
    assert parse_until("2026-01-01T00:00:00+01:00", 0) == 1_767_222_000_000
    with pytest.raises(ConfigError, match="not seconds"):
        parse_until("1767225600", 0)
    with pytest.raises(ConfigError, match="neither epoch"):
        parse_until("soon", 0)
    with pytest.raises(ConfigError, match="comma|1..64"):
        parse_categories("x" * 65)
    hide = build_records("hide", ["a", "b"], None, ("books",), NOW_MS)
    assert [parse_record(k, v) for k, v in hide] == [
        ItemState("a", True, None, ("books",)),
        ItemState("b", True, None, ("books",)),
    ]
    ((key, value),) = build_records("show", ["a"], NOW_MS + 5, (), NOW_MS)
    assert parse_record(key, value) == ItemState("a", False, NOW_MS + 5)
    assert parse_record(*build_records("expire", ["a"], None, (), NOW_MS)[0]) == ItemState("a", False, NOW_MS)
    assert build_records("reset", ["a"], None, (), NOW_MS) == [(b"a", None)]
    with pytest.raises(ConfigError, match="unconditional"):
        build_records("hide", ["a"], NOW_MS, (), NOW_MS)
    with pytest.raises(ConfigError, match="takes no"):
        build_records("reset", ["a"], None, ("x",), NOW_MS)
    with pytest.raises(ConfigError, match="fix the item id"):
        build_records("hide", ["x" * 300], None, (), NOW_MS)
