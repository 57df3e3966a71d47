"""Integration tests of workers/store/factor_store.py on a real redis-server (the Lua scripts: struct, ZADD GT, UNLINK).

``redis_client`` (a flushed database) and ``redis_url`` come from the session fixtures in tests/conftest.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import redis

from workers.errors import GenerationError, ModelDiverged, StoreSchemaError
from workers.store import ApplyStatus, FactorStore

K = 64
NS = "it"


# ------------------------------------------------------------------- helpers
@pytest.fixture
def store(redis_client: redis.Redis) -> FactorStore:
    s = FactorStore(redis_client, NS, seen_cap=3, seen_ttl=500)
    s.ensure_model(K)
    return s


def _mat(n: int, k: int = K, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def _empty(k: int = K) -> np.ndarray:
    return np.zeros((0, k), np.float32)


def _dump(r: redis.Redis) -> dict[bytes, tuple[bytes, bool]]:
    """Every key's serialized value and whether it has a TTL: equal dumps = nothing written."""
    return {key: (r.dump(key), r.ttl(key) > 0) for key in sorted(r.keys("*"))}


# ------------------------------------------------------------------- apply_batch
def test_apply_batch_writes_everything_atomically(store: FactorStore) -> None:
    U, D, A = _mat(2, seed=1), _mat(3, seed=2), np.abs(_mat(2, seed=3))
    store.write_vectors(1, "item", ["i1"], _mat(1, seed=4))
    st = store.apply_batch(
        1,
        3,
        None,
        100,
        {"it.clicks/3": [7, 0]},
        ["u1", "u2"],
        U,
        ["i1", "i2", "i3"],
        D,
        counts={"i1": 2.0, "i2": 1.0},
        user_increments={"u1": 5, "u2": 1},
        seen=[("u1", f"i{t}", 10 + t) for t in range(5)],
        user_acc=A,
        item_acc_deltas=np.ones((3, K), np.float32),
    )
    assert st is ApplyStatus.APPLIED
    u, _ = store.get_vectors(1, "user", ["u1", "u2"])
    np.testing.assert_array_equal(u, U)
    items, found = store.get_vectors(1, "item", ["i1", "i2", "i3"])
    assert found.all()
    np.testing.assert_array_equal(items[0], _mat(1, seed=4)[0] + D[0])
    np.testing.assert_array_equal(items[1:], D[1:])  # absent item: zeros + delta
    np.testing.assert_array_equal(store.get_vectors(1, "user_acc", ["u2"])[0][0], A[1])
    np.testing.assert_array_equal(store.get_vectors(1, "item_acc", ["i3"])[0][0], np.ones(K, np.float32))
    assert store.item_counts(1) == {"i1": 2.0, "i2": 1.0}
    assert store.user_update_counts(1, ["u1", "u2"]) == {"u1": 5, "u2": 1}
    assert store.seen_items("u1") == ["i4", "i3", "i2"]
    assert 0 < store.r.ttl(store.keys.seen("u1")) <= 500
    bs = store.read_batch_state(1, [3], [], [])
    assert bs.offsets == {3: 100} and bs.watermarks == {3: {"it.clicks/3": [7, 0]}}


def test_fence_refuses_stale_batches_and_writes_nothing(store: FactorStore) -> None:
    args = (["u1"], _mat(1), ["i1"], _mat(1, seed=5))
    assert store.apply_batch(1, 0, None, 10, {}, *args, counts={"i1": 1.0})
    before = _dump(store.r)
    kw = dict(counts={"i1": 1.0}, user_increments={"u1": 1}, seen=[("u9", "i1", 5)])
    for expected in (None, 9, 11):  # absent expected while set, a step back, a step ahead
        assert store.apply_batch(1, 0, expected, 20, {"x": 1}, *args, **kw) is ApplyStatus.STALE
    assert _dump(store.r) == before
    assert store.apply_batch(1, 0, 10, 20, {}, *args) is ApplyStatus.APPLIED
    assert store.apply_batch(1, 1, None, 3, {}, *args) is ApplyStatus.APPLIED  # fences are per partition


def test_batch_for_a_retired_generation_writes_nothing(store: FactorStore) -> None:
    g = store.begin_generation()
    store.publish_generation(g, {}, {}, 0.0, 0, 0)
    before = _dump(store.r)
    st = store.apply_batch(1, 0, None, 5, {}, ["u"], _mat(1), ["i"], _mat(1), counts={"i": 1.0})
    assert st is ApplyStatus.NEW_GENERATION and not st
    assert _dump(store.r) == before


