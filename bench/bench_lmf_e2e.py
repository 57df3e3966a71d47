"""End-to-end online LMF throughput and click-to-visible latency; prints one JSON object.

Starts its own LocalStack in a temp dir (stopped at the end) and puts N normalised click events on
``<p>.events`` directly (ids in ingest's format ``<p>.clicks:<partition>:<offset>:0``, key = user, gzip
batches as ``zerocf ingest`` writes them). Then, in the same run:

1. ``raw``: a kafka-python consume-only pass over ``<p>.events`` with the worker's consumer settings (a
   fresh group, ``max_poll_records`` = batch) **including ``json.loads`` of every value**: events/s from
   the first non-empty poll to the last record.
2. ``lmf``: :class:`workers.online.worker.LMFWorker` in-process (k=64, 5 negatives, hard_share 0.2, batch
   2000, fresh group): events/s from the first non-empty poll to the moment Redis holds every partition's
   last offset; ``ratio`` = lmf / raw. Per-batch time split by wrapping the model/store methods the worker
   calls (plan, seen load, fetch, train, commit, write; the write runs on the worker's writer thread and
   overlaps the next batch's decode/plan). With ``--profile``, the top cProfile entries of the worker's
   thread (the writer thread is not profiled; its time is the ``write`` split).
3. ``latency``: a separate producer process sends clicks at ``--rate`` events/s (default 5000) for
   ``--latency-seconds``, each with ``ts`` = its send time (epoch ms); a fresh worker resumes behind the
   stored offsets and, when each batch's Lua write returns, records ``now - ts`` for its clicks: p50/p99 ms.

Usage: ``python -m bench.bench_lmf_e2e [--events 200000] [--rate 5000] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import multiprocessing as mp
import pstats
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import replace
from typing import Any

import numpy as np

from stream import kafka_util
from stream.config import load
from stream.devstack import LocalStack
from stream.events import Event
from workers.config import LMFConfig
from workers.online.worker import LMFWorker
from workers.store import ApplyStatus, FactorStore

log = logging.getLogger("bench.lmf_e2e")
PARTITIONS = 6


# ------------------------------------------------------------------- producing
def _event(prefix: str, src: int, off: int, user: str, item: str, ts: int) -> bytes:
    return Event(
        f"{prefix}.clicks:{src}:{off}:0", "click", user, item, ts, 1.0, None, None, f"{prefix}.clicks/{src}/{off}"
    ).to_json()


BATCH = 2000


def produce_events(cfg: LMFConfig, n: int, n_users: int, n_items: int, seed: int = 0) -> dict[int, int]:
    """Send ``n`` click events (Zipf-ish items); returns the last offset per events partition."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    items = np.minimum(rng.zipf(1.3, n) - 1, n_items - 1)
    ts0 = int(time.time() * 1000) - 3_600_000
    offsets = [0] * PARTITIONS
    producer = kafka_util.producer(cfg.kafka, client_id="bench-lmf-produce", compression_type="gzip")
    last: dict[int, int] = {}

    def done(meta: Any) -> None:
        last[meta.partition] = max(meta.offset, last.get(meta.partition, -1))

    try:
        for n_, (u, i) in enumerate(zip(users.tolist(), items.tolist())):
            src = u % PARTITIONS
            user = f"u{u}"
            producer.send(
                cfg.topics.events,
                key=user.encode(),
                value=_event(cfg.topic_prefix, src, offsets[src], user, f"i{i}", ts0 + n_),
            ).add_callback(done)
            offsets[src] += 1
        producer.flush()
    finally:
        producer.close()
    return last


def _paced_producer(
    bootstrap: str,
    prefix: str,
    rate: float,
    seconds: float,
    n_users: int,
    n_items: int,
    start_offsets: list[int],
    out: Any,
) -> None:
    """Child process: clicks at ``rate``/s with ts = send time (ms); puts the number sent on ``out``."""
    cfg = load(
        LMFConfig, {"ZEROCF_KAFKA_BOOTSTRAP": bootstrap, "ZEROCF_TOPIC_PREFIX": prefix, "ZEROCF_LMF_BATCH": str(BATCH)}
    )
    rng = np.random.default_rng(1)
    producer = kafka_util.producer(cfg.kafka, client_id="bench-lmf-paced", linger_ms=5)
    offsets = list(start_offsets)
    sent, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            due = int((time.monotonic() - t0) * rate)
            for _ in range(due - sent):
                u = int(rng.integers(0, n_users))
                src, user = u % PARTITIONS, f"u{u}"
                item = f"i{min(int(rng.zipf(1.3)) - 1, n_items - 1)}"
                producer.send(
                    cfg.topics.events,
                    key=user.encode(),
                    value=_event(prefix, src, offsets[src], user, item, int(time.time() * 1000)),
                )
                offsets[src] += 1
                sent += 1
            time.sleep(0.002)
        producer.flush()
    finally:
        producer.close()
        out.put(sent)


