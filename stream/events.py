"""Raw impression/click parsing and validation, and the normalised :class:`Event` (pure, no Kafka).

Raw records (JSON objects, UTF-8) as producers write them to ``<p>.impressions`` / ``<p>.clicks``::

    {"impression_id": "imp-9", "user_id": "u42", "item_ids": ["i7", "i3"], "ts": 1700000000000}
    {"user_id": "u42", "item_id": "i7", "ts": "2023-11-14T22:13:20Z", "impression_id": "imp-9", "count": 2}

Rules (every violation raises :class:`~stream.errors.InvalidEvent` naming the field, value and rule):

- the message is at most 1 MiB (checked on the byte length first), valid UTF-8 and one JSON object;
  ``NaN``/``Infinity`` literals are rejected; unknown extra fields are ignored; with duplicate keys
  the last one wins (as in :func:`json.loads`).
- ids (``user_id``, ``item_id``, ``impression_id``, each of ``item_ids``) are strings of 1..256 UTF-8
  bytes without control characters (Unicode category Cc). JSON integers are accepted too and
  normalised to their decimal string (datasets use numeric ids): ``42`` and ``"42"`` are the same id.
  Booleans and floats are not ids.
- ``ts`` is epoch milliseconds (a JSON integer, or a number with an integral value such as ``1.7e12``)
  or an ISO-8601 string (anything :meth:`datetime.datetime.fromisoformat` accepts, e.g. with a
  ``+02:00`` offset or ``Z``; a string without an offset is read as UTC; sub-millisecond digits are
  truncated). It must lie within [2000-01-01T00:00:00Z, ``now_ms`` + 1 day].
- ``item_ids`` holds 1..500 distinct ids, in display order (position 0 first).
- ``count`` (optional, default 1) is an integer 1..10^6; ``impression_id`` is optional. ``null`` for
  an optional field means "absent".
- ``feedback`` (optional, default ``"click"``) names the click's feedback type: 1..32 characters
  ``[a-z0-9_-]`` starting with a letter (``"like"``, ``"purchase"``, ``"play"``, ``"dislike"``). Ingest maps it to
  a weight with ``ZEROCF_FEEDBACK_WEIGHTS`` (:func:`parse_feedback_weights`): the event's weight is
  ``count * |weight|``, and a type with a negative weight is an **explicit negative** (a ``"negative"``
  event). A type the map does not name is refused (:func:`to_events`; ingest dead-letters it with the reason).

A user-erasure request on ``<p>.erasures`` (written by ``zerocf forget-user``, :mod:`stream.erasure`) is
``{"user_id": "u42", "ts": 1700000000000}`` (both required, same rules); it becomes one ``"erase"`` event.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, NoReturn

import orjson

from stream.errors import InvalidEvent

MAX_MESSAGE_BYTES = 1 << 20
MAX_ID_BYTES = 256
MAX_ITEMS = 500
MAX_COUNT = 1_000_000
MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
FUTURE_SLACK_MS = 86_400_000  # ts may be at most one day ahead of now_ms
_MAX_TS_TEXT = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # exactly Unicode category Cc
_EVENT_KEYS = ("id", "type", "user", "item", "ts", "weight", "pos", "imp", "src")
_FEEDBACK_NAME = re.compile(r"[a-z][a-z0-9_\-]{0,31}")
MAX_FEEDBACK_WEIGHT = 1000.0
#: The feedback map when ``ZEROCF_FEEDBACK_WEIGHTS`` is not set: plain clicks, weight 1 per count.
DEFAULT_FEEDBACK: Mapping[str, float] = MappingProxyType({"click": 1.0})
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _show(value: Any, limit: int = 60) -> str:
    """``repr`` of *value*, truncated to about *limit* characters for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; send numbers only")


