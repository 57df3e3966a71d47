"""``zerocf als``: the periodic implicit-ALS re-solve — snapshot -> als -> check -> calibrate -> publish.

One run (:meth:`ALSWorker.run_once`):

1. **Snapshot.** :class:`workers.batch.snapshot.Snapshot` catches up on ``<p>.events`` (all partitions, no
   group, de-duplicated like the LMF worker) and checkpoints the click matrix with its offsets and dedupe
   watermarks, so a restart resumes where the last checkpoint ended.
2. **Decide.** ``pending`` = events past the live generation's snapshot offsets (:meth:`ALSWorker.pending`).
   ``--once`` solves whenever the snapshot holds a click; ``--every`` only when ``pending >= --min-new-events``.
3. **Solve.** :func:`workers.kernels.als.als_fit` on the snapshot, warm-started from the previous solve's raw
   (uncalibrated) factors kept in ``<checkpoint_dir>/factors.npz``, never from the live rows, which carry the
   calibration scale and online updates; new rows are seeded like ``als_fit`` seeds them (uniform
   ``[0, 0.01)``). The first run and ``--rebuild`` start cold (seeded), and ``--rebuild`` also ignores the
   checkpoint (re-reads the topic from the beginning). The loss is logged per iteration (tqdm bar on a TTY);
   NaN/inf raises :class:`ModelDiverged` and nothing is published.
4. **Calibrate.** :func:`workers.kernels.calibration.calibrate` fits ``σ(a·p·q + b)`` on held clicks vs
   ``ZEROCF_ALS_CALIB_NEGATIVES`` sampled negatives each (as many as the LMF trains with); ``sqrt(a)`` is
   folded into both factor sets, ``a`` is recorded as the generation's ``scale`` and ``b`` becomes its global
   bias. User and item biases start at 0; the LMF learns them online.
5. **Publish.** ``begin_generation("als")``, user and item rows in chunks, item click counts and decayed
   popularity (from the snapshot), then ``publish_generation`` with the snapshot's offsets and watermarks: one
   atomic flip, after which LMF workers rewind to those offsets + 1 and replay into the new generation.
   Finally ``gc_generations(gc_grace_s)``.

Start-up (:meth:`ALSWorker.start`): the checkpoint must belong to this deployment. It is bound to the events
topic, its partition count, the Kafka cluster id and the store's model id (``workers.batch.snapshot``); a
checkpoint next to a store that holds no model means Redis lost the model (or the checkpoint is foreign), one
that names another model means the store was re-created: both are refused (:class:`CheckpointMismatch`,
exit 2) until the operator chooses ``--rebuild``. Then building generations abandoned by a killed ALS (their
lease expired) are collected.

Stopping: SIGTERM sets the stop flag, checked between ALS iterations, between vector chunks and right
before the flip; a stop publishes nothing and drops the half-built generation. A crash between
``begin_generation`` and the flip leaves a ``building`` generation whose lease expires within
:data:`~workers.store.LEASE_S`; the next ALS start (or any later gc) removes it. Either way the old generation
stays live and untouched.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stream.config import TOP_LEVEL, add_flags, flag_overrides, load
from stream.runtime import StopFlag, start_http
from workers.batch.snapshot import CheckpointMismatch, Snapshot
from workers.batch.solve import fit, handoff_rows
from workers.config import ALSConfig, parse_duration
from workers.errors import ModelDiverged
from workers.kernels.als import ALSDiverged
from workers.kernels.calibration import Calibration
from workers.store import LEASE_S, FactorStore, ModelLost, Table

log = logging.getLogger(__name__)

WRITE_CHUNK = 50_000  # rows encoded and written per step (bounds the blob copy; stop checked between)

__all__ = ["ALSMetrics", "ALSWorker", "RunResult", "register", "run"]


class _Stopped(Exception):
    """Internal: the stop flag was set; unwind without publishing."""


class ALSMetrics:
    """Prometheus metrics of the ALS worker (own registry)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = r = CollectorRegistry()
        self.last_run = Gauge("zerocf_als_last_run_timestamp_seconds", "end of the last run (epoch s)", registry=r)
        self.last_success = Gauge(
            "zerocf_als_last_success_timestamp_seconds", "end of the last published run", registry=r
        )
        self.duration = Gauge("zerocf_als_run_seconds", "duration of the last run", registry=r)
        self.loss = Gauge("zerocf_als_loss", "WMF loss after the last iteration of the last solve", registry=r)
        self.generation = Gauge("zerocf_als_generation", "last generation published", registry=r)
        self.events = Gauge("zerocf_als_snapshot_events", "events in the snapshot", registry=r)
        self.nnz = Gauge("zerocf_als_snapshot_pairs", "distinct (user, item) pairs in the snapshot", registry=r)
        self.runs = Counter("zerocf_als_runs", "runs by outcome", ["outcome"], registry=r)


