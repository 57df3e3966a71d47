"""``zerocf lmf``: the online LMF worker — events from Kafka, SGD, factors to Redis, exactly-once effect.

Per poll and per events partition: parse, de-duplicate (ingest is at-least-once), plan (sample negatives),
fetch every vector the batch touches in one round trip, train, and write back in one Lua call that also
stores the partition's applied offset and de-duplication watermarks — atomically, fenced on the previous
offset (see :meth:`workers.store.factor_store.FactorStore.apply_batch`). Kafka commits are only a hint: at start and on
every assignment the worker seeks each partition to the offset stored in Redis + 1, so a worker killed at
any moment resumes without losing or double-applying an event.

When the ALS worker publishes a new generation, the next write returns ``NEW_GENERATION``: the worker
reloads the generation (items, counts, calibration bias) and seeks its partitions to the offsets the
snapshot covered, replaying everything learned online since into the new generation.
"""

from __future__ import annotations

import argparse
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream.dedupe import Deduper
from stream.errors import InvalidEvent
from stream.events import Event
from stream.runtime import Backoff, StopFlag, start_http
from stream.config import TOP_LEVEL, add_flags, flag_overrides, load
from workers.config import LMFConfig
from workers.online.model import OnlineModel
from workers.store import ApplyStatus, FactorStore

log = logging.getLogger(__name__)


class _Switch(Exception):
    """Internal: a new generation went live; discard the rest of this poll."""