@pytest.mark.parametrize("k", [1, 33, 64, 100, 256])
def test_lua_delta_add_matches_numpy_float32_bits(redis_client: redis.Redis, k: int) -> None:
    s = FactorStore(redis_client, f"k{k}")
    s.ensure_model(k)
    rng = np.random.default_rng(k)
    base = (rng.standard_normal((300, k)) * 10.0 ** rng.integers(-6, 6, (300, 1))).astype(np.float32)
    delta = (rng.standard_normal((300, k)) * 10.0 ** rng.integers(-9, 3, (300, 1))).astype(np.float32)
    ids = [f"i{j}" for j in range(300)]
    s.write_vectors(1, "item", ids, base)
    assert s.apply_batch(1, 0, None, 0, {}, [], np.zeros((0, k), np.float32), ids, delta)
    got, _ = s.get_vectors(1, "item", ids)
    assert got.tobytes() == (base + delta).tobytes()


def test_overflow_and_bad_blob_refuse_the_whole_batch(store: FactorStore) -> None:
    big = np.full((1, K), 3e38, np.float32)
    store.write_vectors(1, "item", ["hot"], big)
    store.r.hset(store.keys.vectors(1, "item"), "short", b"\0" * 8)
    before = _dump(store.r)
    with pytest.raises(ModelDiverged, match="'hot' overflows float32"):
        store.apply_batch(1, 0, None, 1, {}, ["u"], _mat(1), ["ok", "hot"], np.vstack([_mat(1), big]))
    with pytest.raises(StoreSchemaError, match="'short' is not 256 bytes"):
        store.apply_batch(1, 0, None, 1, {}, ["u"], _mat(1), ["short"], _mat(1))
    assert _dump(store.r) == before


def test_large_batch_and_noscript_reload(store: FactorStore) -> None:
    store.r.script_flush()
    n_u, n_i = 700, 900  # > the Lua 256-field chunk and many EVALSHA args
    users, items = [f"u{j}" for j in range(n_u)], [f"i{j}" for j in range(n_i)]
    st = store.apply_batch(
        1,
        0,
        None,
        1,
        {},
        users,
        _mat(n_u),
        items,
        _mat(n_i, seed=9),
        counts={i: 1.0 for i in items},
        user_increments={u: 1 for u in users},
        seen=[(u, "i0", 1) for u in users],
    )
    assert st and store.item_count(1) == n_i and len(store.user_update_counts(1)) == n_u


def test_two_workers_add_deltas_concurrently_without_losing_any(redis_url: str, store: FactorStore) -> None:
    """Two clients/threads, one partition each, hammer the same items; sums are exact (dyadic deltas)."""
    items = [f"i{j}" for j in range(40)]
    init = np.round(_mat(40) * 8) / 8
    store.write_vectors(1, "item", items, init.astype(np.float32))
    n_batches = 60
    rng = np.random.default_rng(7)
    deltas = (rng.integers(-4, 5, (2, n_batches, 40, K)) / 8).astype(np.float32)
    errors: list[BaseException] = []

    def worker(part: int) -> None:
        try:
            s = FactorStore(redis.Redis.from_url(redis_url), NS)
            prev = None
            for b in range(n_batches):
                st = s.apply_batch(
                    1,
                    part,
                    prev,
                    b,
                    {},
                    [f"w{part}"],
                    _mat(1),
                    items,
                    deltas[part, b],
                    counts={i: 1.0 for i in items},
                    user_increments={f"w{part}": 1},
                )
                assert st is ApplyStatus.APPLIED
                prev = b
            s.r.close()
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got, _ = store.get_vectors(1, "item", items)
    np.testing.assert_array_equal(got, init + deltas.sum(axis=(0, 1), dtype=np.float64).astype(np.float32))
    assert set(store.item_counts(1).values()) == {2.0 * n_batches}
    assert store.user_update_counts(1, ["w0", "w1"]) == {"w0": n_batches, "w1": n_batches}
    assert store.read_batch_state(1, [0, 1], [], []).offsets == {0: n_batches - 1, 1: n_batches - 1}