def check_id(value: Any, field: str) -> str:
    """Validate one id and return it as a string (JSON integers become their decimal string).

    >>> check_id("u42", "user_id"), check_id(42, "user_id")
    ('u42', '42')
    >>> check_id("", "item_id")
    Traceback (most recent call last):
    ...
    stream.errors.InvalidEvent: item_id '' is empty; ids must be 1..256 UTF-8 bytes
    """
    if type(value) is not str:
        if type(value) is int:
            value = str(value)
        else:
            raise InvalidEvent(
                f"{field} {_show(value)} is a {type(value).__name__}; ids must be strings (or JSON integers)"
            )
    if value.isascii():
        size = len(value)
        if 0 < size <= MAX_ID_BYTES and value.isprintable():  # the common case: ASCII has no Cc when printable
            return value
    else:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidEvent(f"{field} {_show(value)} contains a lone surrogate; ids must be valid Unicode") from None
    if size == 0:
        raise InvalidEvent(f"{field} '' is empty; ids must be 1..{MAX_ID_BYTES} UTF-8 bytes")
    if size > MAX_ID_BYTES:
        raise InvalidEvent(f"{field} {_show(value)} is {size} bytes; the limit is {MAX_ID_BYTES} UTF-8 bytes")
    if _CONTROL.search(value):
        raise InvalidEvent(f"{field} {_show(value)} contains a control character; remove it")
    return value


def _as_int(value: Any, field: str) -> int:
    """An integer, or a finite float with an integral value; bool is rejected."""
    kind = type(value)
    if kind is int:
        return value
    if kind is float and value.is_integer():  # False for nan/inf
        return int(value)
    raise InvalidEvent(f"{field} {_show(value)} is not an integer")


def parse_feedback_weights(text: str) -> dict[str, float]:
    """``ZEROCF_FEEDBACK_WEIGHTS``: ``type:weight`` pairs, comma-separated, to a mapping.

    A weight is a non-zero number with ``|weight| <= 1000``; a negative one makes the type an explicit
    negative (LMF: a weighted negative step; ALS: an observed zero of confidence ``1 + alpha * |f|``).
    ``click`` keeps weight 1 unless the text names it, so raw clicks without ``feedback`` stay valid.

    >>> parse_feedback_weights("like:2, purchase:5,dislike:-1")
    {'click': 1.0, 'like': 2.0, 'purchase': 5.0, 'dislike': -1.0}
    >>> parse_feedback_weights("click:0")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: feedback 'click:0' has weight 0; use a non-zero number with |weight| <= 1000 ...
    """
    out: dict[str, float] = {"click": 1.0}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, raw = (x.strip() for x in part.partition(":"))
        if not sep or not _FEEDBACK_NAME.fullmatch(name):
            raise ValueError(
                f"feedback {part!r} is not 'type:weight' with a type of 1-32 characters [a-z0-9_-] "
                "starting with a letter, e.g. 'like:2'"
            )
        try:
            w = float(raw)
        except ValueError:
            w = float("nan")
        if not (w == w and 0 < abs(w) <= MAX_FEEDBACK_WEIGHT):
            raise ValueError(
                f"feedback {part!r} has weight {raw or 'nothing'}; use a non-zero number with "
                f"|weight| <= {MAX_FEEDBACK_WEIGHT:g} (negative = explicit negative)"
            )
        if name == "click" and w < 0:
            raise ValueError(f"feedback {part!r}: plain clicks are positive feedback; give click a weight > 0")
        out[name] = w
    return out


def iso_to_ms(text: str) -> int:
    """Parse an ISO-8601 timestamp to epoch ms; without an offset the time is UTC.

    >>> iso_to_ms("2000-01-01T00:00:00Z"), iso_to_ms("2000-01-01T01:00:00.0019+01:00")
    (946684800000, 946684800001)
    """
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _ONE_MS


