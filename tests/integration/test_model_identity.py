"""A checkpoint or store that belongs to something else is refused; a lost store is named, never silently rebuilt.

Issue 11 (items 2, 6, 7): ``zerocf als`` resumed a checkpoint left by a run on another dataset and published its
model into a fresh store; after Redis lost its data a restarted ``zerocf lmf`` or ``zerocf als`` rebuilt a model
from whatever the topic still retained without saying so; abandoned half-built generations waited for the grace
period. All on the session's real broker and Redis, through the ``zerocf`` commands.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaAdminClient

from stream import kafka_util
from stream.config import load
from stream.ingest import Ingest
from stream.replay.datasets import synthetic_dataset
from tests.helpers import (
    als_stream_cfg,
    assert_published,
    assert_store_matches,
    background,
    fresh_group,
    ingest_synthetic,
    last_offsets,
    model_dump,
    produce_clicks,
    run_zerocf,
    tail,
    truth_of,
    wait_until,
)
from workers.batch.worker import ALSWorker
from workers.config import ALSConfig, LMFConfig
from workers.store import FactorStore, ModelLost

K = 8
ALS_FLAGS = ("--factors", str(K), "--iterations", "3", "--reg", "1", "--calib-samples", "500")


def _one_error_line(done: subprocess.CompletedProcess[str], pattern: str, rc: int = 2) -> str:
    """``done`` exited ``rc`` with exactly one ERROR log line matching ``pattern`` and no traceback."""
    err = done.stderr
    assert done.returncode == rc, f"exit {done.returncode}, expected {rc}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, err[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def _store(env: dict[str, str]) -> FactorStore:
    return FactorStore.from_url(env["ZEROCF_REDIS_URL"], env["ZEROCF_TOPIC_PREFIX"])


def _model_id(env: dict[str, str]) -> str | None:
    """The stored model's id, read straight from the meta hash (None: no model, or one without an id)."""
    store = _store(env)
    raw = store.r.hget(store.keys.meta, "model_id")
    return None if raw is None else raw.decode()


def _sent(env: dict[str, str], ingest: Ingest, users: int, items: int, n: int, seed: int) -> list[Any]:
    rows = synthetic_dataset(users, items, n, seed=seed)
    before = ingest.stats.events_out
    produce_clicks(env, rows)
    wait_until("ingest", lambda: ingest.stats.events_out >= before + len(rows), 30)
    return rows


# ------------------------------------------------------------------- the ALS checkpoint
def test_als_checkpoint_has_a_stable_default_home_and_a_lost_store_is_refused_until_rebuild(
    zerocf_env: dict[str, str], ingest_thread: Ingest, tmp_path: Path
) -> None:
    rows = _sent(zerocf_env, ingest_thread, 60, 30, 600, seed=11)
    state, cwd = tmp_path / "state", tmp_path / "cwd"
    cwd.mkdir()
    env = {**zerocf_env, "XDG_STATE_HOME": str(state)}
    argv = [sys.executable, "-m", "workers.cli", "als", "--once", *ALS_FLAGS]
    first = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    home = state / "zerocf" / "als" / zerocf_env["ZEROCF_TOPIC_PREFIX"]
    assert (home / "CURRENT").is_file() and list(cwd.iterdir()) == []  # not relative to the working directory
    store = _store(zerocf_env)
    model = _model_id(zerocf_env)

    # Redis restarts empty: the checkpoint says a model was built, the store has none -> refused, nothing written
    store.r.flushdb()
    lost = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    _one_error_line(lost, rf"lost model {model} .*zerocf als --once --rebuild")
    assert model_dump(store.r, zerocf_env["ZEROCF_TOPIC_PREFIX"]) == {}

    # the explicit choice: --rebuild re-reads the topic into a new model (a new id) and re-binds the checkpoint
    rebuilt = subprocess.run([*argv, "--rebuild"], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert_published(zerocf_env, rows, last_offsets(als_stream_cfg(zerocf_env)))
    assert _model_id(zerocf_env) not in (None, model)
    again = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]


