"""End-to-end online LMF throughput and click-to-visible latency; prints one JSON object.

Usage: ``python -m bench.bench_lmf_e2e [--events 200000] [--rate 5000 20000] [--latency-seconds 10] [--pack 64]
[--set ZEROCF_X=V] [--profile]``.

Starts its own :class:`stream.devstack.LocalStack` (broker + Redis) in a temporary directory, stopped at the
end, and puts ``--events`` normalised click events on ``<p>.events`` (6 partitions, ``--users`` users,
Zipf items over ``--items``; ids in ingest's format ``<p>.clicks:<partition>:<offset>:0``, key = user,
gzip batches as ``zerocf ingest`` writes them). The worker runs with the production configuration
(``LMFConfig`` defaults: k = 64, 10 negatives, ``hard_share`` 0.5, batch 2,000, AdaGrad, seen sets with
retention and cap) on a store connected as ``zerocf lmf`` connects it. Then, in the same run:

1. ``raw_consume_eps``: a kafka-python consume-only pass over ``<p>.events`` with the worker's consumer
   settings (a fresh group, ``max_poll_records`` = batch), **including ``json.loads`` of every value**:
   events/s from the first non-empty poll to the last record. ``produce_eps`` is the producing (setup).
2. ``lmf_eps``: :class:`workers.online.worker.LMFWorker` in this process (fresh group, numba kernels loaded
   beforehand), events/s from its first non-empty poll until Redis holds every partition's last offset;
   ``ratio`` = lmf / raw. ``mean_write_user_rows``/``mean_write_item_rows``: rows per batch write.
   ``split_per_batch``: per-call mean (ms), total (s), calls and ``share`` of the pass's wall time of the
   methods the worker calls, wrapped: ``poll`` (non-empty polls), ``parse`` (JSON of the records: an event
   or a pack each), ``decode`` (de-duplication), ``plan``, ``fetch`` (:meth:`FactorStore.read_batch_state`:
   rows, accumulators and seen sets of users and items the worker does not hold), ``load`` (caching what
   ``fetch`` read), ``train`` (positive set + the kernel + deltas), ``commit`` (caches, reservoir), ``settle``
   (the main thread waiting for the write in flight) and ``write`` (:meth:`FactorStore.apply_batch` on the
   writer thread, meant to overlap the next batch); ``refresh_items`` if the periodic item re-read ran.
   ``fetch_share_during_write``: the share of the fetch time during which a write was in flight (Redis runs
   one command at a time: a read issued during the write's Lua script waits for it).
   ``redis_script_ms_per_batch`` / ``redis_busy_ms_per_batch``: Redis's own time per applied batch in scripts
   (EVALSHA: the batch write and the fetch's seen-set read) and in all commands (``INFO commandstats``).
   ``item_rows_added_share``: the share of written item rows Redis added (their version had moved, or was
   unknown: the global row) instead of SETting the worker's ``stored + delta``. With ``--profile``: the top
   cProfile entries of the worker's thread (not the writer thread).
3. ``latency`` (one phase per rate of ``--rate``, default 5,000 and 20,000 events/s): a child process sends
   clicks at that rate for ``--latency-seconds``, each with ``ts`` = its send time (epoch ms); a fresh worker
   resumes behind the stored offsets and, when each batch's write returns, records ``now - ts`` for its
   clicks: p50/p90/p99/max ms, with the same split (``share`` of the window). ``drain_s``: how long after
   the producer's last send the last click became visible; well above the p99 means the worker did not keep
   up with the rate (the percentiles then measure a backlog).

``load_avg_1m_at_start``: the machine's 1-minute load average when the bench started (2 cores; other
processes share them).

``targets``: the issue's goals (ratio >= 0.5, >= 40,000 events/s). ``applied_events_in_redis`` (the update
counters) must equal ``events``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import multiprocessing as mp
import os
import pstats
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, replace
from typing import Any

import numpy as np
from kafka.partitioner.default import murmur2

from bench.bench_lmf_kernel import first_calls
from stream import kafka_util
from stream.config import StreamConfig, load
from stream.devstack import LocalStack
from stream.events import Event, pack_json
from workers.config import LMFConfig
from workers.online.worker import LMFWorker
from workers.store import ApplyStatus, BatchWrite, FactorStore

log = logging.getLogger("bench.lmf_e2e")
PARTITIONS = 6
ZIPF = 1.3
REPORTED_CONFIG = ("factors", "negatives", "hard_share", "hard_candidates", "uniform_mix", "sample_alpha", "batch",
                   "adagrad", "seen_cap", "item_refresh_s")  # fmt: skip


# ------------------------------------------------------------------- producing
def _event(prefix: str, src: int, off: int, user: str, item: str, ts: int) -> bytes:
    return Event(
        f"{prefix}.clicks:{src}:{off}:0", "click", user, item, ts, 1.0, None, None, f"{prefix}.clicks/{src}/{off}"
    ).to_json()


def _item(rng: np.random.Generator, n_items: int) -> str:
    return f"i{min(int(rng.zipf(ZIPF)) - 1, n_items - 1)}"


def _partition(user: str) -> int:
    """The events partition ingest writes a user's events to (Kafka's default partitioner on the key)."""
    return (murmur2(user.encode()) & 0x7FFFFFFF) % PARTITIONS


def produce_events(cfg: LMFConfig, n: int, n_users: int, n_items: int, pack: int, seed: int = 0,
                   topic: str | None = None) -> dict[int, int]:  # fmt: skip
    """Send ``n`` click events as ``zerocf ingest`` writes them (packs of ``pack`` events per record of a
    partition; ``pack`` 1: one event per record keyed by user); returns the last offset per events partition."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    ts0 = int(time.time() * 1000) - 3_600_000
    offsets = [0] * PARTITIONS
    producer = kafka_util.producer(cfg.kafka, client_id="bench-lmf-produce", compression_type="gzip")
    last: dict[int, int] = {}
    topic = topic or cfg.topics.events

    def done(meta: Any) -> None:
        last[meta.partition] = max(meta.offset, last.get(meta.partition, -1))

    try:
        for start in range(0, n, 5000):  # ingest packs what one poll of up to 5,000 raw records gives
            parts: dict[int, list[bytes]] = defaultdict(list)
            for seq, u in enumerate(users[start : start + 5000].tolist(), start):
                src, user = u % PARTITIONS, f"u{u}"
                value = _event(cfg.topic_prefix, src, offsets[src], user, _item(rng, n_items), ts0 + seq)
                offsets[src] += 1
                if pack == 1:
                    producer.send(topic, key=user.encode(), value=value).add_callback(done)
                else:
                    parts[_partition(user)].append(value)
            for p, values in parts.items():
                for rec in pack_json(values, pack, 1 << 20):
                    producer.send(topic, value=rec, partition=p).add_callback(done)
        producer.flush()
    finally:
        producer.close()
    return last