@dataclass
class RunResult:
    """What one :meth:`ALSWorker.run_once` did.

    ``outcome``: ``published``, ``skipped`` (nothing new enough), ``stopped`` (stop flag, nothing
    published) or ``diverged`` (NaN/inf, nothing published).
    """

    outcome: str
    generation: int | None = None
    new_events: int = 0
    pending: int = 0
    loss: float = float("nan")
    seconds: float = 0.0
    scale: float = 1.0
    bias: float = 0.0


class ALSWorker:
    """Periodic ALS re-solve into a new generation; see the module docstring.

    Parameters
    ----------
    cfg : ALSConfig
    store : FactorStore
    stop : StopFlag, optional
    snapshot : Snapshot, optional
        Defaults to :meth:`Snapshot.from_config` on ``cfg.checkpoint_dir``.
    rebuild : bool
        Start from an empty snapshot and cold factors (the first run only).
    """

    def __init__(
        self,
        cfg: ALSConfig,
        store: FactorStore,
        stop: StopFlag | None = None,
        snapshot: Snapshot | None = None,
        rebuild: bool = False,
    ) -> None:
        self.cfg, self.store = cfg, store
        self.stop = stop or StopFlag()
        self.snapshot = snapshot or Snapshot.from_config(cfg)
        self.factors = RawFactors(self.snapshot.path)
        self.metrics = ALSMetrics()
        self.cold = rebuild
        self.last_ok: bool | None = None
        self.last: RunResult | None = None
        self._started = False
        self._saved: dict[int, int] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Restore the checkpoint unless rebuilding and check it belongs to the store's model; create the model
        if absent (no checkpoint, or ``--rebuild``); collect abandoned building generations."""
        if self._started:
            return
        store, snap = self.store, self.snapshot
        if self.cold:
            log.info("--rebuild: ignoring the checkpoint in %s, reading %s from the beginning", snap.path, snap.topic)
        elif snap.load():
            self._check_checkpoint_model()
            self._saved = dict(snap.offsets)
        store.ensure_model(self.cfg.factors, self.cfg.pop_half_life_ms, replace_legacy=self.cold)
        snap.model_id = store.model_id
        dropped = store.gc_generations(self.cfg.gc_grace_s)
        if dropped:
            log.info("garbage-collected generations %s (abandoned builds and retired ones)", dropped)
        self._started = True

    def _check_checkpoint_model(self) -> None:
        """Refuse a checkpoint next to a store without a model (lost) or with another model (re-created)."""
        store, snap = self.store, self.snapshot
        rebuild = f"rebuild explicitly with `zerocf als --once --rebuild` (re-reads {snap.topic} from the beginning; "
        rebuild += "its retention bounds what comes back), or point ZEROCF_ALS_CHECKPOINT_DIR (--checkpoint-dir) at "
        rebuild += "this deployment's checkpoint"
        what = f"checkpoint {snap.path} ({snap.n_events} events of {snap.topic}"
        what += f", model {snap.model_id})" if snap.model_id else ")"
        if not store.has_model():
            store.refuse_legacy()
            lost = f"lost model {snap.model_id}" if snap.model_id else "holds no zerocf model"
            raise CheckpointMismatch(
                f"the store at {store.where} {lost} under namespace {store.keys.ns!r}, but {what} says one was "
                "built: Redis lost its data (restarted empty?) or the checkpoint belongs to another deployment. "
                f"Nothing was published; restore Redis, or {rebuild}"
            )
        current = store.model_id
        if snap.model_id and current and snap.model_id != current:
            raise CheckpointMismatch(
                f"the store at {store.where} holds model {current} under namespace {store.keys.ns!r}, but {what} "
                "belongs to another model: the store was re-created after a loss, or the checkpoint comes from "
                f"another deployment. Nothing was published; {rebuild}"
            )

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy unless the last run failed (before the first run: healthy, ``last_run`` null)."""
        last = self.last
        return self.last_ok is not False, {
            "last_run": None if last is None else last.outcome,
            "generation": None if last is None else last.generation,
            "snapshot_events": self.snapshot.n_events,
        }

    def pending(self) -> int:
        """Events the snapshot holds beyond the live generation's snapshot offsets: the records past them times
        the snapshot's mean events per record (a record of ``<p>.events`` is one event or a pack of them; exact
        for one event per record, and for packs whenever nothing was de-duplicated)."""
        meta = self.store.generation_meta(self.store.live_generation())
        offsets = self.snapshot.offsets
        records = sum(max(0, o - meta.offsets.get(p, -1)) for p, o in offsets.items())
        total = sum(o + 1 for o in offsets.values())
        per_record = self.snapshot.n_events / total if total else 1.0
        return round(records * max(per_record, 1.0)) if records else 0

    # ------------------------------------------------------------------ one run
    def run_once(self, min_new_events: int = 0) -> RunResult:
        """Catch up, checkpoint, and (if warranted) solve, calibrate and publish a generation.

        With ``min_new_events=0`` (``--once``) any snapshot holding a click is solved.
        """
        self.start()
        t0 = time.monotonic()
        try:
            res = self._run(min_new_events)
        except ModelDiverged as exc:
            log.error("ALS run refused, nothing published: %s", exc)
            res = RunResult("diverged")
        except _Stopped:
            log.info("ALS run stopped (%s): nothing published", self.stop.reason or "stop flag")
            res = RunResult("stopped")
        except BaseException:
            self._finish(RunResult("failed"), t0, ok=False)
            raise
        return self._finish(res, t0, ok=res.outcome != "diverged")

    def _finish(self, res: RunResult, t0: float, ok: bool) -> RunResult:
        res.seconds = time.monotonic() - t0
        m = self.metrics
        m.runs.labels(res.outcome).inc()
        m.last_run.set(time.time())
        m.duration.set(res.seconds)
        m.events.set(self.snapshot.n_events)
        m.nnz.set(self.snapshot.matrix.nnz)
        if res.outcome == "published":
            m.last_success.set(time.time())
            m.generation.set(res.generation or 0)
            m.loss.set(res.loss)
        self.last, self.last_ok = res, ok
        log.info("als run: %s", res)
        return res

    def _run(self, min_new_events: int) -> RunResult:
        snap = self.snapshot
        new = snap.catch_up(self.stop)
        if self._saved != snap.offsets:
            snap.save()
            self._saved = dict(snap.offsets)
        if self.stop.is_set():
            raise _Stopped()
        pending = self.pending()
        if snap.n_clicks == 0 or snap.matrix.shape[0] == 0:
            log.info("no clicks in %s yet: nothing to solve", snap.topic)
            return RunResult("skipped", new_events=new, pending=pending)
        if min_new_events > 0 and pending < min_new_events:
            log.info(
                "%d new events since the live generation (< --min-new-events %d): not solving", pending, min_new_events
            )
            return RunResult("skipped", new_events=new, pending=pending)
        return self.solve_and_publish(new_events=new, pending=pending)

    def solve_and_publish(self, new_events: int = 0, pending: int = 0) -> RunResult:
        """Solve on the current snapshot (no catch-up), calibrate and publish; see the module docstring."""
        self.start()
        cfg, snap = self.cfg, self.snapshot
        csr = snap.matrix.to_csr()
        users, items = snap.matrix.user_ids, snap.matrix.item_ids
        offsets, watermarks = dict(snap.offsets), snap.watermarks()
        U, V, loss = self._solve(csr, users, items)
        erased = np.array([not u for u in users], np.bool_)  # rows of erased users (stream.erasure): id ""
        U[erased] = 0  # not even the warm start keeps a trace of them
        self.factors.save(U, V)
        U_rows, V_rows, cal = handoff_rows(U, V, csr, cfg)
        if erased.any():  # never published: a generation holds no row for an erased user
            users, U_rows = [u for u in users if u], U_rows[~erased]
        if cal.clamped:
            log.warning("calibration slope was <= 0 (ALS scores do not rank clicks above negatives); clamped to "
                        "%g: check ZEROCF_ALS_ALPHA/ZEROCF_ALS_REG", cal.scale)  # fmt: skip
        log.info("calibration: scale %.4g bias %.4g (logloss %.4f on %d clicks + %d negatives)",
                 cal.scale, cal.bias, cal.logloss, cal.n_pos, cal.n_neg)  # fmt: skip
        counts = np.asarray(csr.sum(axis=0), dtype=np.float64).ravel()
        g = self._publish(users, items, U_rows, V_rows, dict(zip(items, counts.tolist())), offsets, watermarks, cal)
        self.cold = False
        dropped = self.store.gc_generations(cfg.gc_grace_s)
        if dropped:
            log.info("garbage-collected generations %s", dropped)
        return RunResult("published", generation=g, new_events=new_events, pending=pending, loss=loss,
                         scale=cal.scale, bias=cal.bias)  # fmt: skip

    # ------------------------------------------------------------------ solve
    def _solve(
        self, csr: Any, users: list[str], items: list[str]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]:
        """Implicit ALS on the snapshot, warm-started from the previous solve's raw factors (never from the
        live, calibrated and online-updated rows: that would compound the calibration scale); cold and seeded
        on the first run or with ``--rebuild``."""
        from tqdm import tqdm

        cfg = self.cfg
        if cfg.als_backend == "spark":
            return self._solve_spark(csr)
        init = None if self.cold else self.factors.load(len(users), len(items), cfg.factors)
        log.info("ALS solve: %d users x %d items, %d pairs, k=%d, %d iterations (%s, %s alpha=%g eps=%g reg=%g), %s",
                 len(users), len(items), csr.nnz, cfg.factors, cfg.als_iterations, cfg.als_solver, cfg.als_confidence,
                 cfg.als_alpha, cfg.als_eps, cfg.als_reg, "cold start" if init is None else "warm start")  # fmt: skip
        bar = tqdm(total=cfg.als_iterations, desc="als", unit="it", disable=not sys.stderr.isatty())
        last = [float("nan")]

        def callback(it: int, seconds: float, loss: float | None) -> None:
            bar.update(1)
            last[0] = float("nan") if loss is None else loss
            bar.set_postfix(loss=f"{last[0]:.5g}")
            log.info("als iteration %d/%d: loss %.6g (%.3fs)", it + 1, cfg.als_iterations, last[0], seconds)
            if self.stop.is_set():
                raise _Stopped()

        try:
            U, V, _loss = fit(csr, cfg, init, callback)
        except ALSDiverged as exc:
            raise ModelDiverged(str(exc)) from exc
        finally:
            bar.close()
        if not (np.isfinite(U).all() and np.isfinite(V).all() and math.isfinite(last[0])):
            raise ModelDiverged(
                f"ALS factors or loss are NaN/inf (loss {last[0]}); lower ZEROCF_ALS_ALPHA or raise ZEROCF_ALS_REG"
            )
        return U, V, last[0]

    def _solve_spark(self, csr: Any) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]:
        """The optional Spark MLlib backend (:mod:`workers.batch.spark`): same snapshot, same outputs."""
        from workers.batch.spark import spark_als_fit
        from workers.kernels.als import confidence, wmf_loss

        cfg = self.cfg
        U, V = spark_als_fit(
            csr,
            cfg.factors,
            cfg.als_reg,
            cfg.als_alpha,
            cfg.als_iterations,
            cfg.als_threads,
            cfg.als_seed,
            cfg.als_confidence,
            cfg.als_eps,
        )
        loss = wmf_loss(confidence(csr, cfg.als_alpha, cfg.als_confidence, cfg.als_eps), U, V, cfg.als_reg)
        if self.stop.is_set():
            raise _Stopped()
        if not (np.isfinite(U).all() and np.isfinite(V).all() and math.isfinite(loss)):
            raise ModelDiverged(
                f"Spark ALS factors or loss are NaN/inf (loss {loss}); lower ZEROCF_ALS_ALPHA or raise ZEROCF_ALS_REG"
            )
        log.info("spark ALS done: WMF loss %.6g (our objective, for comparison with the numpy backend)", loss)
        return U, V, loss

    # ------------------------------------------------------------------ publish
    def _write(self, g: int, table: Table, ids: list[str], mat: npt.NDArray[np.float32]) -> None:
        for c in range(0, len(ids), WRITE_CHUNK):
            if self.stop.is_set():
                raise _Stopped()
            self.store.renew_lease(g)
            self.store.write_vectors(g, table, ids[c : c + WRITE_CHUNK], mat[c : c + WRITE_CHUNK])

    def _publish(self, users: list[str], items: list[str], U: npt.NDArray[np.float32], V: npt.NDArray[np.float32],
                 counts: dict[str, float], offsets: dict[int, int], watermarks: dict[int, dict[str, list[int]]],
                 cal: Calibration) -> int:  # fmt: skip
        if self.stop.is_set():
            raise _Stopped()
        store, snap = self.store, self.snapshot
        carried = None if self.cold else self._carry(users, items)
        g = store.begin_generation("als", pop_half_life_ms=snap.pop_half_life_ms)
        try:
            self._write(g, "user", users, U)
            self._write(g, "item", items, V)
            if carried is not None:
                self._write(g, "user_acc", users, carried.user_acc)
                self._write(g, "item_acc", items, carried.item_acc)
            store.renew_lease(g)
            store.write_counts(g, counts)
            store.write_popularity(g, snap.item_popularity(), snap.pop_ref_ms)
            if self.stop.is_set():
                raise _Stopped()
            store.renew_lease(g)
            store.publish_generation(g, offsets, watermarks, cal.bias, len(users), len(items), scale=cal.scale)
        except BaseException:
            try:
                store.drop_generation(g)
            except Exception as exc:  # Redis gone: gc removes the building generation once its lease expired
                log.warning("generation %d left in state building (%s); its lease expires within %.0fs and the "
                            "next ALS start removes it", g, exc, LEASE_S)  # fmt: skip
            raise
        return g

    def _carry(self, users: list[str], items: list[str]) -> Carried | None:
        """The live generation's AdaGrad accumulators for the new rows (None when it holds none).

        The online learner then continues on the new rows with the step sizes it had reached: with fresh
        accumulators AdaGrad's first steps have a fixed length (``lr·sqrt(k)``), large enough to undo a
        converged ALS row (measured in the twin: ml-100k pipeline NDCG@10 0.187 fresh vs 0.209 carried).
        """
        store, live = self.store, self.store.live_generation()
        parts = {}
        tables: tuple[tuple[Table, list[str]], ...] = (("user_acc", users), ("item_acc", items))
        for table, ids in tables:
            chunks = [
                store.get_vectors(live, table, ids[c : c + WRITE_CHUNK])[0] for c in range(0, len(ids), WRITE_CHUNK)
            ]
            parts[table] = np.vstack(chunks) if chunks else np.zeros((0, 2), np.float32)
        if not (parts["user_acc"].any() or parts["item_acc"].any()):
            return None
        log.info("handoff keeps the online step sizes (AdaGrad accumulators) of generation %d", live)
        return Carried(parts["user_acc"], parts["item_acc"])

    # ------------------------------------------------------------------ loops
    def run_every(self, interval_s: float, min_new_events: int = 1) -> None:
        """Run, sleep ``interval_s`` (waking on stop), repeat; errors are logged and retried next time."""
        while not self.stop.is_set():
            try:
                self.run_once(min_new_events)
            except (CheckpointMismatch, ModelLost):  # not cured by waiting: the operator must choose
                raise
            except Exception as exc:  # loop boundary: keep the schedule, report via health/metrics
                log.error("ALS run failed (%s: %s); retrying in %.0fs", type(exc).__name__, exc, interval_s)
            self.stop.wait(interval_s)
        log.info("als worker stopping (%s)", self.stop.reason)