def test_als_checkpoint_of_another_topic_or_model_is_one_line_and_exit_2(
    zerocf_env: dict[str, str], ingest_thread: Ingest, tmp_path: Path
) -> None:
    _sent(zerocf_env, ingest_thread, 50, 25, 400, seed=12)
    ckpt = ["--checkpoint-dir", str(tmp_path / "ck")]
    run_zerocf(zerocf_env, "als", "--once", *ALS_FLAGS, *ckpt)
    prefix = zerocf_env["ZEROCF_TOPIC_PREFIX"]
    store = _store(zerocf_env)
    before = model_dump(store.r, prefix)

    # another deployment's prefix pointed at this checkpoint (the reported `./zerocf-als` case)
    other = {**zerocf_env, "ZEROCF_TOPIC_PREFIX": prefix + "x"}
    done = run_zerocf(other, "als", "--once", *ALS_FLAGS, *ckpt, check=False)
    _one_error_line(done, rf"snapshot of topic '{prefix}.events', not '{prefix}x.events'.*--rebuild")
    assert model_dump(store.r, prefix + "x") == {}

    # the store now holds another model (Redis lost its data, then something created a new model)
    store.r.flushdb()
    FactorStore.from_url(zerocf_env["ZEROCF_REDIS_URL"], prefix).ensure_model(K)
    newer = _model_id(zerocf_env)
    done = run_zerocf(zerocf_env, "als", "--once", *ALS_FLAGS, *ckpt, check=False)
    _one_error_line(done, rf"holds model {newer} .*belongs to another model.*--rebuild")
    assert store.generations() == [1] and before  # nothing published into the new model


def test_als_every_stops_on_a_lost_store_instead_of_retrying_forever(
    zerocf_env: dict[str, str], ingest_thread: Ingest, tmp_path: Path
) -> None:
    _sent(zerocf_env, ingest_thread, 40, 20, 300, seed=14)
    overrides = {"factors": K, "checkpoint_dir": str(tmp_path / "ck"), "als_iterations": 3, "calib_samples": 500}
    worker = ALSWorker(load(ALSConfig, zerocf_env, overrides), _store(zerocf_env))
    assert worker.run_once().outcome == "published"
    model = _model_id(zerocf_env)
    worker.store.r.flushdb()
    errors: list[BaseException] = []

    def every() -> None:
        try:
            worker.run_every(0.5, 1)
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)

    t = threading.Thread(target=every, daemon=True)
    t.start()
    t.join(30)
    worker.stop.set("test done")
    assert not t.is_alive() and len(errors) == 1, errors
    assert isinstance(errors[0], ModelLost) and f"lost zerocf model {model}" in str(errors[0])
    assert model_dump(worker.store.r, zerocf_env["ZEROCF_TOPIC_PREFIX"]) == {}


# ------------------------------------------------------------------- the LMF side of a lost store
def test_lmf_names_a_lost_store_at_start_and_while_running_and_rebuilds_only_when_told(
    zerocf_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "1", "ZEROCF_FACTORS": str(K)}
    ingest_synthetic(env, tmp_path, users=80, items=40, clicks=1200, seed=5)
    cfg = load(LMFConfig, env)
    group = fresh_group("lmf-lost")
    run_zerocf(env, "lmf", "--until-idle", "--group", group)
    store = _store(env)
    model = _model_id(env)

    # Redis restarts empty while no worker runs: the group's committed offsets say a model was being learned
    store.r.flushdb()
    done = run_zerocf(env, "lmf", "--until-idle", "--group", group, check=False)
    _one_error_line(done, rf"lost .*consumer group '{group}' committed offsets on {cfg.topics.events}.*--rebuild")
    assert model_dump(store.r, cfg.topic_prefix) == {}  # nothing rebuilt behind the operator's back

    # the explicit choice: a new model learned from what the topic retains, everything applied once
    run_zerocf(env, "lmf", "--until-idle", "--group", group, "--rebuild")
    store = _store(env)  # (the previous object would now refuse: the model it saw is gone)
    live = _model_id(env)
    assert live not in (None, model)
    assert_store_matches(store, truth_of(cfg.kafka, cfg.topics.events), cfg.seen_cap)

    # Redis restarts empty under a running worker: it stops with the lost model's id (exit 2), rebuilds nothing
    log = tmp_path / "lmf.log"
    with background({**env, "ZEROCF_IDLE_SECONDS": "3600"}, log, "lmf", "--group", fresh_group("lmf-run")) as proc:
        wait_until("the worker owns its partitions", lambda: "resumes at offset" in tail(log), 60, proc)
        time.sleep(1.5)
        store.r.flushdb()
        proc.wait(timeout=30)
    assert proc.returncode == 2, tail(log)
    assert re.search(rf"ERROR .*lost zerocf model {live} .*zerocf als --once --rebuild", tail(log)), tail(log)
    assert model_dump(store.r, cfg.topic_prefix) == {}