def _paced_producer(env: dict[str, str], rate: float, seconds: float, n_users: int, n_items: int,
                    start_offset: int, pack: int, out: Any) -> None:  # fmt: skip
    """Child process: clicks at ``rate``/s with ts = send time (ms); puts the number sent on ``out``."""
    cfg = load(LMFConfig, env)
    rng = np.random.default_rng(1)
    producer = kafka_util.producer(cfg.kafka, client_id="bench-lmf-paced", linger_ms=5)
    offsets = [start_offset] * PARTITIONS  # source offsets above every earlier phase's: not duplicates
    sent, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < seconds:
            due = int((time.monotonic() - t0) * rate)
            parts: dict[int, list[bytes]] = defaultdict(list)
            for _ in range(due - sent):  # what is due now, packed per partition as ingest packs one poll
                u = int(rng.integers(0, n_users))
                src, user = u % PARTITIONS, f"u{u}"
                value = _event(cfg.topic_prefix, src, offsets[src], user, _item(rng, n_items), int(time.time() * 1000))
                offsets[src] += 1
                sent += 1
                if pack == 1:
                    producer.send(cfg.topics.events, key=user.encode(), value=value)
                else:
                    parts[_partition(user)].append(value)
            for p, values in parts.items():
                for rec in pack_json(values, pack, 1 << 20):
                    producer.send(cfg.topics.events, value=rec, partition=p)
            time.sleep(0.002)
        producer.flush()
    finally:
        producer.close()
        out.put(sent)


# ------------------------------------------------------------------- raw consume
def raw_consume(cfg: LMFConfig, n: int, topic: str | None = None) -> tuple[float, float]:
    """Group consumer with the worker's settings, json.loads per value: (events/s, records/s), first record to
    last (a record is one event or a pack of them)."""
    consumer = kafka_util.consumer(
        cfg.kafka, group_id=f"bench-raw-{uuid.uuid4().hex[:8]}", client_id="bench-raw", max_poll_records=cfg.batch
    )
    consumer.subscribe([topic or cfg.topics.events])
    got = records_read = 0
    t_first = None
    try:
        deadline = time.monotonic() + 300
        while got < n and time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=500, max_records=cfg.batch)
            if polled and t_first is None:
                t_first = time.perf_counter()
            for records in polled.values():
                for r in records:
                    obj = json.loads(r.value)
                    got += len(obj) if type(obj) is list else 1
                records_read += len(records)
        if t_first is None or got < n:
            raise RuntimeError(f"raw consumer read {got} of {n} events in 300 s")
        secs = time.perf_counter() - t_first
        return n / secs, records_read / secs
    finally:
        consumer.close()


