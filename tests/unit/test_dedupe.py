"""Deduper: replays of ingest (at-least-once) are removed downstream, nothing original is lost."""

from __future__ import annotations

import json
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.dedupe import Deduper, parse_event_id
from stream.errors import InvalidEvent
from stream.events import RawClick, RawImpression, to_events


def test_parse_event_id_topic_with_dots() -> None:
    assert parse_event_id("my.shop.v2.clicks:11:9007199254740993:0") == ("my.shop.v2.clicks/11", 9007199254740993, 0)


@pytest.mark.parametrize("bad", ["", "a:b:c", ":1:2:3", "t:x:2:3", "t:1:2:", "t:1:2.5:0"])
def test_parse_event_id_rejects_malformed(bad: str) -> None:
    with pytest.raises(InvalidEvent, match="zerocf ingest"):
        parse_event_id(bad)


def test_step_back_is_dropped_and_new_positions_pass() -> None:
    d = Deduper()
    ids = [
        "z.clicks:0:1:0",
        "z.impressions:0:1:0",
        "z.impressions:0:1:1",
        "z.clicks:0:2:0",
        "z.impressions:0:1:1",  # replay of an impression item
        "z.clicks:0:1:0",
        "z.clicks:0:2:0",  # replayed click run
        "z.clicks:0:3:0",
        "z.clicks:1:0:0",
        "z.impressions:0:2:0",
    ]
    assert [d.accept_id(i) for i in ids] == [True, True, True, True, False, False, False, True, True, True]
    assert d.state() == {"z.clicks/0": [3, 0], "z.clicks/1": [0, 0], "z.impressions/0": [2, 0]}


def test_accept_takes_events_and_filter_keeps_order() -> None:
    click = to_events(RawClick("u", "i", 1_700_000_000_000), "p.clicks", 2, 7)[0]
    imp = to_events(RawImpression("m", "u", ("a", "b", "c"), 1_700_000_000_000), "p.impressions", 0, 3)
    d = Deduper()
    assert d.accept(click) and not d.accept(click)
    assert d.filter(imp + imp[1:] + [click]) == imp


def test_state_is_json_and_round_trips() -> None:
    d = Deduper()
    for i in ("a.clicks:0:5:0", "a.impressions:3:9:4"):
        d.accept_id(i)
    restored = Deduper.from_state(json.loads(json.dumps(d.state())))
    assert restored.state() == d.state()
    assert not restored.accept_id("a.impressions:3:9:4") and restored.accept_id("a.impressions:3:9:5")
    assert Deduper.from_state(None).state() == {} == Deduper.from_state({}).state()


def test_from_state_rejects_garbage_with_instructions() -> None:
    with pytest.raises(InvalidEvent, match="Deduper.state"):
        Deduper.from_state({"a.clicks/0": 5})


# --- property: crash/replay of ingest, split by user hash, de-duplicated per events partition -------------


@st.composite
def ingest_history(draw: st.DrawFn) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """(original event ids per events partition, sorted; raw event ids per events partition, topic order).

    Each source partition is a list of records; a record yields 1..3 events (an impression's items) whose
    users hash to events partitions. Ingest runs several times per source partition: each run starts at
    the last committed offset, writes to every events partition a prefix (in order) of what it produced
    there, and commits an offset whose events were all acknowledged; the last run completes.
    """
    n_events = draw(st.integers(1, 4))
    sources = {
        f"s.clicks/{sp}" if sp % 2 else f"s.impressions/{sp}": draw(
            st.lists(st.lists(st.sampled_from(["u1", "u2", "u3", "u4", "u5"]), min_size=1, max_size=3), max_size=12)
        )
        for sp in range(draw(st.integers(1, 3)))
    }

    def part(user: str) -> int:
        return zlib.crc32(user.encode()) % n_events

    expected: dict[int, list[str]] = {p: [] for p in range(n_events)}
    per_source_runs: dict[str, dict[int, list[str]]] = {}
    for src, records in sources.items():
        topic, sp = src.split("/")
        flat = [(off, idx, part(u)) for off, users in enumerate(records) for idx, u in enumerate(users)]
        for off, idx, p in flat:
            expected[p].append(f"{topic}:{sp}:{off}:{idx}")
        written: dict[int, list[str]] = {p: [] for p in range(n_events)}
        committed = 0
        for _ in range(draw(st.integers(0, 3))):  # crashed runs
            reached = draw(st.integers(committed, len(records)))  # records handed to the producer
            new_commit = draw(st.integers(committed, reached))  # fully acknowledged, then committed
            for p in range(n_events):
                mine = [(o, i) for o, i, q in flat if q == p and committed <= o < reached]
                must = sum(1 for o, _i in mine if o < new_commit)
                cut = draw(st.integers(must, len(mine)))  # partition p got a prefix of its share
                written[p] += [f"{topic}:{sp}:{o}:{i}" for o, i in mine[:cut]]
            committed = new_commit
        for o, i, p in flat:  # final run: from the last commit to the end, all acknowledged
            if o >= committed:
                written[p].append(f"{topic}:{sp}:{o}:{i}")
        per_source_runs[src] = written

    # each events partition interleaves the sources arbitrarily, preserving each source's order
    topic_parts: dict[int, list[str]] = {}
    for p in range(n_events):
        queues = [list(w[p]) for w in per_source_runs.values() if w[p]]
        merged: list[str] = []
        while queues:
            q = queues[draw(st.integers(0, len(queues) - 1))]
            merged.append(q.pop(0))
            queues = [q for q in queues if q]
        topic_parts[p] = merged
    return {p: sorted(v) for p, v in expected.items()}, topic_parts


@settings(max_examples=300, deadline=None)
@given(history=ingest_history(), checkpoint_at=st.integers(0, 200))
def test_replays_are_removed_and_nothing_is_lost(
    history: tuple[dict[int, list[str]], dict[int, list[str]]], checkpoint_at: int
) -> None:
    expected, topic_parts = history
    for p, raw in topic_parts.items():
        d = Deduper()
        accepted = []
        for n, eid in enumerate(raw):
            if n == checkpoint_at:  # consumer restarts from its persisted state (atomic with its position)
                d = Deduper.from_state(json.loads(json.dumps(d.state())))
            if d.accept_id(eid):
                accepted.append(eid)
        assert len(accepted) == len(set(accepted)), "an event was accepted twice"
        assert sorted(accepted) == expected[p], "accepted events differ from the original stream"
        for src in {parse_event_id(e)[0] for e in accepted}:  # and in source order
            positions = [parse_event_id(e)[1:] for e in accepted if parse_event_id(e)[0] == src]
            assert positions == sorted(positions)