# ------------------------------------------------------------------- abandoned generations
def test_als_start_collects_abandoned_builds_but_never_one_being_built(
    zerocf_env: dict[str, str], ingest_thread: Ingest, tmp_path: Path
) -> None:
    _sent(zerocf_env, ingest_thread, 50, 25, 400, seed=13)
    ckpt = ["--checkpoint-dir", str(tmp_path / "ck")]
    store = _store(zerocf_env)
    store.ensure_model(K)
    # what a killed ALS leaves: a building generation with rows, and a lease nobody renews any more
    killed = store.begin_generation("als", lease_s=0.5)
    store.write_vectors(killed, "user", [f"u{n}" for n in range(500)], np.ones((500, K + 1), np.float32))
    # another ALS that is building right now (its lease is held)
    busy = FactorStore.from_url(zerocf_env["ZEROCF_REDIS_URL"], zerocf_env["ZEROCF_TOPIC_PREFIX"])
    building = busy.begin_generation("als", lease_s=300)
    time.sleep(1.0)
    run_zerocf(zerocf_env, "als", "--once", *ALS_FLAGS, *ckpt)  # grace period: the default 600 s
    gens = store.generations()
    assert killed not in gens and building in gens
    assert not [k for k in store.r.keys(f"*:g:{killed}:*")]
    live = store.live_generation()
    assert live > building and store.generation_meta(live).state == "complete"
    assert store.generation_meta(building).state == "building" and busy.lease_holder(building) == busy.owner


# ------------------------------------------------------------------- lmf --until-idle
def test_lmf_until_idle_refuses_a_missing_topic_and_creates_nothing(zerocf_env: dict[str, str]) -> None:
    done = run_zerocf(zerocf_env, "lmf", "--until-idle", check=False, timeout=60)
    topic = f"{zerocf_env['ZEROCF_TOPIC_PREFIX']}.events"
    _one_error_line(done, rf"topic {topic} does not exist at .*zerocf ingest.*ZEROCF_TOPIC_PREFIX")
    admin = KafkaAdminClient(bootstrap_servers=zerocf_env["ZEROCF_KAFKA_BOOTSTRAP"])
    try:
        assert topic not in admin.list_topics()
    finally:
        admin.close()
    assert model_dump(_store(zerocf_env).r, zerocf_env["ZEROCF_TOPIC_PREFIX"]) == {}


def test_lmf_service_waits_for_a_missing_topic_without_creating_it(zerocf_env: dict[str, str], tmp_path: Path) -> None:
    env = {**zerocf_env, "ZEROCF_FACTORS": str(K)}
    cfg = load(LMFConfig, env)
    log = tmp_path / "lmf.log"
    admin = KafkaAdminClient(bootstrap_servers=zerocf_env["ZEROCF_KAFKA_BOOTSTRAP"])
    try:
        with background(env, log, "lmf", "--group", fresh_group("lmf-wait")) as proc:
            wait_until("the worker reports the missing topic", lambda: "does not exist yet" in tail(log), 30, proc)
            time.sleep(2.5)  # it keeps waiting (and asking the broker) without creating the topic
            assert cfg.topics.events not in admin.list_topics()
            kafka_util.ensure_topics(cfg.kafka, {cfg.topics.events: 3})  # what ingest does
            wait_until("the worker owns the 3 partitions", lambda: tail(log, 10**6).count("resumes at offset") == 3,
                       60, proc)  # fmt: skip
    finally:
        admin.close()
    assert "topic " + cfg.topics.events + " exists now" in tail(log, 10**6)


