"""Every test in this folder runs on the real broker and the real Redis (see tests/conftest.py).

A test (or module) marked ``redis_cluster`` runs twice: on the single Redis and on a three-primary Redis Cluster
(``redis_url`` is then its ``redis+cluster://`` URL and ``redis_client`` a cluster client), started once per
session by :meth:`stream.devstack.LocalStack.start_redis_cluster` when the first such test needs it.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stream import kafka_util
from stream.ingest import Ingest
from stream.runtime import StopFlag
from tests.helpers import ALS_PARTITIONS, als_stream_cfg, prestart_zerocf, stop_process
from workers.store.connect import client_from_url


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "redis_cluster: also run on a three-primary Redis Cluster (redis_url)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("redis_cluster") and "redis_url" in metafunc.fixturenames:
        metafunc.parametrize("redis_url", ["redis", "cluster"], indirect=True)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The ``redis+cluster://`` URL of a three-primary Redis Cluster on loopback, for this session."""
    from stream.devstack import LocalStack

    st = LocalStack(tmp_path_factory.mktemp("cluster"))
    try:
        st.start_redis_cluster(3)
        yield st.cluster_url()
    finally:
        st.down()


@pytest.fixture()
def redis_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The flushed session Redis, or (param ``cluster``) the flushed session Redis Cluster."""
    if getattr(request, "param", "redis") != "cluster":
        return redis_url
    url: str = request.getfixturevalue("redis_cluster")
    client = client_from_url(url)
    try:
        client.flushdb(target_nodes="primaries")
    finally:
        client.close()
    return url


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[object]:
    """A client on ``redis_url``: ``redis.Redis``, or ``RedisCluster`` on the cluster."""
    client = client_from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture()
def ingest_thread(zerocf_env: dict[str, str]) -> Iterator[Ingest]:
    """A running in-process ingest on the ALS tests' topics (one group join per test); stopped at teardown."""
    cfg = als_stream_cfg(zerocf_env)
    kafka_util.ensure_topics(cfg.kafka, {name: ALS_PARTITIONS for name in cfg.topics.all()})
    ing = Ingest(cfg, StopFlag())
    t = threading.Thread(target=ing.run, name="test-ingest", daemon=True)
    t.start()
    try:
        yield ing
    finally:
        ing.stop.set("test done")
        t.join(timeout=15)


@pytest.fixture()
def prestart() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """:func:`tests.helpers.prestart_zerocf`; every process it started is stopped at teardown (one never
    released has run nothing)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str], log: Any, *argv: str, stdout: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
        procs.append(prestart_zerocf(env, log, *argv, stdout=stdout))
        return procs[-1]

    yield start
    for proc in procs:
        stop_process(proc, 5)
