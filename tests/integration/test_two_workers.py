"""Two LMF workers in one consumer group, updating the same items concurrently (real broker, real Redis).

The store-level property (two writers on disjoint partitions adding float32 deltas to the same items, final
= initial + sum of deltas, exactly) is covered by tests/integration/test_store_redis.py
(``test_two_workers_add_deltas_concurrently_without_losing_any``). Here the same property is checked at the
worker level: two :class:`workers.online.worker.LMFWorker` objects run in threads of this process, each with
its own consumer in the same group (the broker splits the partitions between them) and its own Redis
connection; each store's ``apply_batch`` is wrapped to record the item deltas of every batch Redis applied.
Every user's events live on one partition (keyed by user), every item is clicked on every partition, so each
worker's copy of a row goes stale whenever the other writes it: the versioned write's conflict path (the delta
added in Redis instead of the worker's absolute row) runs alongside its fast path.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import numpy as np
import pytest

from stream import kafka_util
from stream.config import load
from stream.events import Event
from tests.helpers import wait_until
from workers.config import LMFConfig
from workers.online.worker import LMFWorker
from workers.store import ApplyStatus, BatchWrite, FactorStore

K = 16
N_EVENTS = 12_000
N_USERS = 400
ITEMS = [f"i{j}" for j in range(40)]
PARTITIONS = 6
TS = 1_700_000_000_000


class _Recorder:
    """Wraps ``store.apply_batch``: keeps (item ids, item deltas) of every batch that Redis applied."""

    def __init__(self, store: FactorStore) -> None:
        self.batches: list[tuple[list[str], np.ndarray]] = []
        self._orig = store.apply_batch
        store.apply_batch = self.apply_batch  # type: ignore[method-assign]

    def apply_batch(self, g: int, b: BatchWrite) -> ApplyStatus:
        status = self._orig(g, b)
        if status is ApplyStatus.APPLIED and b.item_deltas is not None:
            self.batches.append((list(b.item_ids), np.array(b.item_deltas)))
        return status


def _stream(prefix: str) -> list[tuple[str, bytes]]:
    """(user, event JSON) in ingest's id format; each user's source partition is fixed, offsets increase."""
    rng = np.random.default_rng(5)
    users = rng.integers(0, N_USERS, N_EVENTS)
    items = rng.integers(0, len(ITEMS), N_EVENTS)
    next_offset = [0] * PARTITIONS
    out = []
    for n, (u, i) in enumerate(zip(users.tolist(), items.tolist())):
        src = u % PARTITIONS
        off = next_offset[src]
        next_offset[src] += 1
        ev = Event(
            f"{prefix}.clicks:{src}:{off}:0",
            "click",
            f"u{u}",
            ITEMS[i],
            TS + n,
            1.0,
            None,
            None,
            f"{prefix}.clicks/{src}/{off}",
        )
        out.append((ev.user, ev.to_json()))
    return out


@pytest.mark.redis_cluster  # also on a three-primary Redis Cluster
def test_two_workers_share_items_and_every_delta_lands(zerocf_env: dict[str, str]) -> None:
    cfg = load(
        LMFConfig, {**zerocf_env, "ZEROCF_FACTORS": str(K)}, {"lmf_group": f"two-{uuid.uuid4().hex[:8]}", "batch": 500}
    )
    kafka_util.ensure_topics(cfg.kafka, {cfg.topics.events: PARTITIONS})
    seed_store = FactorStore.from_url(cfg.redis_url, cfg.topic_prefix)
    seed_store.ensure_model(K)
    init = (np.random.default_rng(1).standard_normal((len(ITEMS), K + 1)) * 0.1).astype(np.float32)
    seed_store.write_vectors(1, "item", ITEMS, init)  # a live generation with existing item rows (+ biases)

    workers, recorders, threads, errors = [], [], [], []
    for n in range(2):
        store = FactorStore.from_url(cfg.redis_url, cfg.topic_prefix, seen_cap=cfg.seen_cap)
        recorders.append(_Recorder(store))
        w = LMFWorker(cfg, store)
        workers.append(w)

        def target(w: LMFWorker = w) -> None:
            try:
                w.run(until_idle=False)
            except BaseException as exc:  # surfaced in the test thread
                errors.append(exc)

        threads.append(threading.Thread(target=target, name=f"lmf-{n}", daemon=True))
    try:
        for t in threads:
            t.start()

        def split() -> bool:
            assigned = [set(w.health()[1]["assigned"]) for w in workers]
            return (
                all(assigned)
                and not (assigned[0] & assigned[1])
                and assigned[0] | assigned[1] == set(range(PARTITIONS))
            )

        wait_until("both workers to own a share of the partitions", split, 45)
        owned = [sorted(w.health()[1]["assigned"]) for w in workers]

        producer = kafka_util.producer(cfg.kafka, client_id="test-two-workers")
        try:
            futures = [producer.send(cfg.topics.events, key=u.encode(), value=v) for u, v in _stream(cfg.topic_prefix)]
            producer.flush()
            metas = [f.get(timeout=10) for f in futures]
        finally:
            producer.close()
        last = {}
        for m in metas:
            last[m.partition] = max(m.offset, last.get(m.partition, -1))
        wait_until(
            "the workers to apply every partition up to its last offset",
            lambda: seed_store.read_batch_state(1, sorted(last), [], []).offsets == last or bool(errors),
            60,
        )
    finally:
        for w in workers:
            w.stop.set("test done")
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    events = [Event.from_json(v) for _, v in _stream(cfg.topic_prefix)]
    by_partition = {m.partition for m in metas}
    # both workers did real work on their own partitions, and together applied every event exactly once
    assert all(w.stats.events > 0 for w in workers), [w.stats.summary() for w in workers]
    assert sum(w.stats.events for w in workers) == N_EVENTS
    assert owned[0] and owned[1] and by_partition <= set(owned[0]) | set(owned[1])
    store = seed_store
    assert store.user_update_counts(1) == dict(Counter(e.user for e in events))
    assert store.item_counts(1) == {i: float(c) for i, c in Counter(e.item for e in events).items()}
    # every item was written by both workers; final = initial + the sum of every applied delta
    touched = [set().union(*(ids for ids, _ in r.batches)) for r in recorders]
    assert set(ITEMS) <= touched[0] and set(ITEMS) <= touched[1]
    total = np.zeros((len(ITEMS), K + 1), np.float64)
    row = {i: n for n, i in enumerate(ITEMS)}
    for r in recorders:
        for ids, deltas in r.batches:
            for i, d in zip(ids, deltas):
                if i in row:
                    total[row[i]] += d
    final, found = store.get_vectors(1, "item", ITEMS)
    assert found.all() and np.isfinite(final).all()
    assert np.abs(total).max() > 0.01
    # float32 adds in Redis' order vs a float64 sum here: equal up to rounding, far below one lost batch
    np.testing.assert_allclose(final, init + total, rtol=0, atol=5e-6)
    # ... and the check can see a lost batch: every recorded batch moved some item by far more than atol
    assert min(float(np.abs(d).max()) for r in recorders for _, d in r.batches) > 1e-4
    # both paths of the versioned write ran: rows SET from a worker's own copy (versions unchanged since it
    # read them) and rows the other worker wrote since, whose delta Redis added (the conflict path)
    written = sum(len(ids) for r in recorders for ids, _ in r.batches)
    added = sum(w.store.rows_added for w in workers)
    assert 0 < added < written, (added, written)
    # the global bias row (reserved id "") is shared the same way: its deltas from both workers add up
    g_total = sum(float(d[ids.index("")][-1]) for r in recorders for ids, d in r.batches if "" in ids)
    assert abs(store.global_bias(1) - g_total) < 1e-4 and abs(g_total) > 0.01
