"""Fault drills on a private local stack: Redis paused / killed, broker restarted, SIGTERM mid-batch.

``zerocf ingest`` and ``zerocf lmf`` run as subprocesses with metrics ports, as in production. The drills stop
and restart services, so they never touch the session stack other tests share: this module starts its own
:class:`stream.devstack.LocalStack` in a temporary directory (plus, for the Redis crash drill, its own
``redis-server`` with an append-only file) and stops it at the end. Every test uses fresh topic names and
fresh consumer groups. Results and the numbers of a reference run are in docs/drills.md.

The expected model state is computed from what the test produced (and, independently, from the distinct
event ids on ``<p>.events``), never from the worker's own de-duplication.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from stream import kafka_util
from stream.config import StreamConfig, load
from stream.devstack import LocalStack, free_port, redis_argv
from stream.events import Event
from stream.kafka_util import read_topic
from tests.helpers import (
    Truth,
    Workload,
    assert_store_matches,
    background,
    events_of,
    finish_zerocf,
    fresh_group,
    health_status,
    record_events,
    release,
    stop_process,
    tail,
    truth_of,
    wait_until,
)
from workers.config import LMFConfig
from workers.store import FactorStore

log = logging.getLogger(__name__)
pytestmark = pytest.mark.slow

TS = 1_700_000_000_000
OUTAGE_S = 30.0  # how long Redis is down in drill 1 (crash variant)
# The pause variant stops Redis for 25 s, not 30: the worker's Redis socket timeout is 15 s (hard-coded in
# workers/online/worker.py), so its first call times out at ~15 s and the reload after the back-off blocks until
# ~30 s. A 30 s pause ends within a second of that reload's own timeout; when the reload loses that race the
# worker hits the _redis_down bug (test_lmf_redis_back_before_next_batch_loses_no_events): one run lost 99
# events. 25 s keeps the SIGCONT ~5 s inside the blocked reload, so the drill is deterministic.
PAUSE_S = 25.0
LMF_FLAGS = ("--factors", "16", "--batch", "200")


# ------------------------------------------------------------------- stack, processes, probes
@pytest.fixture(scope="module")
def drill_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A broker + Redis of this module only: the drills stop and restart them."""
    st = LocalStack(tmp_path_factory.mktemp("drill-stack"))
    try:
        st.up()
        yield st
    finally:
        st.down()


