"""``zerocf forget-user`` end to end on the real broker and Redis: ingest -> LMF -> ALS, then replays.

After the erasure and a re-solve nothing in Redis (key names, hash fields and values, sorted-set and set
members, strings) and nothing in the ALS checkpoint directory names the user; the user gets the cold-start
fallback and another user keeps everything. Re-producing the user's old clicks (``ts`` before the erasure)
changes nothing; a new click (``ts`` after it) starts a fresh user.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from stream import kafka_util
from stream.client.producer import EventProducer
from stream.config import StreamConfig, load
from stream.erasure import erased_digest
from stream.ingest import Ingest
from stream.kafka_util import read_topic
from tests.helpers import TS, event_dicts, finish_zerocf, fresh_group
from workers.batch.worker import ALSWorker
from workers.config import ALSConfig, LMFConfig
from workers.online.worker import LMFWorker
from workers.serving.lookup import Recommender
from workers.store import FactorStore

A, B = "alice-erase-me", "bob-keep-me"  # distinctive ids: a substring scan for A is meaningful
ALS_FLAGS = ("--factors", "8", "--iterations", "4", "--reg", "1")
ALS_SETTINGS = {"factors": 8, "als_iterations": 4, "als_reg": 1.0}  # the same, as ALSConfig fields
# lmf --until-idle exits only once every partition is applied to its end (the offsets in Redis) and then idle
# this long: a short idle changes when the run ends, never what it has done by then
LMF_IDLE_S = "0.2"


def _clicks(seed: int = 5) -> list[tuple[str, str, int]]:
    """(user, item, ts): A with 13 clicks, B with 12, 30 other users with 15 each, old timestamps."""
    rng = random.Random(seed)
    rows = [(A, f"i{j}", TS + j) for j in range(12)] + [(A, "solo", TS + 50)]  # "solo": clicked by A alone
    rows += [(B, f"i{j + 6}", TS + 100 + j) for j in range(12)]
    rows += [(f"u{u}", f"i{rng.randrange(40)}", TS + 1000 + 20 * u + n) for u in range(30) for n in range(15)]
    return rows


def _send(env: dict[str, str], rows: list[tuple[str, str, int]]) -> None:
    with EventProducer(bootstrap_servers=env["ZEROCF_KAFKA_BOOTSTRAP"], topic_prefix=env["ZEROCF_TOPIC_PREFIX"]) as p:
        for user, item, ts in rows:
            p.send_click(user, item, ts)


def _ingest(env: dict[str, str]) -> None:
    """``zerocf ingest --until-idle``'s worker class in this process (saves a process start per call)."""
    stats = Ingest(load(StreamConfig, env)).run(until_idle=True)
    assert stats.clean_exit and not stats.unfinished, stats.summary()


def _lmf(env: dict[str, str], group: str) -> None:
    """``zerocf lmf --until-idle --group GROUP``'s worker class in this process."""
    cfg = load(LMFConfig, {**env, "ZEROCF_IDLE_SECONDS": LMF_IDLE_S}, {"lmf_group": group})
    worker = LMFWorker(cfg, FactorStore.from_url(cfg.redis_url, cfg.topic_prefix))
    worker.run(until_idle=True)
    assert worker.exit_code == 0


def _als(env: dict[str, str], ckpt: Path) -> None:
    """``zerocf als --once ALS_FLAGS --checkpoint-dir CKPT``'s worker class in this process (the re-solve right
    after the erasure runs the command itself)."""
    cfg = load(ALSConfig, env, {**ALS_SETTINGS, "checkpoint_dir": str(ckpt)})
    res = ALSWorker(cfg, FactorStore.connect(cfg.redis_url, cfg.topic_prefix)).run_once()
    assert res.outcome == "published", res


def _pipeline(env: dict[str, str], group: str, ckpt: Path) -> None:
    """ingest --until-idle, lmf --until-idle, als --once (their worker classes): what a deployment runs."""
    _ingest(env)
    _lmf(env, group)
    _als(env, ckpt)


