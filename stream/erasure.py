"""User erasure: ``zerocf forget-user USER...``, the ``<p>.erasures`` records and the tombstone rule (pure).

``zerocf forget-user`` produces one record per user to the raw topic ``<p>.erasures`` (key = user id, value
``{"user_id": ..., "ts": <now, epoch ms>}``). ``zerocf ingest`` reads it as its third raw topic and writes one
``"erase"`` event (item ``""``, weight 0) to ``<p>.events``, keyed by the user like the user's clicks, so it
lands in the user's partition **in order** with them; an invalid record goes to ``<p>.dlq`` with its reason.
Every consumer of ``<p>.events`` then acts on it at its place in the stream:

- the LMF worker drops the user from its caches and, in the batch's atomic write (with the offset fence),
  deletes the user's row, accumulators and update counter in the live generation (and in the retired ones
  still kept), deletes the seen set and records a tombstone;
- the ALS snapshot drops the user's row of the click matrix (its checkpoint keeps no entry for the user) and
  records the tombstone in its checkpoint, so the next re-solve publishes no row for the user;
- serving then finds no row and no seen set: the user gets the cold-start fallback.

**The tombstone rule** (:class:`Tombstones`, the same in both consumers): after an erasure at ``T`` (the
record's ``ts``), an event of that user with ``ts <= T`` is ignored, so a replay of old events does not
recreate the user; an event with ``ts > T`` starts a fresh user. Events of the user that precede the
erasure in the same batch are dropped with it. A tombstone stores :func:`erased_digest` of the user id, never
the id, and lives :data:`RETENTION_MS` (400 days, in event time: pruned relative to the newest erasure)
in Redis (``zcf:v2:{ns}:erased``) and in the ALS checkpoint.

What erasure does **not** remove (anonymous aggregates): per-item click counts and decayed popularity already
counted, item factors and the global bias learned online, the processes' event counters. The ALS re-solve
recomputes the all-time item counts from the snapshot without the user, and item factors without the user's
clicks; the decayed popularity keeps the user's past clicks as part of per-item sums (it cannot be recomputed
without every click's time, and it halves every ``ZEROCF_POP_HALF_LIFE_S``). Kafka keeps the user's records on
the topics until their retention deletes them; a rebuild from ``<p>.events`` replays the erase event in order.

>>> t = Tombstones()
>>> kept, erased = t.apply([_ev("click", "a", 10), _ev("erase", "a", 20), _ev("click", "a", 15),
...                         _ev("click", "a", 30), _ev("click", "b", 5)])
>>> [(e.type, e.user, e.ts) for e in kept], erased
([('click', 'a', 30), ('click', 'b', 5)], {'a': 20})
>>> t.erased_at("a"), list(t.state().values())
(20, [20])
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from stream.config import TOP_LEVEL, ProcessSettings, StreamConfig, add_flags, flag_overrides, load
from stream.errors import ConfigError, InvalidEvent
from stream.events import Event, check_id

log = logging.getLogger(__name__)

__all__ = ["RETENTION_MS", "Tombstones", "encode_erasure", "erased_digest", "register", "run"]

RETENTION_MS = 400 * 86_400_000  # a tombstone is kept this long after the newest erasure (event time)
_CLEAN_LIMIT = 1 << 20  # users remembered as "not erased" before that cache is cleared
_SEND_TIMEOUT_S = 30.0


def erased_digest(user: str) -> str:
    """The tombstone's name for ``user``: 128 bits of SHA-256, hex (the id itself is never stored).

    >>> erased_digest("u42")
    '2a5001c0038664d7b26e3d911bcb9181'
    """
    return hashlib.sha256(b"zerocf-erased\x00" + user.encode("utf-8")).hexdigest()[:32]


def encode_erasure(user: str | int, ts_ms: int) -> tuple[bytes, bytes]:
    """``(key, value)`` of the ``<p>.erasures`` record for ``user`` (validated like ingest validates it).

    >>> encode_erasure("u42", 1700000000000)
    (b'u42', b'{"user_id":"u42","ts":1700000000000}')
    """
    try:
        uid = check_id(user, "user_id")
    except InvalidEvent as exc:
        raise ConfigError(f"{exc.reason}; fix the user id") from None
    value = json.dumps({"user_id": uid, "ts": int(ts_ms)}, separators=(",", ":"), ensure_ascii=False)
    return uid.encode("utf-8"), value.encode("utf-8")


class Tombstones:
    """Erased users (``digest -> erased_at_ms``) and the rule applied to each batch of events.

    ``by_digest`` is what is persisted (Redis, the ALS checkpoint). Users looked up are cached by id in
    process memory only (erased ones with their time, and up to ~1M users found not erased).
    """

    def __init__(self, by_digest: Mapping[str, int] | None = None) -> None:
        self.by_digest: dict[str, int] = {}
        self._erased: dict[str, int] = {}  # user id -> erased_at, for users looked up or erased here
        self._clean: set[str] = set()  # users looked up and not erased
        self.load(by_digest or {})

    def __len__(self) -> int:
        return len(self.by_digest)

    def load(self, by_digest: Mapping[str, int]) -> None:
        """Replace the tombstones (e.g. by what Redis holds after a reload) and forget the id caches."""
        self.by_digest = {str(d): int(t) for d, t in by_digest.items()}
        self._oldest = min(self.by_digest.values(), default=None)
        self._erased.clear()
        self._clean.clear()

    def state(self) -> dict[str, int]:
        """``digest -> erased_at_ms``, sorted (what a checkpoint stores)."""
        return dict(sorted(self.by_digest.items()))

    def erased_at(self, user: str) -> int | None:
        """When ``user`` was last erased (epoch ms), None if never (within the retention)."""
        t = self._erased.get(user)
        if t is not None or not self.by_digest or user in self._clean:
            return t
        t = self.by_digest.get(erased_digest(user))
        if t is None:
            if len(self._clean) >= _CLEAN_LIMIT:
                self._clean.clear()
            self._clean.add(user)
        else:
            self._erased[user] = t
        return t

    def record(self, user: str, ts_ms: int) -> int:
        """Erase ``user`` at ``ts_ms`` (a later erasure never moves the time back); returns the time kept."""
        t = max(int(ts_ms), self.erased_at(user) or 0)
        self.by_digest[erased_digest(user)] = t
        self._oldest = t if self._oldest is None else min(self._oldest, t)
        self._erased[user] = t
        self._clean.discard(user)
        self.prune(t)
        return t

    def prune(self, newest_ms: int) -> None:
        """Drop tombstones older than :data:`RETENTION_MS` before ``newest_ms`` (as the store's script does)."""
        floor = newest_ms - RETENTION_MS
        if self._oldest is not None and self._oldest < floor:
            self.load({d: t for d, t in self.by_digest.items() if t >= floor})

    def ignores(self, event: Event) -> bool:
        """True when ``event`` belongs to an erased user and is not newer than the erasure."""
        t = self.erased_at(event.user)
        return t is not None and event.ts <= t

    def apply(self, events: Sequence[Event]) -> tuple[list[Event], dict[str, int]]:
        """The batch's events the rule keeps (in order, erase events removed) and ``{user: erased_at}`` of the
        users erased in it. An event of a user erased later in the same batch is dropped."""
        last = {e.user: n for n, e in enumerate(events) if e.type == "erase"}
        if not last and not self.by_digest:
            return list(events), {}
        kept: list[Event] = []
        erased: dict[str, int] = {}
        for n, e in enumerate(events):
            if e.type == "erase":
                erased[e.user] = self.record(e.user, e.ts)
            elif n < last.get(e.user, -1) or self.ignores(e):
                continue
            else:
                kept.append(e)
        return kept, erased


def _ev(kind: Literal["click", "erase"], user: str, ts: int) -> Event:
    """A minimal event for the doctests."""
    erase = kind == "erase"
    return Event(f"t:0:{ts}:0", kind, user, "" if erase else "i", ts, 0.0 if erase else 1.0, None, None, f"t/0/{ts}")


# ---------------------------------------------------------------------- CLI
def read_users(users: Iterable[str], users_file: str | None) -> list[str]:
    """User ids from the arguments, then ``users_file`` (one per line, blanks skipped, ``-`` = stdin)."""
    out = [str(u) for u in users]
    if users_file:
        try:
            fh = sys.stdin if users_file == "-" else Path(users_file).open(encoding="utf-8")
            with fh:
                out += [line.strip() for line in fh if line.strip()]
        except OSError as exc:
            raise ConfigError(f"--users-file {users_file}: {exc.strerror}; pass a readable file of user ids") from None
    if not out:
        raise ConfigError("no users given; pass user ids as arguments or --users-file FILE")
    return list(dict.fromkeys(out))


def register(subparsers: Any) -> None:
    """Add ``zerocf forget-user``."""
    p = subparsers.add_parser(
        "forget-user",
        help="erase users: their vectors, seen items and snapshot rows (writes <prefix>.erasures)",
        description="Write one erasure request per user to <prefix>.erasures. `zerocf ingest` turns each into an "
        "erase event on the user's partition of <prefix>.events; the LMF worker then deletes the user's keys in "
        "Redis and the ALS snapshot the user's interactions; events of the user up to now are ignored afterwards "
        "(a replay does not bring the user back), later ones start a fresh user.",
    )
    p.add_argument("users", nargs="*", metavar="USER", help="user ids")
    p.add_argument("--users-file", default=None, help="file of user ids, one per line ('-' = stdin)")
    p.add_argument("--json", action="store_true", help="print one JSON line per user (partition, offset, ts)")
    add_flags(p, ProcessSettings, skip=TOP_LEVEL + ("metrics_port", "metrics_host"))
    p.set_defaults(func=run)


def produce_erasures(cfg: StreamConfig, users: Sequence[str], ts_ms: int) -> list[dict[str, Any]]:
    """Send one erasure record per user, wait for the acknowledgements; per user ``{user_id, ts, topic,
    partition, offset}``. The topic is created (``ZEROCF_EVENTS_PARTITIONS``) when missing."""
    from stream import kafka_util

    records = [encode_erasure(u, ts_ms) for u in users]
    topic = cfg.topics.erasures
    kafka_util.ensure_topics(cfg.kafka, {topic: cfg.events_partitions})
    producer = kafka_util.producer(cfg.kafka, client_id="zerocf-forget-user")
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in records]
        producer.flush(timeout=_SEND_TIMEOUT_S)
        meta = [f.get(timeout=_SEND_TIMEOUT_S) for f in futures]
    finally:
        producer.close(timeout=5)
    return [
        {"user_id": key.decode("utf-8"), "ts": ts_ms, "topic": topic, "partition": m.partition, "offset": m.offset}
        for (key, _), m in zip(records, meta)
    ]


def run(args: argparse.Namespace) -> int:
    """Produce the erasure records, wait for the broker's acknowledgements, print what was written."""
    cfg = load(StreamConfig, args.env, flag_overrides(args, ProcessSettings))
    users = read_users(args.users, args.users_file)
    sent = produce_erasures(cfg, users, int(time.time() * 1000))
    log.info("forget-user: %d erasure records written to %s", len(sent), cfg.topics.erasures)
    if args.json:
        for row in sent:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(f"{len(sent)} user(s) to forget written to {cfg.topics.erasures}; `zerocf ingest`, `zerocf "
                         "lmf` and the next `zerocf als` run apply it\n")  # fmt: skip
    return 0