def parse_ts(value: Any, now_ms: int, field: str = "ts") -> int:
    """Validate a raw ``ts`` (epoch ms or ISO-8601 string) and return epoch milliseconds.

    >>> parse_ts("2023-11-14T22:13:20Z", now_ms=1_800_000_000_000)
    1700000000000
    """
    if type(value) is str:
        try:
            if len(value) > _MAX_TS_TEXT:
                raise ValueError
            ms = iso_to_ms(value)
        except (ValueError, OverflowError, TypeError):
            raise InvalidEvent(
                f"{field} {_show(value)} is not an ISO-8601 timestamp; send e.g. "
                "'2024-05-01T12:00:00Z' or epoch milliseconds"
            ) from None
    else:
        try:
            ms = _as_int(value, field)
        except InvalidEvent:
            raise InvalidEvent(
                f"{field} {_show(value)} is not epoch milliseconds (an integer) or an ISO-8601 string"
            ) from None
    if ms < MIN_TS_MS:
        raise InvalidEvent(
            f"{field} {_show(value)} is before 2000-01-01T00:00:00Z; ts must be epoch "
            "milliseconds (seconds?) after 2000"
        )
    if ms > now_ms + FUTURE_SLACK_MS:
        raise InvalidEvent(
            f"{field} {_show(value)} is more than one day after now ({now_ms} ms); check the producer's clock"
        )
    return ms


def _load_object(value: bytes) -> dict[str, Any]:
    if type(value) is not bytes:
        raise InvalidEvent(f"message is a {type(value).__name__}, expected bytes")
    if len(value) > MAX_MESSAGE_BYTES:
        raise InvalidEvent(f"message is {len(value)} bytes; the limit is {MAX_MESSAGE_BYTES} (1 MiB)")
    obj = _loads(value)
    if type(obj) is not dict:
        raise InvalidEvent(f"message is a JSON {type(obj).__name__}, expected an object: {_show(value.decode())}")
    return obj


def _loads(value: bytes) -> Any:
    """Parse UTF-8 JSON bytes with orjson (3-4x :func:`json.loads`); failures become ``InvalidEvent``.

    orjson is strict where the rules are: no ``NaN``/``Infinity``, valid UTF-8. Where it refuses what
    :func:`json.loads` accepts (integers beyond 64 bits, lone surrogate escapes), the record was invalid
    under the rules anyway; the standard parser then names the reason.
    """
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        pass
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidEvent(f"message is not valid UTF-8 (byte {e.start}); encode JSON as UTF-8") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise InvalidEvent(f"message is not valid JSON ({_show(str(e), 100)}): {_show(text)}") from None


def _required(obj: dict[str, Any], field: str, kind: str) -> Any:
    if field not in obj:
        raise InvalidEvent(f"{field} is missing; a {kind} needs {field} (fields: {_show(sorted(obj))})")
    return obj[field]


class RawClick(NamedTuple):
    """A validated raw click (a named tuple: ingest builds one per record).

    >>> RawClick("u1", "i2", 1700000000000).count
    1
    """

    user_id: str
    item_id: str
    ts: int
    impression_id: str | None = None
    count: int = 1  # type: ignore[assignment]  # shadows tuple.count (unused on a RawClick)
    feedback: str = "click"  # the feedback type; its weight comes from the feedback map (to_events)


@dataclass(frozen=True, slots=True)
class RawImpression:
    """A validated raw impression: ``item_ids`` in display order.

    >>> RawImpression("imp-1", "u1", ("i2", "i3"), 1700000000000).item_ids[0]
    'i2'
    """

    impression_id: str
    user_id: str
    item_ids: tuple[str, ...]
    ts: int


def parse_click(value: bytes, now_ms: int) -> RawClick:
    """Parse and validate a raw click message.

    >>> parse_click(b'{"user_id": 42, "item_id": "i7", "ts": 1700000000000, "count": 3}', 1700000000000)
    RawClick(user_id='42', item_id='i7', ts=1700000000000, impression_id=None, count=3, feedback='click')
    >>> parse_click(b'{"user_id": "u", "item_id": "i", "ts": 1700000000000, "feedback": "like"}', 1700000000000
    ...             ).feedback
    'like'
    """
    obj = _load_object(value)
    user = check_id(_required(obj, "user_id", "click"), "user_id")
    item = check_id(_required(obj, "item_id", "click"), "item_id")
    ts = parse_ts(_required(obj, "ts", "click"), now_ms)
    imp = obj.get("impression_id")
    if imp is not None:
        imp = check_id(imp, "impression_id")
    count = obj.get("count")
    if count is None:
        count = 1
    else:
        count = _as_int(count, "count")
        if not 1 <= count <= MAX_COUNT:
            raise InvalidEvent(f"count {count} is out of range; count must be 1..{MAX_COUNT}")
    feedback = obj.get("feedback")
    if feedback is None:
        feedback = "click"
    elif type(feedback) is not str or not _FEEDBACK_NAME.fullmatch(feedback):
        raise InvalidEvent(
            f"feedback {_show(feedback)} is not a feedback type: 1-32 characters [a-z0-9_-] starting with a "
            "letter, e.g. 'like'"
        )
    return RawClick(user, item, ts, imp, count, feedback)


