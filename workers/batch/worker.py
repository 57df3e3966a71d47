"""``zerocf als``: the periodic implicit-ALS re-solve — snapshot -> als -> check -> calibrate -> publish.

One run (:meth:`ALSWorker.run_once`):

1. **Snapshot.** :class:`workers.batch.snapshot.Snapshot` catches up on ``<p>.events`` (all partitions, no
   group, de-duplicated like the LMF worker) and checkpoints the click matrix with its offsets and dedupe
   watermarks, so a restart resumes where the last checkpoint ended.
2. **Decide.** ``pending`` = events-topic records past the live generation's snapshot offsets. ``--once``
   solves whenever the snapshot holds a click; ``--every`` only when ``pending >= --min-new-events``.
3. **Solve.** :func:`workers.kernels.als.als_fit` warm-started from the live generation's vectors for the ids it
   has; the other rows are seeded like ``als_fit`` seeds new rows (uniform ``[0, 0.01)``). ``--rebuild``
   ignores the checkpoint (re-reads the topic from the beginning) and the live vectors (cold start).
   The loss is logged per iteration (tqdm bar on a TTY); NaN/inf raises :class:`ModelDiverged` and
   nothing is published.
4. **Calibrate.** :func:`workers.kernels.calibration.calibrate` fits ``σ(a·p·q + b)`` on held clicks vs sampled
   negatives; ``sqrt(a)`` is folded into both factor sets and ``b`` becomes the generation's ``bias``.
5. **Publish.** ``begin_generation("als")``, user and item vectors in chunks, item click counts (the
   snapshot's column sums), then ``publish_generation`` with the snapshot's offsets and watermarks: one
   atomic flip, after which LMF workers rewind to those offsets + 1 and replay into the new generation.
   Finally ``gc_generations(gc_grace_s)``.

Stopping: SIGTERM sets the stop flag, checked between ALS iterations, between vector chunks and right
before the flip; a stop publishes nothing and drops the half-built generation. A crash between
``begin_generation`` and the flip leaves a ``building`` generation that a later gc removes. Either way the
old generation stays live and untouched.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from stream.config import TOP_LEVEL, add_flags, flag_overrides, load
from stream.runtime import StopFlag, start_http
from workers.batch.snapshot import Snapshot
from workers.config import ALSConfig, parse_duration
from workers.errors import ModelDiverged
from workers.kernels.als import ALSDiverged, Scaling, als_fit
from workers.kernels.calibration import calibrate, fold_scale
from workers.store import FactorStore, Table

log = logging.getLogger(__name__)

WRITE_CHUNK = 50_000  # rows encoded and written per step (bounds the blob copy; stop checked between)
READ_CHUNK = 10_000  # ids per HMGET when fetching warm-start vectors
CALIB_NEGATIVES = 1  # negatives per held click in the calibration fit

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
        self.metrics = ALSMetrics()
        self.cold = rebuild
        self.last_ok: bool | None = None
        self.last: RunResult | None = None
        self._started = False
        self._saved: dict[int, int] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Check the model (creating it if absent) and restore the checkpoint unless rebuilding."""
        if self._started:
            return
        self.store.ensure_model(self.cfg.factors)
        if self.cold:
            log.info(
                "--rebuild: ignoring the checkpoint in %s, reading %s from the beginning",
                self.snapshot.path,
                self.snapshot.topic,
            )
        elif self.snapshot.load():
            self._saved = dict(self.snapshot.offsets)
        self._started = True

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy unless the last run failed (before the first run: healthy, ``last_run`` null)."""
        last = self.last
        return self.last_ok is not False, {
            "last_run": None if last is None else last.outcome,
            "generation": None if last is None else last.generation,
            "snapshot_events": self.snapshot.n_events,
        }

    def pending(self) -> int:
        """Events-topic records the snapshot holds beyond the live generation's snapshot offsets."""
        meta = self.store.generation_meta(self.store.live_generation())
        return sum(max(0, o - meta.offsets.get(p, -1)) for p, o in self.snapshot.offsets.items())

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
                "%d new records since the live generation (< --min-new-events %d): not solving", pending, min_new_events
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
        cal = calibrate(
            U, V, csr, cfg.calib_samples, np.random.default_rng([cfg.als_seed, 1]), negatives=CALIB_NEGATIVES
        )
        if cal.clamped:
            log.warning(
                "calibration slope was <= 0 (ALS scores do not rank clicks above negatives); "
                "clamped to %g: check ZEROCF_ALS_ALPHA/ZEROCF_ALS_REG",
                cal.scale,
            )
        log.info(
            "calibration: scale %.4g bias %.4g (logloss %.4f on %d clicks + %d negatives)",
            cal.scale,
            cal.bias,
            cal.logloss,
            cal.n_pos,
            cal.n_neg,
        )
        U, V = fold_scale(U, V, cal.scale)
        counts = np.asarray(csr.sum(axis=0), dtype=np.float64).ravel()
        g = self._publish(users, items, U, V, dict(zip(items, counts.tolist())), offsets, watermarks, cal.bias)
        self.cold = False
        dropped = self.store.gc_generations(cfg.gc_grace_s)
        if dropped:
            log.info("garbage-collected generations %s", dropped)
        return RunResult(
            "published", generation=g, new_events=new_events, pending=pending, loss=loss, scale=cal.scale, bias=cal.bias
        )

    # ------------------------------------------------------------------ solve
    def _warm(self, table: Table, ids: list[str], rng: np.random.Generator) -> npt.NDArray[np.float32]:
        """Live vectors for known ids, ``U[0, 0.01)`` (als_fit's new-row init) for the rest."""
        k = self.cfg.factors
        out = (rng.random((len(ids), k)) * 0.01).astype(np.float32)
        if self.cold:
            return out
        g = self.store.live_generation()
        found_total = 0
        for c in range(0, len(ids), READ_CHUNK):
            vecs, found = self.store.get_vectors(g, table, ids[c : c + READ_CHUNK])
            found &= np.isfinite(vecs).all(axis=1)
            out[c : c + READ_CHUNK][found] = vecs[found]
            found_total += int(found.sum())
        log.info(
            "warm start: %d of %d %s rows from generation %d, %d seeded",
            found_total,
            len(ids),
            table,
            g,
            len(ids) - found_total,
        )
        return out

    def _solve(
        self, csr: Any, users: list[str], items: list[str]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]:
        from tqdm import tqdm

        cfg = self.cfg
        if cfg.als_backend == "spark":
            return self._solve_spark(csr)
        rng = np.random.default_rng(cfg.als_seed)
        init = (self._warm("user", users, rng), self._warm("item", items, rng))
        if not self.cold:
            init = _unfold(csr, *init, alpha=cfg.als_alpha, scaling=cfg.als_confidence, eps=cfg.als_eps)
        log.info(
            "ALS solve: %d users x %d items, %d pairs, k=%d, %d iterations (%s, alpha=%g, reg=%g)",
            len(users),
            len(items),
            csr.nnz,
            cfg.factors,
            cfg.als_iterations,
            cfg.als_solver,
            cfg.als_alpha,
            cfg.als_reg,
        )
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
            U, V, _hist = als_fit(
                csr,
                factors=cfg.factors,
                reg=cfg.als_reg,
                alpha=cfg.als_alpha,
                iterations=cfg.als_iterations,
                solver=cfg.als_solver,
                cg_steps=cfg.als_cg_steps,
                init=init,
                rng=rng,
                callback=callback,
                num_threads=cfg.als_threads,
                scaling=cfg.als_confidence,
                eps=cfg.als_eps,
            )
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
            self.store.write_vectors(g, table, ids[c : c + WRITE_CHUNK], mat[c : c + WRITE_CHUNK])

    def _publish(
        self,
        users: list[str],
        items: list[str],
        U: npt.NDArray[np.float32],
        V: npt.NDArray[np.float32],
        counts: dict[str, float],
        offsets: dict[int, int],
        watermarks: dict[int, dict[str, list[int]]],
        bias: float,
    ) -> int:
        if self.stop.is_set():
            raise _Stopped()
        store = self.store
        g = store.begin_generation("als")
        try:
            self._write(g, "user", users, U)
            self._write(g, "item", items, V)
            store.write_counts(g, counts)
            if self.stop.is_set():
                raise _Stopped()
            store.publish_generation(g, offsets, watermarks, bias, len(users), len(items))
        except BaseException:
            try:
                store.drop_generation(g)
            except Exception as exc:  # Redis gone: gc removes the building generation later
                log.warning(
                    "generation %d left in state building (%s); gc_generations removes it after %.0fs",
                    g,
                    exc,
                    self.cfg.gc_grace_s,
                )
            raise
        return g

    # ------------------------------------------------------------------ loops
    def run_every(self, interval_s: float, min_new_events: int = 1) -> None:
        """Run, sleep ``interval_s`` (waking on stop), repeat; errors are logged and retried next time."""
        while not self.stop.is_set():
            try:
                self.run_once(min_new_events)
            except Exception as exc:  # loop boundary: keep the schedule, report via health/metrics
                log.error("ALS run failed (%s: %s); retrying in %.0fs", type(exc).__name__, exc, interval_s)
            self.stop.wait(interval_s)
        log.info("als worker stopping (%s)", self.stop.reason)


