"""``zerocf items``: write item states to the catalogue topic ``<p>.items`` (:mod:`stream.catalog`).

``zerocf items hide ID... [--categories a,b] [--items-file F]``: hidden (never recommended).
``zerocf items show ID... [--categories a,b] [--until T]``: visible (until ``T`` when given).
``zerocf items expire ID... [--until T] [--categories a,b]``: visible until ``T`` (default now), hidden after.
``zerocf items reset ID...``: a tombstone: back to the default (visible, no expiry, no categories).

Each record is the item's *whole* state (the topic is compacted by key): a command that omits
``--categories`` writes none, so pass them again to keep them. ``T`` is epoch milliseconds or ISO-8601
(``2026-12-24T18:00:00Z``; without an offset UTC). The topic is created (one partition) when missing.
Stdout is one JSON summary, e.g. ``{"action": "hide", "topic": "zerocf.items", "items": 2, "hidden": true,
"available_until": null, "categories": []}``; records are acknowledged by the broker before it is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from stream.catalog import CATALOG_PARTITIONS, ItemState, check_category, encode_record, items_topic
from stream.config import TOP_LEVEL, ProcessSettings, add_flags, flag_overrides, load
from stream.errors import ConfigError, InvalidEvent
from stream.events import MIN_TS_MS, iso_to_ms
from workers.serving.cli import read_ids

log = logging.getLogger(__name__)

__all__ = ["build_records", "parse_until", "register", "run"]

ACTIONS = ("hide", "show", "expire", "reset")
_SEND_TIMEOUT_S = 30.0


def parse_until(text: str | None, now_ms: int) -> int | None:
    """``--until``: epoch ms (digits) or ISO-8601; None when not given.

    >>> parse_until("1767225600000", 0), parse_until("2026-01-01T00:00:00Z", 0), parse_until(None, 5)
    (1767225600000, 1767225600000, None)
    """
    if text is None:
        return None
    raw = text.strip()
    try:
        ms = int(raw) if raw.isdigit() else iso_to_ms(raw)
    except (ValueError, OverflowError):
        raise ConfigError(
            f"--until {text!r} is neither epoch milliseconds nor ISO-8601; use e.g. 2026-12-24T18:00:00Z"
        ) from None
    if ms < MIN_TS_MS:
        raise ConfigError(f"--until {text!r} is before 2000-01-01: give epoch milliseconds (not seconds)")
    return ms


def parse_categories(text: str | None) -> tuple[str, ...]:
    """``--categories a,b``: names separated by commas (blanks dropped, duplicates collapsed).

    >>> parse_categories("books, sale,,books")
    ('books', 'sale')
    """
    if not text:
        return ()
    try:
        return tuple(dict.fromkeys(check_category(c.strip()) for c in text.split(",") if c.strip()))
    except InvalidEvent as exc:
        raise ConfigError(f"--categories: {exc.reason}") from None


def build_records(
    action: str, items: list[str], until: int | None, categories: tuple[str, ...], now_ms: int
) -> list[tuple[bytes, bytes | None]]:
    """The ``(key, value)`` records of one command (a ``None`` value is a tombstone).

    >>> build_records("expire", ["i1"], None, (), 1767225600000)
    [(b'i1', b'{"item":"i1","hidden":false,"available_until":1767225600000,"categories":[]}')]
    """
    if action == "reset":
        if until is not None or categories:
            raise ConfigError("items reset writes the default state; it takes no --until or --categories")
        out: list[tuple[bytes, bytes | None]] = []
        for i in items:
            key, _ = encode_record(ItemState(i))
            out.append((key, None))
        return out
    if action == "hide" and until is not None:
        raise ConfigError("items hide is unconditional; to hide from a time on use `zerocf items expire --until T`")
    if action == "expire" and until is None:
        until = now_ms
    states = [ItemState(i, action == "hide", until, categories) for i in items]
    try:
        return [encode_record(s) for s in states]
    except InvalidEvent as exc:
        raise ConfigError(f"{exc.reason}; fix the item id") from None


def register(subparsers: Any) -> None:
    """Add ``zerocf items``."""
    p = subparsers.add_parser(
        "items",
        help="hide, show, expire or reset catalogue items (writes <prefix>.items)",
        description="Write item states to the catalogue topic <prefix>.items, read by `zerocf serve`. Each "
        "record is the item's whole state: pass --categories again to keep them.",
    )
    p.add_argument("action", choices=ACTIONS, help="hide, show (visible), expire (hidden from --until on), reset")
    p.add_argument("items", nargs="*", metavar="ID", help="item ids")
    p.add_argument("--items-file", default=None, help="file of item ids, one per line ('-' = stdin)")
    p.add_argument("--until", default=None, help="epoch ms or ISO-8601: expire at (default now), or show until")
    p.add_argument("--categories", default=None, help="comma-separated categories of the items, e.g. books,sale")
    add_flags(p, ProcessSettings, skip=TOP_LEVEL + ("metrics_port", "metrics_host"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Produce the records, wait for the broker's acknowledgements, print the JSON summary."""
    from stream import kafka_util

    cfg = load(ProcessSettings, args.env, flag_overrides(args, ProcessSettings))
    now_ms = int(time.time() * 1000)
    items = read_ids(args.items, args.items_file, "item")
    records = build_records(
        args.action, items, parse_until(args.until, now_ms), parse_categories(args.categories), now_ms
    )
    topic = items_topic(cfg.topic_prefix)
    kafka_util.ensure_topics(cfg.kafka, {topic: CATALOG_PARTITIONS}, {topic: {"cleanup.policy": "compact"}})
    producer = kafka_util.producer(cfg.kafka, client_id="zerocf-items")
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in records]
        producer.flush(timeout=_SEND_TIMEOUT_S)
        for f in futures:
            f.get(timeout=_SEND_TIMEOUT_S)
    finally:
        producer.close(timeout=5)
    first = json.loads(records[0][1]) if records and records[0][1] is not None else {}
    summary = {
        "action": args.action,
        "topic": topic,
        "items": len(records),
        "hidden": bool(first.get("hidden", False)),
        "available_until": first.get("available_until"),
        "categories": first.get("categories", []),
    }
    log.info("items %s: %d records written to %s", args.action, len(records), topic)
    sys.stdout.write(json.dumps(summary, ensure_ascii=False) + "\n")
    return 0