def parse_impression(value: bytes, now_ms: int) -> RawImpression:
    """Parse and validate a raw impression message.

    >>> parse_impression(b'{"impression_id": "m1", "user_id": "u", "item_ids": [3, "b"], "ts": 1.7e12}',
    ...                  1700000000000).item_ids
    ('3', 'b')
    """
    obj = _load_object(value)
    imp = check_id(_required(obj, "impression_id", "impression"), "impression_id")
    user = check_id(_required(obj, "user_id", "impression"), "user_id")
    raw_items = _required(obj, "item_ids", "impression")
    if type(raw_items) is not list:
        raise InvalidEvent(f"item_ids {_show(raw_items)} is not a list; send the shown item ids in display order")
    n = len(raw_items)
    if n == 0:
        raise InvalidEvent("item_ids is empty; an impression shows at least 1 item")
    if n > MAX_ITEMS:
        raise InvalidEvent(f"item_ids has {n} items; the limit is {MAX_ITEMS} per impression")
    items = tuple(check_id(x, f"item_ids[{i}]") for i, x in enumerate(raw_items))
    if len(set(items)) != n:
        seen: dict[str, int] = {}
        for i, x in enumerate(items):
            if x in seen:
                raise InvalidEvent(
                    f"item_ids has {_show(x)} at positions {seen[x]} and {i}; "
                    "each item may be shown once per impression"
                )
            seen[x] = i
    ts = parse_ts(_required(obj, "ts", "impression"), now_ms)
    return RawImpression(imp, user, items, ts)


@dataclass(frozen=True, slots=True)
class RawErasure:
    """A validated user-erasure request: forget ``user_id`` and every event of it up to ``ts``.

    >>> RawErasure("u1", 1700000000000).user_id
    'u1'
    """

    user_id: str
    ts: int


def parse_erasure(value: bytes, now_ms: int) -> RawErasure:
    """Parse and validate a record of ``<p>.erasures``: ``{"user_id", "ts"}``, both required.

    >>> parse_erasure(b'{"user_id": 42, "ts": "2023-11-14T22:13:20Z"}', 1700000000000)
    RawErasure(user_id='42', ts=1700000000000)
    """
    obj = _load_object(value)
    user = check_id(_required(obj, "user_id", "user erasure"), "user_id")
    return RawErasure(user, parse_ts(_required(obj, "ts", "user erasure"), now_ms))


RawKind = Literal["clicks", "impressions", "erasures"]


def parse_record(topic_kind: RawKind, value: bytes, now_ms: int) -> RawClick | RawImpression | RawErasure:
    """Parse a record of the ``clicks``, ``impressions`` or ``erasures`` topic (dispatch on *topic_kind*).

    >>> parse_record("clicks", b'{"user_id": "u", "item_id": "i", "ts": 1700000000000}', 1700000000000).item_id
    'i'
    """
    if topic_kind == "clicks":
        return parse_click(value, now_ms)
    if topic_kind == "impressions":
        return parse_impression(value, now_ms)
    if topic_kind == "erasures":
        return parse_erasure(value, now_ms)
    raise ValueError(f"topic_kind {topic_kind!r} is unknown; use 'clicks' or 'impressions' (raw events) or 'erasures'")