@dataclass
class Carried:
    """What a re-solve keeps from the live generation (see :meth:`ALSWorker._carry`)."""

    user_acc: npt.NDArray[np.float32]
    item_acc: npt.NDArray[np.float32]


class RawFactors:
    """The last solve's factors, before calibration, in ``<checkpoint_dir>/factors.npz`` (the warm start).

    Rows follow the snapshot's id order, which only ever appends, so the first rows of the next snapshot
    are the same users and items; the file is replaced atomically after each solve.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / "factors.npz"

    def save(self, U: npt.NDArray[np.float32], V: npt.NDArray[np.float32]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, U=U, V=V)
        os.replace(tmp, self.path)

    def load(
        self, n_users: int, n_items: int, k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None:
        """The saved rows (at most ``n_users`` / ``n_items``), or None when there are none of rank ``k``."""
        try:
            with np.load(self.path) as z:
                U, V = z["U"], z["V"]
        except (OSError, KeyError, ValueError):
            return None
        if U.shape[1] != k or V.shape[1] != k or U.shape[0] > n_users or V.shape[0] > n_items:
            log.info("warm start skipped: %s holds rows of another snapshot or rank", self.path)
            return None
        return U.astype(np.float32), V.astype(np.float32)


# ---------------------------------------------------------------------- CLI
def register(subparsers: Any) -> None:
    """Add ``zerocf als`` to the ``zerocf`` command."""
    p = subparsers.add_parser(
        "als", help="periodic implicit-ALS re-solve: snapshot -> new generation", description=__doc__.split("\n")[0]
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--once", action="store_true", help="one run, then exit")
    mode.add_argument("--every", metavar="DURATION", help="run every DURATION (90s, 15m, 2h, 1d)")
    p.add_argument(
        "--min-new-events",
        type=int,
        default=None,
        help="solve only when this many new records arrived (default 0 with --once, 1 with --every)",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="ignore the checkpoint and the live vectors: re-read the topic, cold start; the explicit choice "
        "after a lost store or a foreign checkpoint (creates the model if Redis has none)",
    )
    add_flags(p, ALSConfig, skip=TOP_LEVEL)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point: 0 when published, skipped or stopped cleanly; 1 when the solve diverged."""
    cfg = load(ALSConfig, args.env, flag_overrides(args, ALSConfig))
    interval = parse_duration(args.every) if args.every else None
    min_new = args.min_new_events if args.min_new_events is not None else (0 if args.once else 1)
    store = FactorStore.connect(cfg.redis_url, cfg.topic_prefix)  # clear errors: unreachable, bad password
    worker = ALSWorker(cfg, store, StopFlag().install(), rebuild=args.rebuild)
    http = (
        start_http(cfg.runtime.metrics_port, worker.health, worker.metrics.registry, cfg.runtime.metrics_host)
        if cfg.runtime.metrics_port
        else None
    )
    try:
        if interval is None:
            res = worker.run_once(min_new)
            return 1 if res.outcome == "diverged" else 0
        worker.run_every(interval, min_new)
        return 0
    finally:
        if http is not None:
            http.shutdown()