def _unfold(
    csr: Any, U0: npt.NDArray[np.float32], V0: npt.NDArray[np.float32], alpha: float, scaling: Scaling, eps: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Rescale warm-start factors by the ``t`` minimising the WMF data term of ``t·U0·V0^T``.

    Live vectors carry the previous calibration's ``sqrt(scale)`` (and the LMF's logit scale), so they are
    typically several times too long for the squared loss. ``t = Σ_obs c·s / (Σ_all s² + Σ_obs (c-1)·s²)``
    (``s = u·v``) is computed in ``O(nnz k + (m+n) k²)``; both factor sets are multiplied by ``sqrt(t)``.
    Measured on 20k x 3k, 209k pairs, k=64: the first warm iteration's loss drops from 504k to 281k
    (the cold solve reaches 282k after 15 iterations).
    """
    from workers.kernels.als import confidence

    d = confidence(csr, alpha, scaling, eps)
    rows = np.repeat(np.arange(csr.shape[0]), np.diff(d.indptr))
    s = np.einsum("ij,ij->i", U0[rows].astype(np.float64), V0[d.indices].astype(np.float64))
    U64, V64 = U0.astype(np.float64), V0.astype(np.float64)
    num = float(((1.0 + d.data) * s).sum())
    den = float(((U64.T @ U64) * (V64.T @ V64)).sum() + (d.data * s * s).sum())
    t = num / den if den > 0 else 0.0
    if not (math.isfinite(t) and t > 0):
        return U0, V0
    r = np.float32(math.sqrt(t))
    log.info("warm start rescaled by %.4g (factor scale sqrt(t), t=%.4g)", r, t)
    return (U0 * r).astype(np.float32), (V0 * r).astype(np.float32)


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
        help="ignore the checkpoint and the live vectors: re-read the topic, cold start",
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
        start_http(cfg.runtime.metrics_port, worker.health, worker.metrics.registry)
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