# ------------------------------------------------------------------- instrumented worker
class Probe:
    """Times the methods the worker calls (see the module docstring) and stops the worker once Redis holds
    ``target`` (the last offset per partition; None: never)."""

    def __init__(self, worker: LMFWorker, target: dict[int, int] | None) -> None:
        self.worker, self.target = worker, target
        self.split: dict[str, list[float]] = defaultdict(list)
        self.spans: dict[str, list[tuple[float, float]]] = defaultdict(list)  # fetch and write (start, end)
        self.applied: dict[int, int] = {}
        self.t_first: float | None = None
        self.t_done: float | None = None
        self.t_last: float | None = None  # the last applied write
        self.latencies_ms: list[float] = []
        self.batch_clicks: list[int] = []
        self.write_rows: list[tuple[int, int]] = []  # (user rows, item rows) per applied write
        self._lock = threading.Lock()
        self._patched: list[tuple[Any, str, Any]] = []  # (object, attribute, original) to restore
        m = worker.model
        for name, obj, attr in (("parse", worker, "_parse"), ("decode", worker, "_decode"),
                                ("settle", worker, "_settle"), ("refresh_items", worker, "_refresh_items"),
                                ("plan", m, "plan_many"),
                                ("load", m, "load_users"), ("load", m, "absorb_items"), ("train", m, "train"),
                                ("commit", m, "commit"), ("fetch", worker.store, "read_batch_state")):  # fmt: skip
            self._wrap(name, obj, attr)
        self._apply = self._patch(worker.store, "apply_batch", self._timed_apply)
        self._consumer = self._patch(kafka_util, "consumer", self._timed_consumer)

    def restore(self) -> None:
        """Undo every patch (the store and the consumer factory outlive the worker)."""
        for obj, attr, orig in reversed(self._patched):
            setattr(obj, attr, orig)
        self._patched.clear()

    def _patch(self, obj: Any, attr: str, new: Any) -> Any:
        orig = getattr(obj, attr)
        self._patched.append((obj, attr, orig))
        setattr(obj, attr, new)
        return orig

    def _wrap(self, name: str, obj: Any, attr: str) -> None:
        orig = getattr(obj, attr)

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                t1 = time.perf_counter()
                self.split[name].append(t1 - t0)
                if name == "fetch":
                    self.spans[name].append((t0, t1))

        self._patch(obj, attr, timed)

    def _timed_consumer(self, *a: Any, **kw: Any) -> Any:
        c = self._consumer(*a, **kw)
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

    def _timed_apply(self, g: int, write: BatchWrite) -> ApplyStatus:
        t0 = time.perf_counter()
        status = self._apply(g, write)
        now = time.perf_counter()
        now_ms = time.time() * 1000
        self.split["write"].append(now - t0)
        self.spans["write"].append((t0, now))
        if status is not ApplyStatus.APPLIED:
            return status
        with self._lock:
            self.t_last = now
            self.batch_clicks.append(len(write.seen))
            self.write_rows.append((len(write.user_ids), len(write.item_ids)))
            self.latencies_ms.extend(now_ms - ts for _u, _i, ts in write.seen)
            self.applied[write.partition] = write.new_offset
            for f in write.more:  # the other partitions of the same poll, fenced by the same write
                self.applied[f.partition] = f.new_offset
            target = self.target
            if (
                target is not None
                and self.t_done is None
                and all(self.applied.get(p, -1) >= o for p, o in target.items())
            ):
                self.t_done = now
                self.worker.stop.set("bench: caught up")
        return status

    def batch_stats(self) -> dict[str, float]:
        """Applied writes, and per write: mean clicks, user rows and item rows (the global row included)."""
        if not self.write_rows:
            return {"batches": 0}
        users, items = np.mean(self.write_rows, axis=0)
        return {
            "batches": len(self.batch_clicks),
            "mean_batch_events": round(float(np.mean(self.batch_clicks)), 1),
            "mean_write_user_rows": round(float(users), 1),
            "mean_write_item_rows": round(float(items), 1),
        }

    def fetch_during_write(self) -> float | None:
        """Share of the fetch time spent while a write was in flight (Redis runs one command at a time, so a
        fetch issued during the write's Lua script waits for it)."""
        total = sum(b - a for a, b in self.spans["fetch"])
        if not total:
            return None
        writes = sorted(self.spans["write"])
        overlap = sum(max(0.0, min(fb, wb) - max(fa, wa)) for fa, fb in self.spans["fetch"] for wa, wb in writes
                      if wa < fb and wb > fa)  # fmt: skip
        return round(overlap / total, 3)

    def split_ms(self, wall_s: float) -> dict[str, dict[str, float]]:
        return {
            k: {"mean_ms": round(1000 * float(np.mean(v)), 2), "total_s": round(float(np.sum(v)), 3),
                "calls": len(v), "share": round(float(np.sum(v)) / wall_s, 3)}
            for k, v in sorted(self.split.items())
        }  # fmt: skip


