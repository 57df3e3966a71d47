"""Shared fixtures.

Unit tests (``tests/unit``) use nothing from here but fakeredis and in-process objects. Integration tests
(``tests/integration``) get a real Kafka-protocol broker and a real Redis, started once per session by the
same :class:`stream.devstack.LocalStack` code that ``zerocf stack up`` uses, on free loopback ports, and
stopped at the end. Each test gets fresh topic names (a unique prefix) and a flushed Redis database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DATASETS


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """zerocf's default state folder (ALS checkpoints) inside the session's temp dir, never the user's home."""
    old = os.environ.get("XDG_STATE_HOME")
    path = tmp_path_factory.mktemp("state")
    os.environ["XDG_STATE_HOME"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("XDG_STATE_HOME", None)
        else:
            os.environ["XDG_STATE_HOME"] = old


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The running local stack (broker + Redis) for this test session."""
    from stream.devstack import LocalStack

    st = LocalStack(tmp_path_factory.mktemp("stack"))
    try:
        st.up()
        yield st
    finally:
        st.down()


@pytest.fixture(scope="session")
def stack_env(stack: object) -> dict[str, str]:
    """``ZEROCF_KAFKA_BOOTSTRAP`` and ``ZEROCF_REDIS_URL`` of the session stack."""
    return stack.env()  # type: ignore[attr-defined]


@pytest.fixture()
def kafka_bootstrap(stack_env: dict[str, str]) -> str:
    return stack_env["ZEROCF_KAFKA_BOOTSTRAP"]


@pytest.fixture()
def redis_url(stack: object) -> str:
    """URL of the session Redis; the database is flushed before the test."""
    import redis

    url = stack.env()["ZEROCF_REDIS_URL"]  # type: ignore[attr-defined]
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[object]:
    """A ``redis.Redis`` client on the flushed session Redis."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture()
def topic_prefix() -> str:
    """A topic prefix no other test uses (fresh topics per test)."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture()
def zerocf_env(stack_env: dict[str, str], topic_prefix: str, redis_url: str) -> dict[str, str]:
    """Environment for running zerocf commands against the session stack with this test's topics."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROCF_")}
    env.update(stack_env)
    env["ZEROCF_REDIS_URL"] = redis_url
    env["ZEROCF_TOPIC_PREFIX"] = topic_prefix
    return env


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """../shared/datasets beside the checkout (tests that need it skip when absent)."""
    if not DATASETS.exists():
        pytest.skip(f"datasets not found at {DATASETS}")
    return DATASETS