class LMFMetrics:
    """Prometheus metrics of one worker (own registry, so tests can run several in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.events = Counter("zerocf_lmf_events", "events applied (after de-duplication)", registry=r)
        self.duplicates = Counter("zerocf_lmf_duplicates", "replayed events dropped by the deduper", registry=r)
        self.invalid = Counter("zerocf_lmf_invalid_events", "undecodable records on the events topic", registry=r)
        self.batches = Counter("zerocf_lmf_batches", "batches by outcome", ["outcome"], registry=r)
        self.nan_guards = Counter("zerocf_lmf_nan_guards", "batches whose factors were refused (NaN/inf)",
                                  registry=r)
        self.errors = Counter("zerocf_lmf_errors", "Redis/Kafka errors retried", ["kind"], registry=r)
        self.loss = Gauge("zerocf_lmf_loss_ewma", "EWMA of the per-event logistic loss", registry=r)
        self.lag = Gauge("zerocf_lmf_lag", "records behind the high watermark", ["partition"], registry=r)
        self.generation = Gauge("zerocf_lmf_generation", "generation being written", registry=r)
        self.latency = Histogram("zerocf_lmf_batch_seconds", "batch latency (plan+fetch+train+write)",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5), registry=r)


@dataclass
class WorkerStats:
    events: int = 0
    clicks: int = 0
    batches: int = 0
    duplicates: int = 0
    nan_batches: int = 0
    started: float = field(default_factory=time.monotonic)
    loss_ewma: float = float("nan")

    def summary(self) -> dict[str, Any]:
        secs = max(time.monotonic() - self.started, 1e-9)
        return {"events": self.events, "clicks": self.clicks, "batches": self.batches,
                "duplicates": self.duplicates, "nan_batches": self.nan_batches,
                "seconds": round(secs, 2), "events_per_s": round(self.events / secs, 1),
                "loss_ewma": round(self.loss_ewma, 5)}


class LMFWorker:
    """Consume ``<p>.events`` with a group and train the online model into the live generation."""

    def __init__(self, cfg: LMFConfig, store: FactorStore, stop: StopFlag | None = None,
                 rank_hook: Any = None) -> None:
        """``rank_hook(ranks)``, if given, receives per batch the prequential ranks of its clicks
        (:meth:`workers.online.model.OnlineModel.ranks_before_learning`), computed before the batch is learned."""
        self.cfg, self.store = cfg, store
        self.rank_hook = rank_hook
        self.stop = stop or StopFlag()
        self.model = OnlineModel(cfg, seed=cfg.seed)
        self.metrics = LMFMetrics()
        self.stats = WorkerStats()
        self.g = 0
        self.bias = 0.0
        self.applied: dict[int, int | None] = {}
        self.dedupers: dict[int, Deduper] = {}
        self.consumer: Any = None
        self._healthy_redis = True
        self._pending: _Pending | None = None
        self._needs_resume = False
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zerocf-lmf-writer")

    # ------------------------------------------------------------------ lifecycle
    def health(self) -> tuple[bool, dict[str, Any]]:
        assigned = sorted(tp.partition for tp in self.consumer.assignment()) if self.consumer else []
        ok = bool(assigned) and self._healthy_redis
        return ok, {"assigned": assigned, "redis": self._healthy_redis, "generation": self.g}

    def load_generation(self) -> None:
        """(Re)load the live generation: item vectors, counts (sampler), calibration bias."""
        self.g = self.store.live_generation()
        self.bias = self.store.generation_meta(self.g).bias
        ids, mat = self.store.get_all_items(self.g)
        self.model.warm(ids, mat, self.store.item_counts(self.g))
        self.model.forget_users()
        self.metrics.generation.set(self.g)
        log.info("writing into generation %d (%d items, bias %.3f)", self.g, len(ids), self.bias)

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
            log.info("partition %d resumes at offset %s (generation %d)", tp.partition,
                     "beginning" if off is None else off + 1, self.g)

    # kafka-python ConsumerRebalanceListener protocol
    def on_partitions_revoked(self, revoked: Any) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:  # let the write in flight land before the partitions move
            try:
                self._pending = pending
                self._settle()
            except Exception as exc:  # noqa: BLE001 - the assignment callback reloads from Redis anyway
                log.info("write in flight at revocation not applied (%s); the new owner resumes from Redis",
                         type(exc).__name__)
                self._pending = None
        for tp in revoked:
            self.applied.pop(tp.partition, None)
            self.dedupers.pop(tp.partition, None)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.load_generation()  # caches may hold optimistic state; another worker may have written meanwhile
        self.resume(list(assigned))

    def run(self, until_idle: bool = False) -> WorkerStats:
        from kafka import ConsumerRebalanceListener

        from stream import kafka_util

        self.store.ensure_model(self.cfg.factors)
        self.load_generation()
        self.consumer = kafka_util.consumer(self.cfg.kafka, group_id=self.cfg.group, client_id="zerocf-lmf",
                                            max_poll_records=self.cfg.batch)
        listener = type("L", (ConsumerRebalanceListener,), {
            "on_partitions_revoked": lambda _s, r: self.on_partitions_revoked(r),
            "on_partitions_assigned": lambda _s, a: self.on_partitions_assigned(a)})()
        self.consumer.subscribe([self.cfg.topics.events], listener=listener)
        http = start_http(self.cfg.runtime.metrics_port, self.health, self.metrics.registry) \
            if self.cfg.runtime.metrics_port else None
        try:
            self._loop(until_idle)
            self._settle()
        except _Switch:
            pass
        finally:
            log.info("lmf stopping: %s", self.stats.summary())
            self._writer.shutdown(wait=True)
            self.consumer.close(autocommit=False)
            if http:
                http.shutdown()
        return self.stats

    def _loop(self, until_idle: bool) -> None:
        from stream.kafka_util import caught_up

        idle_since = time.monotonic()
        backoff = Backoff()
        last_log = last_gen_check = time.monotonic()
        while not self.stop.is_set():
            polled = self.consumer.poll(timeout_ms=self.cfg.poll_timeout_ms, max_records=self.cfg.batch)
            if self._needs_resume:  # after a Redis outage: nothing is processed before a full resume
                try:
                    self._recover()
                except _redis_errors() as exc:
                    self._redis_down(exc, backoff)
                continue  # what was polled is re-read from the stored offsets (or dropped on failure)
            if polled:
                idle_since = time.monotonic()
                try:
                    for tp, records in polled.items():
                        self._partition_batch(tp, records)
                    backoff.reset()
                    self._healthy_redis = True
                except _Switch:
                    continue
                except _redis_errors() as exc:
                    self._redis_down(exc, backoff)
                    continue
                self._update_lag()
                if time.monotonic() - last_log > 10:
                    log.info("lmf progress: %s", self.stats.summary())
                    last_log = time.monotonic()
                continue
            try:
                self._settle()  # nothing new: land the write in flight now (latency)
                if time.monotonic() - last_gen_check > 1.0:  # idle: notice a swap without waiting for data
                    last_gen_check = time.monotonic()
                    if self.consumer.assignment() and self.store.live_generation() != self.g:
                        self._restart("generation %d was replaced while idle: switching and replaying" % self.g)
            except _Switch:
                idle_since = time.monotonic()
                continue
            except _redis_errors() as exc:
                self._redis_down(exc, backoff)
                continue
            if until_idle and time.monotonic() - idle_since >= self.cfg.idle_seconds:
                if caught_up(self.consumer):
                    log.info("caught up and idle for %.1fs: exiting (--until-idle)", self.cfg.idle_seconds)
                    return
                if not self.consumer.assignment() and time.monotonic() - idle_since > 60:
                    log.warning("no partition of %s assigned after 60 s: exiting (--until-idle); does the "
                                "topic exist?", self.cfg.topics.events)
                    return

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
        except _redis_errors():
            pass  # still down: retried on the next loop pass

    def _recover(self) -> None:
        """Reload the live generation and seek every assigned partition to its stored offset + 1."""
        self.load_generation()
        self.resume(list(self.consumer.assignment()))
        self._needs_resume = False
        self._healthy_redis = True
        log.info("redis is back: resumed from the offsets stored in Redis")

    def _update_lag(self) -> None:
        from stream.kafka_util import lag

        for tp, behind in lag(self.consumer).items():
            self.metrics.lag.labels(str(tp.partition)).set(behind)

    # ------------------------------------------------------------------ one partition's batch
    def _decode(self, p: int, records: list[Any]) -> tuple[list[Event], int]:
        """Parse and de-duplicate; returns (new events, replayed duplicates dropped)."""
        dedupe = self.dedupers[p]
        events: list[Event] = []
        dups = 0
        for rec in records:
            try:
                ev = Event.from_json(rec.value)
            except InvalidEvent as exc:
                self.metrics.invalid.inc()
                log.error("partition %d offset %d: undecodable event skipped (%s)", p, rec.offset, exc.reason)
                continue
            if dedupe.accept(ev):
                events.append(ev)
            else:
                dups += 1
        return events, dups

    def _partition_batch(self, tp: Any, records: list[Any]) -> None:
        """Plan, fetch, train and submit one partition's batch while the previous batch's write runs.

        At most one write is in flight, and it is settled before the next one is submitted, so the offset
        fence chain stays exact. The fetch does not wait for it: user rows come from the worker's own cache
        when present (this worker is their only writer, so the cache is never older than Redis), and an item
        row read while a write is in flight may miss that one batch's deltas -- the next deltas are still
        added to whatever Redis holds, so no update is lost (bounded staleness, as in Hogwild). With AdaGrad
        the fetch waits, since accumulators are not cached.
        """
        p = tp.partition
        if p not in self.dedupers:  # assignment raced with the poll: resume properly first
            self._settle()
            self.resume([tp])
            raise _Switch()
        applied = self.applied.get(p)
        records = [r for r in records if applied is None or r.offset > applied]
        if not records:
            return
        t0 = time.perf_counter()
        cfg, store, model = self.cfg, self.store, self.model
        events, dups = self._decode(p, records)
        clicks = [e for e in events if e.type == "click"]
        missing = model.users_missing_seen(e.user for e in clicks)
        plan = model.plan(p, events)
        if cfg.adagrad:
            self._settle()
        state = store.read_batch_state(self.g, [], plan.users, plan.items, accumulators=cfg.adagrad,
                                       seen_users=missing, seen_limit=cfg.seen_cap)
        if state.live_gen != self.g:
            self._settle()
            self._restart("generation %d was replaced: switching and replaying from the snapshot offsets" % self.g)
        if missing:  # users new to this worker: their stored recent clicks may not be sampled as negatives
            model.load_seen(state.seen or {})
            model.drop_known_negatives(plan, missing)
        user_vecs, user_found = state.user_vecs, state.user_found
        for n, user in enumerate(plan.users):
            cached = model.user_cache.get(user)
            if cached is not None:
                user_vecs[n], user_found[n] = cached, True
        ranks = model.ranks_before_learning(plan, user_vecs, user_found) if self.rank_hook is not None else None
        result = model.train(plan, user_vecs, user_found, state.item_vecs, self.bias, state.user_acc,
                             state.item_acc)
        counts: dict[str, float] = {}
        increments: dict[str, int] = {}
        for e in events:
            increments[e.user] = increments.get(e.user, 0) + 1
        for _user, item, _ts, w in plan.clicks:
            counts[item] = counts.get(item, 0.0) + w
        seen = [(u, i, ts) for u, i, ts, _w in plan.clicks]
        last = records[-1].offset
        empty = np.zeros((0, model.k), np.float32)
        watermarks = self.dedupers[p].state()
        self._settle()  # the previous write must have landed before this one is fenced on its offset
        if result.finite:
            vectors = (plan.users, result.user_vecs, plan.items, result.item_deltas, result.user_acc,
                       result.item_acc_deltas)
            model.commit(plan, result)  # optimistic: a failed write reloads every cache (_restart)
        else:
            self.metrics.nan_guards.inc()
            self.stats.nan_batches += 1
            log.error("partition %d offsets ..%d: non-finite factors, batch refused (counts and offsets still "
                      "recorded); lower ZEROCF_LMF_LR or raise ZEROCF_LMF_REG", p, last)
            vectors = ([], empty, [], empty, None, None)
        future = self._writer.submit(store.apply_batch, self.g, p, applied, last, watermarks,
                                     vectors[0], vectors[1], vectors[2], vectors[3], counts=counts,
                                     user_increments=increments, seen=seen, user_acc=vectors[4],
                                     item_acc_deltas=vectors[5])
        self.applied[p] = last
        self._pending = _Pending(future, p, len(events), dups, len(clicks), ranks,
                                 result.loss / max(1, len(plan.ev_user)) if result.finite else None, t0)

    def _settle(self) -> None:
        """Wait for the write in flight; account for it, or restart from Redis if it was not applied."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        status = pending.future.result()  # Redis errors propagate to the loop's back-off
        if status is ApplyStatus.APPLIED:
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
                prev = st.loss_ewma
                st.loss_ewma = pending.loss if prev != prev else 0.98 * prev + 0.02 * pending.loss
                m.loss.set(st.loss_ewma)
            if pending.ranks is not None and self.rank_hook is not None:
                self.rank_hook(pending.ranks)
            self.consumer.commit_async()  # a hint only: Redis holds the truth
            return
        if status is ApplyStatus.NEW_GENERATION:
            self.metrics.batches.labels("new_generation").inc()
            self._restart("generation %d was replaced: switching and replaying from the snapshot offsets" % self.g)
        self.metrics.batches.labels("stale").inc()
        self._restart("partition %d: stored offset moved under us (another writer?); resuming from Redis"
                      % pending.partition)

    def _restart(self, why: str) -> None:
        """Drop everything optimistic: reload the live generation, seek every partition from Redis."""
        log.info("%s", why)
        self._pending = None
        self.load_generation()
        self.resume(list(self.consumer.assignment()))
        raise _Switch()


@dataclass
class _Pending:
    """The one batch write in flight and what to account when it lands."""

    future: Any
    partition: int
    events: int
    dups: int
    clicks: int
    ranks: Any
    loss: float | None
    t0: float


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


# ---------------------------------------------------------------------- CLI
def register(subparsers: Any) -> None:
    """Add ``zerocf lmf``."""
    p = subparsers.add_parser("lmf", help="online logistic-MF worker: <p>.events -> factors in Redis")
    p.add_argument("--until-idle", action="store_true", help="exit 0 once caught up and idle")
    add_flags(p, LMFConfig, skip=TOP_LEVEL)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``zerocf lmf``."""
    cfg = load(LMFConfig, args.env, flag_overrides(args, LMFConfig))
    store = FactorStore.connect(cfg.redis_url, cfg.topic_prefix, seen_cap=cfg.seen_cap,
                                seen_ttl=int(cfg.seen_ttl_days * 86400))
    worker = LMFWorker(cfg, store, StopFlag().install())
    stats = worker.run(until_idle=args.until_idle)
    log.info("lmf done: %s", stats.summary())
    return 0
