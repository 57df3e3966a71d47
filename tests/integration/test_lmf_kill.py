"""Acceptance test of the online worker's exactly-once effect: ``kill -9`` at random moments, restart, finish.

A 50k-click stream flows through the real pipeline (``zerocf produce --rate`` -> ``zerocf ingest`` ->
``<p>.events``) while ``zerocf lmf`` runs as a subprocess and is SIGKILLed at seeded random moments, 10
times: eight kills come 0.5-3 s after the worker was seen applying batches (mid-stream, often with a write in
flight), two come 0.5-3 s after the command started (during start-up / the group join). Every restart uses a
fresh consumer group: the worker's progress lives in Redis (offsets fenced in the batch's Lua call), not in
Kafka commits, and a restarted member of the same group would wait ~8 s for the dead member's session to
expire (Tansu also keeps a group broken when a member died mid-join). A last ``--until-idle`` run finishes.

Each ``zerocf lmf`` process is started while its predecessor still runs and waits, its imports done, until the
kill of the predecessor (:func:`tests.helpers.prestart_zerocf`): then it runs the command, so the loop does not
spend ~1.3 s of interpreter start and imports per kill. The timings of the kills are from that moment.

Why a paced stream rather than one already on ``<p>.events``: the worker consumes a pre-loaded 60k stream in
under 10 s of processing, so most kills would land after its end. Paced at ~1100 events/s the stream lasts
about as long as the kill loop, so the kills hit a worker that is applying batches.

Then per-user update counters must equal the number of distinct events per user and per-item counts the
clicks per item: nothing lost, nothing applied twice.
"""

from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from stream.config import StreamConfig, load
from stream.replay.datasets import synthetic_dataset, write_csv
from tests.helpers import (
    Truth,
    assert_store_matches,
    fresh_group,
    lmf_summary,
    prestart_zerocf,
    release,
    stop_process,
    truth_of,
)
from workers.config import LMFConfig
from workers.store import FactorStore

log = logging.getLogger(__name__)

N_CLICKS = 50_000
RATE = 1100  # raw clicks per second: the stream lasts ~45 s, about as long as the kill loop
N_KILLS = 10
EARLY_KILLS = {1, 6}  # these kills are timed from the start of the command: start-up / join
SEED = 20261127


def _applied(store: FactorStore, partitions: list[int]) -> int:
    """Events-topic records covered by the offsets stored in Redis (sum of offset + 1)."""
    offs = store.read_batch_state(1, partitions, [], []).offsets
    return sum(o + 1 for o in offs.values() if o is not None)


