"""Unit tests of workers.batch.snapshot with an in-memory stand-in for a group-less KafkaConsumer."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream.events import Event
from stream.runtime import StopFlag
from workers.batch.snapshot import CheckpointMismatch, Snapshot

Rec = namedtuple("Rec", "offset value")
TOPIC = "t.events"


class FakeLog:
    """Partitions of one topic: lists of values, offsets are list indices."""

    def __init__(self, n_partitions: int) -> None:
        self.parts: dict[int, list[bytes]] = {p: [] for p in range(n_partitions)}
        self.consumers: list[FakeConsumer] = []

    def append(self, partition: int, value: bytes) -> int:
        self.parts[partition].append(value)
        return len(self.parts[partition]) - 1

    def consumer(self) -> FakeConsumer:
        c = FakeConsumer(self)
        self.consumers.append(c)
        return c


class FakeConsumer:
    def __init__(self, log: FakeLog, batch: int = 3) -> None:
        self.log, self.batch = log, batch
        self.pos: dict[Any, int] = {}
        self.hw: dict[Any, int] = {}
        self.seeks: dict[int, int | str] = {}
        self.closed = False

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(self.log.parts) if topic == TOPIC else None

    def assign(self, tps: list[Any]) -> None:
        self.pos = {tp: 0 for tp in tps}

    def assignment(self) -> set[Any]:
        return set(self.pos)

    def seek(self, tp: Any, offset: int) -> None:
        self.pos[tp] = offset
        self.seeks[tp.partition] = offset

    def seek_to_beginning(self, tp: Any) -> None:
        self.pos[tp] = 0
        self.seeks[tp.partition] = "beginning"

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Rec]]:
        out = {}
        for tp, pos in self.pos.items():
            values = self.log.parts[tp.partition]
            self.hw[tp] = len(values)  # like a fetch response: high watermark updated
            recs = [Rec(o, values[o]) for o in range(pos, min(len(values), pos + self.batch))]
            if recs:
                out[tp] = recs
                self.pos[tp] = recs[-1].offset + 1
        return out

    def highwater(self, tp: Any) -> int | None:
        return self.hw.get(tp)

    def position(self, tp: Any) -> int:
        return self.pos[tp]

    def close(self) -> None:
        self.closed = True


def _ev(src_off: int, user: str, item: str, kind: str = "click", weight: float = 1.0, idx: int = 0) -> bytes:
    src = "t.clicks" if kind == "click" else "t.impressions"
    return Event(
        id=f"{src}:0:{src_off}:{idx}",
        type=kind,
        user=user,
        item=item,
        ts=1_700_000_000_000,  # type: ignore[arg-type]
        weight=weight if kind == "click" else 0.0,
        pos=None if kind == "click" else idx,
        imp=None if kind == "click" else "m1",
        src=f"{src}/0/{src_off}",
    ).to_json()


def _snap(log: FakeLog, path: Path) -> Snapshot:
    return Snapshot(TOPIC, path, log.consumer)


def test_catch_up_counts_clicks_dedupes_and_skips_impressions_and_garbage(tmp_path: Path) -> None:
    log = FakeLog(2)
    log.append(0, _ev(1, "u1", "a"))
    log.append(0, _ev(2, "u1", "b", weight=3.0))
    log.append(0, _ev(1, "u1", "a"))  # duplicate run (replayed source offset 1)
    log.append(0, _ev(2, "u1", "b", weight=3.0))
    log.append(0, b"{not json")
    log.append(1, _ev(3, "u2", "a"))
    log.append(1, _ev(4, "u2", "c", kind="impression"))
    s = _snap(log, tmp_path)
    assert s.catch_up() == 4  # 3 clicks + 1 impression accepted
    assert (s.n_clicks, s.n_duplicates, s.n_invalid) == (3, 2, 1)
    assert s.offsets == {0: 4, 1: 1}
    assert s.matrix.user_ids == ["u1", "u2"] and s.matrix.item_ids == ["a", "b"]  # impression item unseen
    np.testing.assert_array_equal(s.matrix.to_csr().toarray(), [[1, 3], [1, 0]])
    assert log.consumers[-1].closed and log.consumers[-1].seeks == {0: "beginning", 1: "beginning"}


def test_checkpoint_restart_resumes_after_last_offset_with_dedupe_state(tmp_path: Path) -> None:
    log = FakeLog(2)
    log.append(0, _ev(1, "u1", "a"))
    log.append(1, _ev(2, "u2", "b"))
    s = _snap(log, tmp_path)
    s.catch_up()
    s.save()
    log.append(0, _ev(1, "u1", "a"))  # a replay of an event the checkpoint already holds
    log.append(0, _ev(5, "u3", "a", weight=2.0))
    r = _snap(log, tmp_path)
    assert r.load()
    assert r.offsets == {0: 0, 1: 0} and r.n_events == 2
    assert r.catch_up() == 1
    assert log.consumers[-1].seeks == {0: 1, 1: 1}
    assert r.n_events == 3 and r.n_duplicates == 1 and r.offsets == {0: 2, 1: 0}
    np.testing.assert_array_equal(r.matrix.to_csr().toarray(), [[1, 0], [0, 1], [2, 0]])
    meta = r.metadata()
    assert meta["watermarks"] == {"0": {"t.clicks/0": [5, 0]}, "1": {"t.clicks/0": [2, 0]}}


def test_load_without_checkpoint_and_wrong_topic(tmp_path: Path) -> None:
    log = FakeLog(1)
    assert not _snap(log, tmp_path).load()
    s = _snap(log, tmp_path)
    log.append(0, _ev(1, "u", "i"))
    s.catch_up()
    s.save()
    with pytest.raises(CheckpointMismatch, match="holds a snapshot of topic 't.events', not 'other.events'.*--rebuild"):
        Snapshot("other.events", tmp_path, log.consumer).load()


def _saved(tmp_path: Path, n_partitions: int = 2, cluster: str | None = "c1") -> FakeLog:
    """A checkpoint of 2 clicks on each of ``n_partitions`` partitions, bound to cluster ``cluster``."""
    log = FakeLog(n_partitions)
    for p in range(n_partitions):
        log.append(p, _ev(2 * p + 1, f"u{p}", "a"))
        log.append(p, _ev(2 * p + 2, f"u{p}", "b"))
    s = Snapshot(TOPIC, tmp_path, log.consumer, cluster_id=lambda: cluster)
    s.model_id = "m1"
    s.catch_up()
    s.save()
    return log


def test_checkpoint_records_what_it_was_built_from(tmp_path: Path) -> None:
    _saved(tmp_path)
    r = Snapshot(TOPIC, tmp_path, FakeLog(2).consumer)
    assert r.load()
    assert r.metadata()["binding"] == {"topic": TOPIC, "partitions": 2, "cluster_id": "c1", "model_id": "m1"}


def test_checkpoint_of_another_partition_count_or_cluster_is_refused_before_reading(tmp_path: Path) -> None:
    _saved(tmp_path)
    other = FakeLog(3)  # the same topic name with 3 partitions: re-created, or another cluster
    for p in range(3):
        other.append(p, _ev(10 + p, "x", "y"))
        other.append(p, _ev(20 + p, "x", "z"))
        other.append(p, _ev(30 + p, "x", "w"))
    r = Snapshot(TOPIC, tmp_path, other.consumer, cluster_id=lambda: "c1")
    assert r.load()
    with pytest.raises(CheckpointMismatch, match="with 2 partitions, the topic now has 3.*--rebuild"):
        r.catch_up()
    assert r.n_events == 4 and r.matrix.item_ids == ["a", "b"]  # nothing of the other topic folded in

    same = _saved(tmp_path / "b")
    same.append(0, _ev(99, "u9", "c"))
    r = Snapshot(TOPIC, tmp_path / "b", same.consumer, cluster_id=lambda: "c2")
    assert r.load()
    with pytest.raises(CheckpointMismatch, match="built from Kafka cluster c1, the broker now answering is cluster c2"):
        r.catch_up()
    assert r.n_events == 4
    # an unknown cluster id (a broker that reports none) is not a mismatch
    r = Snapshot(TOPIC, tmp_path / "b", same.consumer, cluster_id=lambda: None)
    assert r.load() and r.catch_up() == 1


def test_checkpoint_beyond_the_end_of_the_topic_is_refused(tmp_path: Path) -> None:
    _saved(tmp_path)
    fresh = FakeLog(2)  # a fresh broker: the topic holds one record per partition
    fresh.append(0, _ev(50, "v", "x"))
    fresh.append(1, _ev(51, "v", "y"))
    r = Snapshot(TOPIC, tmp_path, fresh.consumer)
    assert r.load()
    with pytest.raises(CheckpointMismatch, match="partition 0 up to offset 1, but the topic ends at offset 0"):
        r.catch_up()
    assert r.n_events == 4 and "x" not in r.matrix.item_ids


def test_a_consumer_that_falls_back_to_the_beginning_is_refused(tmp_path: Path) -> None:
    log = _saved(tmp_path)

    class Resetting(FakeConsumer):  # what auto_offset_reset=earliest does after an out-of-range seek
        def seek(self, tp: Any, offset: int) -> None:
            super().seek(tp, 0)

    log.append(0, _ev(77, "u7", "q"))
    r = Snapshot(TOPIC, tmp_path, lambda: Resetting(log))
    assert r.load()
    with pytest.raises(CheckpointMismatch, match="broker served offset 0 after it"):
        r.catch_up()
    assert r.n_events == 4 and "q" not in r.matrix.item_ids


def test_stop_flag_interrupts_with_consistent_offsets(tmp_path: Path) -> None:
    log = FakeLog(1)
    for n in range(10):
        log.append(0, _ev(n + 1, f"u{n}", "i"))
    stop = StopFlag()
    stop.set("test")
    s = _snap(log, tmp_path)
    assert s.catch_up(stop) == 3  # one poll (batch 3), then the flag is seen
    assert s.offsets == {0: 2} and s.matrix.shape == (3, 1)
    assert s.catch_up() == 7 and s.offsets == {0: 9}


def test_missing_topic_is_an_instructive_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stream.errors import ServiceUnavailable
    from workers.batch import snapshot

    monkeypatch.setattr(snapshot, "DISCOVER_S", 0.0)
    s = Snapshot("nope.events", tmp_path, FakeLog(1).consumer)
    with pytest.raises(ServiceUnavailable, match="zerocf ingest"):
        s.catch_up()