class _StuckMember:
    """A member of the LMF group that takes its share of partitions and never applies anything."""

    def __init__(self, env: dict[str, str], group: str) -> None:
        cfg = load(LMFConfig, env)
        self.consumer = kafka_util.consumer(cfg.kafka, group_id=group, client_id="stuck", max_poll_records=1)
        self.consumer.subscribe([cfg.topics.events])
        self.stop = threading.Event()
        self.history: list[set[int]] = []  # its assignment after each poll
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            for tp in self.consumer.assignment():
                self.consumer.pause(tp)  # holds the partitions, reads nothing
            self.consumer.poll(timeout_ms=200)
            self.history.append(self.assigned())

    def assigned(self) -> set[int]:
        return {tp.partition for tp in self.consumer.assignment()}

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.consumer.close(autocommit=False)


def test_lmf_until_idle_exits_0_only_when_every_partition_is_applied(
    zerocf_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "1", "ZEROCF_FACTORS": str(K), "ZEROCF_EVENTS_PARTITIONS": "6"}
    ingest_synthetic(env, tmp_path, users=150, items=60, clicks=3000, seed=6)
    cfg = load(LMFConfig, env)
    truth = truth_of(cfg.kafka, cfg.topics.events)
    assert len(truth.last_offsets) == 6
    group = fresh_group("lmf-share")
    stuck = _StuckMember(env, group)
    try:
        wait_until("the stuck member holds all partitions", lambda: len(stuck.assigned()) == 6, 60)
        done = run_zerocf({**env, "ZEROCF_LMF_IDLE_TIMEOUT_S": "5"}, "lmf", "--until-idle", "--group", group,
                          check=False, timeout=180)  # fmt: skip
    finally:
        stuck.close()
    line = _one_error_line(done, r"made no progress for 5 s .*exiting 1 \(--until-idle\)", rc=1)
    held = sorted(min((a for a in stuck.history if a), key=len))
    assert len(held) < 6, held  # the group was shared: the worker had only some partitions
    for p in held:
        assert f"{p}: " in line, line
    store = _store(env)
    applied = store.read_batch_state(1, list(range(6)), [], []).offsets
    assert any(applied[p] != truth.last_offsets[p] for p in held)

    # alone in a group (a fresh one: Tansu keeps a group broken after members left mid-join), the worker takes
    # every partition, finishes the stuck member's share from the fence in Redis and exits 0
    run_zerocf(env, "lmf", "--until-idle", "--group", fresh_group("lmf-alone"), timeout=180)
    assert_store_matches(store, truth, cfg.seen_cap)


# ------------------------------------------------------------------- bad starts (item 6)
@pytest.mark.parametrize(
    ("url", "pattern"),
    [
        ("redis://127.0.0.1:6379/0?db=x", r"ZEROCF_REDIS_URL=.*Invalid value for 'db'"),
        ("redis://127.0.0.1:6379/0?socket_timeout=abc", r"ZEROCF_REDIS_URL=.*Invalid value for 'socket_timeout'"),
        ("redis://:pw@127.0.0.1:6379/notadb", r"ZEROCF_REDIS_URL=redis://:\*\*\*@.*'/notadb' is not a database"),
    ],
)
@pytest.mark.parametrize("command", [("lmf", "--until-idle"), ("als", "--once"), ("recommend", "u1")])
def test_a_bad_redis_url_is_one_line_and_exit_2(
    zerocf_env: dict[str, str], url: str, pattern: str, command: tuple[str, ...]
) -> None:
    done = run_zerocf({**zerocf_env, "ZEROCF_REDIS_URL": url}, *command, check=False, timeout=30)
    line = _one_error_line(done, pattern)
    assert "pw" not in line


def test_the_spark_backend_without_pyspark_is_one_line_and_exit_2(zerocf_env: dict[str, str]) -> None:
    hide = "import sys; sys.modules['pyspark'] = None; from workers.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**zerocf_env, "ZEROCF_ALS_BACKEND": "spark"}
    done = subprocess.run([sys.executable, "-c", hide, "als", "--once"], env=env, capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    _one_error_line(done, r"ZEROCF_ALS_BACKEND=spark needs pyspark.*pip install -e '\.\[spark\]'")
