"""``zerocf als`` on the real broker and Redis: publish, crash/stop safety, and the LMF handoff.

Data: synthetic clicks (``stream.replay.datasets.synthetic_dataset``) sent as raw clicks, normalised by the real
ingest (in-process), read by the ALS snapshot; the LMF worker runs as a ``zerocf lmf`` subprocess.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream import kafka_util
from stream.config import load
from stream.ingest import Ingest
from stream.kafka_util import read_topic
from stream.replay.datasets import synthetic_dataset
from stream.runtime import StopFlag
from tests.helpers import (
    als_stream_cfg,
    assert_published,
    events_of,
    last_offsets,
    produce_clicks,
    run_zerocf,
    wait_until,
)
from workers.batch.worker import ALSWorker
from workers.config import ALSConfig
from workers.store import FactorStore

K = 16


# ------------------------------------------------------------------- helpers
def _als_cfg(env: dict[str, str], ckpt: Path) -> ALSConfig:
    return load(
        ALSConfig,
        env,
        {"factors": K, "checkpoint_dir": str(ckpt), "als_iterations": 6, "als_reg": 1.0, "calib_samples": 2000},
    )


def _store(env: dict[str, str]) -> FactorStore:
    return FactorStore.from_url(env["ZEROCF_REDIS_URL"], env["ZEROCF_TOPIC_PREFIX"])


def _ckpt_meta(ckpt: Path) -> dict[str, Any]:
    name = (ckpt / "CURRENT").read_text().strip()
    return json.loads((ckpt / name / "meta.json").read_text())["metadata"]


# ------------------------------------------------------------------- (a) publish via the CLI
def test_als_once_publishes_every_user_and_item_with_snapshot_offsets(
    zerocf_env: dict[str, str], ingest_thread: Ingest, tmp_path: Path
) -> None:
    rows = synthetic_dataset(120, 60, 1500, seed=1)
    produce_clicks(zerocf_env, rows)
    wait_until("ingest", lambda: ingest_thread.stats.events_out >= len(rows), 30)
    cfg = als_stream_cfg(zerocf_env)
    # a duplicate run on the events topic (as a replaying ingest leaves it): must be counted once
    dup = [r for r in read_topic(cfg.kafka, cfg.topics.events) if r.partition == 0][:40]
    producer = kafka_util.producer(cfg.kafka, client_id="test-dup")
    for r in dup:
        producer.send(cfg.topics.events, key=r.key, value=r.value, partition=0)
    producer.flush()
    producer.close()
    last = last_offsets(cfg)
    ckpt = tmp_path / "ckpt"
    flags = ["--factors", str(K), "--iterations", "6", "--reg", "1", "--checkpoint-dir", str(ckpt)]
    proc = run_zerocf(zerocf_env, "als", "--once", *flags)
    store, meta, users, items, U, V = assert_published(zerocf_env, rows, last)
    assert store.generation_meta(1).state == "retired"
    ck = _ckpt_meta(ckpt)
    assert ck["n_events"] == len(rows) and ck["n_duplicates"] == len(events_of(dup))
    assert {int(p): o for p, o in ck["offsets"].items()} == last
    assert {int(p): w for p, w in ck["watermarks"].items()} == meta.watermarks
    # calibrated logits rank the clicked pairs above random pairs
    iu = {u: n for n, u in enumerate(users)}
    ii = {i: n for n, i in enumerate(items)}
    clicked = np.array([U[iu[r.user_id]] @ V[ii[r.item_id]] for r in rows]) + meta.bias
    rnd = np.random.default_rng(0)
    random_pairs = (
        np.einsum("ij,ij->i", U[rnd.integers(0, len(users), 2000)], V[rnd.integers(0, len(items), 2000)]) + meta.bias
    )
    assert clicked.mean() > random_pairs.mean() + 1.0
    assert "als iteration 6/6: loss" in proc.stderr


# ------------------------------------------------------------------- (b) stop / crash before the flip
def test_stop_or_crash_before_publish_keeps_the_old_generation(
    zerocf_env: dict[str, str], ingest_thread: Ingest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = synthetic_dataset(80, 40, 600, seed=2)
    produce_clicks(zerocf_env, rows)
    wait_until("ingest", lambda: ingest_thread.stats.events_out >= len(rows), 30)
    cfg = _als_cfg(zerocf_env, tmp_path / "ckpt")
    store = _store(zerocf_env)
    first = ALSWorker(cfg, store).run_once()
    assert first.outcome == "published" and store.live_generation() == first.generation == 2
    users = sorted({r.user_id for r in rows})
    before, _ = store.get_vectors(2, "user", users)

    # 1. a stop arriving after the first vector chunk: nothing published, the half-built generation dropped
    stop = StopFlag()
    worker = ALSWorker(cfg, store, stop)
    real_write = store.write_vectors

    def write_then_stop(*a: Any, **kw: Any) -> None:
        real_write(*a, **kw)
        stop.set("test")

    monkeypatch.setattr(store, "write_vectors", write_then_stop)
    assert worker.run_once().outcome == "stopped"
    assert store.live_generation() == 2 and 3 not in store.generations()
    monkeypatch.setattr(store, "write_vectors", real_write)

    # 2. a crash between begin and publish, with Redis unreachable for the clean-up: a building generation
    def boom(*a: Any, **kw: Any) -> None:
        raise ConnectionError("redis went away")

    monkeypatch.setattr(store, "write_counts", boom)
    monkeypatch.setattr(store, "drop_generation", boom)
    with pytest.raises(ConnectionError):
        ALSWorker(cfg, store).run_once()
    assert store.live_generation() == 2 and store.generation_meta(4).state == "building"
    monkeypatch.undo()
    after, _ = store.get_vectors(2, "user", users)
    np.testing.assert_array_equal(before, after)
    assert store.gc_generations(0.0) == [1]  # its builder's lease is still held: never collected meanwhile
    store.r.pexpire(store.keys.lease(4), 1)  # the lease expires (nobody renews it)
    wait_until("the lease expires", lambda: store.lease_holder(4) is None, 5)
    assert store.gc_generations(600.0) == [4]  # abandoned: collected at once, not after the grace period

    # 3. a later run works (and retires generation 2)
    ok = ALSWorker(cfg, store).run_once()
    assert ok.outcome == "published" and store.live_generation() == ok.generation == 5
    vecs, found = store.get_vectors(5, "user", users)
    assert found.all() and np.isfinite(vecs).all()
    assert store.generation_meta(2).state == "retired"


# ------------------------------------------------------------------- (c) the handoff
@pytest.mark.redis_cluster  # also on a three-primary Redis Cluster
def test_handoff_lmf_replays_after_swap_and_checkpoint_resumes(
    zerocf_env: dict[str, str], ingest_thread: Ingest, tmp_path: Path
) -> None:
    rows = synthetic_dataset(100, 50, 1450, seed=3)
    p1, p2, p3, p4 = rows[:800], rows[800:1200], rows[1200:1400], rows[1400:]
    rows = rows[:1400]
    cfg_s = als_stream_cfg(zerocf_env)
    store = _store(zerocf_env)
    ckpt = tmp_path / "ckpt"
    cfg = _als_cfg(zerocf_env, ckpt)

    def applied(g: int) -> int:
        return sum(store.user_update_counts(g).values())

    # part 1 -> events; the ALS snapshot covers exactly part 1
    produce_clicks(zerocf_env, p1)
    wait_until("ingest of part 1", lambda: ingest_thread.stats.events_out >= len(p1), 30)
    als = ALSWorker(cfg, store)
    als.start()
    assert als.snapshot.catch_up() == len(p1)
    als.snapshot.save()
    p1_offsets = last_offsets(cfg_s)

    # the LMF worker learns parts 1 and 2 online in generation 1
    env = {**zerocf_env, "ZEROCF_FACTORS": str(K), "ZEROCF_LMF_GROUP": f"{zerocf_env['ZEROCF_TOPIC_PREFIX']}-lmf"}
    with open(tmp_path / "lmf.log", "w") as log_fh:
        lmf = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "lmf"], env=env, stdout=log_fh, stderr=subprocess.STDOUT
        )
    try:
        wait_until("LMF on part 1", lambda: store.r.exists(store.keys.meta) and applied(1) == len(p1), 30)
        produce_clicks(zerocf_env, p2)
        wait_until("LMF on part 2", lambda: applied(1) == len(p1) + len(p2), 30)

        # the swap: generation 2 from the part-1 snapshot, warm-started from the LMF's vectors
        res = als.solve_and_publish()
        assert res.outcome == "published" and store.live_generation() == res.generation == 2
        assert store.generation_meta(2).offsets == p1_offsets

        # the next events make the LMF notice the swap, rewind to the snapshot offsets + 1 and replay
        produce_clicks(zerocf_env, p3)
        wait_until("LMF replay of parts 2 and 3 into generation 2", lambda: applied(2) == len(p2) + len(p3), 30)
    finally:
        lmf.send_signal(signal.SIGTERM)  # a warm stop lands the last write: after the exit nothing can change
        try:
            lmf.wait(timeout=15)
        except subprocess.TimeoutExpired:
            lmf.kill()
            lmf.wait()
    assert lmf.returncode == 0, (tmp_path / "lmf.log").read_text()[-3000:]
    assert store.user_update_counts(2) == dict(Counter(r.user_id for r in p2 + p3))  # no double replay
    assert applied(1) == len(p1) + len(p2)  # nothing more went to the retired generation
    expected_counts = Counter(r.item_id for r in rows)
    assert store.item_counts(2) == {i: float(n) for i, n in expected_counts.items()}
    assert "switching and replaying from the snapshot offsets" in (tmp_path / "lmf.log").read_text()

    # checkpoint restart: a fresh worker reads only parts 2 and 3
    again = ALSWorker(cfg, store)
    res = again.run_once(min_new_events=1)
    assert res.outcome == "published" and res.new_events == len(p2) + len(p3)
    assert again.snapshot.n_events == len(rows) and _ckpt_meta(ckpt)["n_events"] == len(rows)
    assert store.generation_meta(res.generation).offsets == last_offsets(cfg_s)

    # an LMF started after that swap (the restart path) resumes at generation 3's offsets + 1
    produce_clicks(zerocf_env, p4)
    wait_until("ingest of part 4", lambda: ingest_thread.stats.events_out >= len(rows) + len(p4), 30)
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", "lmf", "--until-idle", "--idle-seconds", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert store.user_update_counts(res.generation) == dict(Counter(r.user_id for r in p4))


def test_every_skips_when_nothing_is_new_and_stops_on_the_flag(
    zerocf_env: dict[str, str], ingest_thread: Ingest, tmp_path: Path
) -> None:
    rows = synthetic_dataset(30, 20, 200, seed=4)
    produce_clicks(zerocf_env, rows)
    wait_until("ingest", lambda: ingest_thread.stats.events_out >= len(rows), 30)
    cfg = _als_cfg(zerocf_env, tmp_path / "ckpt")
    store = _store(zerocf_env)
    worker = ALSWorker(cfg, store)
    t = threading.Thread(target=worker.run_every, args=(3600.0, 1), daemon=True)
    t.start()
    wait_until("the first scheduled run", lambda: worker.last is not None, 30)
    assert worker.last is not None and worker.last.outcome == "published" and worker.last.pending == len(rows)
    worker.last = None
    worker.stop.set("test")
    t.join(timeout=10)
    assert not t.is_alive()
    # nothing new since the live generation: a scheduled run skips, health stays ok
    res = ALSWorker(cfg, store).run_once(min_new_events=1)
    assert res.outcome == "skipped" and res.pending == 0 and res.new_events == 0
    assert worker.health()[0]


# ------------------------------------------------------------------- (e) upgrading a schema-1 model
def test_schema_1_model_is_refused_by_name_and_rebuilt_by_als_rebuild(
    zerocf_env: dict[str, str], ingest_thread: Ingest, tmp_path: Path
) -> None:
    rows = synthetic_dataset(80, 40, 800, seed=4)
    produce_clicks(zerocf_env, rows)
    wait_until("ingest", lambda: ingest_thread.stats.events_out >= len(rows), 30)
    store = _store(zerocf_env)
    ns = zerocf_env["ZEROCF_TOPIC_PREFIX"]
    legacy = {"schema_version": "1", "k": str(K), "dtype": "<f4", "live_gen": "1"}
    store.r.hset(f"zcf:v1:{{{ns}}}:meta", mapping=legacy)
    store.r.hset(f"zcf:v1:{{{ns}}}:g:1:user", "u1", b"\0" * 4 * K)
    lmf = run_zerocf(zerocf_env, "lmf", "--until-idle", "--factors", str(K), check=False)
    assert lmf.returncode == 2 and "schema-1" in lmf.stderr and "zerocf als --once --rebuild" in lmf.stderr
    assert not store.r.exists(store.keys.meta)  # refused before creating anything
    last = last_offsets(als_stream_cfg(zerocf_env))
    flags = ["--factors", str(K), "--iterations", "4", "--reg", "1", "--checkpoint-dir", str(tmp_path / "ck")]
    run_zerocf(zerocf_env, "als", "--once", "--rebuild", *flags)
    assert_published(zerocf_env, rows, last)
    assert store.meta().schema_version == 2
    assert store.r.hget(f"zcf:v1:{{{ns}}}:g:1:user", "u1") == b"\0" * 4 * K  # the old keys are left alone
    run_zerocf(zerocf_env, "lmf", "--until-idle", "--factors", str(K))