class Event(NamedTuple):
    """A normalised event, the value of ``<p>.events`` (see docs/architecture.md). Immutable; a named tuple
    because the LMF worker and the ALS snapshot build one per event they read (5x cheaper than a frozen
    dataclass: ~0.5 against ~3 µs).

    ``type``: ``"click"`` (positive feedback, ``weight = count * w`` of its feedback type), ``"negative"`` (an
    explicit negative such as a dislike: ``weight = count * |w|``), ``"impression"`` (shown, ``weight`` 0) or
    ``"erase"`` (forget the user: item ``""``, weight 0, :mod:`stream.erasure`). ``fb`` names the feedback
    type when it is not ``"click"`` (the JSON then has an ``fb`` key; plain clicks keep the nine keys).

    >>> e = to_events(RawClick("u42", "i7", 1700000000000, "imp-9"), "zerocf.clicks", 2, 1041)[0]
    >>> e.to_json()
    b'{"id":"zerocf.clicks:2:1041:0","type":"click","user":"u42","item":"i7","ts":1700000000000,"weight":1.0,"pos":null,"imp":"imp-9","src":"zerocf.clicks/2/1041"}'
    >>> Event.from_json(e.to_json()) == e, e.key, e.origin
    (True, b'u42', ('zerocf.clicks', 2, 1041, 0))
    >>> d = to_events(RawClick("u42", "i7", 1700000000000, None, 2, "dislike"), "z.clicks", 0, 7, {"dislike": -0.5})[0]
    >>> d.type, d.weight, d.fb, Event.from_json(d.to_json()) == d
    ('negative', 1.0, 'dislike', True)
    """

    id: str
    type: Literal["click", "negative", "impression", "erase"]
    user: str
    item: str
    ts: int
    weight: float
    pos: int | None
    imp: str | None
    src: str
    fb: str | None = None  # the feedback type, when it is not "click"

    @property
    def key(self) -> bytes:
        """The Kafka key: the user id, UTF-8."""
        return self.user.encode("utf-8")

    @property
    def origin(self) -> tuple[str, int, int, int]:
        """``(source topic, source partition, source offset, index)`` parsed from ``id``."""
        topic, partition, offset, index = self.id.rsplit(":", 3)
        return topic, int(partition), int(offset), int(index)

    def to_json(self) -> bytes:
        """Compact JSON, keys exactly ``id,type,user,item,ts,weight,pos,imp,src`` (then ``fb`` if set)."""
        obj: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "user": self.user,
            "item": self.item,
            "ts": self.ts,
            "weight": self.weight,
            "pos": self.pos,
            "imp": self.imp,
            "src": self.src,
        }
        if self.fb is not None:
            obj["fb"] = self.fb
        return orjson.dumps(obj)

    @classmethod
    def from_json(cls, data: bytes) -> Event:
        """Strictly parse :meth:`to_json` output; anything malformed raises ``InvalidEvent``."""
        obj = _load_object(data)
        _check_keys(obj)
        return cls(*_check_event_fields(obj))


def _check_keys(obj: dict[str, Any]) -> None:
    """The count of keys (9, or 10 with ``fb``); :func:`_check_event_fields` then finds each of the nine, so
    together they accept exactly the two key sets, cheaper than comparing sets."""
    n = len(obj)
    if n != 9 and not (n == 10 and "fb" in obj):
        _bad_keys(obj)


def _bad_keys(obj: dict[str, Any]) -> NoReturn:
    raise InvalidEvent(f"event has keys {_show(sorted(obj), 120)}; expected exactly {list(_EVENT_KEYS)} "
                       "(and 'fb' for a feedback type other than click)")  # fmt: skip


