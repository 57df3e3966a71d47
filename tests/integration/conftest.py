"""Every test in this folder runs on the real broker and the real Redis (see tests/conftest.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from stream import kafka_util
from stream.ingest import Ingest
from stream.runtime import StopFlag
from tests.helpers import ALS_PARTITIONS, als_stream_cfg


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