@contextmanager
def _released(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Run a pre-started ``zerocf`` process (the ``prestart`` fixture) now; on exit SIGTERM it (SIGKILL after
    15 s) if still running, as :func:`tests.helpers.background` does."""
    release(proc)
    try:
        yield proc
    finally:
        stop_process(proc, 15)


def _env(stack: LocalStack, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROCF_")}
    env.update(stack.env())
    env.update({"ZEROCF_TOPIC_PREFIX": prefix, "ZEROCF_IDLE_SECONDS": "1"})
    env.update(extra)
    return env


def _prefix(tag: str) -> str:
    return f"d{tag}{uuid.uuid4().hex[:8]}"


@contextmanager
def _pipeline(
    env: dict[str, str], tmp_path: Path, lmf_log: Path | None = None
) -> Iterator[tuple[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]], int, int]]:
    """``zerocf ingest`` + ``zerocf lmf`` (fresh groups, metrics ports) until both /healthz are 200.

    Yields ``((ingest, lmf), ingest_port, lmf_port)``; both are stopped on exit.
    """
    ip, lp = free_port(), free_port()
    with (
        background(
            env, tmp_path / "ingest.log", "ingest", "--metrics-port", str(ip), "--group", fresh_group("ing")
        ) as ingest,
        background(
            env,
            lmf_log or tmp_path / "lmf.log",
            "lmf",
            *LMF_FLAGS,
            "--metrics-port",
            str(lp),
            "--group",
            fresh_group("lmf"),
        ) as lmf,
    ):
        wait_until("both /healthz 200", lambda: health_status(ip) == 200 and health_status(lp) == 200, 40, ingest, lmf)
        yield (ingest, lmf), ip, lp


# ------------------------------------------------------------------- workload with known outcome
def _counters(store: FactorStore) -> dict[str, int]:
    return store.user_update_counts(store.live_generation()) if store.r.exists(store.keys.meta) else {}


def _applied_total(store: FactorStore) -> int:
    return sum(_counters(store).values())


def _stream_done(cfg: LMFConfig, n_events: int) -> Truth:
    """``<p>.events`` once ingest has put all ``n_events`` distinct events there."""
    holder: list[Truth] = []

    def done() -> bool:
        holder[:] = [truth_of(cfg.kafka, cfg.topics.events)]
        return holder[0].distinct >= n_events

    wait_until(f"{n_events} distinct events on {cfg.topics.events}", done, 60, every=0.5)
    return holder[0]


def _assert_reconciled(store: FactorStore, cfg: LMFConfig, work: Workload, truth: Truth) -> None:
    """Nothing lost, nothing applied twice: counters equal the produced workload and the topic."""
    g = store.live_generation()
    counts = store.user_update_counts(g)
    assert truth.distinct == work.n_events
    assert sum(counts.values()) == work.n_events, (sum(counts.values()), work.n_events)
    assert counts == dict(work.user_events())
    assert store.item_counts(g) == work.item_clicks()
    assert_store_matches(store, truth, cfg.seen_cap)  # + vectors, seen sets, applied offsets


def _wait_applied_to_end(
    store: FactorStore, truth: Truth, *procs: subprocess.Popen[bytes], timeout: float = 40
) -> float:
    parts = sorted(truth.last_offsets)

    def at_end() -> bool:
        if not store.r.exists(store.keys.meta):
            return False
        return store.read_batch_state(store.live_generation(), parts, [], []).offsets == truth.last_offsets

    return wait_until("lmf applied every events partition to its end", at_end, timeout, *procs)


# ------------------------------------------------------------------- drill 1: Redis outage
def _outage(
    work: Workload,
    bootstrap: str,
    prefix: str,
    lmf_port: int,
    ingest_port: int,
    procs: tuple[subprocess.Popen[bytes], ...],
    seconds: float,
    send_from: float = 0.0,
) -> dict[str, Any]:
    """During the outage: produce from ``send_from`` s to mid-outage (the worker must touch Redis), poll
    both /healthz."""
    chunks = work.chunks(max(1, len(work.clicks + work.impressions) // 10))
    lmf_codes: Counter[Any] = Counter()
    ingest_codes: Counter[Any] = Counter()
    first_503 = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if chunks and send_from <= time.monotonic() - t0 < seconds / 2:
            chunks.pop(0).send(bootstrap, prefix)
        code = health_status(lmf_port)
        lmf_codes[code] += 1
        if code == 503 and first_503 is None:
            first_503 = round(time.monotonic() - t0, 1)
        ingest_codes[health_status(ingest_port)] += 1
        for p in procs:
            assert p.poll() is None, f"{p.args[3]} exited with {p.returncode} during the Redis outage"
        time.sleep(0.5)
    assert not chunks, "the outage ended before the workload was produced"
    return {"lmf_healthz": dict(lmf_codes), "ingest_healthz": dict(ingest_codes), "first_503_s": first_503}


def test_redis_paused_worker_unhealthy_then_resumes_and_reconciles(
    drill_stack: LocalStack, tmp_path: Path, record_property: Any
) -> None:
    """SIGSTOP redis-server for 25 s (a hang, not a refusal): socket timeouts must turn it into 503."""
    prefix = _prefix("pause")
    env = _env(drill_stack, prefix)
    cfg = load(LMFConfig, env)
    bootstrap = env["ZEROCF_KAFKA_BOOTSTRAP"]
    before, during, after = (Workload.make(s, n) for s, n in ((1, 1500), (2, 1000), (3, 500)))
    store = FactorStore.from_url(cfg.redis_url, prefix, socket_timeout=5)
    redis_pid = drill_stack.services()["redis"].pid
    with _pipeline(env, tmp_path) as (procs, ip, lp):
        before.send(bootstrap, prefix)
        wait_until("the first workload applied", lambda: _applied_total(store) == before.n_events, 40, *procs)
        # the worker accounts a batch once its write landed, which an idle step does: then it is idle, and
        # its next Redis call is the one the pause catches
        wait_until(
            "lmf idle with every event accounted",
            lambda: _metric(lp, "zerocf_lmf_events_total") >= before.n_events,
            30,
            *procs,
        )
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            seen = _outage(during, bootstrap, prefix, lp, ip, procs, PAUSE_S, send_from=2.0)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        back = wait_until("lmf /healthz 200 after SIGCONT", lambda: health_status(lp) == 200, 30, *procs)
        after.send(bootstrap, prefix)
        total = Workload(
            before.clicks + during.clicks + after.clicks,
            before.impressions + during.impressions + after.impressions,
            before.invalid + during.invalid + after.invalid,
        )
        truth = _stream_done(cfg, total.n_events)
        drained = _wait_applied_to_end(store, truth, *procs)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{lp}/metrics", timeout=5).read().decode()
        assert health_status(lp) == 200 and health_status(ip) == 200
    seen.update(
        healthy_again_s=round(back, 1),
        drained_s=round(drained, 1),
        events=total.n_events,
        records=truth.records,
        replayed_by_ingest=truth.repeated,
        redis_errors=[ln for ln in metrics.splitlines() if ln.startswith("zerocf_lmf_errors_total")],
    )
    record_property("drill", seen)
    log.warning("redis pause drill: %s", json.dumps(seen))
    assert procs[0].returncode == 0 and procs[1].returncode == 0, tail(tmp_path / "lmf.log")
    # a hang became "unhealthy" (socket timeouts work), the ingest (no Redis) stayed ready throughout
    assert seen["lmf_healthz"].get(503, 0) > 0, seen
    assert set(seen["ingest_healthz"]) == {200}, seen
    assert "Timeout" in tail(tmp_path / "lmf.log", 200_000)
    _assert_reconciled(store, cfg, total, truth)


def _start_aof_redis(directory: Path, port: int) -> subprocess.Popen[bytes]:
    """redis-server with an fsync-always append-only file: what it acknowledged survives SIGKILL."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "redis.log", "ab") as out:
        proc = subprocess.Popen(
            redis_argv(port, directory, "--appendonly", "yes", "--appendfsync", "always"),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def up() -> bool:
        try:
            return bool(redis.Redis(port=port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    wait_until(f"redis-server (AOF) on {port}", up, 15, proc, every=0.1)
    return proc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_redis_killed_30s_with_aof_worker_recovers_and_reconciles(
    drill_stack: LocalStack, tmp_path: Path, record_property: Any
) -> None:
    """SIGKILL a persistent Redis, keep it down 30 s, restart it on the same port from its AOF."""
    prefix = _prefix("kill")
    port = free_port()
    env = _env(drill_stack, prefix, ZEROCF_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    cfg = load(LMFConfig, env)
    bootstrap = env["ZEROCF_KAFKA_BOOTSTRAP"]
    before, during, after = (Workload.make(s, n) for s, n in ((11, 1500), (12, 2500), (13, 500)))
    rdir = tmp_path / "redis"
    server = _start_aof_redis(rdir, port)
    try:
        store = FactorStore.from_url(cfg.redis_url, prefix, socket_timeout=5)
        with _pipeline(env, tmp_path) as (procs, ip, lp):
            before.send(bootstrap, prefix)
            wait_until("the first workload applied", lambda: _applied_total(store) == before.n_events, 40, *procs)
            applied_before = _counters(store)
            # the backlog outlasts the outage (one failed poll of <= 200 records per back-off step), so
            # Redis returns while the worker backs off and the reload that follows succeeds
            _kill(server)
            seen = _outage(during, bootstrap, prefix, lp, ip, procs, OUTAGE_S)
            server = _start_aof_redis(rdir, port)
            # no new data from here on: the worker must notice Redis is back by itself
            back = wait_until("lmf /healthz 200 after the Redis restart", lambda: health_status(lp) == 200, 30, *procs)
            after.send(bootstrap, prefix)
            total = Workload(
                before.clicks + during.clicks + after.clicks,
                before.impressions + during.impressions + after.impressions,
                before.invalid + during.invalid + after.invalid,
            )
            truth = _stream_done(cfg, total.n_events)
            drained = _wait_applied_to_end(store, truth, *procs)
            assert health_status(lp) == 200 and health_status(ip) == 200
        seen.update(
            healthy_again_s=round(back, 1),
            drained_s=round(drained, 1),
            events=total.n_events,
            applied_before_kill=sum(applied_before.values()),
            records=truth.records,
        )
        record_property("drill", seen)
        log.warning("redis kill drill: %s", json.dumps(seen))
        assert procs[0].returncode == 0 and procs[1].returncode == 0, tail(tmp_path / "lmf.log")
        assert seen["lmf_healthz"].get(503, 0) > 0, seen
        assert set(seen["ingest_healthz"]) == {200}, seen
        _assert_reconciled(store, cfg, total, truth)
    finally:
        _kill(server)


def test_lmf_redis_back_before_next_batch_loses_no_events(
    drill_stack: LocalStack, tmp_path: Path, record_property: Any
) -> None:
    """Short Redis crash while a small batch arrives; Redis returns; only then new data comes."""
    prefix = _prefix("gap")
    port = free_port()
    env = _env(drill_stack, prefix, ZEROCF_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    cfg = load(LMFConfig, env)
    bootstrap = env["ZEROCF_KAFKA_BOOTSTRAP"]
    first, lost, later = (Workload.make(s, n, users=20, impressions=False) for s, n in ((61, 400), (62, 1), (63, 400)))
    rdir = tmp_path / "redis"
    server = _start_aof_redis(rdir, port)
    try:
        store = FactorStore.from_url(cfg.redis_url, prefix, socket_timeout=5)
        ip, lp = free_port(), free_port()
        lmf_log = tmp_path / "lmf.log"
        with (
            background(
                env, tmp_path / "ingest.log", "ingest", "--metrics-port", str(ip), "--group", fresh_group("ing")
            ) as ingest,
            background(
                env, lmf_log, "lmf", *LMF_FLAGS, "--metrics-port", str(lp), "--group", fresh_group("lmf")
            ) as lmf,
        ):
            procs = (ingest, lmf)
            try:  # preconditions: failures here are errors of the drill, not the expected failure
                assert {u for u, *_ in lost.clicks} <= {u for u, *_ in later.clicks}  # same partitions again
                wait_until(
                    "both /healthz 200", lambda: health_status(ip) == 200 and health_status(lp) == 200, 40, *procs
                )
                first.send(bootstrap, prefix)
                wait_until("the first workload applied", lambda: _applied_total(store) == first.n_events, 40, *procs)
                _kill(server)
                lost.send(bootstrap, prefix)
                wait_until("lmf hit the outage", lambda: health_status(lp) == 503, 30, *procs)
                wait_until(
                    "lmf's reload failed while Redis is down",
                    lambda: "redis still unavailable" in tail(lmf_log, 10**6),
                    30,
                    *procs,
                )
                server = _start_aof_redis(rdir, port)
            except AssertionError as exc:
                pytest.fail(f"drill precondition: {exc}")
            idle = Counter(health_status(lp) for _ in range(20) if time.sleep(0.5) is None)  # no new data: 10 s
            later.send(bootstrap, prefix)
            total = Workload(first.clicks + lost.clicks + later.clicks)
            truth = _stream_done(cfg, total.n_events)
            _wait_applied_to_end(store, truth, *procs)
        found = {
            "healthz_10s_after_redis_back_without_data": dict(idle),
            "applied": _applied_total(store),
            "produced": total.n_events,
            "in_gap": lost.n_events,
        }
        record_property("drill", found)
        log.warning("redis gap drill: %s", json.dumps(found))
        _assert_reconciled(store, cfg, total, truth)
    finally:
        _kill(server)


# ------------------------------------------------------------------- drill 2: broker restart
def _applied_by_stale_offsets(
    records: list[Any], offsets: dict[int, int | None], marks: dict[int, dict[str, list[int]]]
) -> list[Event]:
    """Which new events a worker resuming from pre-restart Redis state applies (independent model).

    Per events partition: records at offsets <= the stored applied offset are skipped, and an event whose
    (source offset, index) is not above the stored watermark of its source partition is dropped as a
    replay; accepted events advance the watermark.
    """
    out = []
    by_part: dict[int, list[Any]] = {}
    for rec in records:
        by_part.setdefault(rec.partition, []).append(rec)
    for p, recs in by_part.items():
        wm = {src: tuple(v) for src, v in marks.get(p, {}).items()}
        stored = offsets.get(p)
        for rec in sorted(recs, key=lambda r: r.offset):
            if stored is not None and rec.offset <= stored:
                continue
            for ev in record_events(rec):
                topic, sp, so, idx = ev.id.rsplit(":", 3)
                src, pos = f"{topic}/{sp}", (int(so), int(idx))
                if src in wm and pos <= wm[src]:
                    continue
                wm[src] = pos
                out.append(ev)
    return out


def test_broker_restart_memory_storage_workers_reconnect_stale_offsets_skip_new_data(
    drill_stack: LocalStack, tmp_path: Path, record_property: Any
) -> None:
    """Restart the memory-storage broker under running ingest + lmf; produce new data afterwards.

    The topics come back empty, auto-created by the clients' metadata requests with the broker's default
    of 4 partitions, so the drill runs with 4 partitions from the start (with 6, ingest crashes: see
    ``test_ingest_survives_events_topic_recreated_with_fewer_partitions``). Offsets restart at 0 while
    Redis still holds the pre-restart applied offsets and dedupe watermarks: the worker skips every new
    record at or below them. That is the expected effect of offsets being reused; Kafka never reuses them.
    """
    prefix = _prefix("brk")
    env = _env(drill_stack, prefix, ZEROCF_EVENTS_PARTITIONS="4")
    cfg = load(LMFConfig, env)
    bootstrap = env["ZEROCF_KAFKA_BOOTSTRAP"]
    first = Workload.make(21, 800, users=60, impressions=False)
    second = Workload.make(22, 1400, users=60, impressions=False)  # more per partition than before
    store = FactorStore.from_url(cfg.redis_url, prefix, socket_timeout=5)
    with _pipeline(env, tmp_path) as (procs, ip, lp):
        first.send(bootstrap, prefix)
        truth1 = _stream_done(cfg, first.n_events)
        _wait_applied_to_end(store, truth1, *procs)
        g = store.live_generation()
        parts = list(range(4))
        stale = store.read_batch_state(g, parts, [], [])
        counts_before = store.user_update_counts(g)
        assert counts_before == dict(first.user_events())

        drill_stack.restart_service("broker")
        codes: Counter[tuple[Any, Any]] = Counter()

        def rejoined() -> bool:  # both groups are gone with the broker: wait for the second assignment
            codes.update([(health_status(ip), health_status(lp))])
            return (
                # clicks, impressions and erasures: 3 x 4 partitions, before and after the restart
                tail(tmp_path / "ingest.log", 10**6).count("ingest: assigned 12 partitions") >= 2
                and tail(tmp_path / "lmf.log", 10**6).count("partition 0 resumes at offset") >= 2
                and health_status(ip) == 200
                and health_status(lp) == 200
            )

        rejoin_s = wait_until("ingest and lmf rejoined after the broker restart", rejoined, 40, *procs)
        second.send(bootstrap, prefix)
        truth2 = _stream_done(cfg, second.n_events)
        new_records = read_topic(cfg.kafka, cfg.topics.events, 30)
        expect = _applied_by_stale_offsets(new_records, stale.offsets, stale.watermarks)
        want_offsets = {
            p: max(stale.offsets[p] if stale.offsets[p] is not None else -1, truth2.last_offsets.get(p, -1))
            for p in parts
        }
        wait_until(
            "lmf caught up on the new topic",
            lambda: store.read_batch_state(g, parts, [], []).offsets == want_offsets,
            40,
            *procs,
        )
        counts_after = store.user_update_counts(g)
        items_after = store.item_counts(g)
        assert health_status(ip) == 200 and health_status(lp) == 200
    applied_new = sum(counts_after.values()) - sum(counts_before.values())
    found = {
        "stale_offsets": stale.offsets,
        "new_last_offsets": truth2.last_offsets,
        "new_events": truth2.distinct,
        "applied_new": applied_new,
        "skipped_new": truth2.distinct - applied_new,
        "healthz_while_rejoining": {f"{a}/{b}": n for (a, b), n in codes.items()},
        "rejoined_s": round(rejoin_s, 1),
    }
    record_property("drill", found)
    log.warning("broker restart drill: %s", json.dumps(found))
    assert procs[0].returncode == 0 and procs[1].returncode == 0, tail(tmp_path / "lmf.log")
    # ingest reconnected and processed everything produced after the restart (topic holds exactly that)
    assert truth2.distinct == second.n_events and truth2.records == len(new_records)
    # the worker applied exactly what the stale-offset model predicts: new data at offsets above the
    # pre-restart ones, nothing below them (those records are lost to the model), nothing twice
    want = Counter(counts_before)
    want.update(e.user for e in expect)
    assert counts_after == dict(want)
    want_items = Counter(first.item_clicks())
    for e in expect:
        want_items[e.item] += e.weight
    assert items_after == {i: float(n) for i, n in want_items.items()}
    assert 0 < applied_new < second.n_events, found


def test_ingest_survives_broker_restart_that_brings_back_fewer_partitions(
    drill_stack: LocalStack, tmp_path: Path
) -> None:
    """The 6-partition default layout through a memory-broker restart (topics return with 4 partitions)."""
    prefix = _prefix("parts")
    env = _env(drill_stack, prefix)  # ZEROCF_EVENTS_PARTITIONS defaults to 6
    cfg = load(LMFConfig, env)
    ip = free_port()
    log_path = tmp_path / "ingest.log"
    with background(env, log_path, "ingest", "--metrics-port", str(ip), "--group", fresh_group("ing")) as ingest:
        try:  # preconditions: failures here are errors of the drill, not the expected failure
            wait_until("ingest /healthz 200", lambda: health_status(ip) == 200, 40, ingest)
            drill_stack.restart_service("broker")
            # what a running lmf's subscription does within a second (broker default: 4 partitions)
            kafka_util.ensure_topics(load(StreamConfig, env).kafka, {cfg.topics.events: 4})
            work = Workload.make(31, 300, impressions=False)
            work.send(env["ZEROCF_KAFKA_BOOTSTRAP"], prefix)  # auto-creates the raw topics (4 partitions)
            # 4 + 4 auto-created raw partitions, plus <p>.erasures (re-created by ingest with 6, or auto-created)
            rejoined = re.compile(r"assigned 1[24] partitions")
            wait_until("ingest rejoined", lambda: bool(rejoined.search(tail(log_path, 10**6))), 30, ingest)
        except AssertionError as exc:
            pytest.fail(f"drill precondition: {exc}")

        got: list[int] = [0]

        def delivered() -> bool:
            assert ingest.poll() is None, f"ingest exited {ingest.returncode}: {tail(log_path, 400)}"
            got[0] = len({e.id for e in events_of(read_topic(cfg.kafka, cfg.topics.events, 10))})
            return got[0] >= work.n_events

        try:
            wait_until("every event delivered to <p>.events", delivered, 12, every=1.0)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; {got[0]} of {work.n_events} events on <p>.events, ingest log: {tail(log_path, 300)}"
            ) from None


# ------------------------------------------------------------------- drill 3: SIGTERM mid-batch
def test_lmf_sigterm_mid_batch_exits_0_with_no_partial_batch(
    drill_stack: LocalStack, tmp_path: Path, record_property: Any, prestart: Callable[..., subprocess.Popen[bytes]]
) -> None:
    prefix = _prefix("term")
    env = _env(drill_stack, prefix)
    cfg = load(LMFConfig, env)
    work = Workload.make(41, 12_000, users=400, items=200)
    ip, lp = free_port(), free_port()
    # both lmf runs below, started now with their imports done; each runs its command when released
    with open(tmp_path / "lmf.log", "ab") as err:
        lmf_run = prestart(
            env,
            err,
            "lmf",
            "--factors",
            "16",
            "--batch",
            "100",
            "--metrics-port",
            str(lp),
            "--group",
            fresh_group("lmf"),
        )
    with open(tmp_path / "lmf2.log", "ab") as err:  # --until-idle: exits once all is applied, then idle 0.2 s
        lmf2_run = prestart(
            {**env, "ZEROCF_IDLE_SECONDS": "0.2"},
            err,
            "lmf",
            *LMF_FLAGS,
            "--until-idle",
            "--group",
            fresh_group("lmf2"),
        )
    with background(
        env, tmp_path / "ingest.log", "ingest", "--metrics-port", str(ip), "--group", fresh_group("ing")
    ) as ingest:
        wait_until("ingest /healthz 200", lambda: health_status(ip) == 200, 40, ingest)
        work.send(env["ZEROCF_KAFKA_BOOTSTRAP"], prefix)
        truth = _stream_done(cfg, work.n_events)
    records = read_topic(cfg.kafka, cfg.topics.events, 30)
    store = FactorStore.from_url(cfg.redis_url, prefix, socket_timeout=5)
    total = work.n_events
    with _released(lmf_run) as lmf:
        wait_until("lmf applying batches", lambda: _applied_total(store) > 1000, 40, lmf, every=0.05)
        at_signal = _applied_total(store)
        lmf.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = lmf.wait(15)
        exit_s = time.monotonic() - t0
    assert rc == 0, tail(tmp_path / "lmf.log")
    assert "SIGTERM received" in tail(tmp_path / "lmf.log")
    g = store.live_generation()
    parts = sorted(truth.last_offsets)
    stored = store.read_batch_state(g, parts, [], []).offsets
    counts = store.user_update_counts(g)
    # the prefix of each partition up to its stored applied offset, de-duplicated by event id
    ids: set[str] = set()
    want_users: Counter[str] = Counter()
    want_items: Counter[str] = Counter()
    for rec in records:
        for ev in record_events(rec):
            if stored.get(rec.partition) is None or rec.offset > stored[rec.partition] or ev.id in ids:
                continue
            ids.add(ev.id)
            want_users[ev.user] += 1
            if ev.type == "click":
                want_items[ev.item] += ev.weight
    found = {
        "events": total,
        "applied_at_sigterm": at_signal,
        "applied_after_exit": sum(counts.values()),
        "exit_s": round(exit_s, 2),
        "stored_offsets": stored,
    }
    record_property("drill", found)
    log.warning("lmf sigterm drill: %s", json.dumps(found))
    assert 0 < sum(counts.values()) < total, found  # the stop landed mid-stream
    assert sum(counts.values()) == len(ids) and counts == dict(want_users)
    assert store.item_counts(g) == {i: float(n) for i, n in want_items.items()}

    with _released(lmf2_run) as again:
        assert again.wait(60) == 0, tail(tmp_path / "lmf2.log")
    _assert_reconciled(store, cfg, work, truth)


def _committed(cfg: StreamConfig, group: str, topics: list[str]) -> dict[tuple[str, int], int | None]:
    from kafka.structs import TopicPartition

    consumer = kafka_util.consumer(cfg.kafka, group_id=group, client_id="drill-committed")
    try:
        out = {}
        for topic in topics:
            for p in sorted(consumer.partitions_for_topic(topic) or ()):
                out[(topic, p)] = consumer.committed(TopicPartition(topic, p))
        return out
    finally:
        consumer.close(autocommit=False)


def _metric(port: int, name: str) -> float:
    """Value of an unlabelled Prometheus sample on ``/metrics`` (0 if absent or nothing answers)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
    except OSError:
        return 0.0
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " "))


def test_ingest_sigterm_mid_stream_commits_and_restart_loses_nothing(
    drill_stack: LocalStack, tmp_path: Path, record_property: Any, prestart: Callable[..., subprocess.Popen[bytes]]
) -> None:
    prefix = _prefix("iterm")
    env = _env(drill_stack, prefix)
    scfg = load(StreamConfig, env)
    cfg = load(LMFConfig, env)
    kafka_util.ensure_topics(
        scfg.kafka, {t: scfg.events_partitions for t in (scfg.topics.clicks, scfg.topics.impressions)}
    )
    group = fresh_group("ing")
    ip = free_port()
    # both ingest runs below, started now (their imports overlap the send); each runs when released
    with open(tmp_path / "ingest.log", "ab") as err:
        ingest_run = prestart(env, err, "ingest", "--batch", "100", "--metrics-port", str(ip), "--group", group)
    restart = prestart(env, subprocess.PIPE, "ingest", "--until-idle", "--group", group, stdout=subprocess.PIPE)
    work = Workload.make(51, 20_000, users=500, items=300)
    work.send(env["ZEROCF_KAFKA_BOOTSTRAP"], prefix)
    raw = {
        (r.topic, r.partition, r.offset)
        for t in (scfg.topics.clicks, scfg.topics.impressions)
        for r in read_topic(scfg.kafka, t, 30)
    }
    with _released(ingest_run) as ingest:
        wait_until(
            "ingest producing events",
            lambda: _metric(ip, "zerocf_ingest_events_out_total") >= 2000,
            40,
            ingest,
            every=0.05,
        )
        ingest.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = ingest.wait(15)
        exit_s = time.monotonic() - t0
    assert rc == 0, tail(tmp_path / "ingest.log")
    committed = _committed(scfg, group, [scfg.topics.clicks, scfg.topics.impressions])
    produced_from = {
        (t, int(p), int(o))
        for t, p, o in (e.id.rsplit(":", 3)[:3] for e in events_of(read_topic(scfg.kafka, scfg.topics.events, 30)))
    }
    dlq_from = {
        (d["topic"], d["partition"], d["offset"])
        for d in (json.loads(r.value) for r in read_topic(scfg.kafka, scfg.topics.dlq, 30))
    }
    handled = produced_from | dlq_from
    below = {k for k in raw if committed.get(k[:2]) is not None and k[2] < committed[k[:2]]}
    found = {
        "raw_records": len(raw),
        "handled_before_stop": len(handled),
        "committed_below": len(below),
        "dead_lettered": len(dlq_from),
        "exit_s": round(exit_s, 2),
    }
    record_property("drill", found)
    log.warning("ingest sigterm drill: %s", json.dumps(found))
    assert 0 < len(below) < len(raw), found  # the stop landed mid-stream
    # warm stop: every raw record below the committed offsets was handled, none at or above them
    assert handled == below, (len(handled - below), len(below - handled))

    done = finish_zerocf(restart, timeout=80, check=False)  # `zerocf ingest --until-idle --group GROUP`
    assert done.returncode == 0, done.stderr[-2000:]
    truth = truth_of(cfg.kafka, cfg.topics.events)
    assert truth.distinct == work.n_events and truth.repeated == 0, (truth.distinct, truth.repeated)
    assert len(read_topic(scfg.kafka, scfg.topics.dlq, 30)) == len(work.invalid)