def _worker(cfg: LMFConfig, store: FactorStore, group: str) -> LMFWorker:
    return LMFWorker(replace(cfg, lmf_group=f"{group}-{uuid.uuid4().hex[:8]}"), store)


def throughput_phase(cfg: LMFConfig, store: FactorStore, target: dict[int, int], n: int, profile: bool
                     ) -> dict[str, Any]:  # fmt: skip
    """Run a worker in this thread until Redis holds ``target`` (the probe stops it)."""
    worker = _worker(cfg, store, "bench-lmf")
    probe = Probe(worker, target)
    prof = cProfile.Profile() if profile else None
    added0, server0 = store.rows_added, _server_usec(store)
    try:
        if prof:
            prof.enable()
        worker.run(until_idle=False)
    finally:
        if prof:
            prof.disable()
        probe.restore()
    if probe.t_first is None or probe.t_done is None:
        raise RuntimeError("the worker stopped before Redis held every partition's last offset")
    secs = probe.t_done - probe.t_first
    out: dict[str, Any] = {"lmf_eps": round(n / secs), "lmf_seconds": round(secs, 2)}
    out |= probe.batch_stats()
    out["split_per_batch"] = probe.split_ms(secs)
    out["fetch_share_during_write"] = probe.fetch_during_write()
    out |= _server_split(store, server0, probe)
    written = sum(i for _u, i in probe.write_rows)
    out["item_rows_added_share"] = round((store.rows_added - added0) / written, 4) if written else None
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        out["profile_top_tottime"] = [ln for ln in buf.getvalue().splitlines() if ln.strip()][:40]
    return out


def latency_phase(cfg: LMFConfig, store: FactorStore, env: dict[str, str], args: argparse.Namespace, rate: float,
                  start_offset: int) -> dict[str, Any]:  # fmt: skip
    """Click-to-visible latency at a fixed produce rate (see the module docstring); source offsets of the paced
    clicks start at ``start_offset``."""
    worker = _worker(cfg, store, "bench-lat")
    probe = Probe(worker, None)
    thread = threading.Thread(target=worker.run, name="bench-lmf-latency", daemon=True)
    thread.start()
    sent, t_sent = 0, time.perf_counter()
    try:
        deadline = time.monotonic() + 60
        while not (worker.consumer is not None and worker.health()[1]["assigned"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # let the assignment callback resume every partition
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=_paced_producer, args=(env, rate, args.latency_seconds, args.users, args.items,
                                                          start_offset, args.pack, q))  # fmt: skip
        proc.start()
        sent = q.get(timeout=args.latency_seconds + 60)
        t_sent = time.perf_counter()
        proc.join(10)
        deadline = time.monotonic() + 20
        while len(probe.latencies_ms) < sent and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.stop.set("bench: window over")
        thread.join(30)
        probe.restore()
    lat = probe.latencies_ms
    return {
        "rate": rate,
        "seconds": args.latency_seconds,
        "sent": sent,
        "measured": len(lat),
        **{f"p{q}_ms": _pct(lat, q) for q in (50, 90, 99)},
        "max_ms": _pct(lat, 100),
        "drain_s": round(max(0.0, (probe.t_last or t_sent) - t_sent), 2),
        **probe.batch_stats(),
        "split_per_batch": probe.split_ms(args.latency_seconds),
        "fetch_share_during_write": probe.fetch_during_write(),
    }


def _server_usec(store: FactorStore) -> dict[str, tuple[int, int]]:
    """Per Redis command: (calls, microseconds) so far (INFO commandstats)."""
    stats = store.r.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()}


