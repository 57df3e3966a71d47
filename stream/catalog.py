"""The item catalogue: per-item state on ``<p>.items`` and :class:`CatalogView`, which follows it in memory.

Record format (compacted-topic friendly: the latest record of a key is the item's whole state)::

    key   = the item id (UTF-8, 1..256 bytes, no control characters; the same rules as event ids)
    value = {"item": "i7", "hidden": false, "available_until": 1767225600000, "categories": ["books", "sale"]}
    value = null (a tombstone): back to the default, visible, no expiry, no categories

- ``hidden`` (bool, default false): never recommended while true.
- ``available_until`` (epoch ms, or null = no expiry): from that instant on the item counts as hidden.
- ``categories`` (optional list of 0..32 distinct strings of 1..64 UTF-8 bytes without control characters or
  commas; duplicates collapse, order is kept).
- ``item`` (optional) must equal the key when present. Unknown fields are ignored, so that a newer producer's
  records stay readable; a value is at most 64 KiB of UTF-8 JSON.

A record that breaks these rules raises :class:`~stream.errors.InvalidEvent` in :func:`parse_record`;
:class:`CatalogView` logs it, counts it and keeps the item's previous state. There is no dead-letter topic
for the catalogue (its producers are operators and their tools, not a firehose): the view's ``bad_records``
counter and its log line (partition, offset, reason) are where a bad record shows.

>>> key, value = encode_record(ItemState("i7", hidden=True, categories=("books",)))
>>> key, value
(b'i7', b'{"item":"i7","hidden":true,"available_until":null,"categories":["books"]}')
>>> parse_record(key, value)
ItemState(item='i7', hidden=True, available_until=None, categories=('books',))
>>> parse_record(b"i7", None).is_default
True
>>> parse_record(b"i7", b'{"hidden": "yes"}')
Traceback (most recent call last):
...
stream.errors.InvalidEvent: item 'i7': hidden 'yes' is a str; send true or false
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stream.errors import InvalidEvent
from stream.events import check_id

log = logging.getLogger(__name__)

__all__ = [
    "CATALOG_PARTITIONS",
    "MAX_CATEGORIES",
    "MAX_CATEGORY_BYTES",
    "MAX_RECORD_BYTES",
    "CatalogView",
    "ItemState",
    "catalog_consumer",
    "check_category",
    "encode_record",
    "items_topic",
    "parse_record",
]

#: Partitions of ``<p>.items`` when zerocf creates it (a catalogue is small; the view reads every partition).
CATALOG_PARTITIONS = 1
MAX_CATEGORIES = 32
MAX_CATEGORY_BYTES = 64
MAX_RECORD_BYTES = 64 << 10
MAX_TIME_MS = 1 << 53  # JSON-safe integers: far beyond any real date
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc, as stream.events
MAX_RETRY_S = 60.0  # longest wait between two attempts to reach the broker
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def items_topic(prefix: str) -> str:
    """The catalogue topic of a prefix.

    >>> items_topic("zerocf")
    'zerocf.items'
    """
    return f"{prefix}.items"


@dataclass(frozen=True)
class ItemState:
    """The catalogue state of one item (the default: visible, no expiry, no categories)."""

    item: str
    hidden: bool = False
    available_until: int | None = None  # epoch ms; at and after it the item counts as hidden
    categories: tuple[str, ...] = ()

    @property
    def is_default(self) -> bool:
        """True when the state is the default one (nothing to remember about the item)."""
        return not self.hidden and self.available_until is None and not self.categories

    def hidden_at(self, now_ms: int) -> bool:
        """Hidden, or expired at ``now_ms``.

        >>> ItemState("a", available_until=1000).hidden_at(999), ItemState("a", available_until=1000).hidden_at(1000)
        (False, True)
        """
        return self.hidden or (self.available_until is not None and now_ms >= self.available_until)


def check_category(value: Any, item: str | None = None) -> str:
    """Validate one category name (1..64 UTF-8 bytes, no control characters, no comma) and return it.

    >>> check_category("books")
    'books'
    >>> check_category("a,b", "i1")
    Traceback (most recent call last):
    ...
    stream.errors.InvalidEvent: item 'i1': category 'a,b' contains a comma; categories are separate strings
    """
    who = "" if item is None else f"item {item!r}: "
    if type(value) is not str:
        raise InvalidEvent(f"{who}category {value!r} is a {type(value).__name__}; send strings")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidEvent(f"{who}category {value!r} is not valid Unicode") from None
    if not 1 <= size <= MAX_CATEGORY_BYTES:
        raise InvalidEvent(
            f"{who}category {value[:80]!r} is {size} bytes; categories are 1..{MAX_CATEGORY_BYTES} UTF-8 bytes"
        )
    if _CONTROL.search(value):
        raise InvalidEvent(f"{who}category {value!r} contains a control character; remove it")
    if "," in value:
        raise InvalidEvent(f"{who}category {value!r} contains a comma; categories are separate strings")
    return value


def _categories(value: Any, item: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if type(value) is not list:
        raise InvalidEvent(f"item {item!r}: categories is a {type(value).__name__}; send a list of strings")
    out = tuple(dict.fromkeys(check_category(c, item) for c in value))
    if len(out) > MAX_CATEGORIES:
        raise InvalidEvent(f"item {item!r}: {len(out)} categories; the limit is {MAX_CATEGORIES} per item")
    return out


def _until(value: Any, item: str) -> int | None:
    if value is None:
        return None
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or not 0 <= value <= MAX_TIME_MS:
        raise InvalidEvent(
            f"item {item!r}: available_until {value!r} is not epoch milliseconds (an integer >= 0) or null"
        )
    return value


def parse_record(key: bytes | None, value: bytes | None) -> ItemState:
    """The :class:`ItemState` of one ``<p>.items`` record; a ``None`` value (tombstone) is the default state.

    Raises :class:`~stream.errors.InvalidEvent` naming the item, the field and the rule.
    """
    if key is None:
        raise InvalidEvent("catalogue record without a key; the key must be the item id")
    try:
        item = check_id(key.decode("utf-8"), "item id (key)")
    except UnicodeDecodeError:
        raise InvalidEvent("catalogue key is not valid UTF-8; the key must be the item id") from None
    if value is None:
        return ItemState(item)
    if len(value) > MAX_RECORD_BYTES:
        raise InvalidEvent(f"item {item!r}: value is {len(value)} bytes; the limit is {MAX_RECORD_BYTES}")
    try:
        doc = json.loads(value.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidEvent(f"item {item!r}: value is not UTF-8 JSON ({exc}); send a JSON object or null") from None
    if doc is None:
        return ItemState(item)
    if type(doc) is not dict:
        raise InvalidEvent(f"item {item!r}: value is a JSON {type(doc).__name__}; send a JSON object or null")
    if doc.get("item") is not None and doc["item"] != item:
        raise InvalidEvent(f"item {item!r}: the value names item {doc['item']!r}; it must equal the key")
    hidden = doc.get("hidden", False)
    if hidden is None:
        hidden = False
    if type(hidden) is not bool:
        raise InvalidEvent(f"item {item!r}: hidden {hidden!r} is a {type(hidden).__name__}; send true or false")
    return ItemState(item, hidden, _until(doc.get("available_until"), item), _categories(doc.get("categories"), item))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def encode_record(state: ItemState) -> tuple[bytes, bytes]:
    """``(key, value)`` of ``state`` for ``<p>.items`` (validated as :func:`parse_record` reads it)."""
    key = check_id(state.item, "item id").encode("utf-8")
    doc = {
        "item": state.item,
        "hidden": bool(state.hidden),
        "available_until": _until(state.available_until, state.item),
        "categories": list(_categories(list(state.categories), state.item)),
    }
    return key, _ENCODER.encode(doc).encode("utf-8")


# ---------------------------------------------------------------------------------------------- the view
@dataclass
class _Counters:
    records: int = 0
    bad_records: int = 0
    last_bad: str = ""
    errors: int = 0
    last_error: str = ""
    state: str = "starting"  # starting, unavailable, waiting_for_topic, loading, following, stopped
    partitions: list[int] = field(default_factory=list)


class CatalogView:
    """The latest :class:`ItemState` of every item on a catalogue topic, in memory, thread-safe.

    :meth:`start` follows ``topic`` from its beginning in a daemon thread with a consumer from
    ``make_consumer`` (no group: every partition assigned and read from offset 0, then polled for new records;
    partitions added later are picked up when the client's metadata shows them). Reads answer from memory:
    :meth:`hidden_now` (hidden or expired now, a ``frozenset`` cached until the state changes or the next
    expiry passes), :meth:`items_of` a category's items, :meth:`in_category`, :meth:`state`. A bad record is
    logged and counted (``bad_records``) and leaves the item's previous state; a broker error is logged once,
    counted, and retried with back-off from ``retry_s`` doubling to 60 s (the view keeps answering with what
    it has; kafka-python itself logs its failed bootstrap attempts at WARNING/ERROR).

    :meth:`apply` is the record sink the thread uses; tests and other consumers (e.g. an LMF worker that reads
    the topic itself) can feed it directly.

    >>> view = CatalogView(None, "p.items", clock=lambda: 2.0)  # clock in seconds: now = 2000 ms
    >>> view.apply(b"a", b'{"hidden": true}'); view.apply(b"b", b'{"available_until": 1500, "categories": ["x"]}')
    >>> view.apply(b"c", b'{"available_until": 9000, "categories": ["x"]}'); view.apply(b"d", b"oops")
    >>> sorted(view.hidden_now()), sorted(view.items_of("x")), view.in_category("c", "x"), view.bad_records
    (['a', 'b'], ['b', 'c'], True, 1)
    >>> view.apply(b"a", None); sorted(view.hidden_now())
    ['b']
    """

    def __init__(
        self,
        make_consumer: Callable[[], Any] | None,
        topic: str,
        *,
        clock: Callable[[], float] = time.time,
        poll_ms: int = 200,
        metadata_s: float = 10.0,
        retry_s: float = 5.0,
    ) -> None:
        self.topic, self._make_consumer, self._clock = topic, make_consumer, clock
        self._poll_ms, self._metadata_s, self._retry_s = int(poll_ms), float(metadata_s), float(retry_s)
        self._lock = threading.Lock()
        self._states: dict[str, ItemState] = {}
        self._hidden: set[str] = set()
        self._expiring: dict[str, int] = {}
        self._by_category: dict[str, set[str]] = {}
        self._cached: frozenset[str] = frozenset()
        self._cached_valid_until = -1  # ms; the cached set is exact for now_ms < this (-1: recompute)
        self._counters = _Counters()
        self._stop = threading.Event()
        self._loaded = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reads (from memory)
    def hidden_now(self) -> frozenset[str]:
        """Ids of the items hidden or expired at the current time (the ``Recommender``'s ``hidden`` hook)."""
        now = int(self._clock() * 1000)
        with self._lock:
            if now >= self._cached_valid_until:
                expired = {i for i, until in self._expiring.items() if until <= now}
                upcoming = [until for until in self._expiring.values() if until > now]
                self._cached = frozenset(self._hidden | expired)
                self._cached_valid_until = min(upcoming, default=MAX_TIME_MS + 1)
            return self._cached

    def items_of(self, category: str) -> frozenset[str]:
        """The items whose latest state lists ``category`` (hidden ones included: filter with hidden_now)."""
        with self._lock:
            return frozenset(self._by_category.get(category, ()))

    def in_category(self, item: str, category: str) -> bool:
        with self._lock:
            return item in self._by_category.get(category, ())

    def state(self, item: str) -> ItemState:
        """The latest state of ``item`` (the default one for an item the topic never named)."""
        with self._lock:
            return self._states.get(item) or ItemState(item)

    @property
    def bad_records(self) -> int:
        return self._counters.bad_records

    @property
    def records(self) -> int:
        return self._counters.records

    @property
    def loaded(self) -> bool:
        """True once every partition was read to the end at least once."""
        return self._loaded.is_set()

    def wait_loaded(self, timeout: float) -> bool:
        return self._loaded.wait(timeout)

    def status(self) -> dict[str, Any]:
        """What ``/healthz`` shows: the follower's state, its counts and its last error."""
        c = self._counters
        with self._lock:
            items, categories = len(self._states), len(self._by_category)
        out: dict[str, Any] = {
            "topic": self.topic,
            "state": c.state,
            "loaded": self.loaded,
            "items": items,
            "hidden_now": len(self.hidden_now()),
            "categories": categories,
            "records": c.records,
            "bad_records": c.bad_records,
        }
        if c.last_bad:
            out["last_bad_record"] = c.last_bad
        if c.last_error:
            out["error"] = c.last_error
        return out

    # ------------------------------------------------------------------ writes
    def apply(self, key: bytes | None, value: bytes | None, where: str = "") -> None:
        """Apply one record (the latest state of its item); a bad one is logged and counted, never raised."""
        try:
            new = parse_record(key, value)
        except InvalidEvent as exc:
            self._counters.bad_records += 1
            self._counters.last_bad = f"{where} {exc.reason}".strip()[:300]
            log.warning("catalog %s: bad record skipped%s: %s", self.topic, f" at {where}" if where else "", exc)
            return
        self._counters.records += 1
        with self._lock:
            self._replace(new)
            self._cached_valid_until = -1

    def apply_many(self, states: Iterable[ItemState]) -> None:
        """Set the state of several items at once (tests, and callers that parsed records themselves)."""
        with self._lock:
            for s in states:
                self._replace(s)
            self._cached_valid_until = -1

    def _replace(self, new: ItemState) -> None:
        item = new.item
        old = self._states.pop(item, None)
        if old is not None:
            for c in old.categories:
                members = self._by_category.get(c)
                if members is not None:
                    members.discard(item)
                    if not members:
                        del self._by_category[c]
        self._hidden.discard(item)
        self._expiring.pop(item, None)
        if new.is_default:
            return  # nothing to remember: a tombstone or an all-default state frees the item's memory
        self._states[item] = new
        if new.hidden:
            self._hidden.add(item)
        if new.available_until is not None:
            self._expiring[item] = new.available_until
        for c in new.categories:
            self._by_category.setdefault(c, set()).add(item)

    # ------------------------------------------------------------------ the follower thread
    def start(self) -> CatalogView:
        """Follow the topic in a daemon thread (returns at once; never waits for the broker)."""
        if self._make_consumer is None:
            raise ValueError("CatalogView without a consumer factory cannot follow a topic; feed it with apply()")
        self._thread = threading.Thread(target=self._run, name=f"zerocf-catalog-{self.topic}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        reported, delay = "", self._retry_s
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = self._make_consumer() if self._make_consumer else None
                delay = self._retry_s
                self._follow(consumer)
            except Exception as exc:  # the loop boundary: any client failure is retried, never fatal
                self._counters.errors += 1
                self._counters.state = "unavailable"
                text = f"{type(exc).__name__}: {exc}"[:300]
                self._counters.last_error = text
                if text != reported:  # logged once per distinct error, not on every retry
                    log.warning("catalog %s not followed (%s); retrying with back-off", self.topic, text)
                    reported = text
                self._stop.wait(delay)
                delay = min(MAX_RETRY_S, delay * 2)  # a broker that stays away costs (and logs) little
            finally:
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception:  # closing a broken client: nothing left to do
                        log.debug("catalog consumer close failed", exc_info=True)
        self._counters.state = "stopped"

    def _follow(self, consumer: Any) -> None:
        from kafka.structs import TopicPartition

        from stream import kafka_util

        assigned: set[int] = set()
        checked = float("-inf")
        empty_polls = 0
        while not self._stop.is_set():
            if time.monotonic() - checked >= (self._metadata_s if assigned else 1.0):
                checked = time.monotonic()
                found = set(consumer.partitions_for_topic(self.topic) or ())
                new = found - assigned
                if new:
                    assigned |= new
                    consumer.assign([TopicPartition(self.topic, p) for p in sorted(assigned)])
                    consumer.seek_to_beginning(*(TopicPartition(self.topic, p) for p in sorted(new)))
                    self._counters.partitions = sorted(assigned)
                    log.info("catalog %s: following partitions %s", self.topic, sorted(assigned))
            if not assigned:
                self._counters.state = "waiting_for_topic"
                self._stop.wait(1.0)
                continue
            self._counters.last_error = ""
            polled: Mapping[Any, list[Any]] = consumer.poll(timeout_ms=self._poll_ms)
            for tp, records in polled.items():
                for r in records:
                    self.apply(r.key, r.value, f"partition {tp.partition} offset {r.offset}")
            empty_polls = 0 if polled else empty_polls + 1
            tps = [TopicPartition(self.topic, p) for p in sorted(assigned)]
            if not polled and kafka_util.caught_up(consumer, tps, unknown_is_done=empty_polls >= 5):
                if not self._loaded.is_set():
                    log.info("catalog %s loaded: %s", self.topic, self._summary())
                self._loaded.set()
            self._counters.state = "following" if self._loaded.is_set() else "loading"

    def _summary(self) -> str:
        s = self.status()
        return f"{s['items']} items with state, {s['hidden_now']} hidden now, {s['bad_records']} bad records"


def catalog_consumer(settings: Any, client_id: str = "zerocf-catalog") -> Any:
    """A group-less consumer for :class:`CatalogView` (metadata refreshed every 10 s: new partitions show)."""
    from stream import kafka_util

    return kafka_util.consumer(
        settings, group_id=None, client_id=client_id, metadata_max_age_ms=10_000, fetch_max_wait_ms=200
    )
