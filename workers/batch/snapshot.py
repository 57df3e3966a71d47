"""The ALS snapshot: every click of ``<p>.events`` folded into an :class:`InteractionMatrix`, checkpointed.

:class:`Snapshot` reads *all* partitions of the events topic with ``assign()`` (no consumer group: the
checkpoint, not Kafka, holds its progress), resuming each partition at the checkpoint's last included
offset + 1, or at the beginning. Like the LMF worker it runs one :class:`stream.dedupe.Deduper` per events
partition, so a duplicate run left by an at-least-once ingest is counted once, and it persists the
watermarks with the offsets. "Caught up" uses the high watermark of the last fetch
(:func:`stream.kafka_util.caught_up`), never ``end_offsets`` (wrong on the dev broker).

What is accumulated: ``type == "click"`` events add their ``weight`` (the click count times its feedback weight) to
``F[user, item]``, ``"negative"`` events (explicit negatives, e.g. dislikes) subtract theirs (ALS reads a negative
entry as an observed zero of confidence ``1 + alpha |f|``, :mod:`workers.kernels.als`; no popularity), and clicks
add ``weight · 2^((ts - pop_ref_ms) / half_life)`` to the item's time-decayed popularity (a sum that does not depend
on the order the partitions are read in, so the LMF workers' replay after the swap continues it exactly).
Impressions register nothing (no ids either): a zero entry would not change the ALS solution, and rows with
no clicks would only be published as near-zero vectors; users and items seen only in impressions are
initialised online by the LMF worker instead. Every accepted event (click or impression) counts in
``n_events``; undecodable records are logged and skipped.

An ``"erase"`` event (:mod:`stream.erasure`) removes the user's row from the matrix (the row index stays with
the id ``""``, skipped by the publisher) and records a tombstone (the user id's digest, never the id): the
user's later events with ``ts`` up to the erasure are ignored, newer ones start a fresh row.

Checkpoint (:meth:`Snapshot.save`, atomic via :meth:`InteractionMatrix.save`)::

    <checkpoint_dir>/CURRENT, ckpt-<seq>/{matrix.npz, ids.json, meta.json}
    meta.json "metadata": {"topic": "<p>.events",
                           "binding": {"topic", "partitions": count, "cluster_id": Kafka's or null,
                                       "model_id": the store's model id},
                           "offsets": {"<partition>": last offset included, ...},
                           "watermarks": {"<partition>": Deduper.state(), ...},
                           "n_events": accepted events, "n_clicks": accepted clicks,
                           "n_duplicates": ..., "n_invalid": ..., "n_erasures": erase events,
                           "erased": {"<erased_digest(user)>": erased_at_ms, ...}}

**Binding.** A checkpoint belongs to one source and one model: the events topic, its partition count, the
Kafka cluster id (where the broker reports one) and the store's model id. :meth:`Snapshot.load` refuses a
checkpoint of another topic, :meth:`Snapshot.catch_up` one whose partition count or cluster differs, or whose
offsets lie beyond the topic's end (the topic was re-created), with :class:`CheckpointMismatch`; the ALS worker
refuses one whose model is not the store's (``workers.batch.worker``). Nothing is read into the matrix first.

Memory for N distinct (user, item) pairs, U users and I items (:meth:`InteractionMatrix.estimate_bytes`):
at most ``40·N + 150·(U + I) + 8·U`` bytes while building a CSR (32 B/pair for the growable COO buffer
with slack, 8 B/pair for the CSR copy, ~150 B per string id). 10 M pairs, 1 M users, 100 k items:
~0.55 GiB. Repeated clicks on the same pair cost nothing extra.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream.dedupe import Deduper
from stream.erasure import Tombstones
from stream.errors import ServiceUnavailable
from stream.events import Event, decode_events
from stream.runtime import StopFlag
from workers.batch.interactions import InteractionMatrix
from workers.errors import WorkerError

log = logging.getLogger(__name__)

POLL_MS = 200
MAX_POLL_RECORDS = 20_000
DISCOVER_S = 10.0  # how long to wait for the events topic's metadata
POP_RESCALE = 500.0  # half-lives past the reference after which the decayed popularity is rescaled

__all__ = ["CheckpointMismatch", "Snapshot"]


class CheckpointMismatch(WorkerError):
    """The checkpoint was built from another topic, cluster or model than the one configured; nothing read."""


def _start_over(path: Path, topic: str) -> str:
    return (
        f"start over with `zerocf als --once --rebuild` (re-reads {topic} from the beginning), or point "
        f"ZEROCF_ALS_CHECKPOINT_DIR (--checkpoint-dir) at this deployment's checkpoint instead of {path}"
    )


class Snapshot:
    """Clicks of the events topic as a user x item count matrix, resumable from a checkpoint.

    Parameters
    ----------
    topic : str
        The events topic (``cfg.topics.events``).
    checkpoint_dir : str or Path
        Where :meth:`save` and :meth:`load` keep the checkpoint.
    consumer_factory : callable
        Returns a KafkaConsumer-like object with no group (``partitions_for_topic``, ``assign``,
        ``seek``, ``seek_to_beginning``, ``poll``, ``highwater``, ``position``, ``assignment``,
        ``close``); one is created per :meth:`catch_up` and closed at its end.

    Examples
    --------
    >>> s = Snapshot("demo.events", "/tmp/unused", consumer_factory=lambda: None)
    >>> s.n_events, s.offsets, s.matrix.shape
    (0, {}, (0, 0))
    """

    def __init__(self, topic: str, checkpoint_dir: str | Path, consumer_factory: Callable[[], Any],
                 pop_half_life_ms: int = 86_400_000,
                 cluster_id: Callable[[], str | None] | None = None) -> None:  # fmt: skip
        self.topic = topic
        self.path = Path(checkpoint_dir)
        self._factory = consumer_factory
        self._cluster_id = cluster_id or (lambda: None)
        self.model_id = ""  # the store's model this snapshot feeds (set by the ALS worker)
        self.partitions: int | None = None  # the events topic's partition count at the last catch-up
        self.cluster_id: str | None = None  # the Kafka cluster id at the last catch-up (None: not reported)
        self._checked = False  # the source was compared with the checkpoint's binding
        self.matrix = InteractionMatrix()
        self.offsets: dict[int, int] = {}
        self.dedupers: dict[int, Deduper] = {}
        self.n_events = 0
        self.n_clicks = 0
        self.n_duplicates = 0
        self.n_invalid = 0
        self.n_erasures = 0
        self.tombstones = Tombstones()  # erased users (digests only), checkpointed as "erased"
        self.pop_half_life_ms = int(pop_half_life_ms)
        self.pop_ref_ms = 0  # set by the first click
        self.popularity = np.zeros(0)  # decayed click weight per item index of the matrix

    @classmethod
    def from_config(cls, cfg: Any, checkpoint_dir: str | Path | None = None) -> Snapshot:
        """A snapshot of ``cfg.topics.events`` reading with a group-less consumer of ``cfg.kafka``."""
        from stream import kafka_util

        def factory() -> Any:
            return kafka_util.consumer(
                cfg.kafka, group_id=None, client_id="zerocf-als", max_poll_records=MAX_POLL_RECORDS
            )

        def cluster_id() -> str | None:
            from kafka import KafkaAdminClient

            try:
                admin = KafkaAdminClient(**cfg.kafka.client_kwargs(), client_id="zerocf-als")
            except Exception as exc:  # noqa: BLE001 - the id is a safety check, not required
                log.info("Kafka cluster id not available (%s); the checkpoint is bound without it", exc)
                return None
            try:
                cid = admin.describe_cluster().get("cluster_id")
                return str(cid) if cid else None
            except Exception as exc:  # noqa: BLE001
                log.info("Kafka cluster id not available (%s); the checkpoint is bound without it", exc)
                return None
            finally:
                admin.close()

        path = checkpoint_dir or cfg.checkpoint_path
        return cls(cfg.topics.events, path, factory, cfg.pop_half_life_ms, cluster_id)

    # ------------------------------------------------------------------ state
    def watermarks(self) -> dict[int, dict[str, list[int]]]:
        """Dedupe state per events partition (what the generation's ``watermarks`` get)."""
        return {p: d.state() for p, d in sorted(self.dedupers.items())}

    def estimate_bytes(self) -> int:
        """Upper estimate of the matrix's memory (see the module docstring)."""
        m, n = self.matrix.shape
        return InteractionMatrix.estimate_bytes(self.matrix.nnz, m, n)

    def binding(self) -> dict[str, Any]:
        """What the checkpoint was built from: topic, partition count, Kafka cluster id, the store's model."""
        return {"topic": self.topic, "partitions": self.partitions, "cluster_id": self.cluster_id,
                "model_id": self.model_id}  # fmt: skip

    def metadata(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "binding": self.binding(),
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "watermarks": {str(p): w for p, w in self.watermarks().items()},
            "n_events": self.n_events,
            "n_clicks": self.n_clicks,
            "n_duplicates": self.n_duplicates,
            "n_invalid": self.n_invalid,
            "n_erasures": self.n_erasures,
            "erased": self.tombstones.state(),
            "pop_ref_ms": self.pop_ref_ms,
            "pop_half_life_ms": self.pop_half_life_ms,
        }

    def save(self) -> Path:
        """Atomically checkpoint the matrix with offsets, watermarks and counters; returns its directory."""
        return self.matrix.save(self.path, self.metadata(), {"popularity": self.popularity})

    def load(self) -> bool:
        """Restore the checkpoint in ``checkpoint_dir``; False (state left empty) when there is none.

        Raises :class:`CheckpointMismatch` when the checkpoint belongs to another topic; its partition count,
        cluster and model are restored into :attr:`partitions`, :attr:`cluster_id` and :attr:`model_id` and
        checked by :meth:`catch_up` and the ALS worker.
        """
        try:
            m = InteractionMatrix.load(self.path)
        except FileNotFoundError:
            return False
        meta = m.metadata
        if meta.get("topic") != self.topic:
            raise CheckpointMismatch(
                f"checkpoint {self.path} holds a snapshot of topic {meta.get('topic')!r}, not {self.topic!r} "
                f"(another ZEROCF_TOPIC_PREFIX or deployment); {_start_over(self.path, self.topic)}"
            )
        bound = meta.get("binding") or {}
        self.partitions = bound.get("partitions")
        self.cluster_id = bound.get("cluster_id")
        self.model_id = bound.get("model_id") or ""
        self.matrix = m
        self.offsets = {int(p): int(o) for p, o in meta.get("offsets", {}).items()}
        self.dedupers = {int(p): Deduper.from_state(w) for p, w in meta.get("watermarks", {}).items()}
        for name in ("n_events", "n_clicks", "n_duplicates", "n_invalid", "n_erasures"):
            setattr(self, name, int(meta.get(name, 0)))
        self.tombstones.load(meta.get("erased", {}))
        if int(meta.get("pop_half_life_ms", self.pop_half_life_ms)) == self.pop_half_life_ms:
            self.pop_ref_ms = int(meta.get("pop_ref_ms", 0))
            self.popularity = m.arrays.get("popularity", np.zeros(0)).astype(np.float64)
        else:  # another half-life: the decayed sums cannot be converted; they restart from the next click
            log.warning("checkpoint popularity half-life differs from ZEROCF_POP_HALF_LIFE_S: popularity restarts")
        log.info(
            "snapshot restored from %s: %d events, %d users x %d items, offsets %s",
            self.path,
            self.n_events,
            *self.matrix.shape,
            self.offsets,
        )
        return True

    # ------------------------------------------------------------------ reading
    def _partitions(self, consumer: Any) -> list[int]:
        deadline = time.monotonic() + DISCOVER_S
        parts = consumer.partitions_for_topic(self.topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = consumer.partitions_for_topic(self.topic)
        if not parts:
            raise ServiceUnavailable(
                f"topic {self.topic} not found; run `zerocf ingest` first or check "
                "ZEROCF_TOPIC_PREFIX and ZEROCF_KAFKA_BOOTSTRAP"
            )
        found = sorted(int(p) for p in parts)
        self._check_source(len(found))
        return found

    def _check_source(self, n_partitions: int) -> None:
        """Compare the topic's partition count and the cluster id with the checkpoint's (once), then bind."""
        if self._checked:
            return
        cid = self._cluster_id()
        resumed = bool(self.offsets)
        if resumed and self.partitions is not None and self.partitions != n_partitions:
            raise CheckpointMismatch(
                f"checkpoint {self.path} was built from {self.topic} with {self.partitions} partitions, the topic "
                f"now has {n_partitions} (re-created, or another cluster); {_start_over(self.path, self.topic)}"
            )
        if resumed and self.cluster_id and cid and self.cluster_id != cid:
            raise CheckpointMismatch(
                f"checkpoint {self.path} was built from Kafka cluster {self.cluster_id}, the broker now answering "
                f"is cluster {cid} (another cluster: ZEROCF_KAFKA_BOOTSTRAP?); {_start_over(self.path, self.topic)}"
            )
        self.partitions, self.cluster_id, self._checked = n_partitions, cid or self.cluster_id, True

    def catch_up(self, stop: StopFlag | None = None, max_seconds: float | None = None) -> int:
        """Read every partition up to its high watermark; return the number of new accepted events.

        Stops early (state consistent: offsets name the last record folded in) when ``stop`` is set or
        after ``max_seconds``.
        """
        from kafka.structs import TopicPartition

        from stream.kafka_util import caught_up

        consumer = self._factory()
        before = self.n_events
        t0 = time.monotonic()
        try:
            tps = [TopicPartition(self.topic, p) for p in self._partitions(consumer)]
            consumer.assign(tps)
            for tp in tps:
                off = self.offsets.get(tp.partition)
                if off is None:
                    consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, off + 1)
            while True:
                polled = consumer.poll(timeout_ms=POLL_MS, max_records=MAX_POLL_RECORDS)
                for tp, records in polled.items():
                    if records:
                        self._fold(tp.partition, records)
                if not polled and caught_up(consumer):
                    self._check_ends(consumer, tps)
                    break
                if stop is not None and stop.is_set():
                    log.info("snapshot: stop requested, catch-up interrupted")
                    break
                if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                    log.info("snapshot: catch-up paused after %.0fs (max_seconds)", max_seconds)
                    break
        finally:
            consumer.close()
        new = self.n_events - before
        log.info(
            "snapshot: +%d events in %.1fs (total %d events, %d clicks, %d users x %d items, "
            "%d duplicates dropped, ~%.1f MiB)",
            new,
            time.monotonic() - t0,
            self.n_events,
            self.n_clicks,
            *self.matrix.shape,
            self.n_duplicates,
            self.estimate_bytes() / 2**20,
        )
        return new

    def _check_ends(self, consumer: Any, tps: list[Any]) -> None:
        """Refuse a checkpoint whose offsets lie beyond the end of the topic (it was re-created since)."""
        for tp in tps:
            hw, off = consumer.highwater(tp), self.offsets.get(tp.partition)
            if hw is not None and off is not None and off >= hw:
                raise CheckpointMismatch(
                    f"checkpoint {self.path} covers {self.topic} partition {tp.partition} up to offset {off}, but "
                    f"the topic ends at offset {hw - 1} (it was deleted and re-created, or this is another "
                    f"cluster); {_start_over(self.path, self.topic)}"
                )

    def _add_popularity(self, items: list[str], weights: list[float], stamps: list[int]) -> None:
        if not items:
            return
        ts = np.asarray(stamps, np.int64)
        if self.pop_ref_ms == 0:
            self.pop_ref_ms = int(ts.min())
        ahead = (int(ts.max()) - self.pop_ref_ms) / self.pop_half_life_ms
        if ahead > POP_RESCALE:  # keep the sums finite: move the reference to the newest click
            self.popularity *= 2.0 ** (-ahead)
            self.pop_ref_ms = int(ts.max())
        n = self.matrix.shape[1]
        if self.popularity.size < n:
            self.popularity = np.concatenate([self.popularity, np.zeros(n - self.popularity.size)])
        idx = self.matrix.item_index(items)
        np.add.at(self.popularity, idx, np.asarray(weights) * np.exp2((ts - self.pop_ref_ms) / self.pop_half_life_ms))

    def item_popularity(self) -> dict[str, float]:
        """Decayed popularity of every item, relative to :attr:`pop_ref_ms`."""
        n = self.matrix.shape[1]
        pop = np.concatenate([self.popularity, np.zeros(max(0, n - self.popularity.size))])[:n]
        return dict(zip(self.matrix.item_ids, pop.tolist()))

    def _fold(self, partition: int, records: list[Any]) -> None:
        """Decode, de-duplicate and add one partition's records; advance its offset."""
        last = self.offsets.get(partition)
        if last is not None and records and records[0].offset <= last:
            # the consumer fell back to the beginning: the checkpoint's offset is out of range of this topic
            raise CheckpointMismatch(
                f"checkpoint {self.path} covers {self.topic} partition {partition} up to offset {last}, but the "
                f"broker served offset {records[0].offset} after it (the topic was re-created or truncated, or "
                f"this is another cluster); {_start_over(self.path, self.topic)}"
            )
        dedupe = self.dedupers.setdefault(partition, Deduper())
        users: list[str] = []
        items: list[str] = []
        weights: list[float] = []
        stamps: list[int] = []
        for ev, rec in _events(records):
            if ev is None:
                self.n_invalid += 1
                log.error("partition %d offset %d: undecodable event skipped (%s)", partition, rec.offset, rec.reason)
                continue
            if not dedupe.accept(ev):
                self.n_duplicates += 1
                continue
            self.n_events += 1
            if ev.type == "erase":  # user erasure (stream.erasure): the clicks before it first, then the user goes
                self._add_clicks(users, items, weights, stamps)
                self._erase(ev)
            elif (ev.type == "click" or ev.type == "negative") and ev.weight > 0 and not self.tombstones.ignores(ev):
                users.append(ev.user)
                items.append(ev.item)
                weights.append(ev.weight if ev.type == "click" else -ev.weight)
                stamps.append(ev.ts)
        self._add_clicks(users, items, weights, stamps)
        self.offsets[partition] = int(records[-1].offset)

    def _add_clicks(self, users: list[str], items: list[str], weights: list[float], stamps: list[int]) -> None:
        """Fold collected clicks (and explicit negatives: negative weights) into the matrix, the clicks into the
        popularity, then empty the lists."""
        self.matrix.add_batch(users, items, weights)
        pi, pw, pt = items, weights, stamps
        if any(w < 0 for w in weights):
            pos = [n for n, w in enumerate(weights) if w > 0]
            pi, pw, pt = [items[n] for n in pos], [weights[n] for n in pos], [stamps[n] for n in pos]
        self._add_popularity(pi, pw, pt)
        self.n_clicks += len(pi)
        for part in (users, items, weights, stamps):
            part.clear()

    def _erase(self, ev: Event) -> None:
        """An erase event: the user's row leaves the matrix (its id too), a tombstone makes the snapshot ignore
        the user's events up to ``ev.ts`` from now on. The decayed popularity keeps the user's clicks, as
        anonymous per-item sums (stream.erasure)."""
        self.tombstones.record(ev.user, ev.ts)
        self.matrix.remove_user(ev.user)
        self.n_erasures += 1


@dataclass(frozen=True)
class _Refused:
    offset: int
    reason: str


def _events(records: list[Any]) -> Iterator[tuple[Event | None, Any]]:
    """``(event, record)`` for every event of the records (a record is one event or a pack), in order, and
    ``(None, _Refused)`` for each element that could not be decoded."""
    for rec in records:
        events, bad = decode_events(rec.value)
        for reason in bad:
            yield None, _Refused(rec.offset, reason)
        for ev in events:
            yield ev, rec
