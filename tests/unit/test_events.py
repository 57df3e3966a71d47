"""Tests of stream.events: parsing, limits at their boundaries, normalisation, fuzzing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.errors import InvalidEvent
from stream.events import (
    MAX_MESSAGE_BYTES,
    MIN_TS_MS,
    Event,
    RawClick,
    RawImpression,
    decode_events,
    encode_click,
    encode_events,
    encode_impression,
    event_records,
    pack_json,
    parse_click,
    parse_impression,
    parse_record,
    to_events,
)

NOW = 1_700_000_000_000
DAY = 86_400_000


def click(**fields: object) -> bytes:
    obj = {"user_id": "u1", "item_id": "i1", "ts": NOW}
    obj.update(fields)
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def impression(**fields: object) -> bytes:
    obj = {"impression_id": "m1", "user_id": "u1", "item_ids": ["a", "b"], "ts": NOW}
    obj.update(fields)
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def reason(value: bytes, kind: str = "clicks") -> str:
    with pytest.raises(InvalidEvent) as info:
        parse_record(kind, value, NOW)  # type: ignore[arg-type]
    return info.value.reason


# --- happy paths --------------------------------------------------------------------------------


def test_click_defaults_and_normalisation() -> None:
    c = parse_click(click(user_id=42, item_id="i7", extra={"x": 1}), NOW)
    assert c == RawClick("42", "i7", NOW, None, 1)
    c = parse_click(click(impression_id=9, count=3, ts=1.7e12), NOW)
    assert (c.impression_id, c.count, c.ts) == ("9", 3, 1_700_000_000_000)
    assert parse_click(click(impression_id=None, count=None), NOW).count == 1


@pytest.mark.parametrize(
    "text,ms",
    [
        ("2023-11-14T22:13:20Z", NOW),
        ("2023-11-14T22:13:20", NOW),  # naive = UTC
        ("2023-11-15T00:13:20.0009+02:00", NOW),  # sub-ms truncated
    ],
)
def test_iso_timestamps(text: str, ms: int) -> None:
    assert parse_click(click(ts=text), NOW).ts == ms


def test_impression_keeps_display_order() -> None:
    imp = parse_impression(impression(item_ids=["z", 5, "a"]), NOW)
    assert imp == RawImpression("m1", "u1", ("z", "5", "a"), NOW)


# --- rejections, with reasons ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,needle",
    [
        (b"\xff{}", "UTF-8"),
        (b"{nope", "not valid JSON"),
        (b"[1,2]", "expected an object"),
        (b'{"user_id":"u","item_id":"i","ts":NaN}', "NaN"),
        (click(user_id=...), "user_id is missing"),
        (click(user_id=True), "user_id True is a bool"),
        (click(item_id=1.5), "item_id 1.5 is a float"),
        (click(item_id=""), "is empty"),
        (click(item_id="a\x00b"), "control character"),
        (click(item_id="a\u0085b"), "control character"),
        (click(ts="yesterday"), "ISO-8601"),
        (click(ts=True), "ts True is not epoch milliseconds"),
        (click(ts=1.5e12 + 0.5), "not epoch milliseconds"),
        (click(ts=1_700_000_000), "before 2000-01-01"),
        (click(count=0), "count 0 is out of range"),
        (click(count="2"), "count '2' is not an integer"),
        (b'{"user_id":"u","item_id":"i","ts":1e400}', "not epoch milliseconds"),
        (b'{"user_id":"\\ud800","item_id":"i","ts":1700000000000}', "surrogate"),
        (b"[" * 100_000, "not valid JSON"),
        (b'{"user_id":' + b"9" * 5000 + b',"item_id":"i","ts":1}', "not valid JSON"),
    ],
)
def test_click_rejections_name_field_and_rule(value: bytes, needle: str) -> None:
    assert needle in reason(value)


@pytest.mark.parametrize(
    "value,needle",
    [
        (impression(item_ids=[]), "item_ids is empty"),
        (impression(item_ids="a"), "not a list"),
        (impression(item_ids=["a", "b", "a"]), "positions 0 and 2"),
        (impression(item_ids=["a", None]), "item_ids[1] None"),
        (impression(impression_id=...), "impression_id is missing"),
    ],
)
def test_impression_rejections(value: bytes, needle: str) -> None:
    assert needle in reason(value, "impressions")


# --- every limit at its boundary -----------------------------------------------------------------


def test_id_length_limit_counts_utf8_bytes() -> None:
    assert parse_click(click(item_id="x" * 256), NOW).item_id == "x" * 256
    assert "257 bytes; the limit is 256" in reason(click(item_id="x" * 257))
    assert parse_click(click(item_id="é" * 128), NOW).item_id == "é" * 128  # 256 bytes
    assert "258 bytes" in reason(click(item_id="é" * 129))


def test_items_per_impression_limit() -> None:
    ok = [f"i{i}" for i in range(500)]
    assert len(parse_impression(impression(item_ids=ok), NOW).item_ids) == 500
    assert reason(impression(item_ids=ok + ["x"]), "impressions") == (
        "item_ids has 501 items; the limit is 500 per impression"
    )


def test_count_limit() -> None:
    assert parse_click(click(count=10**6), NOW).count == 10**6
    assert "out of range" in reason(click(count=10**6 + 1))


def test_ts_bounds() -> None:
    assert parse_click(click(ts=MIN_TS_MS), NOW).ts == MIN_TS_MS
    assert parse_click(click(ts="2000-01-01T00:00:00Z"), NOW).ts == MIN_TS_MS
    assert "before 2000" in reason(click(ts=MIN_TS_MS - 1))
    assert "before 2000" in reason(click(ts="1999-12-31T23:59:59.999Z"))
    assert parse_click(click(ts=NOW + DAY), NOW).ts == NOW + DAY
    assert "more than one day after now" in reason(click(ts=NOW + DAY + 1))


def test_message_size_limit() -> None:
    head = click()[:-1] + b', "pad": "'
    exact = head + b"x" * (MAX_MESSAGE_BYTES - len(head) - 2) + b'"}'
    assert len(exact) == MAX_MESSAGE_BYTES
    assert parse_click(exact, NOW).user_id == "u1"
    too_big = exact[:-2] + b'x"}'
    assert reason(too_big) == f"message is {MAX_MESSAGE_BYTES + 1} bytes; the limit is {MAX_MESSAGE_BYTES} (1 MiB)"


def test_tombstone_value_is_invalid_not_a_crash() -> None:
    with pytest.raises(InvalidEvent, match="NoneType, expected bytes"):
        parse_record("clicks", None, NOW)  # type: ignore[arg-type]


def test_parse_record_rejects_unknown_topic_kind() -> None:
    with pytest.raises(ValueError, match="use 'clicks' or 'impressions'"):
        parse_record("views", click(), NOW)  # type: ignore[arg-type]


# --- normalisation --------------------------------------------------------------------------------


def test_to_events_click_and_impression() -> None:
    (c,) = to_events(parse_click(click(count=4, impression_id="m1"), NOW), "p.clicks", 3, 77)
    assert c == Event("p.clicks:3:77:0", "click", "u1", "i1", NOW, 4.0, None, "m1", "p.clicks/3/77")
    evs = to_events(parse_impression(impression(item_ids=["a", "b", "c"]), NOW), "p.impressions", 0, 9)
    assert [(e.id, e.item, e.pos, e.weight, e.imp) for e in evs] == [
        ("p.impressions:0:9:0", "a", 0, 0.0, "m1"),
        ("p.impressions:0:9:1", "b", 1, 0.0, "m1"),
        ("p.impressions:0:9:2", "c", 2, 0.0, "m1"),
    ]
    assert evs[2].key == b"u1" and evs[2].origin == ("p.impressions", 0, 9, 2)


def test_event_json_has_exact_keys_and_round_trips() -> None:
    (e,) = to_events(RawClick("ü", "i", NOW), "zerocf.clicks", 2, 1041)
    data = e.to_json()
    assert list(json.loads(data)) == ["id", "type", "user", "item", "ts", "weight", "pos", "imp", "src"]
    assert b" " not in data and Event.from_json(data) == e


@pytest.mark.parametrize(
    "change",
    [
        {"extra": 1},
        {"ts": True},
        {"ts": 1.7e12},
        {"weight": "1"},
        {"weight": float("inf")},
        {"type": "view"},
        {"pos": 0},
        {"id": "p.clicks:2:1041:1"},
        {"src": "other/2/1041"},
        {"user": 5},
        {"imp": ""},
        {"id": "p.clicks:²:1041:0"},
    ],
)
def test_event_from_json_is_strict(change: dict[str, object]) -> None:
    obj = json.loads(to_events(RawClick("u", "i", NOW), "p.clicks", 2, 1041)[0].to_json())
    obj.update(change)
    with pytest.raises(InvalidEvent):
        Event.from_json(json.dumps(obj).encode())


def test_event_from_json_requires_all_keys() -> None:
    obj = json.loads(to_events(RawClick("u", "i", NOW), "p.clicks", 2, 1041)[0].to_json())
    del obj["imp"]
    with pytest.raises(InvalidEvent, match="expected exactly"):
        Event.from_json(json.dumps(obj).encode())


def test_encoders_produce_parseable_json() -> None:
    assert parse_click(encode_click("u", "i", NOW, "m", 2), NOW) == RawClick("u", "i", NOW, "m", 2)
    assert parse_impression(encode_impression("m", "u", ("a",), NOW), NOW).item_ids == ("a",)
    with pytest.raises(InvalidEvent, match="cannot encode"):
        encode_click("\ud800", "i", NOW)


# --- property-based fuzzing -----------------------------------------------------------------------

ids = st.one_of(
    st.text(max_size=40),
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=250, max_size=260),
)
junk = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=30),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
ts_values = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(),
    st.text(max_size=40),
    st.datetimes().map(lambda d: d.isoformat()),
    junk,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "user_id": ids,
        "item_id": ids,
        "impression_id": ids,
        "ts": ts_values,
        "count": st.one_of(st.integers(min_value=-5, max_value=2 * 10**6), junk),
        "item_ids": st.one_of(st.lists(ids, max_size=8), junk),
        "junk": junk,
    },
)


def _check(kind: str, value: bytes) -> None:
    try:
        raw = parse_record(kind, value, NOW)  # type: ignore[arg-type]
    except InvalidEvent as e:
        assert e.reason
        return
    events = to_events(raw, "p." + kind, 0, 1)
    assert events and all(Event.from_json(e.to_json()) == e for e in events)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["clicks", "impressions"]), st.binary(max_size=200))
def test_any_bytes_parse_or_raise_invalid_event(kind: str, value: bytes) -> None:
    _check(kind, value)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["clicks", "impressions"]), fields, st.booleans())
def test_jsonish_inputs_parse_or_raise_invalid_event(kind: str, obj: dict[str, object], ascii_only: bool) -> None:
    text = json.dumps(obj, ensure_ascii=ascii_only)  # NaN/Infinity literals and \\ud800 escapes included
    value = text.encode("utf-8", "surrogatepass")
    _check(kind, value)


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=64),
    st.lists(
        st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20),
        min_size=1,
        max_size=20,
        unique=True,
    ),
    st.integers(min_value=MIN_TS_MS, max_value=NOW + DAY),
    st.integers(min_value=0, max_value=2**31),
)
def test_valid_impressions_round_trip(user: str, items: list[str], ts: int, offset: int) -> None:
    raw = parse_impression(encode_impression("m", user, items, ts), NOW)
    events = to_events(raw, "zerocf.impressions", 1, offset)
    assert [e.item for e in events] == items
    assert all(Event.from_json(e.to_json()) == e for e in events)


# ---------------------------------------------------------------------- packs: records of <p>.events
def _clicks(n: int) -> list[Event]:
    return [to_events(RawClick(f"u{k}", f"i{k}", 1_700_000_000_000 + k), "p.clicks", 0, k)[0] for k in range(n)]


def test_a_pack_round_trips_in_order_and_a_single_event_record_still_decodes() -> None:
    events = _clicks(5)
    assert decode_events(encode_events(events)) == (events, [])
    assert decode_events(events[0].to_json()) == ([events[0]], [])  # the layout before packs


def test_a_bad_element_of_a_pack_is_refused_alone_and_garbage_is_one_reason() -> None:
    good = _clicks(2)
    broken = json.loads(good[1].to_json())
    broken["ts"] = "yesterday"
    value = b"[" + good[0].to_json() + b"," + json.dumps(broken).encode() + b"]"
    events, bad = decode_events(value)
    assert events == [good[0]] and len(bad) == 1 and "ts" in bad[0]
    for garbage in (b"[1, 2]", b"7", b"{not json", b"\xff\xfe"):
        events, bad = decode_events(garbage)
        assert events == [] and len(bad) == 1


def test_pack_json_keeps_order_and_respects_the_count_and_byte_limits() -> None:
    values = [e.to_json() for e in _clicks(10)]
    packs = list(pack_json(values, 4, 1 << 20))
    assert [len(decode_events(p)[0]) for p in packs] == [4, 4, 2]
    assert [e.to_json() for p in packs for e in decode_events(p)[0]] == values
    limit = 2 * len(values[0]) + 3  # two events fit, three do not
    packs = list(pack_json(values, 100, limit))
    assert all(len(p) <= limit for p in packs) and sum(len(decode_events(p)[0]) for p in packs) == 10


@settings(max_examples=200, deadline=None)
@given(
    user=st.text(min_size=1, max_size=8).filter(lambda t: t.isprintable()),
    item=st.text(min_size=1, max_size=8).filter(lambda t: t.isprintable()),
    count=st.integers(1, 1000),
    imp=st.none() | st.text(min_size=1, max_size=5).filter(lambda t: t.isprintable()),
    offset=st.integers(0, 10**12),
)
def test_event_records_are_the_bytes_of_to_events(
    user: str, item: str, count: int, imp: str | None, offset: int
) -> None:
    shown = RawImpression("m", user, (item, item + "x"), MIN_TS_MS)
    for raw in (RawClick(user, item, MIN_TS_MS + 5, imp, count), shown):
        want = [(e.key, e.to_json()) for e in to_events(raw, "p.clicks", 3, offset)]
        assert event_records(raw, "p.clicks", 3, offset) == want
        assert [decode_events(v)[0][0] for _k, v in want] == to_events(raw, "p.clicks", 3, offset)