def _wait_progress(
    store: FactorStore, partitions: list[int], start: int, proc: subprocess.Popen[bytes], timeout: float = 15.0
) -> None:
    """Wait until the worker applied something beyond ``start`` (at most ``timeout``: the stream may be over;
    such a kill is simply not counted as mid-stream, and the final check still catches any loss)."""
    deadline = time.monotonic() + timeout
    while _applied(store, partitions) == start and time.monotonic() < deadline:
        assert proc.poll() is None, f"lmf exited with {proc.returncode} before applying anything"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing_and_applies_nothing_twice(
    zerocf_env: dict[str, str], tmp_path: Path, record_property: Any
) -> None:
    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "0.2"}  # only the final --until-idle run: it exits when all is applied
    cfg = load(LMFConfig, env)
    csv = tmp_path / "stream.csv"
    write_csv(synthetic_dataset(2000, 1000, N_CLICKS, seed=11), csv)
    store = FactorStore.from_url(cfg.redis_url, cfg.topic_prefix)
    store.ensure_model(cfg.factors)  # what the worker does first; lets the test read offsets from the start
    zerocf = [sys.executable, "-m", "workers.cli"]
    ingest_log = open(tmp_path / "ingest.log", "wb")
    producer = subprocess.Popen(
        [*zerocf, "produce", str(csv), "--format", "csv", "--rate", str(RATE)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=ingest_log,
    )
    ingest = subprocess.Popen(
        [*zerocf, "ingest", "--group", fresh_group("ingest")], env=env, stdout=subprocess.DEVNULL, stderr=ingest_log
    )
    with ExitStack() as cleanup:
        try:
            kills = _kill_loop(env, store, list(range(load(StreamConfig, env).events_partitions)), tmp_path)
            final_log = cleanup.enter_context(open(tmp_path / "lmf-final.log", "wb"))
            final = prestart_zerocf(  # its imports overlap the end of the stream
                env, final_log, "lmf", "--until-idle", "--group", fresh_group("lmf-kill-final"), "--batch", "500"
            )
            cleanup.callback(stop_process, final, 5)
            assert producer.wait(120) == 0, "zerocf produce failed: see ingest.log"
            truth = _wait_for_stream(cfg, N_CLICKS)
        finally:
            for proc in (producer, ingest):
                stop_process(proc, 20)
            ingest_log.close()
        total = sum(o + 1 for o in truth.last_offsets.values())  # records (packs of events), the unit of offsets
        assert total == truth.records and truth.distinct == N_CLICKS and truth.repeated == 0  # no ingest replays
        for k in kills:
            k["mid_stream"] = k["running"] > k["start"] and k["after"] < total
        mid = sum(k["mid_stream"] for k in kills)
        record_property("kills", kills)
        assert all(k["sigkilled"] for k in kills), f"a worker exited before its kill: {kills}"
        assert mid >= 5, f"only {mid} kills landed mid-stream; lower RATE or grow the stream: {kills}"

        release(final)  # `zerocf lmf --until-idle` now: the last run, after ingest stopped
        rc = final.wait(120)
        err = (tmp_path / "lmf-final.log").read_text(errors="replace")
        assert rc == 0, f"the final zerocf lmf --until-idle exited {rc}:\n{err[-3000:]}"
    stats = lmf_summary(err)
    log.warning("after %d kills (%d mid-stream) the final run applied %d events", len(kills), mid, stats["events"])
    assert_store_matches(store, truth, cfg.seen_cap)


def _wait_for_stream(cfg: LMFConfig, n: int, timeout: float = 60.0) -> Truth:
    """Read <p>.events until ingest has put all ``n`` distinct events there."""
    deadline = time.monotonic() + timeout
    while True:
        truth = truth_of(cfg.kafka, cfg.topics.events)
        if truth.distinct >= n or time.monotonic() > deadline:
            return truth
        time.sleep(1.0)


def _kill_loop(env: dict[str, str], store: FactorStore, partitions: list[int], tmp_path: Path) -> list[dict[str, Any]]:
    """Run ``zerocf lmf``, SIGKILL it at a seeded random moment, N_KILLS times; progress per kill.

    The process of kill ``n + 1`` is started (and does its imports) while the one of kill ``n`` runs; it runs
    the command only once its predecessor is dead (:func:`tests.helpers.release`)."""
    rng = random.Random(SEED)
    kills: list[dict[str, Any]] = []

    def prestart(n: int) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"lmf-{n}.log", "wb") as err:
            return prestart_zerocf(env, err, "lmf", "--batch", "500", "--group", fresh_group(f"lmf-kill{n}"))

    following = prestart(0)
    try:
        for n in range(N_KILLS):
            proc = following
            start = _applied(store, partitions)
            release(proc)
            if n + 1 < N_KILLS:
                following = prestart(n + 1)
            try:
                if n not in EARLY_KILLS:
                    _wait_progress(store, partitions, start, proc)
                    running = _applied(store, partitions)
                else:
                    running = start
                time.sleep(rng.uniform(0.5, 3.0))
                before_kill = _applied(store, partitions)
                alive = proc.poll() is None
                proc.kill()  # SIGKILL: no warm stop, a write may be in flight
                proc.wait(10)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            after = _applied(store, partitions)
            kills.append(
                {
                    "start": start,
                    "running": running,
                    "at_kill": before_kill,
                    "after": after,
                    "sigkilled": alive and proc.returncode == -signal.SIGKILL,
                }
            )
            log.warning("kill %d: applied %d -> %d records", n, start, after)
    finally:
        stop_process(following, 5)  # a pre-started process never released (the loop failed): it runs nothing
    return kills
