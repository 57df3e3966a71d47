"""``zerocf lmf``: the online LMF worker — events from Kafka, SGD, factors to Redis, exactly-once effect.

One loop step (:meth:`LMFWorker._step`) polls, then per events partition: decode and de-duplicate (ingest
is at-least-once), plan (sample negatives), fetch every vector the batch touches in one round trip, train,
and submit the write: one Lua call that also stores the partition's applied offset and de-duplication
watermarks — atomically, fenced on the previous offset (:meth:`workers.store.FactorStore.apply_batch`). The
write runs on a writer thread while the next batch is prepared; at most one is in flight. Kafka commits are
only a hint: at start and on every assignment the worker seeks each partition to the offset stored in Redis
+ 1, so a worker killed at any moment resumes without losing or double-applying an event.

When the ALS worker publishes a new generation, the next write returns ``NEW_GENERATION``: the worker
reloads the generation (items, counts, calibration bias) and seeks its partitions to the offsets the
snapshot covered, replaying everything learned online since into the new generation. A Redis outage is
the same: once Redis answers again, everything resumes from the offsets Redis holds.

Kafka commits carry the model id and generation as metadata (``{"model": id, "g": g}``), so a group's committed
offsets say which model it fed. A start that finds no model in Redis while the group has committed offsets
means Redis lost the model: the worker refuses (:class:`~workers.store.ModelLost`, exit 2) unless ``--rebuild``
says to start a new one; a store lost while running stops the worker the same way.

``--until-idle`` exits 0 only when every partition of ``<p>.events``, not just this worker's, is applied to
its end (the applied-offset fence in Redis against the high watermark the broker reports); while other
members still make progress it waits for them, and it exits 1 when they made none for
``ZEROCF_LMF_IDLE_TIMEOUT_S``. A missing events topic is refused with ``--until-idle`` (exit 2) and waited for
otherwise; the worker never subscribes to a topic that does not exist (a subscription could auto-create it).
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata, TopicPartition

from stream import kafka_util
from stream.catalog import CatalogView, catalog_consumer, items_topic
from stream.config import TOP_LEVEL, add_flags, flag_overrides, load
from stream.dedupe import Deduper
from stream.errors import ConfigError
from stream.events import Event, decode_events
from stream.runtime import Backoff, StopFlag, start_http
from workers.config import LMFConfig
from workers.online.metrics import LMFMetrics, WorkerStats
from workers.online.model import BatchPlan, OnlineModel, TrainResult, rank_rows
from workers.online.progress import TopicEnds
from workers.online.quality import attach
from workers.store import ApplyStatus, BatchState, BatchWrite, FactorStore, Fence, ModelLost

log = logging.getLogger(__name__)

__all__ = ["LMFWorker", "register", "run"]

PROGRESS_EVERY_S = 10.0
GENERATION_CHECK_S = 1.0  # while idle, how often the worker looks for a newly published generation
RANK_CAP_FROM_ITEMS = 20_000  # live quality: from this catalogue size on, rank_items_per_click spaces the ranks
CATALOG_WAIT_S = 10.0  # at start, how long the worker waits for an existing catalogue topic to be read
NO_ASSIGNMENT_EXIT_S = 60.0  # --until-idle gives up after this long without any partition
PROBE_EVERY_S = 1.0  # --until-idle: how often the other partitions' progress is checked
TOPIC_WAIT_LOG_S = 60.0  # without --until-idle: how often a missing events topic is reported


class Step(enum.Enum):
    """What one loop step did."""

    TRAINED = "trained"  # every polled batch was planned, trained and submitted
    IDLE = "idle"  # nothing polled (the write in flight has landed)
    RESTARTED = "restarted"  # state was reloaded from Redis: the rest of the poll is re-read from its offsets
    RESUMED = "resumed"  # recovered from a Redis outage (what was polled is re-read likewise)


class LMFWorker:
    """Consume ``<p>.events`` with a group and train the online model into the live generation.

    ``catalog``: the catalogue view whose hidden and expired items are never sampled as negatives; by default
    (``ZEROCF_LMF_CATALOG``) the worker follows ``<p>.items`` itself.

    ``rank_hook(ranks)``, if given, receives per applied batch the prequential ranks of its clicks (every
    ``rank_every``-th click, to bound the cost on large catalogues), each
    computed inside the kernel right before that click's own update: ``(user, item, model greater, model ties,
    count greater, count ties, decayed greater, decayed ties, warm)`` (see :func:`workers.kernels.lmf.lmf_train`).
    """

    def __init__(self, cfg: LMFConfig, store: FactorStore, stop: StopFlag | None = None, rank_hook: Any = None,
                 rank_every: int = 1, rebuild: bool = False, catalog: CatalogView | None = None) -> None:  # fmt: skip
        self.cfg, self.store = cfg, store
        self.catalog, self._own_catalog = catalog, False
        self.rebuild = rebuild  # create a new model even if the group's commits say the store lost one
        self.exit_code = 0  # 1: --until-idle ended without every partition applied to its end
        self.model_id = ""
        self.rank_hook, self.rank_every = rank_hook, rank_every
        self.rank_items_per_click = 0  # > 0: rank at most one click per this many items (live quality, its cost)
        self.lag_total: int | None = None  # records behind on the assigned partitions at the last batch
        self.stop = stop or StopFlag()
        self.model = OnlineModel(cfg, seed=cfg.seed)
        self.metrics = LMFMetrics()
        self.stats = WorkerStats()
        self.g = 0
        self._items_read = 0.0
        self.applied: dict[int, int | None] = {}
        self.dedupers: dict[int, Deduper] = {}
        self.consumer: Any = None
        self._healthy_redis = True
        self._needs_resume = False
        self._pending: _Pending | None = None
        self._gen_checked = 0.0
        self._ends: TopicEnds | None = None  # --until-idle: the end of every partition, whoever owns it
        self._probed = 0.0
        self._progress: tuple[int, float] | None = None  # (records behind, since when) of the other partitions
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zerocf-lmf-writer")

    @property
    def effective_rank_every(self) -> int:
        """Every how many clicks one is ranked: ``rank_every``, or more on a large catalogue with
        ``rank_items_per_click`` (a rank scores every item)."""
        n_items = self.model.n_items
        if self.rank_items_per_click > 0 and n_items > RANK_CAP_FROM_ITEMS:
            return max(self.rank_every, n_items // self.rank_items_per_click)
        return self.rank_every

    # ------------------------------------------------------------------ lifecycle
    def run(self, until_idle: bool = False) -> WorkerStats:
        """Bootstrap, loop until stopped (or caught up and idle with ``until_idle``), tear down. Without a rank
        hook of its own the worker publishes its live quality (``ZEROCF_LMF_QUALITY_EVERY``,
        :mod:`workers.online.quality`) while it runs."""
        reporter = attach(self) if self.rank_hook is None else None
        http = None
        try:
            http = self._bootstrap(until_idle)
            if http is not False:
                self._work(until_idle)
        finally:
            self._teardown(http)
            if reporter is not None:
                reporter.close()
        return self.stats

    def _bootstrap(self, until_idle: bool = False) -> Any:
        """Connect, check the topic and the store, create the model if absent, subscribe; False if stopped."""
        # Auto-creation only after the topic was seen (checked next, before subscribing): a broker that lost it
        # (the dev broker's memory storage after a restart) gets it back, and the group its partitions; Tansu
        # never assigns a topic to a member that joined before the topic existed.
        self.consumer = kafka_util.consumer(self.cfg.kafka, group_id=self.cfg.group, client_id="zerocf-lmf",
                                            max_poll_records=self.cfg.batch, allow_auto_create_topics=True)  # fmt: skip
        if not self._wait_for_topic(until_idle):
            return False
        self._check_store()
        self.store.ensure_model(self.cfg.factors)
        self.model_id = self.store.model_id
        self.load_generation()
        self._follow_catalog()
        self.consumer.subscribe([self.cfg.topics.events], listener=_Rebalance(self))
        port = self.cfg.runtime.metrics_port
        return start_http(port, self.health, self.metrics.registry, self.cfg.runtime.metrics_host) if port else None

    def _follow_catalog(self) -> None:
        """Follow ``<p>.items`` (``ZEROCF_LMF_CATALOG``) unless a view was given; when the topic exists, wait up to
        :data:`CATALOG_WAIT_S` for it to be read, so the first batches already skip what it hides."""
        if self.catalog is not None or not self.cfg.catalog:
            return
        topic = items_topic(self.cfg.topic_prefix)
        kafka = self.cfg.kafka
        self.catalog = CatalogView(lambda: catalog_consumer(kafka, client_id="zerocf-lmf-catalog"), topic).start()
        self._own_catalog = True
        if topic in self.consumer.topics() and not self.catalog.wait_loaded(CATALOG_WAIT_S):
            log.warning("catalogue %s not read within %.0f s: until it is, hidden items may be sampled as "
                        "negatives", topic, CATALOG_WAIT_S)  # fmt: skip

    def _teardown(self, http: Any) -> None:
        log.info("lmf stopping: %s", self.stats.summary())
        if self._own_catalog and self.catalog is not None:
            self.catalog.stop()
        self._writer.shutdown(wait=True)
        if self._ends is not None:
            self._ends.close()
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
        if http:
            http.shutdown()

    def _wait_for_topic(self, until_idle: bool) -> bool:
        """True once ``<p>.events`` exists. With ``until_idle`` a missing topic is an error; otherwise the
        worker waits for it (ingest creates it), never subscribing first: that could auto-create it with
        the broker's default partition count."""
        topic, t0, told = self.cfg.topics.events, time.monotonic(), -TOPIC_WAIT_LOG_S
        while topic not in self.consumer.topics():
            fix = (f"run `zerocf ingest` first (it creates the topics) or check ZEROCF_TOPIC_PREFIX "
                   f"(now {self.cfg.topic_prefix!r})")  # fmt: skip
            if until_idle:
                raise ConfigError(f"topic {topic} does not exist at {self.cfg.kafka.bootstrap}: {fix}")
            if time.monotonic() - told >= TOPIC_WAIT_LOG_S:
                log.warning("topic %s does not exist yet; waiting for it (%s)", topic, fix)
                told = time.monotonic()
            if self.stop.wait(2.0):
                return False
        if time.monotonic() - t0 > 1.0:
            log.info("topic %s exists now", topic)
        return True

    def _check_store(self) -> None:
        """Refuse to start a new model over a lost one: Redis has no model but the group committed offsets."""
        store, topic = self.store, self.cfg.topics.events
        if store.has_model():
            return
        store.refuse_legacy()
        committed = self._committed()
        if not committed:
            return  # a first start: ensure_model creates the model
        where = ", ".join(f"partition {p} at {o.offset}" for p, o in sorted(committed.items())[:6])
        models = sorted({m for o in committed.values() if (m := _model_of(o.metadata))})
        lost = f"lost model {', '.join(models)}" if models else "lost its model"
        msg = (f"the store at {store.where} {lost} under namespace {store.keys.ns!r}: it holds no zerocf model, but "
               f"consumer group {self.cfg.group!r} committed offsets on {topic} ({where}), so a model was being "
               "learned")  # fmt: skip
        if self.rebuild:
            log.warning("%s; --rebuild: starting a new model from what %s retains", msg, topic)
            return
        raise ModelLost(
            f"{msg}. Redis lost its data (restarted empty?). Nothing was rebuilt; restore Redis, or rebuild "
            f"explicitly: `zerocf als --once --rebuild` then restart `zerocf lmf`, or `zerocf lmf --rebuild` "
            f"(a new online model from what {topic} retains)"
        )

    def _committed(self) -> dict[int, Any]:
        """The group's committed offsets (with metadata) on the events topic, partitions that have one."""
        topic = self.cfg.topics.events
        out = {}
        for p in sorted(self.consumer.partitions_for_topic(topic) or ()):
            got = self.consumer.committed(TopicPartition(topic, p), metadata=True)
            if got is not None and got.offset is not None and got.offset >= 0:
                out[p] = got
        return out

    def _work(self, until_idle: bool) -> None:
        """One :meth:`_step` per poll; Redis failures back off and resume from Redis; idle exit if asked."""
        backoff = Backoff()
        idle_since = last_progress = time.monotonic()
        while not self.stop.is_set():
            try:
                step = self._step()
            except _redis_errors() as exc:
                self._redis_down(exc, backoff)
                continue
            now = time.monotonic()
            if step is not Step.IDLE:
                idle_since = now
            if step is Step.TRAINED:
                backoff.reset()
            if now - last_progress > PROGRESS_EVERY_S:
                log.info("lmf progress: %s", self.stats.summary())
                last_progress = now
            if until_idle and step is Step.IDLE and self._idle_exit(now - idle_since):
                return
        try:
            self._settle(restart=False)  # stopping: let the last write land
        except _redis_errors() as exc:
            log.warning("the last write did not land (%s); the next start resumes from Redis", exc)

    def _step(self) -> Step:
        """Poll once and handle what came back."""
        polled = self.consumer.poll(timeout_ms=self.cfg.poll_timeout_ms, max_records=self.cfg.batch)
        if self._needs_resume:  # after a Redis outage nothing is processed before a full resume
            self._recover()
            return Step.RESUMED
        if not polled:
            return self._idle()
        if not self._train_polled(polled):
            return Step.RESTARTED
        self._healthy_redis = True
        self._update_lag()
        return Step.TRAINED

    def _idle(self) -> Step:
        """Nothing new: land the write in flight now (latency) and notice a swap without waiting for data."""
        if not self._settle():
            return Step.RESTARTED
        now = time.monotonic()
        if now - self._gen_checked < GENERATION_CHECK_S:
            return Step.IDLE
        self._gen_checked = now
        if self.consumer.assignment() and self.store.live_generation() != self.g:
            self._restart(
                f"generation {self.g} was replaced while idle: switching and replaying from the snapshot offsets"
            )
            return Step.RESTARTED
        return Step.IDLE

    def _idle_exit(self, idle_for: float) -> bool:
        """``--until-idle``: True once idle long enough and every partition of the topic is applied to its end
        (exit 0), or when that cannot happen: nothing assigned after :data:`NO_ASSIGNMENT_EXIT_S`, or the
        other members' partitions made no progress for ``idle_timeout_s`` (:attr:`exit_code` 1)."""
        if idle_for < self.cfg.idle_seconds:
            return False
        assigned = bool(self.consumer.assignment())
        if assigned and not kafka_util.caught_up(self.consumer):
            return False
        if not assigned and idle_for <= NO_ASSIGNMENT_EXIT_S:
            return False
        now = time.monotonic()
        if now - self._probed < PROBE_EVERY_S:
            return False
        self._probed = now
        return self._every_partition_exit(assigned, now)

    def _every_partition_exit(self, assigned: bool, now: float) -> bool:
        """The part of :meth:`_idle_exit` that looks at every partition: the fence in Redis against the ends."""
        topic = self.cfg.topics.events
        if self._ends is None:
            self._ends = TopicEnds(self.cfg.kafka, topic)
        parts = sorted(self.consumer.partitions_for_topic(topic) or ())
        behind = self._ends.behind(self.store.read_batch_state(self.store.live_generation(), parts, [], []).offsets)
        if not behind:
            log.info("every partition of %s is applied to its end and this worker was idle for %.1fs: exiting "
                     "(--until-idle)", topic, self.cfg.idle_seconds)  # fmt: skip
            return True
        lagging = ", ".join(f"{p}: {n}" for p, n in sorted(behind.items()))
        if not assigned:
            log.error("no partition of %s assigned after %.0f s and partitions are behind (partition: records "
                      "behind %s): exiting 1 (--until-idle); is another member of group %s stuck?", topic,
                      NO_ASSIGNMENT_EXIT_S, lagging, self.cfg.group)  # fmt: skip
            self.exit_code = 1
            return True
        total = sum(behind.values())
        if self._progress is None or total < self._progress[0]:
            if self._progress is None:
                log.info("own partitions done; waiting for the others of %s (partition: records behind %s)",
                         topic, lagging)  # fmt: skip
            self._progress = (total, now)
            return False
        if now - self._progress[1] > self.cfg.idle_timeout_s:
            log.error("partitions of %s owned by other members of group %s made no progress for %.0f s (partition: "
                      "records behind %s): exiting 1 (--until-idle); restart the stuck member, or raise "
                      "ZEROCF_LMF_IDLE_TIMEOUT_S", topic, self.cfg.group, self.cfg.idle_timeout_s, lagging)  # fmt: skip
            self.exit_code = 1
            return True
        return False

    # ------------------------------------------------------------------ state from Redis
    def health(self) -> tuple[bool, dict[str, Any]]:
        assigned = sorted(tp.partition for tp in self.consumer.assignment()) if self.consumer else []
        ok = bool(assigned) and self._healthy_redis
        return ok, {"assigned": assigned, "redis": self._healthy_redis, "generation": self.g}

    def load_generation(self) -> None:
        """(Re)load the live generation: item rows and accumulators, global bias, counts (sampler), popularity."""
        store = self.store
        self.g = g = store.live_generation()
        meta = store.generation_meta(g)
        versions = store.item_versions(g)  # before the rows (see workers.online.stored)
        ids, rows, glob = store.get_all_items(g)
        acc_ids, acc = store.get_all_accumulators(g)
        acc_of = dict(zip(acc_ids, range(len(acc_ids))))
        item_acc = np.zeros((len(ids), 2), np.float32)
        for n, item in enumerate(ids):
            if item in acc_of:
                item_acc[n] = acc[acc_of[item]]
        self.model.warm(ids, rows, glob, store.item_counts(g), store.item_popularity(g), meta.pop_ref_ms,
                        meta.pop_half_life_ms, item_acc, versions)  # fmt: skip
        self.model.forget_users()
        self.model.tombstones.load(store.erased_users())  # erased users (stream.erasure)
        self.metrics.generation.set(g)
        self._items_read = time.monotonic()
        log.info("writing into generation %d (%d items, global bias %.3f)", g, len(ids), glob)

    def _refresh_items(self) -> None:
        """Re-read every item row (other workers' deltas), after the write in flight has landed."""
        versions = self.store.item_versions(self.g)  # before the rows (see workers.online.stored)
        ids, rows, glob = self.store.get_all_items(self.g)
        self.model.refresh_items(ids, rows, glob, *self.store.get_all_accumulators(self.g), versions)
        self._items_read = time.monotonic()
        log.debug("item rows refreshed from Redis (%d items)", len(ids))

    def resume(self, partitions: list[Any]) -> None:
        """Seek each partition to its applied offset in Redis + 1 and restore its deduper."""
        if not partitions:
            return
        state = self.store.read_batch_state(self.g, [tp.partition for tp in partitions], [], [])
        for tp in partitions:
            off = state.offsets.get(tp.partition)
            self.applied[tp.partition] = off
            self.dedupers[tp.partition] = Deduper.from_state(state.watermarks.get(tp.partition))
            if off is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, off + 1)
            log.info(
                "partition %d resumes at offset %s (generation %d)",
                tp.partition,
                "beginning" if off is None else off + 1,
                self.g,
            )

    def _restart(self, why: str) -> None:
        """Drop everything optimistic: reload the live generation, seek every partition from Redis."""
        log.info("%s", why)
        self._pending = None
        self.load_generation()
        self.resume(list(self.consumer.assignment()))

    def _redis_down(self, exc: BaseException, backoff: Backoff) -> None:
        """Redis failed mid-batch: forget every partition's position, back off, try to recover.

        Until :meth:`_recover` succeeds no partition is processed (records polled meanwhile are dropped:
        the resume seeks back to the offsets stored in Redis), so nothing polled during an outage can be
        skipped. Whether the last write landed or not is unknown; the offset fence makes both cases safe.
        """
        self._healthy_redis = False
        self._needs_resume = True
        self._pending = None
        self.applied.clear()
        self.dedupers.clear()
        self.metrics.errors.labels("redis").inc()
        log.warning("redis unavailable (%s); backing off, then replaying from the stored offsets", exc)
        backoff.sleep(self.stop)
        try:
            self._recover()
        except _redis_errors() as again:
            log.info("redis still unavailable (%s); retrying on the next step", again)

    def _recover(self) -> None:
        """Reload the live generation and seek every assigned partition to its stored offset + 1."""
        self.load_generation()
        self.resume(list(self.consumer.assignment()))
        self._needs_resume = False
        self._healthy_redis = True
        log.info("redis is back: resumed from the offsets stored in Redis")

    def _update_lag(self) -> None:
        behind = kafka_util.lag(self.consumer)
        for tp, n in behind.items():
            self.metrics.lag.labels(str(tp.partition)).set(n)
        self.lag_total = sum(behind.values()) if behind else None

    # ------------------------------------------------------------------ one poll's batches
    def _train_polled(self, polled: Mapping[Any, list[Any]]) -> bool:
        """Decode, plan, fetch, train and submit what one poll returned; False if the worker restarted.

        A poll holds records of several partitions: they are trained and written together, in batches of
        whole records holding about ``batch`` events, each write fencing and advancing every partition it
        covers (one Lua script per batch, not one per partition: hot item rows are written once for all).

        The worker does not wait for the write in flight before fetching: it reads only users and items it
        holds no row for (users have one writer, so the cached rows are never older than Redis; an item this
        worker has not seen yet was not in the write in flight either). Redis itself runs one script at a
        time, so the read still queues behind the write on the server (bench/bench_lmf_e2e.py reports the
        overlap as ``fetch_share_during_write``); what overlaps is the worker's own poll, decode and plan.
        The kernel trains on the cached item rows and the write adds each row's change to whatever Redis
        holds, so no update of another worker is lost; rows are re-read every ``ZEROCF_LMF_ITEM_REFRESH_S``
        (bounded staleness, as in Hogwild). Redis does the add only for rows another worker wrote since this
        one read or wrote them: the others are sent as ``stored + delta`` with their version and SET
        (:mod:`workers.online.stored`, the same bits).
        """
        runs: dict[int, list[tuple[int, list[Event]]]] = {}
        for tp, records in polled.items():
            p = tp.partition
            if p not in self.dedupers:  # assigned between the poll and now: resume properly first
                if self._settle():
                    self._restart(f"partition {p} was assigned mid-poll: resuming from Redis")
                return False
            applied = self.applied.get(p)
            fresh = [r for r in records if applied is None or r.offset > applied]
            if fresh:
                runs[p] = self._parse(p, fresh)
        return all(self._train_chunk(chunk) for chunk in self._chunks(runs))

    def _chunks(self, runs: dict[int, list[tuple[int, list[Event]]]]) -> Iterator[dict[int, list[Any]]]:
        """``{partition: [(offset, events), ...]}`` runs of whole records holding about ``batch`` events each
        (a pack of ``<p>.events`` holds up to ``ZEROCF_EVENTS_PACK`` events; a record is never split across
        writes), partitions in poll order, each partition's records in offset order."""
        chunk: dict[int, list[Any]] = {}
        n = 0
        for p, parsed in runs.items():
            for rec in parsed:
                chunk.setdefault(p, []).append(rec)
                n += len(rec[1])
                if n >= self.cfg.batch:
                    yield chunk
                    chunk, n = {}, 0
        if chunk:
            yield chunk

    def _parse(self, p: int, records: list[Any]) -> list[tuple[int, list[Event]]]:
        """``(offset, events)`` of each record; what cannot be decoded is counted, logged and skipped (only
        ingest writes ``<p>.events``: a bad record there is a bug or a foreign producer, never a user error)."""
        out = []
        for rec in records:
            events, bad = decode_events(rec.value)
            for reason in bad:
                self.metrics.invalid.inc()
                log.error("partition %d offset %d: undecodable event skipped (%s)", p, rec.offset, reason)
            out.append((rec.offset, events))
        return out

    def _train_chunk(self, chunk: dict[int, list[tuple[int, list[Event]]]]) -> bool:
        """Plan, fetch, train and submit one batch of records of one or more partitions; False if the worker
        restarted."""
        fences = [(p, self.applied.get(p), recs[-1][0]) for p, recs in chunk.items()]
        t0 = time.perf_counter()
        parts: list[tuple[int, list[Event]]] = []
        erased: dict[str, int] = {}
        dups = 0
        for p, recs in chunk.items():
            fresh, d = self._decode(p, recs)
            kept, gone = self.model.erase(fresh)  # user erasure (stream.erasure): the tombstone rule
            parts.append((p, kept))
            erased |= gone
            dups += d
        events = [e for _p, evs in parts for e in evs]
        plan = self.model.plan_many(parts, erased)
        state = self._fetch(plan)
        if state.live_gen != self.g:
            if self._settle():
                self._restart(f"generation {self.g} was replaced: switching and replaying from the snapshot "
                              "offsets")  # fmt: skip
            return False
        if not self._rescale_popularity(plan):
            return False
        if self.catalog is not None:
            self.model.hidden = self.catalog.hidden_now()
        result = self.model.train(plan, rank_every=self.effective_rank_every if self.rank_hook is not None else 0)
        if not self._settle():  # the previous write must land before this one is fenced on its offset
            return False
        self._submit(fences, events, dups, plan, result, t0)
        if self.cfg.item_refresh_s and time.monotonic() - self._items_read > self.cfg.item_refresh_s:
            if self._settle():
                self._refresh_items()
            else:
                return False
        return True

    def _decode(self, p: int, chunk: list[tuple[int, list[Event]]]) -> tuple[list[Event], int]:
        """De-duplicate a run of parsed records; returns (new events, replayed duplicates dropped)."""
        accept = self.dedupers[p].accept
        events: list[Event] = []
        dups = 0
        for _offset, evs in chunk:
            for ev in evs:
                if accept(ev):
                    events.append(ev)
                else:
                    dups += 1
        return events, dups

    def _fetch(self, plan: BatchPlan) -> BatchState:
        """One round trip for what the worker does not hold: new users (rows, accumulators, seen items) and
        new items (rows, accumulators)."""
        state = self.store.read_batch_state(self.g, [], plan.fetch_users, plan.new_items, accumulators=True,
                                            seen_users=plan.fetch_users)  # fmt: skip
        if state.live_gen == self.g:
            self.model.absorb_items(plan, state.item_rows, state.item_found, state.item_acc, state.item_versions)
            self.model.load_users(plan.fetch_users, state.user_rows, state.user_found, state.user_acc,
                                  state.seen or {}, plan)  # fmt: skip
        return state

    def _rescale_popularity(self, plan: BatchPlan) -> bool:
        """Move the decayed popularity's reference time forward when the stream has run far past it."""
        new_ref = self.model.rescale_due(plan.ev_ts)
        if new_ref is None:
            return True
        if not self._settle():
            return False
        m = self.model
        if self.store.rescale_popularity(self.g, m.pop_ref_ms, new_ref, m.half_life_ms):
            m.rescale(new_ref)
            return True
        self._restart("the decayed popularity was rescaled by another worker: reloading")
        return False

    def _submit(self, fences: list[tuple[int, int | None, int]], events: list[Event], dups: int, plan: BatchPlan,
                result: TrainResult, t0: float) -> None:  # fmt: skip
        """Hand the batch's write to the writer thread (the model's caches are updated optimistically).
        ``fences``: ``(partition, applied offset before, last offset of the batch)`` of each partition."""
        increments: dict[str, int] = {}
        for e in events:
            increments[e.user] = increments.get(e.user, 0) + 1
        (p, applied, last), *rest = fences
        more = [Fence(q, before, end, self.dedupers[q].state()) for q, before, end in rest]
        write = BatchWrite(p, applied, last, self.dedupers[p].state(), counts=result.counts,
                           user_increments=increments, seen=plan.seen_adds(),
                           seen_upkeep=self.model.seen_upkeep(plan, time.time()),
                           popularity=result.popularity, pop_ref_ms=self.model.pop_ref_ms,
                           erase=plan.erased, more=more)  # fmt: skip
        if result.finite:
            write = replace(write, user_ids=plan.users, user_rows=result.user_rows, item_ids=result.item_ids,
                            item_deltas=result.item_deltas, user_acc=result.user_acc,
                            item_acc_deltas=result.item_acc_deltas, item_versions=result.item_versions,
                            item_rows=result.item_rows, item_acc=result.item_acc)  # fmt: skip
        else:
            self.metrics.nan_guards.inc()
            self.stats.nan_batches += 1
            where = ", ".join(f"partition {q} offsets ..{end}" for q, _b, end in fences)
            log.error("%s: non-finite factors, batch refused (its clicks, counts and offsets are still "
                      "recorded); lower ZEROCF_LMF_LR or raise ZEROCF_LMF_REG", where)  # fmt: skip
            self.model.rollback(result)
        self.model.commit(plan, result)  # optimistic: a refused write reloads every cache (_restart)
        future = self._writer.submit(self.store.apply_batch, self.g, write)
        for q, _before, end in fences:
            self.applied[q] = end
        loss = result.loss / max(1, len(plan.ev_user)) if result.finite else None
        ranks = rank_rows(plan, result) if self.rank_hook is not None else None
        self._pending = _Pending(future, [(q, end) for q, _b, end in fences], len(events), dups, len(plan.clicks),
                                 ranks, loss, t0)  # fmt: skip

    def _settle(self, restart: bool = True) -> bool:
        """Wait for the write in flight and account for it.

        True when it was applied (or nothing was in flight). False when Redis refused it (a new generation
        went live, or the partition's stored offset moved: another writer); then, with ``restart``, the
        worker has reloaded its state from Redis and the caller drops what it holds. Redis errors propagate.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return True
        status = pending.future.result()
        if status is ApplyStatus.APPLIED:
            self._account(pending)
            self._commit_hint(pending.fences)
            return True
        if status is ApplyStatus.NEW_GENERATION:
            self.metrics.batches.labels("new_generation").inc()
            why = f"generation {self.g} was replaced: switching and replaying from the snapshot offsets"
        elif status is ApplyStatus.POPULARITY_MOVED:
            self.metrics.batches.labels("popularity_moved").inc()
            why = f"generation {self.g}'s popularity reference moved (another worker): reloading"
        else:
            self.metrics.batches.labels("stale").inc()
            where = ", ".join(str(q) for q, _end in pending.fences)
            why = f"partition(s) {where}: stored offset moved under us (another writer?); resuming from Redis"
        if restart:
            self._restart(why)
        return False

    def _commit_hint(self, fences: list[tuple[int, int]]) -> None:
        """Commit each partition's applied offset + 1 to Kafka with the model's identity as metadata. Only a hint
        for positions (Redis holds the truth) but it survives a Redis loss, which :meth:`_check_store` detects."""
        meta = json.dumps({"model": self.model_id, "g": self.g}, separators=(",", ":"))
        topic = self.cfg.topics.events
        offsets = {TopicPartition(topic, p): OffsetAndMetadata(end + 1, meta, -1) for p, end in fences}
        self.consumer.commit_async(offsets)

    def _account(self, pending: _Pending) -> None:
        st, m = self.stats, self.metrics
        st.events += pending.events
        st.duplicates += pending.dups
        st.clicks += pending.clicks
        st.batches += 1
        m.events.inc(pending.events)
        m.duplicates.inc(pending.dups)
        m.batches.labels("applied").inc()
        m.latency.observe(time.perf_counter() - pending.t0)
        if pending.loss is not None:
            st.add_loss(pending.loss)
            m.loss.set(st.loss_ewma)
        if pending.ranks is not None and self.rank_hook is not None:
            self.rank_hook(pending.ranks)

    # ------------------------------------------------------------------ rebalances (called inside poll)
    def on_partitions_revoked(self, revoked: Any) -> None:
        try:  # let the write in flight land before the partitions move
            self._settle(restart=False)
        except Exception as exc:  # noqa: BLE001 - the assignment callback reloads from Redis anyway
            log.info(
                "write in flight at revocation not applied (%s); the new owner resumes from Redis", type(exc).__name__
            )
            self._pending = None
        for tp in revoked:
            self.applied.pop(tp.partition, None)
            self.dedupers.pop(tp.partition, None)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.load_generation()  # caches may hold optimistic state; another worker may have written meanwhile
        self.resume(list(assigned))


class _Rebalance(ConsumerRebalanceListener):
    """kafka-python's rebalance callbacks, forwarded to the worker."""

    def __init__(self, worker: LMFWorker) -> None:
        self.worker = worker

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.worker.on_partitions_revoked(revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.worker.on_partitions_assigned(assigned)


@dataclass
class _Pending:
    """The one batch write in flight and what to account when it lands."""

    future: Any
    fences: list[tuple[int, int]]  # (partition, the batch's last offset there): applied once the write lands
    events: int
    dups: int
    clicks: int
    ranks: Any
    loss: float | None
    t0: float


def _model_of(metadata: str | None) -> str:
    """The model id in a commit's metadata (``{"model": id, ...}``); "" when absent or not ours."""
    try:
        got = json.loads(metadata or "")
    except ValueError:
        return ""
    return str(got.get("model") or "") if isinstance(got, dict) else ""


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


# ---------------------------------------------------------------------- CLI
def register(subparsers: Any) -> None:
    """Add ``zerocf lmf``."""
    p = subparsers.add_parser("lmf", help="online logistic-MF worker: <p>.events -> factors in Redis")
    p.add_argument(
        "--until-idle",
        action="store_true",
        help="exit 0 once every partition of <p>.events is applied to its end and this worker is idle; 1 when "
        "other members' partitions stop making progress (ZEROCF_LMF_IDLE_TIMEOUT_S)",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="start a new model even though this group's committed offsets show the store lost one (Redis "
        "restarted empty); it learns from what <p>.events still retains",
    )
    add_flags(p, LMFConfig, skip=TOP_LEVEL)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``zerocf lmf``."""
    cfg = load(LMFConfig, args.env, flag_overrides(args, LMFConfig))
    store = FactorStore.connect(
        cfg.redis_url, cfg.topic_prefix, seen_cap=cfg.seen_cap, seen_ttl=int(cfg.seen_ttl_days * 86400)
    )
    worker = LMFWorker(cfg, store, StopFlag().install(), rebuild=args.rebuild)
    stats = worker.run(until_idle=args.until_idle)
    log.info("lmf done: %s", stats.summary())
    return worker.exit_code
