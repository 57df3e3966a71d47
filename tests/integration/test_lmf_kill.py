"""Acceptance test of the online worker's exactly-once effect: ``kill -9`` at random moments, restart, finish.

60k click events are put on ``<p>.events`` by ``zerocf ingest``. ``zerocf lmf`` (small batches so that writes
are frequent) is started as a subprocess and SIGKILLed at seeded random moments, at least 10 times: most
kills come 0.5-3 s after the worker was seen applying batches (mid-stream, usually with a write in flight),
two come 0.5-3 s after process start (during start-up / the group join). Every restart uses a fresh consumer
group: the worker's progress lives in Redis (offsets fenced in the batch's Lua call), not in Kafka commits,
and a restarted member of the same group would wait ~8 s for the dead member's session to expire (Tansu
also keeps a group broken when a member died mid-join). A last ``--until-idle`` run finishes the stream.

Then per-user update counters must equal the number of distinct events per user and per-item counts the
clicks per item: nothing lost, nothing applied twice.
"""

from __future__ import annotations

import logging
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from stream.config import load
from tests.integration.test_lmf_worker import (assert_store_matches, fresh_group, ingest_synthetic, lmf_cmd,
                                               run_lmf, truth_of)
from workers.config import LMFConfig
from workers.store import FactorStore

log = logging.getLogger(__name__)

N_CLICKS = 60_000
N_KILLS = 10
EARLY_KILLS = {1, 6}  # these kills are timed from process start: start-up / join
SEED = 20261127


def _applied(store: FactorStore, partitions: list[int]) -> int:
    """Events-topic records covered by the offsets stored in Redis (sum of offset + 1)."""
    offs = store.read_batch_state(1, partitions, [], []).offsets
    return sum(o + 1 for o in offs.values() if o is not None)


def _wait_progress(store: FactorStore, partitions: list[int], start: int, total: int,
                   proc: subprocess.Popen[bytes], timeout: float = 40.0) -> None:
    """Wait until the worker applied something beyond ``start`` (or the stream is done)."""
    deadline = time.monotonic() + timeout
    while start < total and _applied(store, partitions) == start:
        assert proc.poll() is None, f"lmf exited with {proc.returncode} before applying anything"
        assert time.monotonic() < deadline, "lmf applied nothing within 40 s of its start"
        time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing_and_applies_nothing_twice(
        zerocf_env: dict[str, str], tmp_path: Path, record_property: Any) -> None:
    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "1"}
    cfg = load(LMFConfig, env)
    ingest_synthetic(env, tmp_path, users=2000, items=1000, clicks=N_CLICKS, seed=11)
    truth = truth_of(cfg.kafka, cfg.topics.events)
    assert truth.distinct == N_CLICKS
    partitions = sorted(truth.last_offsets)
    total = sum(o + 1 for o in truth.last_offsets.values())
    store = FactorStore.from_url(cfg.redis_url, cfg.topic_prefix)
    store.ensure_model(cfg.factors)  # what the worker does first; lets the test read offsets from the start

    rng = random.Random(SEED)
    kills: list[dict[str, Any]] = []
    for n in range(N_KILLS):
        start = _applied(store, partitions)
        with open(tmp_path / f"lmf-{n}.log", "wb") as err:
            proc = subprocess.Popen(lmf_cmd("--batch", "200", "--group", fresh_group(f"lmf-kill{n}")),
                                    env=env, stdout=subprocess.DEVNULL, stderr=err)
            try:
                if n not in EARLY_KILLS:
                    _wait_progress(store, partitions, start, total, proc)
                    running = _applied(store, partitions)
                else:
                    running = start
                time.sleep(rng.uniform(0.5, 3.0))
                before_kill = _applied(store, partitions)
                proc.kill()  # SIGKILL: no warm stop, a write may be in flight
                proc.wait(10)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        after = _applied(store, partitions)
        kills.append({"start": start, "running": running, "at_kill": before_kill, "after": after,
                      "mid_stream": running > start and after < total})
        log.warning("kill %d: applied %d -> %d of %d records", n, start, after, total)

    mid = sum(k["mid_stream"] for k in kills)
    record_property("kills", kills)
    assert len(kills) >= 10
    assert mid >= 5, f"only {mid} kills landed mid-stream; lower the rate (--batch) or grow the stream: {kills}"
    assert kills[-1]["after"] < total or mid >= 8

    stats = run_lmf(env, fresh_group("lmf-kill-final"), "--batch", "200")
    log.warning("after %d kills (%d mid-stream) the final run applied %d events", len(kills), mid,
                stats["events"])
    assert_store_matches(store, truth, cfg.seen_cap)