def _redis_mentions(r: redis.Redis, needle: bytes) -> list[str]:
    """Every place in Redis whose name or content contains ``needle``: key names, hash fields and values,
    sorted-set, set and list members, string values."""
    found = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()
        if needle in key:
            found.append(f"key {key!r}")
        parts: list[bytes] = []
        if kind == "hash":
            for f, v in r.hscan_iter(key, count=1000):
                parts += [f, v]
        elif kind == "zset":
            parts = [m for m, _ in r.zscan_iter(key, count=1000)]
        elif kind == "set":
            parts = list(r.sscan_iter(key, count=1000))
        elif kind == "list":
            parts = list(r.lrange(key, 0, -1))
        elif kind == "string":
            parts = [r.get(key) or b""]
        found += [f"{kind} {key!r} holds {p[:80]!r}" for p in parts if needle in p]
    return found


def _checkpoint_mentions(ckpt: Path, needle: bytes) -> list[str]:
    """Files under the ALS checkpoint directory whose bytes contain ``needle`` (ids, metadata, matrices)."""
    return [str(p) for p in ckpt.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _ckpt(ckpt: Path) -> tuple[list[str], dict[str, Any]]:
    name = (ckpt / "CURRENT").read_text().strip()
    ids = json.loads((ckpt / name / "ids.json").read_text())
    return ids["users"], json.loads((ckpt / name / "meta.json").read_text())["metadata"]


def _assert_forgotten(store: FactorStore, ckpt: Path, erased_at: int) -> None:
    r, g = store.r, store.live_generation()
    assert _redis_mentions(r, A.encode()) == []
    assert _checkpoint_mentions(ckpt, A.encode()) == []
    users, meta = _ckpt(ckpt)
    assert A not in users and meta["erased"] == {erased_digest(A): erased_at}
    assert store.erased_users() == {erased_digest(A): erased_at}
    for gen in store.generations():  # the live one and the retired ones still kept
        assert not store.get_vectors(gen, "user", [A])[1].any()
        assert store.user_update_counts(gen, [A]) == {A: 0}
    assert store.seen_items(A) == []
    rec = Recommender(store, refresh_s=0)
    got, stranger = rec.recommend(A, k=5), rec.recommend("never-seen-user", k=5)
    assert got.fallback and got.items == stranger.items and got.generation == g


def test_forget_user_leaves_no_trace_and_replays_do_not_bring_the_user_back(
    zerocf_env: dict[str, str], tmp_path: Path, prestart: Callable[..., subprocess.Popen[bytes]]
) -> None:
    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "1", "ZEROCF_EVENTS_PARTITIONS": "3", "ZEROCF_FACTORS": "8"}
    cfg = load(StreamConfig, env)
    ckpt, group = tmp_path / "ckpt", fresh_group("erase")
    # the two commands run below, started now (their imports overlap the first pipeline); each runs its command
    # only when finish_zerocf releases it
    out_, err_ = subprocess.PIPE, subprocess.PIPE
    forget = prestart(env, err_, "forget-user", A, "--json", stdout=out_)
    als_cli = prestart(env, err_, "als", "--once", *ALS_FLAGS, "--checkpoint-dir", str(ckpt), stdout=out_)
    rows = _clicks()
    _send(env, rows)
    _pipeline(env, group, ckpt)
    store = FactorStore.from_url(env["ZEROCF_REDIS_URL"], cfg.topic_prefix)
    assert store.live_generation() == 2 and store.get_vectors(2, "user", [A, B])[1].all()
    assert _redis_mentions(store.r, A.encode()) and A in _ckpt(ckpt)[0]  # the scan does find A when present
    b_seen = sorted(store.seen_items(B))
    assert b_seen == sorted({i for u, i, _ in rows if u == B})

    # forget A: one erasure record, keyed by A, on <p>.erasures
    before = int(time.time() * 1000)
    out = finish_zerocf(forget).stdout.strip().splitlines()  # `zerocf forget-user A --json`
    sent = [json.loads(line) for line in out]
    assert [(s["user_id"], s["topic"]) for s in sent] == [(A, cfg.topics.erasures)]
    erased_at = sent[0]["ts"]
    assert before <= erased_at <= int(time.time() * 1000)
    _ingest(env)
    erase = [e for e in event_dicts(cfg) if e["type"] == "erase"]
    assert [(e["user"], e["item"], e["ts"], e["weight"]) for e in erase] == [(A, "", erased_at, 0.0)]
    _lmf(env, group)  # the live generation (2) and the retired one (1) lose A at once
    assert not store.get_vectors(2, "user", [A])[1].any() and not store.get_vectors(1, "user", [A])[1].any()
    assert store.seen_items(A) == [] and store.erased_users() == {erased_digest(A): erased_at}
    finish_zerocf(als_cli)  # `zerocf als --once ALS_FLAGS --checkpoint-dir CKPT`
    assert store.live_generation() == 3
    _assert_forgotten(store, ckpt, erased_at)
    assert sorted(store.seen_items(B)) == b_seen and store.get_vectors(3, "user", [B])[1].all()
    rec_b = Recommender(store, refresh_s=0).recommend(B, k=5)
    assert not rec_b.fallback and not set(rec_b.items) & set(b_seen)
    # aggregates: the ALS generation's all-time counts are the snapshot's (A's clicks gone), the decayed
    # popularity still sums A's clicks anonymously
    counts, popularity = store.item_counts(3), store.item_popularity(3)
    assert counts.get("i0", 0.0) == sum(1 for u, i, _ in rows if i == "i0" and u != A)
    assert counts.get("solo", 0.0) == 0.0 and popularity["solo"] > 0

    # a replay of A's old clicks (ts before the erasure): ignored by the LMF and the snapshot
    _send(env, [r for r in rows if r[0] == A])
    _pipeline(env, group, ckpt)
    assert store.live_generation() == 4
    _assert_forgotten(store, ckpt, erased_at)

    # A comes back: a click after the erasure starts a fresh user
    _send(env, [(A, "i30", erased_at + 1000)])
    _pipeline(env, group, ckpt)
    g = store.live_generation()
    assert store.seen_items(A) == ["i30"] and store.get_vectors(g, "user", [A])[1].all()
    users, meta = _ckpt(ckpt)
    assert A in users and meta["erased"] == {erased_digest(A): erased_at}
    assert not Recommender(store, refresh_s=0).recommend(A, k=5).fallback