def _check_event_fields(obj: dict[str, Any]) -> tuple[Any, ...]:
    try:
        eid, kind, user, item, ts, weight, pos, imp, src = (
            obj["id"],
            obj["type"],
            obj["user"],
            obj["item"],
            obj["ts"],
            obj["weight"],
            obj["pos"],
            obj["imp"],
            obj["src"],
        )
    except KeyError:
        _bad_keys(obj)
    # the common case of check_id inline: printable ASCII (no control character) of 1..256 bytes
    if not (type(user) is str and user.isascii() and user.isprintable() and 0 < len(user) <= MAX_ID_BYTES):
        user = check_id(user, "user") if type(user) is str else _bad("user", user, "a string")
    if not (type(item) is str and item.isascii() and item.isprintable() and 0 < len(item) <= MAX_ID_BYTES) \
            and not (kind == "erase" and item == ""):  # an erasure names no item  # fmt: skip
        item = check_id(item, "item") if type(item) is str else _bad("item", item, "a string")
    if type(ts) is not int or ts < MIN_TS_MS:
        _bad("ts", ts, f"an integer epoch ms >= {MIN_TS_MS}")
    if type(weight) is int:
        weight = float(weight)
    if type(weight) is not float or not 0.0 <= weight <= MAX_COUNT:
        _bad("weight", weight, f"a number in [0, {MAX_COUNT}]")
    if imp is not None and (type(imp) is not str or not imp):
        _bad("imp", imp, "null or a non-empty string")
    if type(eid) is not str or type(src) is not str:
        _bad("id/src", (eid, src), "strings")
    # id = '<topic>:<partition>:<offset>:<index>' (ASCII digits) and src = '<topic>/<partition>/<offset>'
    parts = eid.rsplit(":", 3)
    if len(parts) != 4:
        return _bad("id", eid, f"'<topic>:<partition>:<offset>:<index>' matching src {_show(src)}")
    topic, partition, offset, index_text = parts
    digits = partition + offset + index_text
    if not (topic and partition and offset and index_text and digits.isascii() and digits.isdecimal()) \
            or src != f"{topic}/{partition}/{offset}":  # fmt: skip
        return _bad("id", eid, f"'<topic>:<partition>:<offset>:<index>' matching src {_show(src)}")
    index = int(index_text)
    fb = obj.get("fb")
    if fb is not None and (kind not in ("click", "negative") or type(fb) is not str
                           or not _FEEDBACK_NAME.fullmatch(fb) or fb == "click"):  # fmt: skip
        _bad("fb", fb, "absent, or a feedback type other than 'click' of a click or negative event")
    if kind == "click" or kind == "negative":
        if pos is not None or index != 0 or not weight > 0.0:
            _bad(kind, (pos, index, weight), "pos null, index 0, weight > 0")
        if kind == "negative" and fb is None:
            _bad("negative", fb, "fb set: the feedback type of the explicit negative")
    elif kind == "impression":
        if type(pos) is not int or pos != index or weight != 0.0 or imp is None:
            _bad("impression", (pos, index, weight, imp), "pos == index, weight 0.0, imp set")
    elif kind == "erase":
        if item != "" or pos is not None or index != 0 or weight != 0.0 or imp is not None:
            _bad("erase", (item, pos, index, weight, imp), "item '', pos null, index 0, weight 0.0, imp null")
    else:
        _bad("type", kind, "'click', 'negative', 'impression' or 'erase'")
    return eid, kind, user, item, ts, weight, pos, imp, src, fb


def _bad(field: str, value: Any, rule: str) -> NoReturn:
    raise InvalidEvent(f"event {field} {_show(value)} is invalid; it must be {rule}")


def _feedback(raw: RawClick, feedback: Mapping[str, float]) -> tuple[Literal["click", "negative"], float, str | None]:
    """``(event type, weight, fb)`` of a raw click under the feedback map."""
    w = feedback.get(raw.feedback)
    if w is None:
        raise InvalidEvent(
            f"feedback {_show(raw.feedback)} is not configured (known: {', '.join(sorted(feedback))}); "
            "add it to ZEROCF_FEEDBACK_WEIGHTS of ingest, e.g. 'like:2'"
        )
    fb = None if raw.feedback == "click" else raw.feedback
    return ("click" if w > 0 else "negative"), raw.count * abs(w), fb


