"""User erasure without a broker: the record and event formats, the tombstone rule, the snapshot, the online
model's caches, and the store's erase section (its Lua on fakeredis: it packs no floats)."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest

from stream.erasure import RETENTION_MS, Tombstones, encode_erasure, erased_digest, read_users
from stream.errors import ConfigError, InvalidEvent
from stream.events import (
    Event,
    RawClick,
    RawErasure,
    decode_events,
    encode_events,
    parse_erasure,
    parse_record,
    to_events,
)
from workers.batch.interactions import InteractionMatrix
from workers.batch.snapshot import Snapshot
from workers.config import LMFConfig
from workers.kernels.exposure import ExposureTracker
from workers.online.model import OnlineModel
from workers.store import FactorStore
from workers.store.lua import _ERASE_LIB

NOW = 1_800_000_000_000
T = 1_700_000_000_000


def ev(kind: str, user: str, ts: int, n: int = 0, item: str = "i") -> Event:
    """An event of partition 0 of topic ``t`` at offset ``n`` (a click, an impression or an erasure)."""
    if kind == "erase":
        return to_events(RawErasure(user, ts), "t.erasures", 0, n)[0]
    if kind == "click":
        return to_events(RawClick(user, item, ts), "t.clicks", 0, n)[0]
    return Event(f"t.impressions:0:{n}:0", "impression", user, item, ts, 0.0, 0, "m", f"t.impressions/0/{n}")


# ------------------------------------------------------------------- formats
def test_an_erasure_record_is_parsed_like_a_click_and_becomes_one_erase_event() -> None:
    raw = parse_record("erasures", b'{"user_id": 42, "ts": "2023-11-14T22:13:20Z", "extra": 1}', NOW)
    assert raw == RawErasure("42", T)
    (e,) = to_events(raw, "p.erasures", 2, 7)
    assert (e.id, e.type, e.user, e.item, e.ts, e.weight, e.pos, e.imp, e.src, e.key) == (
        "p.erasures:2:7:0", "erase", "42", "", T, 0.0, None, None, "p.erasures/2/7", b"42",
    )  # fmt: skip
    assert Event.from_json(e.to_json()) == e
    click = to_events(RawClick("u", "i", T), "p.clicks", 0, 1)[0]
    assert decode_events(encode_events([click, e])) == ([click, e], [])
    key, value = encode_erasure("u42", T)
    assert parse_erasure(value, NOW) == RawErasure("u42", T) and key == b"u42"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b'{"user_id": "u1"}', "ts is missing"),
        (b'{"ts": 1700000000000}', "user_id is missing"),
        (b'{"user_id": "", "ts": 1700000000000}', "user_id '' is empty"),
        (b'{"user_id": true, "ts": 1700000000000}', "user_id True is a bool"),
        (b'{"user_id": "u", "ts": 1700000000}', "ts 1700000000 is before 2000"),
        (b'{"user_id": "u", "ts": 1900000000000}', "ts 1900000000000 is more than one day after now"),
        (b"[1]", "message is a JSON list"),
    ],
)
def test_invalid_erasure_records_are_rejected_with_a_reason(value: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as exc:
        parse_erasure(value, NOW)
    assert exc.value.reason.startswith(reason), exc.value.reason


def test_erase_events_are_strict_and_an_empty_item_stays_invalid_elsewhere() -> None:
    good = json.loads(ev("erase", "u", T).to_json())
    for field, value in (("item", "i1"), ("weight", 1.0), ("pos", 0), ("imp", "m")):
        with pytest.raises(InvalidEvent, match="event erase"):
            Event.from_json(json.dumps({**good, field: value}).encode())
    click = json.loads(ev("click", "u", T).to_json())
    with pytest.raises(InvalidEvent, match="item '' is empty"):
        Event.from_json(json.dumps({**click, "item": ""}).encode())
    with pytest.raises(ConfigError, match="user_id '' is empty"):
        encode_erasure("", T)


def test_read_users_from_arguments_and_a_file(tmp_path: Path) -> None:
    f = tmp_path / "users.txt"
    f.write_text("u2\n\n u3 \nu1\n")
    assert read_users(["u1", "u2"], str(f)) == ["u1", "u2", "u3"]
    with pytest.raises(ConfigError, match="no users given"):
        read_users([], None)


# ------------------------------------------------------------------- the tombstone rule
def test_tombstone_rule_ignores_older_events_keeps_newer_and_drops_the_batch_before_the_erasure() -> None:
    t = Tombstones()
    batch = [ev("click", "a", T, 0), ev("click", "b", T, 1), ev("erase", "a", T + 10, 2), ev("click", "a", T + 5, 3),
             ev("impression", "a", T + 10, 4), ev("click", "a", T + 11, 5)]  # fmt: skip
    kept, erased = t.apply(batch)
    assert [(e.user, e.ts) for e in kept] == [("b", T), ("a", T + 11)] and erased == {"a": T + 10}
    # later batches: a replay of old events is ignored, a new one kept; other users untouched
    kept, erased = t.apply([ev("click", "a", T, 6), ev("click", "a", T + 10, 7), ev("click", "a", T + 20, 8)])
    assert [e.ts for e in kept] == [T + 20] and erased == {}
    # an erasure that arrives late (an older ts) never moves the tombstone back
    assert t.apply([ev("erase", "a", T + 1, 9), ev("click", "a", T + 5, 10)]) == ([], {"a": T + 10})


def test_tombstones_persist_digests_only_and_reload_to_the_same_rule() -> None:
    t = Tombstones()
    t.apply([ev("erase", "alice", T), ev("erase", "bob", T + 1)])
    state = t.state()
    assert state == {erased_digest("alice"): T, erased_digest("bob"): T + 1}
    assert "alice" not in json.dumps(state) and len(erased_digest("alice")) == 32
    again = Tombstones(state)
    kept, _ = again.apply([ev("click", "alice", T - 1), ev("click", "carol", T - 1), ev("click", "bob", T + 2)])
    assert [e.user for e in kept] == ["carol", "bob"]
    assert again.erased_at("alice") == T and again.erased_at("carol") is None


def test_tombstones_older_than_the_retention_are_pruned() -> None:
    t = Tombstones({erased_digest("old"): T})
    t.record("new", T + RETENTION_MS + 1)
    assert set(t.state()) == {erased_digest("new")} and t.erased_at("old") is None


def test_without_tombstones_or_erasures_a_batch_passes_unchanged() -> None:
    batch = [ev("click", "a", T, n) for n in range(3)]
    kept, erased = Tombstones().apply(batch)
    assert kept == batch and erased == {}


# ------------------------------------------------------------------- the ALS snapshot
Rec = namedtuple("Rec", "offset value")


class _Log:
    """One-partition events topic read by a group-less consumer (what Snapshot needs of KafkaConsumer)."""

    def __init__(self) -> None:
        self.values: list[bytes] = []
        self.pos = 0

    def consumer(self) -> _Log:
        return self

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def assign(self, tps: list[Any]) -> None:
        self.tp = tps[0]

    def assignment(self) -> set[Any]:
        return {self.tp}

    def seek(self, tp: Any, offset: int) -> None:
        self.pos = offset

    def seek_to_beginning(self, tp: Any) -> None:
        self.pos = 0

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Rec]]:
        recs = [Rec(o, self.values[o]) for o in range(self.pos, len(self.values))]
        self.pos = len(self.values)
        return {self.tp: recs} if recs else {}

    def highwater(self, tp: Any) -> int:
        return len(self.values)

    def position(self, tp: Any) -> int:
        return self.pos

    def close(self) -> None:
        pass


def test_snapshot_drops_the_users_row_and_its_checkpoint_keeps_no_entry(tmp_path: Path) -> None:
    log = _Log()
    events = [ev("click", "alice", T, 0, "x"), ev("click", "bob", T, 1, "x"), ev("click", "alice", T + 1, 2, "y")]
    log.values = [e.to_json() for e in events] + [encode_events([ev("erase", "alice", T + 5, 3)])]
    snap = Snapshot("t.events", tmp_path / "ckpt", log.consumer)
    snap.catch_up()
    assert snap.matrix.user_ids == ["", "bob"] and snap.matrix.to_csr().toarray().tolist() == [[0, 0], [1, 0]]
    assert snap.n_erasures == 1 and snap.n_clicks == 3  # counters are aggregates: they keep the clicks
    assert snap.item_popularity()["y"] > 0  # the decayed popularity too (anonymous per-item sums)
    path = snap.save()
    assert all(b"alice" not in p.read_bytes() for p in path.iterdir())
    # restored: old events of alice are still ignored, a new one starts a fresh row
    again = Snapshot("t.events", tmp_path / "ckpt", log.consumer)
    assert again.load() and again.tombstones.erased_at("alice") == T + 5
    log.values += [ev("click", "alice", T + 4, 4, "z").to_json(), ev("click", "alice", T + 6, 5, "y").to_json()]
    again.catch_up()
    assert again.matrix.user_ids == ["", "bob", "alice"]
    assert again.matrix.item_ids == ["x", "y"]  # the ignored click registers nothing, not even its item
    assert again.matrix.to_csr().toarray().tolist() == [[0, 0], [1, 0], [0, 1]]


def test_interaction_matrix_keeps_an_erased_users_row_index_empty_across_a_checkpoint(tmp_path: Path) -> None:
    m = InteractionMatrix()
    m.add_batch(["a", "b", "a"], ["i", "j", "j"], [1.0, 2.0, 3.0])
    assert m.remove_user("a") and not m.remove_user("a") and not m.remove_user("nobody")
    m.save(tmp_path)
    back = InteractionMatrix.load(tmp_path)
    assert back.user_ids == ["", "b"] and back.user_index(["a", "b", ""]).tolist() == [-1, 1, -1]
    back.add("a", "i")
    assert back.user_ids == ["", "b", "a"] and back.to_csr().toarray().tolist() == [[0, 0], [0, 2], [1, 0]]


# ------------------------------------------------------------------- the online model
def test_online_model_erase_restarts_the_user_fresh_without_reading_redis() -> None:
    cfg = LMFConfig(factors=4, exposure_window_s=60)
    m = OnlineModel(cfg, seed=0)
    m.warm(["i"], np.zeros((1, 5), np.float32), 0.0, {"i": 1.0}, {}, 0, 86_400_000)
    old = np.ones(5, np.float32)
    m.user_cache["a"] = (old, np.ones(2, np.float32), True)
    m.plan(0, [ev("impression", "a", T, 0), ev("impression", "b", T, 1)])
    assert len(m.exposure[0]) == 2
    kept, erased = m.erase([ev("click", "a", T + 1, 2), ev("erase", "a", T + 2, 3), ev("click", "b", T + 3, 4)])
    assert [e.user for e in kept] == ["b"] and erased == {"a": T + 2}
    row, acc, had = m.user_cache["a"]
    assert not had and not np.array_equal(row, old) and not acc.any() and len(m.seen["a"]) == 0
    assert len(m.exposure[0]) == 1  # b's impression only
    plan = m.plan(0, kept, erased)
    assert plan.erased == {"a": T + 2} and plan.users == ["b"] and "a" not in plan.fetch_users


def test_exposure_tracker_forgets_one_users_pairs() -> None:
    t = ExposureTracker()
    t.shown([1, 1, 2], [7, 8, 7], [1000, 1000, 1000])
    assert t.forget_user(1) == 2 and len(t) == 1
    assert [a.tolist() for a in t.due(now_ts=10**6, window_ms=1)] == [[2], [7]]


# ------------------------------------------------------------------- the store's erase section
def test_the_erase_section_deletes_the_users_state_and_records_the_tombstone() -> None:
    """The batch script's erase section (``_ERASE_LIB``) on fakeredis, with the arguments apply_batch builds."""
    r = fakeredis.FakeRedis()
    store = FactorStore(r, namespace="e")
    store.ensure_model(2)
    km = store.keys
    g = store.begin_generation()  # a building generation is left alone
    for gen in (1, g):
        store.write_vectors(gen, "user", ["a", "b"], np.ones((2, 3), np.float32))
        store.write_vectors(gen, "user_acc", ["a", "b"], np.ones((2, 2), np.float32))
        r.hset(km.updates(gen), mapping={"a": 3, "b": 1})
    r.hset(km.gen_meta(1), "state", "retired")
    r.hset(km.meta, "live_gen", g)  # pretend g went live: 1 is retired
    store.add_seen([("a", "i", T), ("b", "i", T)])
    r.zadd(km.erased, {"stale": T - RETENTION_MS - 1, erased_digest("a"): T + 50})
    fixed = [km.meta, km.offsets(g), km.watermarks(g), km.vectors(g, "user"), km.vectors(g, "item"),
             km.vectors(g, "user_acc"), km.vectors(g, "item_acc"), km.counts(g), km.updates(g)]  # fmt: skip
    keys, args = store._erase_args(g, {"a": T}, first_key=len(fixed) + 1)
    assert keys == [km.erased, km.seen("a"), km.vectors(1, "user"), km.vectors(1, "user_acc"), km.updates(1)]
    r.register_script(_ERASE_LIB + "erase_users(1) return 1")(keys=fixed + keys, args=args)
    for gen in (1, g):
        assert r.hkeys(km.vectors(gen, "user")) == [b"b"] and r.hkeys(km.vectors(gen, "user_acc")) == [b"b"]
        assert r.hkeys(km.updates(gen)) == [b"b"]
    assert store.seen_items("a") == [] and store.seen_items("b") == ["i"]
    assert store.erased_users() == {erased_digest("a"): T + 50}  # the newer time kept; the stale one pruned