# ------------------------------------------------------------------- raw consume
def raw_consume(cfg: LMFConfig, n: int) -> float:
    """Group consumer with the worker's settings, json.loads per value; events/s first record -> last."""
    consumer = kafka_util.consumer(
        cfg.kafka, group_id=f"bench-raw-{uuid.uuid4().hex[:8]}", client_id="bench-raw", max_poll_records=cfg.batch
    )
    consumer.subscribe([cfg.topics.events])
    got, t_first = 0, None
    try:
        deadline = time.monotonic() + 300
        while got < n and time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=500, max_records=cfg.batch)
            if polled and t_first is None:
                t_first = time.perf_counter()
            for records in polled.values():
                for r in records:
                    json.loads(r.value)
                got += len(records)
        assert t_first is not None and got >= n, f"raw consumer read {got} of {n}"
        return n / (time.perf_counter() - t_first)
    finally:
        consumer.close()


# ------------------------------------------------------------------- instrumented worker
class Probe:
    """Wraps the methods the worker calls to time them, and stops the worker when Redis holds ``target``."""

    def __init__(self, worker: LMFWorker, target: dict[int, int] | None) -> None:
        self.worker, self.target = worker, target
        self.split: dict[str, list[float]] = defaultdict(list)
        self.applied: dict[int, int] = {}
        self.t_first: float | None = None
        self.t_done: float | None = None
        self.latencies: list[float] = []
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()
        m, s = worker.model, worker.store
        for name, obj, attr in (
            ("plan", m, "plan"),
            ("train", m, "train"),
            ("commit", m, "commit"),
            ("fetch", s, "read_batch_state"),
            ("seen_load", s, "seen_items_many"),
        ):
            self._time(name, obj, attr)
        self._orig_apply = s.apply_batch
        s.apply_batch = self._apply  # type: ignore[method-assign]
        self._orig_consumer = kafka_util.consumer
        kafka_util.consumer = self._consumer  # type: ignore[assignment]

    def restore(self) -> None:
        kafka_util.consumer = self._orig_consumer  # type: ignore[assignment]

    def _time(self, name: str, obj: Any, attr: str) -> None:
        orig = getattr(obj, attr)

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                self.split[name].append(time.perf_counter() - t0)

        setattr(obj, attr, timed)

    def _consumer(self, *a: Any, **kw: Any) -> Any:
        c = self._orig_consumer(*a, **kw)
        orig_poll = c.poll

        def poll(*pa: Any, **pkw: Any) -> Any:
            t0 = time.perf_counter()
            out = orig_poll(*pa, **pkw)
            if out:
                self.split["poll"].append(time.perf_counter() - t0)
                if self.t_first is None:
                    self.t_first = t0
            return out

        c.poll = poll
        return c

    def _apply(self, g: int, partition: int, expected: int | None, new_offset: int, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        status = self._orig_apply(g, partition, expected, new_offset, *a, **kw)
        now = time.perf_counter()
        now_ms = time.time() * 1000
        self.split["write"].append(now - t0)
        if status is ApplyStatus.APPLIED:
            seen = list(kw.get("seen", ()))
            with self._lock:
                self.batch_sizes.append(len(seen))
                self.latencies.extend(now_ms - ts for _u, _i, ts in seen)
                self.applied[partition] = new_offset
                if (
                    self.target is not None
                    and self.t_done is None
                    and all(self.applied.get(p, -1) >= o for p, o in self.target.items())
                ):
                    self.t_done = now
                    self.worker.stop.set("bench: caught up")
        return status

    def split_ms(self) -> dict[str, dict[str, float]]:
        return {
            k: {"mean_ms": round(1000 * float(np.mean(v)), 2), "total_s": round(float(np.sum(v)), 3), "calls": len(v)}
            for k, v in sorted(self.split.items())
        }


def run_lmf(cfg: LMFConfig, store: FactorStore, target: dict[int, int], profile: bool) -> tuple[Probe, str | None]:
    """Run a worker in this thread until Redis holds ``target`` (the probe stops it)."""
    worker = LMFWorker(replace(cfg, lmf_group=f"bench-lmf-{uuid.uuid4().hex[:8]}"), store)
    probe = Probe(worker, target)
    prof = cProfile.Profile() if profile else None
    try:
        if prof:
            prof.enable()
        worker.run(until_idle=False)
    finally:
        if prof:
            prof.disable()
        probe.restore()
    text = None
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        text = buf.getvalue()
    return probe, text


def latency_phase(cfg: LMFConfig, store: FactorStore, args: argparse.Namespace) -> dict[str, Any]:
    """Click-to-visible latency at a fixed produce rate (see the module docstring)."""
    worker = LMFWorker(replace(cfg, lmf_group=f"bench-lat-{uuid.uuid4().hex[:8]}"), store)
    probe = Probe(worker, None)
    thread = threading.Thread(target=worker.run, name="bench-lmf-latency", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (worker.consumer is not None and worker.health()[1]["assigned"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # let the assignment callback resume every partition
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(
            target=_paced_producer,
            args=(
                cfg.kafka.bootstrap,
                cfg.topic_prefix,
                args.rate,
                args.latency_seconds,
                args.users,
                args.items,
                [args.events] * PARTITIONS,
                q,
            ),
        )
        proc.start()
        sent = q.get(timeout=args.latency_seconds + 60)
        proc.join(10)
        deadline = time.monotonic() + 20
        while len(probe.latencies) < sent and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.stop.set("bench: window over")
        thread.join(30)
        probe.restore()
    lat = probe.latencies
    return {
        "rate": args.rate,
        "seconds": args.latency_seconds,
        "sent": sent,
        "measured": len(lat),
        "p50_ms": _pct(lat, 50),
        "p90_ms": _pct(lat, 90),
        "p99_ms": _pct(lat, 99),
        "max_ms": _pct(lat, 100),
        "batches": len(probe.batch_sizes),
        "mean_batch_events": round(float(np.mean(probe.batch_sizes)), 1) if probe.batch_sizes else 0,
        "split_per_batch": probe.split_ms(),
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


# ------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=5000.0, help="events/s of the latency phase")
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--profile", action="store_true", help="cProfile the worker thread of the throughput pass")
    ap.add_argument("--batch", type=int, default=2000, help="ZEROCF_LMF_BATCH of the worker (and the raw pass)")
    args = ap.parse_args(argv)
    global BATCH
    BATCH = args.batch
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    out: dict[str, Any] = {
        "events": args.events,
        "partitions": PARTITIONS,
        "config": {"factors": 64, "negatives": 5, "hard_share": 0.2, "batch": 2000},
        "raw_includes_json_loads": True,
    }
    with tempfile.TemporaryDirectory(prefix="zerocf-bench-lmf-") as tmp:
        stack = LocalStack(tmp)
        stack.up()
        try:
            env = {**stack.env(), "ZEROCF_TOPIC_PREFIX": f"b{uuid.uuid4().hex[:8]}"}
            cfg = load(LMFConfig, env, {"factors": 64, "negatives": 5, "hard_share": 0.2, "batch": 2000})
            kafka_util.ensure_topics(cfg.kafka, {cfg.topics.events: PARTITIONS})
            t0 = time.perf_counter()
            last = produce_events(cfg, args.events, args.users, args.items)
            out["produce_eps"] = round(args.events / (time.perf_counter() - t0))
            out["raw_consume_eps"] = round(raw_consume(cfg, args.events))

            store = FactorStore.from_url(cfg.redis_url, cfg.topic_prefix, seen_cap=cfg.seen_cap)
            probe, prof_text = run_lmf(cfg, store, last, args.profile)
            assert probe.t_first is not None and probe.t_done is not None, "the worker never caught up"
            secs = probe.t_done - probe.t_first
            lmf_eps = args.events / secs
            out["lmf_eps"] = round(lmf_eps)
            out["lmf_seconds"] = round(secs, 2)
            out["ratio"] = round(lmf_eps / out["raw_consume_eps"], 3)
            out["targets"] = {"ratio>=0.5": out["ratio"] >= 0.5, "lmf_eps>=20000": lmf_eps >= 20_000}
            out["batches"] = len(probe.batch_sizes)
            out["mean_batch_events"] = round(float(np.mean(probe.batch_sizes)), 1)
            out["split_per_batch"] = probe.split_ms()
            counts = store.user_update_counts(store.live_generation())
            out["applied_events_in_redis"] = sum(counts.values())

            # latency phase: a fresh worker resumes behind the stored offsets; once it owns its partitions a
            # paced producer process starts (source offsets continue above the first phase's: not duplicates)
            out["latency"] = latency_phase(cfg, store, args)
            if prof_text:
                out["profile_top_tottime"] = [ln for ln in prof_text.splitlines() if ln.strip()][:40]
        finally:
            stack.down()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