def _server_split(store: FactorStore, before: dict[str, tuple[int, int]], probe: Probe) -> dict[str, Any]:
    """Redis's own time per batch during the pass: in scripts (EVALSHA: the batch write and the seen-set read
    of the fetch) and in every command."""
    after, n = _server_usec(store), max(1, len(probe.write_rows))
    delta = {k: (c - before.get(k, (0, 0))[0], u - before.get(k, (0, 0))[1]) for k, (c, u) in after.items()}
    script = delta.get("evalsha", (0, 0))
    return {
        "redis_script_ms_per_batch": round(script[1] / 1000 / n, 2),
        "redis_script_calls_per_batch": round(script[0] / n, 2),
        "redis_busy_ms_per_batch": round(sum(u for _c, u in delta.values()) / 1000 / n, 2),
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


# ------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--events", type=int, default=200_000, help="events of the throughput pass (>= 1)")
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--rate", type=float, nargs="+", default=[5000.0, 20000.0], help="events/s of the latency "
                    "phases (one phase per rate, each with a fresh worker)")  # fmt: skip
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--pack", type=int, default=StreamConfig().events_pack, help="events per record of <p>.events, "
                    "as ingest writes them (ZEROCF_EVENTS_PACK; 1 = one event per record)")  # fmt: skip
    ap.add_argument("--set", action="append", default=[], metavar="ZEROCF_X=V", help="override a setting "
                    "(repeatable), e.g. --set ZEROCF_LMF_BATCH=8000; the defaults are the production ones")  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="cProfile the worker thread of the throughput pass")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    out: dict[str, Any] = {"events": args.events, "users": args.users, "items": args.items, "partitions": PARTITIONS}
    out["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    out["events_pack"] = args.pack
    with tempfile.TemporaryDirectory(prefix="zerocf-bench-lmf-") as tmp:
        stack = LocalStack(tmp)
        stack.up()
        try:
            env = {**stack.env(), "ZEROCF_TOPIC_PREFIX": f"b{uuid.uuid4().hex[:8]}"}
            env |= dict(kv.split("=", 1) for kv in args.set)
            out["overrides"] = args.set
            cfg = load(LMFConfig, env)
            out["config"] = {name: v for name, v in asdict(cfg).items() if name in REPORTED_CONFIG}
            out["raw_includes_json_loads"] = True
            kafka_util.ensure_topics(cfg.kafka, {cfg.topics.events: PARTITIONS})
            t0 = time.perf_counter()
            last = produce_events(cfg, args.events, args.users, args.items, args.pack)
            out["produce_eps"] = round(args.events / (time.perf_counter() - t0))
            eps, rps = raw_consume(cfg, args.events)
            out["raw_consume_eps"], out["raw_consume_records_per_s"] = round(eps), round(rps)
            if args.pack > 1:  # the same events one per record (ZEROCF_EVENTS_PACK=1, the layout before packs)
                single = f"{cfg.topic_prefix}.events-single"
                kafka_util.ensure_topics(cfg.kafka, {single: PARTITIONS})
                produce_events(cfg, args.events, args.users, args.items, 1, topic=single)
                out["raw_consume_eps_one_event_per_record"] = round(raw_consume(cfg, args.events, single)[0])
            first_calls()  # load the compiled kernels first, as a running worker has them: a steady-state pass
            store = FactorStore.connect(cfg.redis_url, cfg.topic_prefix, seen_cap=cfg.seen_cap,
                                        seen_ttl=int(cfg.seen_ttl_days * 86400))  # fmt: skip
            out |= throughput_phase(cfg, store, last, args.events, args.profile)
            out["ratio"] = round(out["lmf_eps"] / out["raw_consume_eps"], 3)
            if "raw_consume_eps_one_event_per_record" in out:
                out["ratio_to_one_event_per_record"] = round(
                    out["lmf_eps"] / out["raw_consume_eps_one_event_per_record"], 3
                )
            out["targets"] = {"ratio>=0.5": out["ratio"] >= 0.5, "lmf_eps>=40000": out["lmf_eps"] >= 40_000}
            out["applied_events_in_redis"] = sum(store.user_update_counts(store.live_generation()).values())
            # a fresh worker resumes behind the stored offsets; once it owns its partitions a paced producer
            # process starts
            out["latency"] = {}
            sent = args.events  # no partition has an offset above this yet
            for rate in args.rate:
                out["latency"][f"{rate:g}"] = lat = latency_phase(cfg, store, env, args, rate, sent)
                sent += lat["sent"]
        finally:
            stack.down()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