def to_events(raw: RawClick | RawImpression | RawErasure, topic: str, partition: int, offset: int,
              feedback: Mapping[str, float] = DEFAULT_FEEDBACK) -> list[Event]:  # fmt: skip
    """Normalise a raw record read at (*topic*, *partition*, *offset*) into events.

    A click gives one event (index 0, ``weight = count * |w|`` with ``w`` its feedback type's weight in
    *feedback*; type ``"negative"`` when ``w < 0``; an unknown type raises ``InvalidEvent``); an impression one
    event per shown item (index = display position, ``weight = 0.0``, ``pos`` = position); an erasure one
    ``"erase"`` event (index 0, item ``""``, ``weight = 0.0``).

    >>> [e.id for e in to_events(RawImpression("m", "u", ("a", "b"), 1700000000000), "p.impressions", 0, 5)]
    ['p.impressions:0:5:0', 'p.impressions:0:5:1']
    >>> to_events(RawErasure("u", 1700000000000), "p.erasures", 1, 3)[0].type
    'erase'
    """
    head = f"{topic}:{partition}:{offset}:"
    src = f"{topic}/{partition}/{offset}"
    if isinstance(raw, RawErasure):
        return [Event(head + "0", "erase", raw.user_id, "", raw.ts, 0.0, None, None, src)]
    if isinstance(raw, RawClick):
        kind, weight, fb = _feedback(raw, feedback)
        return [Event(head + "0", kind, raw.user_id, raw.item_id, raw.ts, weight, None, raw.impression_id, src, fb)]
    user, ts, imp = raw.user_id, raw.ts, raw.impression_id
    return [Event(f"{head}{i}", "impression", user, item, ts, 0.0, i, imp, src) for i, item in enumerate(raw.item_ids)]


def event_records(raw: RawClick | RawImpression | RawErasure, topic: str, partition: int, offset: int,
                  feedback: Mapping[str, float] = DEFAULT_FEEDBACK) -> list[tuple[bytes, bytes]]:  # fmt: skip
    """``(key, value)`` of each event of :func:`to_events`, the same bytes as ``(e.key, e.to_json())``, without
    building the :class:`Event` objects for a click (ingest's hot path: most records are clicks).

    >>> raw = RawClick("u42", "i7", 1700000000000, "imp-9")
    >>> event_records(raw, "z.clicks", 2, 1041) == [(e.key, e.to_json()) for e in to_events(raw, "z.clicks", 2, 1041)]
    True
    """
    if type(raw) is not RawClick:
        return [(e.key, e.to_json()) for e in to_events(raw, topic, partition, offset)]
    name = raw.feedback
    w = feedback.get(name)
    if w is None:
        _feedback(raw, feedback)  # raises, naming the types the map knows
        w = 0.0
    obj = {
        "id": f"{topic}:{partition}:{offset}:0",
        "type": "click" if w > 0 else "negative",
        "user": raw.user_id,
        "item": raw.item_id,
        "ts": raw.ts,
        "weight": raw.count * (w if w > 0 else -w),
        "pos": None,
        "imp": raw.impression_id,
        "src": f"{topic}/{partition}/{offset}",
    }
    if name != "click":
        obj["fb"] = name
    return [(raw.user_id.encode("utf-8"), orjson.dumps(obj))]


def _dumps(obj: dict[str, Any]) -> bytes:
    try:
        return _ENCODER.encode(obj).encode("utf-8")
    except (TypeError, ValueError) as e:  # UnicodeEncodeError (lone surrogate) is a ValueError
        raise InvalidEvent(f"cannot encode {_show(obj)} as UTF-8 JSON ({e}); use str/int ids") from None


def encode_click(
    user_id: str | int,
    item_id: str | int,
    ts: int | str,
    impression_id: str | int | None = None,
    count: int | None = None,
    feedback: str | None = None,
) -> bytes:
    """Raw click JSON (not validated: run :func:`parse_click` on it); ``None`` fields are omitted.

    >>> encode_click("u", "i", 1700000000000, count=2)
    b'{"user_id":"u","item_id":"i","ts":1700000000000,"count":2}'
    """
    obj: dict[str, Any] = {"user_id": user_id, "item_id": item_id, "ts": ts}
    if impression_id is not None:
        obj["impression_id"] = impression_id
    if count is not None:
        obj["count"] = count
    if feedback is not None:
        obj["feedback"] = feedback
    return _dumps(obj)


