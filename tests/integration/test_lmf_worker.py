"""``zerocf lmf`` on the real broker and Redis: exactly-once effect of a replayed stream, undecodable records.

The expected state is computed independently of the worker's de-duplication: from the *distinct* event
ids on ``<p>.events`` (a duplicate run carries the same ids), not from a Deduper.

The helpers here (``lmf_cmd``, ``ingest_synthetic``, ``Truth``, ``truth_of``, ``assert_store_matches``) are
also used by test_lmf_kill.py and test_two_workers.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from stream import kafka_util
from stream.config import load
from stream.events import Event
from stream.kafka_util import read_topic
from tests.helpers import (
    assert_store_matches,
    events_of,
    fresh_group,
    ingest_synthetic,
    model_dump,
    run_lmf,
    truth_of,
)
from workers.config import LMFConfig
from workers.online.worker import LMFWorker
from workers.store import FactorStore

log = logging.getLogger(__name__)
TS = 1_700_000_000_000


# ------------------------------------------------------------------- shared helpers
def _send_raw(env: dict[str, str], topic: str, records: list[tuple[int, bytes | None, bytes | None]]) -> None:
    """Send (partition, key, value) records and wait for every acknowledgement."""
    cfg = load(LMFConfig, env)
    producer = kafka_util.producer(cfg.kafka, client_id="test-lmf-raw")
    try:
        futures = [producer.send(topic, key=k, value=v, partition=p) for p, k, v in records]
        producer.flush()
        for f in futures:
            f.get(timeout=10)
    finally:
        producer.close()


# ------------------------------------------------------------------- tests
def test_replayed_stream_is_applied_exactly_once(zerocf_env: dict[str, str], tmp_path: Path) -> None:
    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "1"}
    cfg = load(LMFConfig, env)
    ingest_synthetic(env, tmp_path, users=300, items=200, clicks=5000, seed=3)
    raw = read_topic(cfg.kafka, cfg.topics.events, 30)
    by_part: dict[int, list[Any]] = {}
    for rec in raw:
        by_part.setdefault(rec.partition, []).append(rec)
    biggest, *others = sorted(by_part, key=lambda p: -len(by_part[p]))
    # Duplicate runs as an ingest crash would leave them: a chunk of a partition re-appended (same ids, same
    # partition), once from the middle and once from the very start of another partition.
    # (Records are packs of events, as ingest writes them: the runs are whole records.)
    big, other = by_part[biggest], by_part[others[0]]
    chosen = big[len(big) // 4 : 3 * len(big) // 4] + other[: max(1, len(other) // 4)]
    replay = [(r.partition, r.key, r.value) for r in chosen]
    _send_raw(env, cfg.topics.events, replay)
    replayed = len(events_of(chosen))

    truth = truth_of(cfg.kafka, cfg.topics.events)
    assert truth.distinct == 5000 and truth.repeated == replayed > 100 and truth.invalid == 0

    stats = run_lmf(env, fresh_group("lmf-once"))
    assert stats["events"] == 5000 and stats["clicks"] == 5000
    assert stats["duplicates"] == replayed and stats["nan_batches"] == 0
    store = FactorStore.from_url(env["ZEROCF_REDIS_URL"], cfg.topic_prefix)
    assert store.live_generation() == 1
    assert_store_matches(store, truth, cfg.seen_cap)

    # A second run (new group: Kafka commits are no help) resumes from the offsets in Redis: nothing new.
    before = model_dump(store.r, cfg.topic_prefix)
    again = run_lmf(env, fresh_group("lmf-again"))
    assert again["events"] == 0 and again["batches"] == 0
    assert model_dump(store.r, cfg.topic_prefix) == before


def _event(prefix: str, offset: int, user: str, item: str) -> bytes:
    src = f"{prefix}.clicks:0:{offset}:0"
    return Event(src, "click", user, item, TS + offset, 1.0, None, None, f"{prefix}.clicks/0/{offset}").to_json()


def test_undecodable_records_are_skipped_logged_and_counted(
    zerocf_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "1", "ZEROCF_FACTORS": "16"}
    cfg = load(LMFConfig, env, {"lmf_group": fresh_group("lmf-bad")})
    p = cfg.topic_prefix
    kafka_util.ensure_topics(cfg.kafka, {cfg.topics.events: 2})
    valid = [_event(p, n, f"u{n % 3}", f"i{n % 4}") for n in range(12)]
    bad: list[bytes | None] = [
        b"\xff\xfe not utf-8",
        b"{not json",
        b"[1, 2]",
        None,  # tombstone
        json.dumps({"id": "x", "type": "click"}).encode(),  # missing keys
        valid[0].replace(b'"type":"click"', b'"type":"like"'),  # valid JSON, invalid event
    ]
    part0 = valid[:4] + bad[:3] + valid[4:8] + bad[3:4] + valid[8:]  # garbage between valid events
    part1 = bad[4:]  # a partition with nothing but garbage still advances its offset
    _send_raw(env, cfg.topics.events, [(0, b"k", v) for v in part0] + [(1, b"k", v) for v in part1])

    store = FactorStore.from_url(cfg.redis_url, p, seen_cap=cfg.seen_cap)
    worker = LMFWorker(cfg, store)
    with caplog.at_level(logging.ERROR, logger="workers.online.worker"):
        stats = worker.run(until_idle=True)
    assert stats.events == 12 and stats.clicks == 12 and stats.nan_batches == 0
    assert worker.metrics.invalid._value.get() == len(bad)
    skipped = [r.getMessage() for r in caplog.records if "undecodable event skipped" in r.getMessage()]
    assert len(skipped) == len(bad)
    bad_offsets = {(0, n) for n, v in enumerate(part0) if v in bad} | {(1, n) for n in range(len(part1))}
    assert {(int(m.split()[1]), int(m.split()[3].rstrip(":"))) for m in skipped} == bad_offsets
    g = store.live_generation()
    assert store.read_batch_state(g, [0, 1], [], []).offsets == {0: len(part0) - 1, 1: len(part1) - 1}
    assert store.user_update_counts(g) == {"u0": 4, "u1": 4, "u2": 4}
    assert store.item_counts(g) == {f"i{j}": 3.0 for j in range(4)}


def test_invalid_records_are_not_counted_as_duplicates(zerocf_env: dict[str, str]) -> None:
    """One partition: 3 valid events, 1 replayed event, 2 undecodable records -> 1 duplicate, 2 invalid."""
    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "1", "ZEROCF_FACTORS": "8"}
    cfg = load(LMFConfig, env, {"lmf_group": fresh_group("lmf-dups")})
    kafka_util.ensure_topics(cfg.kafka, {cfg.topics.events: 1})
    e = [_event(cfg.topic_prefix, n, "u", f"i{n}") for n in range(3)]
    _send_raw(env, cfg.topics.events, [(0, b"u", v) for v in (e[0], e[1], b"junk", e[1], None, e[2])])
    worker = LMFWorker(cfg, FactorStore.from_url(cfg.redis_url, cfg.topic_prefix))
    stats = worker.run(until_idle=True)
    assert stats.events == 3 and worker.metrics.invalid._value.get() == 2
    assert worker.store.user_update_counts(1) == {"u": 3}
    assert stats.duplicates == 1, f"duplicates={stats.duplicates}, expected 1 (the replayed event only)"
