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
"""

from __future__ import annotations

import argparse
import enum
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener

from stream import kafka_util
from stream.config import TOP_LEVEL, add_flags, flag_overrides, load
from stream.dedupe import Deduper
from stream.errors import InvalidEvent
from stream.events import Event
from stream.runtime import Backoff, StopFlag, start_http
from workers.config import LMFConfig
from workers.online.metrics import LMFMetrics, WorkerStats
from workers.online.model import BatchPlan, OnlineModel, TrainResult
from workers.store import ApplyStatus, BatchState, FactorStore

log = logging.getLogger(__name__)

__all__ = ["LMFWorker", "register", "run"]

PROGRESS_EVERY_S = 10.0
GENERATION_CHECK_S = 1.0  # while idle, how often the worker looks for a newly published generation
NO_ASSIGNMENT_EXIT_S = 60.0  # --until-idle gives up after this long without any partition


class Step(enum.Enum):
    """What one loop step did."""

    TRAINED = "trained"  # every polled batch was planned, trained and submitted
    IDLE = "idle"  # nothing polled (the write in flight has landed)
    RESTARTED = "restarted"  # state was reloaded from Redis: the rest of the poll is re-read from its offsets
    RESUMED = "resumed"  # recovered from a Redis outage (what was polled is re-read likewise)


class LMFWorker:
    """Consume ``<p>.events`` with a group and train the online model into the live generation.

    ``rank_hook(ranks)``, if given, receives per batch the prequential ranks of its clicks
    (:meth:`workers.online.model.OnlineModel.ranks_before_learning`), computed before the batch is learned.
    """

    def __init__(self, cfg: LMFConfig, store: FactorStore, stop: StopFlag | None = None, rank_hook: Any = None) -> None:
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
        self._needs_resume = False
        self._pending: _Pending | None = None
        self._gen_checked = 0.0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zerocf-lmf-writer")

    # ------------------------------------------------------------------ lifecycle
    def run(self, until_idle: bool = False) -> WorkerStats:
        """Bootstrap, loop until stopped (or caught up and idle with ``until_idle``), tear down."""
        http = self._bootstrap()
        try:
            self._work(until_idle)
        finally:
            self._teardown(http)
        return self.stats

    def _bootstrap(self) -> Any:
        self.store.ensure_model(self.cfg.factors)
        self.load_generation()
        self.consumer = kafka_util.consumer(
            self.cfg.kafka, group_id=self.cfg.group, client_id="zerocf-lmf", max_poll_records=self.cfg.batch
        )
        self.consumer.subscribe([self.cfg.topics.events], listener=_Rebalance(self))
        port = self.cfg.runtime.metrics_port
        return start_http(port, self.health, self.metrics.registry) if port else None

    def _teardown(self, http: Any) -> None:
        log.info("lmf stopping: %s", self.stats.summary())
        self._writer.shutdown(wait=True)
        self.consumer.close(autocommit=False)
        if http is not None:
            http.shutdown()

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
        for tp, records in polled.items():
            if not self._train_partition(tp.partition, records):
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
        """``--until-idle``: True once idle long enough and caught up (or never assigned anything)."""
        if idle_for < self.cfg.idle_seconds:
            return False
        if kafka_util.caught_up(self.consumer):
            log.info("caught up and idle for %.1fs: exiting (--until-idle)", self.cfg.idle_seconds)
            return True
        if not self.consumer.assignment() and idle_for > NO_ASSIGNMENT_EXIT_S:
            log.warning(
                "no partition of %s assigned after %.0f s: exiting (--until-idle); does the topic exist?",
                self.cfg.topics.events,
                NO_ASSIGNMENT_EXIT_S,
            )
            return True
        return False

    # ------------------------------------------------------------------ state from Redis
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
        for tp, behind in kafka_util.lag(self.consumer).items():
            self.metrics.lag.labels(str(tp.partition)).set(behind)

    # ------------------------------------------------------------------ one partition's batch
    def _train_partition(self, p: int, records: list[Any]) -> bool:
        """Decode, plan, fetch, train and submit one partition's batch; False if the worker restarted.

        The fetch does not wait for the write in flight: user rows come from the worker's own cache when
        present (this worker is their only writer, so the cache is never older than Redis), and an item row
        read while a write is in flight may miss that one batch's deltas -- the next deltas are still added
        to whatever Redis holds, so no update is lost (bounded staleness, as in Hogwild). With AdaGrad the
        fetch waits, since accumulators are not cached.
        """
        if p not in self.dedupers:  # assigned between the poll and now: resume properly first
            if self._settle():
                self._restart(f"partition {p} was assigned mid-poll: resuming from Redis")
            return False
        applied = self.applied.get(p)
        records = [r for r in records if applied is None or r.offset > applied]
        if not records:
            return True
        t0 = time.perf_counter()
        events, dups = self._decode(p, records)
        plan = self.model.plan(p, events)
        if self.cfg.adagrad and not self._settle():
            return False
        state = self._fetch(plan)
        if state.live_gen != self.g:
            if self._settle():
                self._restart(f"generation {self.g} was replaced: switching and replaying from the snapshot offsets")
            return False
        ranks = (
            self.model.ranks_before_learning(plan, state.user_vecs, state.user_found)
            if self.rank_hook is not None
            else None
        )
        result = self.model.train(
            plan, state.user_vecs, state.user_found, state.item_vecs, self.bias, state.user_acc, state.item_acc
        )
        if not self._settle():  # the previous write must land before this one is fenced on its offset
            return False
        self._submit(p, applied, records[-1].offset, events, dups, plan, result, ranks, t0)
        return True

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

    def _fetch(self, plan: BatchPlan) -> BatchState:
        """Read the batch's vectors (one round trip); users this worker holds come from its cache."""
        model = self.model
        missing = model.users_missing_seen(plan.click_users())
        state = self.store.read_batch_state(
            self.g,
            [],
            plan.users,
            plan.items,
            accumulators=self.cfg.adagrad,
            seen_users=missing,
            seen_limit=self.cfg.seen_cap,
        )
        if missing:  # users new to this worker: their stored recent clicks may not be sampled as negatives
            model.load_seen(state.seen or {})
            model.drop_known_negatives(plan, missing)
        for n, user in enumerate(plan.users):
            cached = model.user_cache.get(user)
            if cached is not None:
                state.user_vecs[n], state.user_found[n] = cached, True
        return state

    def _submit(
        self,
        p: int,
        applied: int | None,
        last: int,
        events: list[Event],
        dups: int,
        plan: BatchPlan,
        result: TrainResult,
        ranks: Any,
        t0: float,
    ) -> None:
        """Hand the batch's write to the writer thread (the model's caches are updated optimistically)."""
        counts: dict[str, float] = {}
        increments: dict[str, int] = {}
        for e in events:
            increments[e.user] = increments.get(e.user, 0) + 1
        for _user, item, _ts, w in plan.clicks:
            counts[item] = counts.get(item, 0.0) + w
        seen = [(u, i, ts) for u, i, ts, _w in plan.clicks]
        empty = np.zeros((0, self.model.k), np.float32)
        if result.finite:
            vectors = (
                plan.users,
                result.user_vecs,
                plan.items,
                result.item_deltas,
                result.user_acc,
                result.item_acc_deltas,
            )
            self.model.commit(plan, result)  # optimistic: a refused write reloads every cache (_restart)
        else:
            self.metrics.nan_guards.inc()
            self.stats.nan_batches += 1
            log.error(
                "partition %d offsets ..%d: non-finite factors, batch refused (counts and offsets still "
                "recorded); lower ZEROCF_LMF_LR or raise ZEROCF_LMF_REG",
                p,
                last,
            )
            vectors = ([], empty, [], empty, None, None)
        future = self._writer.submit(
            self.store.apply_batch,
            self.g,
            p,
            applied,
            last,
            self.dedupers[p].state(),
            vectors[0],
            vectors[1],
            vectors[2],
            vectors[3],
            counts=counts,
            user_increments=increments,
            seen=seen,
            user_acc=vectors[4],
            item_acc_deltas=vectors[5],
        )
        self.applied[p] = last
        loss = result.loss / max(1, len(plan.ev_user)) if result.finite else None
        self._pending = _Pending(future, p, len(events), dups, len(plan.clicks), ranks, loss, t0)

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
            self.consumer.commit_async()  # a hint only: Redis holds the truth
            return True
        if status is ApplyStatus.NEW_GENERATION:
            self.metrics.batches.labels("new_generation").inc()
            why = f"generation {self.g} was replaced: switching and replaying from the snapshot offsets"
        else:
            self.metrics.batches.labels("stale").inc()
            why = f"partition {pending.partition}: stored offset moved under us (another writer?); resuming from Redis"
        if restart:
            self._restart(why)
        return False

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
    store = FactorStore.connect(
        cfg.redis_url, cfg.topic_prefix, seen_cap=cfg.seen_cap, seen_ttl=int(cfg.seen_ttl_days * 86400)
    )
    worker = LMFWorker(cfg, store, StopFlag().install())
    stats = worker.run(until_idle=args.until_idle)
    log.info("lmf done: %s", stats.summary())
    return 0