def test_invalid_erasure_records_go_to_the_dead_letter_topic(zerocf_env: dict[str, str]) -> None:
    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "1", "ZEROCF_EVENTS_PARTITIONS": "2"}
    cfg = load(StreamConfig, env)
    kafka_util.ensure_topics(cfg.kafka, {t: 2 for t in cfg.topics.all()})
    bad = [b'{"user_id": "u1"}', b'{"user_id": "", "ts": 1700000000000}', b"not json", b'{"ts": 1700000000000}']
    good = b'{"user_id": "u2", "ts": 1700000000000}'
    producer = kafka_util.producer(cfg.kafka, client_id="test-erasure-dlq")
    try:
        futures = [producer.send(cfg.topics.erasures, key=b"k", value=v) for v in [*bad, good]]
        producer.flush()
        for f in futures:
            f.get(timeout=10)
    finally:
        producer.close()
    _ingest(env)
    dead = [json.loads(r.value) for r in read_topic(cfg.kafka, cfg.topics.dlq, timeout=20)]
    assert sorted(d["topic"] for d in dead) == [cfg.topics.erasures] * len(bad)
    reasons = sorted(d["reason"].split(" ")[0] for d in dead)
    assert reasons == ["message", "ts", "user_id", "user_id"], reasons
    events = event_dicts(cfg)
    assert [(e["type"], e["user"], e["ts"]) for e in events] == [("erase", "u2", 1_700_000_000_000)]
    assert np.all([e["id"].startswith(cfg.topics.erasures + ":") for e in events])