def encode_impression(
    impression_id: str | int, user_id: str | int, item_ids: list[str | int] | tuple[str | int, ...], ts: int | str
) -> bytes:
    """Raw impression JSON (not validated: run :func:`parse_impression` on it).

    >>> encode_impression("m", "u", ["a", "b"], 1700000000000)
    b'{"impression_id":"m","user_id":"u","item_ids":["a","b"],"ts":1700000000000}'
    """
    return _dumps({"impression_id": impression_id, "user_id": user_id, "item_ids": list(item_ids), "ts": ts})


# ---------------------------------------------------------------------- records of <p>.events
def encode_events(events: Sequence[Event]) -> bytes:
    """One record value of ``<p>.events`` carrying *events*: a **pack**, the JSON array of their
    :meth:`Event.to_json` objects, in stream order (``zerocf ingest`` packs up to ``ZEROCF_EVENTS_PACK``
    events of one partition per record; docs/architecture.md).

    >>> e = to_events(RawClick("u42", "i7", 1700000000000), "z.clicks", 0, 5)[0]
    >>> encode_events([e, e])[:30]
    b'[{"id":"z.clicks:0:5:0","type"'
    """
    return b"[" + b",".join([e.to_json() for e in events]) + b"]"


def pack_json(values: Sequence[bytes], pack: int, limit: int) -> Iterator[bytes]:
    """Record values of ``<p>.events`` for one partition's event JSON *values* (each below *limit*), in order:
    JSON arrays of at most *pack* events and *limit* bytes.

    >>> list(pack_json([b'{"a":1}', b'{"b":2}', b'{"c":3}'], 2, 100))
    [b'[{"a":1},{"b":2}]', b'[{"c":3}]']
    >>> list(pack_json([b'{"a":1}', b'{"b":2}'], 10, 16))
    [b'[{"a":1}]', b'[{"b":2}]']
    """
    start, size = 0, 2
    for n, v in enumerate(values):
        if n > start and (n - start >= pack or size + len(v) + 1 > limit):
            yield b"[" + b",".join(values[start:n]) + b"]"
            start, size = n, 2
        size += len(v) + 1
    if start < len(values):
        yield b"[" + b",".join(values[start:]) + b"]"


def decode_events(value: bytes) -> tuple[list[Event], list[str]]:
    """The events of one ``<p>.events`` record and the reasons for any element refused.

    A record is one event (a JSON object: one event per record, keyed by its user, as ``ZEROCF_EVENTS_PACK=1``
    and every release before packs write) or a pack (a JSON array of them). A pack with a bad element keeps
    its good ones; a record that is neither gives no events and one reason.

    >>> e = to_events(RawClick("u42", "i7", 1700000000000), "z.clicks", 0, 5)[0]
    >>> decode_events(e.to_json()) == decode_events(encode_events([e])) == ([e], [])
    True
    >>> decode_events(b'[{"id": 1}]')[1][0][:40]
    "event has keys ['id']; expected exactly "
    """
    try:
        if type(value) is not bytes:
            raise InvalidEvent(f"message is a {type(value).__name__}, expected bytes")
        obj = _loads(value)
    except InvalidEvent as exc:
        return [], [exc.reason]
    if type(obj) is dict:
        obj = [obj]
    elif type(obj) is not list or not all(type(o) is dict for o in obj):
        what = type(obj).__name__ if type(obj) is not list else "array with a non-object element"
        return [], [f"record is a JSON {what}; expected an event object or an array of them"]
    events: list[Event] = []
    bad: list[str] = []
    for o in obj:
        try:
            _check_keys(o)
            events.append(Event(*_check_event_fields(o)))
        except InvalidEvent as exc:
            bad.append(exc.reason)
    return events, bad
