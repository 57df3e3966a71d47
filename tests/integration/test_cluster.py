"""zerocf on a real Redis Cluster: the stack's three-primary cluster, the ``redis+cluster://`` URL, and the
exactly-once path (``kill -9`` of ``zerocf lmf``) against it.

The store tests (tests/integration/test_store_redis.py), the two-worker test and the ALS publish and handoff
tests also run on the cluster: they carry the ``redis_cluster`` marker (tests/integration/conftest.py). Today a
model's keys share the hash tag ``{<ns>}``: one slot, one primary; :func:`test_a_model_lives_in_one_slot_on_one_primary`
pins that down (the figure behind issue 14 item 1).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.cluster

from stream.config import load, redact_url
from stream.devstack import CLUSTER_SLOTS, LocalStack, free_cluster_port
from stream.errors import ConfigError, ServiceUnavailable
from tests.helpers import TS, assert_store_matches, fresh_group, ingest_synthetic, lmf_cmd, run_lmf, truth_of
from workers.config import LMFConfig
from workers.store import ApplyStatus, BatchWrite, FactorStore
from workers.store.connect import client_from_url, cluster_startup, is_cluster, where

log = logging.getLogger(__name__)


# ------------------------------------------------------------------- the URL
def test_the_cluster_url_names_its_nodes_and_keeps_credentials_and_options() -> None:
    first, others = cluster_startup("redis+cluster://:pw@10.0.0.1:7000, 10.0.0.2:7001,[::1]:7002?socket_timeout=3")
    assert first == "redis://:pw@10.0.0.1:7000?socket_timeout=3"
    assert others == [("10.0.0.2", 7001), ("::1", 7002)]
    assert cluster_startup("rediss+cluster://h:1/0")[0] == "rediss://h:1/0"
    assert redact_url("redis+cluster://app:secret@a:1,b:2") == "redis+cluster://app:***@a:1,b:2"
    with pytest.raises(ConfigError, match="database 0"):
        cluster_startup("redis+cluster://h:7000/2")
    with pytest.raises(ConfigError, match="host:port"):
        cluster_startup("redis+cluster://h:7000,nohost")


def test_an_unreachable_cluster_is_named_by_connect() -> None:
    url = f"redis+cluster://127.0.0.1:{free_cluster_port()}"
    with pytest.raises(ServiceUnavailable, match="cannot reach Redis"):
        FactorStore.connect(url, "t", socket_connect_timeout=1)


# ------------------------------------------------------------------- the stack's cluster
def test_the_stack_starts_three_primaries_restarts_one_and_stops_them(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path)
    nodes = stack.start_redis_cluster(3)
    try:
        assert [n.name for n in stack.cluster_nodes()] == ["redis-cluster-0", "redis-cluster-1", "redis-cluster-2"]
        assert all((tmp_path / n.name / "nodes.conf").exists() for n in nodes)  # one folder per node
        client = client_from_url(stack.cluster_url())
        assert is_cluster(client) and where(client).startswith("redis+cluster://127.0.0.1:")
        primaries = client.get_primaries()
        assert sorted(n.port for n in primaries) == sorted(n.port for n in nodes)
        owned = [sum(b - a + 1 for a, b in r) for r in _slot_ranges_by_port(client).values()]
        assert sorted(owned) == [5461, 5461, 5462] and sum(owned) == CLUSTER_SLOTS
        client.mset_nonatomic({f"k{i}": i for i in range(300)})  # keys without a tag spread over the primaries
        assert all(client.dbsize(target_nodes=n) > 50 for n in primaries)
        client.close()

        stack.restart_service("redis-cluster-1")  # rejoins from its nodes.conf: same slots, its data gone
        client = client_from_url(stack.cluster_url())
        assert client.cluster_info()["cluster_state"] == "ok"
        assert 0 < client.dbsize() < 300
        client.config_set("requirepass", "s3cret", target_nodes="primaries")
        client.close()
        url = stack.cluster_url().replace("//", "//:wrong@")
        with pytest.raises(ConfigError, match="rejected the credentials") as err:
            FactorStore.connect(url, "t")
        assert "wrong" not in str(err.value)
        assert FactorStore.connect(url.replace("wrong", "s3cret"), "t").r.ping()
    finally:
        stack.down()
    assert not any(_alive(n.pid) for n in nodes)
    assert not (tmp_path / "stack.json").exists()


def _slot_ranges_by_port(client: redis.cluster.RedisCluster) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {}
    for (a, b), info in client.cluster_slots().items():
        out.setdefault(int(info["primary"][1]), []).append((int(a), int(b)))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(") ")[-1][:1] != "Z"


# ------------------------------------------------------------------- one model = one slot = one primary
def test_a_model_lives_in_one_slot_on_one_primary(redis_cluster: str) -> None:
    store = FactorStore.from_url(redis_cluster, "slot")
    client = store.r
    client.flushdb(target_nodes="primaries")
    g = store.ensure_model(4)
    w = store.width
    batch = BatchWrite(0, None, 9, {}, user_ids=["u1", "u2"], user_rows=np.ones((2, w), np.float32),
                       item_ids=["i1"], item_deltas=np.ones((1, w), np.float32), counts={"i1": 2.0},
                       user_increments={"u1": 1, "u2": 1}, seen=[("u1", "i1", TS), ("u2", "i1", TS)])  # fmt: skip
    assert store.apply_batch(g, batch) is ApplyStatus.APPLIED
    g2 = store.begin_generation()
    store.write_vectors(g2, "user", ["u1"], np.ones((1, w), np.float32))
    store.write_vectors(g2, "item", ["i1"], np.ones((1, w), np.float32))
    store.publish_generation(g2, {0: 9}, {}, 0.5, 1, 1)
    keys = client.keys("*")
    assert len(keys) > 10
    slots = {client.keyslot(k) for k in keys}
    assert len(slots) == 1  # every key carries the {slot} hash tag
    holders = [n.port for n in client.get_primaries() if client.dbsize(target_nodes=n)]
    assert len(holders) == 1, holders  # so one primary holds the whole model and takes all of its writes


# ------------------------------------------------------------------- exactly-once on the cluster
N_CLICKS = 12_000
N_KILLS = 3


@pytest.mark.parametrize("redis_url", ["cluster"], indirect=True)
def test_kill_9_on_the_cluster_loses_nothing_and_applies_nothing_twice(
    zerocf_env: dict[str, str], tmp_path: Path
) -> None:
    """A shorter ``test_lmf_kill``: the stream is on ``<p>.events`` first, small batches keep the worker busy for
    a few seconds (a batch of 20 events is one record: a pack of ingest), and each of three workers is SIGKILLed
    0.1-0.5 s after it was seen applying."""
    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "1"}
    assert env["ZEROCF_REDIS_URL"].startswith("redis+cluster://")
    cfg = load(LMFConfig, env)
    ingest_synthetic(env, tmp_path, 800, 400, N_CLICKS, seed=5)
    truth = truth_of(cfg.kafka, cfg.topics.events)
    assert truth.distinct == N_CLICKS
    parts = sorted(truth.last_offsets)
    total = sum(o + 1 for o in truth.last_offsets.values())  # records (packs of events): the unit of offsets
    store = FactorStore.from_url(cfg.redis_url, cfg.topic_prefix)
    store.ensure_model(cfg.factors)

    def applied() -> int:
        offs = store.read_batch_state(store.live_generation(), parts, [], []).offsets
        return sum(o + 1 for o in offs.values() if o is not None)

    rng, mid = random.Random(14), 0
    for n in range(N_KILLS):
        start = applied()
        with open(tmp_path / f"lmf-{n}.log", "wb") as err:
            proc = subprocess.Popen(lmf_cmd("--batch", "20", "--group", fresh_group(f"lmf-ck{n}")), env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while applied() == start and time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / f"lmf-{n}.log").read_text()[-3000:]
                time.sleep(0.05)
            time.sleep(rng.uniform(0.1, 0.5))
            assert proc.poll() is None, f"lmf {n} exited before its kill"
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        after = applied()
        mid += start < after < total
        log.warning("cluster kill %d: applied %d -> %d records", n, start, after)
    assert mid >= 2, f"only {mid} of {N_KILLS} kills landed mid-stream"
    stats = run_lmf(env, fresh_group("lmf-ck-final"), "--batch", "500")
    log.warning("after %d kills on the cluster the final run applied %d events", N_KILLS, stats["events"])
    assert_store_matches(store, truth, cfg.seen_cap)
    assert sum(Counter(store.user_update_counts(store.live_generation())).values()) == N_CLICKS