# ------------------------------------------------------------------- generations
def test_crash_mid_build_keeps_old_generation_live(store: FactorStore) -> None:
    old = _mat(4, seed=1)
    store.write_vectors(1, "user", ["a", "b", "c", "d"], old)
    g = store.begin_generation()
    store.write_vectors(g, "user", ["a", "b"], _mat(2, seed=2))  # ... and the ALS worker dies here
    with pytest.raises(GenerationError, match="2 user rows, expected n_users=4"):
        store.publish_generation(g, {0: 9}, {}, 0.5, 4, 0)
    assert store.live_generation() == 1 and store.generation_meta(g).state == "building"
    live = store.live_generation()
    np.testing.assert_array_equal(store.get_vectors(live, "user", ["a", "b", "c", "d"])[0], old)
    assert store.read_batch_state(g, [0], [], []).offsets == {0: None}  # refused publish wrote nothing


def test_publish_flips_atomically_and_retires_previous(store: FactorStore) -> None:
    store.apply_batch(1, 0, None, 50, {}, ["a"], _mat(1), [], _empty())
    g = store.begin_generation()
    new_u, new_i = _mat(3, seed=5), _mat(2, seed=6)
    store.write_vectors(g, "user", ["a", "b", "c"], new_u)
    store.write_vectors(g, "item", ["x", "y"], new_i)
    store.write_counts(g, {"x": 4.0})
    store.publish_generation(g, {0: 40, 1: 7}, {0: {"it.clicks/0": [3, 1]}}, -1.25, 3, 2)
    m, gm, old = store.meta(), store.generation_meta(g), store.generation_meta(1)
    assert (m.live_gen, gm.state, gm.bias, gm.n_users, gm.n_items) == (g, "complete", -1.25, 3, 2)
    assert gm.offsets == {0: 40, 1: 7} and gm.watermarks == {0: {"it.clicks/0": [3, 1]}}
    assert old.state == "retired" and old.retired_at is not None
    bs = store.read_batch_state(g, [0, 1, 2], ["b"], ["y"])
    assert bs.live_gen == g and bs.offsets == {0: 40, 1: 7, 2: None}
    assert bs.watermarks == {0: {"it.clicks/0": [3, 1]}}
    np.testing.assert_array_equal(bs.user_vecs[0], new_u[1])
    assert store.top_items(store.live_generation(), 1) == [("x", 4.0)]
    # an LMF worker resumes in g behind the snapshot fence; the old generation refuses its writes
    assert store.apply_batch(g, 0, 40, 41, {}, ["a"], _mat(1), ["x"], _mat(1))
    assert store.apply_batch(1, 0, 50, 51, {}, ["a"], _mat(1), [], _empty()) is ApplyStatus.NEW_GENERATION
    with pytest.raises(GenerationError, match="state is complete, not building"):
        store.publish_generation(g, {}, {}, 0.0, 3, 3)
    with pytest.raises(ModelDiverged):
        store.publish_generation(store.begin_generation(), {}, {}, float("nan"), 0, 0)


def test_gc_drops_old_retired_and_abandoned_only(redis_client: redis.Redis) -> None:
    now = [1000.0]
    s = FactorStore(redis_client, NS, clock=lambda: now[0])
    s.ensure_model(K)
    s.write_vectors(1, "item", ["i"], _mat(1))
    g2 = s.begin_generation()  # t=1000, will be published at 1100 (retires 1)
    now[0] = 1050.0
    abandoned = s.begin_generation()  # building since 1050, never published
    s.write_vectors(abandoned, "user", ["u"], _mat(1))
    now[0] = 1100.0
    s.publish_generation(g2, {}, {}, 0.0, 0, 0)
    now[0] = 1200.0
    fresh = s.begin_generation()  # building since 1200
    assert s.gc_generations(grace_seconds=120, now=1210.0) == [abandoned]  # 1 retired only 110 s ago
    assert s.gc_generations(grace_seconds=120, now=1230.0) == [1]
    assert s.generations() == [g2, fresh]
    leftovers = [k for k in redis_client.keys("*") if b":g:1:" in k or f":g:{abandoned}:".encode() in k]
    assert leftovers == []
    with pytest.raises(GenerationError, match="is live"):
        s.drop_generation(g2)
    s.drop_generation(fresh)
    assert s.generations() == [g2] and s.gc_generations(0, now=10**9) == []
