"""Downstream de-duplication of replayed events (pure: no Kafka, no clock).

Ingest is at-least-once: after a crash it re-reads source records from the last committed offset, so an
events partition can hold a *duplicate run*. Within one events partition the events of one source
partition arrive in increasing ``(source offset, index)`` order, so a replay shows up as a step back.
A :class:`Deduper` — one per events partition a consumer reads — keeps, per source partition, the highest
``(offset, index)`` accepted and drops everything not above it (see docs/architecture.md, "At-least-once
ingest, exactly-once effect downstream").

The source position is parsed from the event id ``<topic>:<partition>:<offset>:<index>`` (topic names
contain dots but never colons), so the deduper needs nothing but ids.

>>> d = Deduper()
>>> [d.accept_id(i) for i in ("z.clicks:0:5:0", "z.clicks:0:6:0", "z.clicks:0:5:0", "z.clicks:0:7:0")]
[True, True, False, True]
>>> d.state()
{'z.clicks/0': [7, 0]}
>>> Deduper.from_state(d.state()).accept_id("z.clicks:0:6:0")
False
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from stream.errors import InvalidEvent


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


def parse_event_id(event_id: str) -> tuple[str, int, int]:
    """Split an event id into ``(source key "<topic>/<partition>", offset, index)``.

    >>> parse_event_id("shop.impressions:3:1041:2")
    ('shop.impressions/3', 1041, 2)
    >>> parse_event_id("nonsense")
    Traceback (most recent call last):
    ...
    stream.errors.InvalidEvent: event id 'nonsense' is not '<topic>:<partition>:<offset>:<index>'; ...
    """
    parts = event_id.rsplit(":", 3)
    if len(parts) != 4 or not parts[0]:
        raise InvalidEvent(
            f"event id {event_id!r} is not '<topic>:<partition>:<offset>:<index>'; "
            "ids are written by `zerocf ingest` only"
        )
    topic, partition, offset, index = parts
    try:
        return f"{topic}/{int(partition)}", int(offset), int(index)
    except ValueError:
        raise InvalidEvent(
            f"event id {event_id!r} has a non-integer partition, offset or index; "
            "ids are written by `zerocf ingest` only"
        ) from None


class Deduper:
    """Per-source-partition high-water marks of one events partition.

    Use one instance per events partition (the ordering guarantee holds only within a partition) and
    persist :meth:`state` atomically with the consumer's own progress.

    Parameters
    ----------
    marks
        Initial marks ``{"<src topic>/<src partition>": (offset, index)}``; empty by default.

    Examples
    --------
    >>> d = Deduper({"p.impressions/0": (10, 1)})
    >>> d.accept_id("p.impressions:0:10:1"), d.accept_id("p.impressions:0:10:2")
    (False, True)
    """

    __slots__ = ("_marks", "_keys")

    def __init__(self, marks: Mapping[str, tuple[int, int]] | None = None) -> None:
        self._marks: dict[str, tuple[int, int]] = {k: (int(v[0]), int(v[1])) for k, v in (marks or {}).items()}
        self._keys: dict[str, str] = {}  # "<topic>:<partition>" as written in ids -> its source key

    def accept_id(self, event_id: str) -> bool:
        """True (and advance the mark) if ``event_id`` is above its source partition's mark."""
        head, _, index_text = event_id.rpartition(":")
        prefix, _, offset_text = head.rpartition(":")
        src = self._keys.get(prefix)
        if src is None or not (offset_text.isdecimal() and index_text.isdecimal()):  # first sight, or odd: check
            src, offset, index = parse_event_id(event_id)
            if len(self._keys) < 10_000:
                self._keys[prefix] = src
        else:
            offset, index = int(offset_text), int(index_text)
        pos = (offset, index)
        mark = self._marks.get(src)
        if mark is not None and pos <= mark:
            return False
        self._marks[src] = pos
        return True

    def accept(self, event: _HasId) -> bool:
        """True if ``event`` (anything with an ``id``, e.g. :class:`stream.events.Event`) is new."""
        return self.accept_id(event.id)

    def filter(self, events: Iterable[Any]) -> list[Any]:
        """The events of ``events`` that :meth:`accept` lets through, in order."""
        return [e for e in events if self.accept_id(e.id)]

    def state(self) -> dict[str, list[int]]:
        """JSON-able marks ``{"<src topic>/<src partition>": [offset, index]}`` (a copy)."""
        return {k: [v[0], v[1]] for k, v in sorted(self._marks.items())}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> Deduper:
        """Rebuild a deduper from :meth:`state` output (``None`` or ``{}`` gives an empty one).

        >>> Deduper.from_state({"a.clicks/1": [4, 0]}).state()
        {'a.clicks/1': [4, 0]}
        """
        marks: dict[str, tuple[int, int]] = {}
        for key, value in (state or {}).items():
            try:
                offset, index = value
                marks[str(key)] = (int(offset), int(index))
            except (TypeError, ValueError):
                raise InvalidEvent(
                    f"dedupe state entry {key!r}: {value!r} is not [offset, index]; "
                    "pass the dict Deduper.state() returned"
                ) from None
        return cls(marks)

    def __repr__(self) -> str:
        return f"Deduper({len(self._marks)} source partitions)"
