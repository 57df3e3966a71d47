"""Integration tests of workers/store/ on a real redis-server: the Lua scripts (struct float32 adds, ZADD GT,
ZUNIONSTORE, UNLINK) of schema 2.

A factor row is ``k`` latent values then the bias (width ``k + 1``), accumulators are 2 float32 per row and the
global bias is the bias of the item row ``GLOBAL_ROW``. ``redis_client`` (a flushed database) and
``redis_url`` come from the session fixtures in tests/conftest.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import redis

from tests.helpers import wait_until
from workers.errors import GenerationError, ModelDiverged, StoreSchemaError
from workers.store import (
    GLOBAL_ROW,
    SEEN_EXPIRE,
    SEEN_PRUNE,
    ApplyStatus,
    BatchWrite,
    FactorStore,
    Fence,
    ModelLost,
)

K = 64
W = K + 1
NS = "it"
TTL = 500  # seen_ttl of the fixture store, seconds
T0 = 1_700_000_000_000  # an event time, ms
HL = 3_600_000  # a popularity half-life, ms

pytestmark = pytest.mark.redis_cluster  # every test also runs on a three-primary Redis Cluster


# ------------------------------------------------------------------- helpers
@pytest.fixture
def store(redis_client: redis.Redis) -> FactorStore:
    s = FactorStore(redis_client, NS, seen_cap=3, seen_ttl=TTL)
    s.ensure_model(K)
    return s


def _mat(n: int, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, w)).astype(np.float32)


def _acc(n: int, seed: int = 0) -> np.ndarray:
    return np.abs(_mat(n, 2, seed))


def _dump(r: redis.Redis) -> dict[bytes, tuple[bytes, bool]]:
    """Every key's serialized value and whether it has a TTL: equal dumps = nothing written."""
    return {key: (r.dump(key), r.ttl(key) > 0) for key in sorted(r.keys("*"))}


def _batch(part: int, expected: int | None, new: int, **kw: Any) -> BatchWrite:
    return BatchWrite(part, expected, new, kw.pop("watermarks", {}), **kw)


def _full(part: int, expected: int | None, new: int, seed: int = 0, ref: int = T0) -> BatchWrite:
    """A batch that writes into every structure (to show that a refusal writes none of them)."""
    return _batch(part, expected, new, watermarks={"x": 1}, user_ids=["u1"], user_rows=_mat(1, seed=seed),
                  item_ids=["i1", GLOBAL_ROW], item_deltas=_mat(2, seed=seed + 1), user_acc=_acc(1, seed),
                  item_acc_deltas=_acc(2, seed + 1), counts={"i1": 1.0}, popularity={"i1": 0.5}, pop_ref_ms=ref,
                  user_increments={"u1": 1}, seen=[("u9", "i1", T0)])  # fmt: skip


# ------------------------------------------------------------------- apply_batch
def test_apply_batch_writes_everything_atomically(store: FactorStore) -> None:
    base_i, base_acc = _mat(1, seed=4), np.array([[1.0, 2.0]], np.float32)
    store.write_vectors(1, "item", ["i1"], base_i)
    store.write_vectors(1, "item_acc", ["i1"], base_acc)
    store.write_vectors(1, "user", ["u1"], _mat(1, seed=8))  # overwritten: user rows are SET
    store.write_vectors(1, "user_acc", ["u1"], np.full((1, 2), 9.0, np.float32))
    U, D, A = _mat(2, seed=1), _mat(3, seed=2), _acc(2, seed=3)
    DA = np.array([[0.5, 0.25], [1.0, 2.0], [4.0, 8.0]], np.float32)
    st = store.apply_batch(
        1,
        _batch(
            3,
            None,
            100,
            watermarks={"it.clicks/3": [7, 0]},
            user_ids=["u1", "u2"],
            user_rows=U,
            item_ids=["i1", "i2", "i3"],
            item_deltas=D,
            user_acc=A,
            item_acc_deltas=DA,
            counts={"i1": 2.0, "i2": 1.0},
            popularity={"i1": 0.75, "i3": 1.5},
            pop_ref_ms=T0,
            user_increments={"u1": 5, "u2": 1},
            seen=[("u1", f"i{t}", T0 + t) for t in range(5)],
        ),
    )
    assert st is ApplyStatus.APPLIED
    u, _ = store.get_vectors(1, "user", ["u1", "u2"])
    np.testing.assert_array_equal(u, U)
    items, found = store.get_vectors(1, "item", ["i1", "i2", "i3"])
    assert found.all() and items.shape == (3, W)
    np.testing.assert_array_equal(items[0], base_i[0] + D[0])
    np.testing.assert_array_equal(items[1:], D[1:])  # absent item: zeros + delta
    ua, _ = store.get_vectors(1, "user_acc", ["u1", "u2"])
    np.testing.assert_array_equal(ua, A)  # SET, the stored 9s are gone
    ia, _ = store.get_vectors(1, "item_acc", ["i1", "i2", "i3"])
    np.testing.assert_array_equal(ia, np.vstack([base_acc + DA[0], DA[1:]]))  # ADDED, width 2
    assert store.r.hstrlen(store.keys.vectors(1, "item_acc"), "i3") == 8
    assert store.item_counts(1) == {"i1": 2.0, "i2": 1.0}
    assert store.item_popularity(1) == {"i1": 0.75, "i3": 1.5}
    assert store.generation_meta(1).pop_ref_ms == T0  # the first popularity sets the reference
    assert store.user_update_counts(1, ["u1", "u2"]) == {"u1": 5, "u2": 1}
    assert store.seen_items("u1") == ["i4", "i3", "i2"]
    assert 0 < store.r.ttl(store.keys.seen("u1")) <= TTL
    bs = store.read_batch_state(1, [3], [], [])
    assert bs.offsets == {3: 100} and bs.watermarks == {3: {"it.clicks/3": [7, 0]}}
    # the next batch of the partition: counts, popularity and increments accumulate
    again = _batch(3, 100, 101, counts={"i1": 1.0}, popularity={"i1": 0.25}, pop_ref_ms=T0, user_increments={"u2": 2})
    assert store.apply_batch(1, again) is ApplyStatus.APPLIED
    assert store.item_counts(1) == {"i1": 3.0, "i2": 1.0} and store.item_popularity(1)["i1"] == 1.0
    assert store.user_update_counts(1, ["u2"]) == {"u2": 3}
    assert store.popular_items(1, 1) == [("i3", 1.5)] and store.top_items(1, 1) == [("i1", 3.0)]


def test_fence_refuses_stale_batches_and_writes_nothing(store: FactorStore) -> None:
    assert store.apply_batch(1, _full(0, None, 10))
    before = _dump(store.r)
    for expected in (None, 9, 11):  # absent expected while set, a step back, a step ahead
        assert store.apply_batch(1, _full(0, expected, 20, seed=5)) is ApplyStatus.STALE
    assert _dump(store.r) == before
    assert store.apply_batch(1, _full(0, 10, 20)) is ApplyStatus.APPLIED
    assert store.apply_batch(1, _full(1, None, 3)) is ApplyStatus.APPLIED  # fences are per partition
    assert store.read_batch_state(1, [0, 1], [], []).offsets == {0: 20, 1: 3}


def test_one_batch_fences_and_advances_several_partitions_or_writes_nothing(store: FactorStore) -> None:
    def multi(b: BatchWrite, *more: Fence) -> BatchWrite:
        return replace(b, more=more)

    assert store.apply_batch(1, multi(_full(0, None, 10), Fence(1, None, 4, {"s/1": [4, 0]}), Fence(2, None, 7, {})))
    state = store.read_batch_state(1, [0, 1, 2], [], [])
    assert state.offsets == {0: 10, 1: 4, 2: 7} and state.watermarks[1] == {"s/1": [4, 0]}
    before = _dump(store.r)
    # any one partition's fence failing refuses the whole batch, whichever position it has
    for bad in ((Fence(1, 3, 9, {}), Fence(2, 7, 9, {})), (Fence(1, 4, 9, {}), Fence(2, None, 9, {}))):
        assert store.apply_batch(1, multi(_full(0, 10, 20, seed=5), *bad)) is ApplyStatus.STALE
    assert _dump(store.r) == before
    assert store.apply_batch(1, multi(_full(0, 10, 20), Fence(2, 7, 8, {})))
    assert store.read_batch_state(1, [0, 1, 2], [], []).offsets == {0: 20, 1: 4, 2: 8}


def test_batch_for_a_retired_generation_writes_nothing(store: FactorStore) -> None:
    g = store.begin_generation()
    store.publish_generation(g, {}, {}, 0.0, 0, 0)
    before = _dump(store.r)
    st = store.apply_batch(1, _full(0, None, 5))
    assert st is ApplyStatus.NEW_GENERATION and not st
    assert _dump(store.r) == before


def test_popularity_reference_is_enforced(store: FactorStore) -> None:
    assert store.apply_batch(1, _batch(0, None, 1, popularity={"x": 1.0}, pop_ref_ms=T0))
    assert store.generation_meta(1).pop_ref_ms == T0
    before = _dump(store.r)
    moved = _full(0, 1, 2, ref=T0 + 5)  # another reference: nothing of the batch may land
    st = store.apply_batch(1, moved)
    assert st is ApplyStatus.POPULARITY_MOVED and not st
    assert _dump(store.r) == before
    # a batch without popularity does not care about the reference
    assert store.apply_batch(1, _batch(0, 1, 2, counts={"x": 1.0}, pop_ref_ms=T0 + 5))
    assert store.item_popularity(1) == {"x": 1.0} and store.generation_meta(1).pop_ref_ms == T0
    # another worker moves the reference forward by one half-life: old scores halve, old-reference batches bounce
    assert store.rescale_popularity(1, T0, T0 + HL, HL)
    assert store.item_popularity(1) == {"x": 0.5} and store.generation_meta(1).pop_ref_ms == T0 + HL
    assert store.apply_batch(1, _batch(0, 2, 3, popularity={"x": 1.0}, pop_ref_ms=T0)) is ApplyStatus.POPULARITY_MOVED
    assert store.apply_batch(1, _batch(0, 2, 3, popularity={"x": 1.0, "y": 2.0}, pop_ref_ms=T0 + HL))
    assert store.item_popularity(1) == {"x": 1.5, "y": 2.0}
    assert not store.rescale_popularity(1, T0, T0 + 2 * HL, HL)  # stale reference: refused, unchanged
    assert store.item_popularity(1) == {"x": 1.5, "y": 2.0}


def test_an_als_popularity_sets_the_reference_batches_must_use(store: FactorStore) -> None:
    g = store.begin_generation()
    store.write_popularity(g, {"a": 4.0}, ref_ms=T0 - 10)
    store.publish_generation(g, {0: 7}, {}, 0.0, 0, 0)
    assert store.apply_batch(g, _batch(0, 7, 8, popularity={"a": 1.0}, pop_ref_ms=T0)) is ApplyStatus.POPULARITY_MOVED
    assert store.apply_batch(g, _batch(0, 7, 8, popularity={"a": 1.0}, pop_ref_ms=T0 - 10))
    assert store.popular_items(g, 5) == [("a", 5.0)]


def test_fence_and_generation_are_checked_before_the_popularity_reference(store: FactorStore) -> None:
    assert store.apply_batch(1, _batch(0, None, 1, popularity={"x": 1.0}, pop_ref_ms=T0))
    assert store.apply_batch(1, _batch(0, 0, 2, popularity={"x": 1.0}, pop_ref_ms=T0 + 1)) is ApplyStatus.STALE
    g = store.begin_generation()
    store.publish_generation(g, {}, {}, 0.0, 0, 0)
    assert store.apply_batch(1, _batch(0, 1, 2, popularity={"x": 1.0}, pop_ref_ms=T0 + 1)) is ApplyStatus.NEW_GENERATION


def test_concurrent_rescales_from_one_reference_apply_once(redis_url: str, store: FactorStore) -> None:
    store.write_popularity(1, {"a": 8.0, "b": 1.0}, ref_ms=T0)
    n = 6
    start, results = threading.Barrier(n), [False] * n

    def rescale(j: int) -> None:
        s = FactorStore.from_url(redis_url, NS)
        start.wait(timeout=10)
        results[j] = s.rescale_popularity(1, T0, T0 + 3 * HL, HL)
        s.r.close()

    threads = [threading.Thread(target=rescale, args=(j,)) for j in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sum(results) == 1, results
    assert store.item_popularity(1) == {"a": 1.0, "b": 0.125} and store.generation_meta(1).pop_ref_ms == T0 + 3 * HL


@pytest.mark.parametrize("k", [1, 33, 63, 64, 100, 256])  # widths 2..257, across the Lua 64-float chunks
def test_lua_delta_add_matches_numpy_float32_bits(redis_client: redis.Redis, k: int) -> None:
    s = FactorStore(redis_client, f"k{k}")
    s.ensure_model(k)
    w, n = k + 1, 300
    rng = np.random.default_rng(k)
    base = (rng.standard_normal((n, w)) * 10.0 ** rng.integers(-6, 6, (n, 1))).astype(np.float32)
    delta = (rng.standard_normal((n, w)) * 10.0 ** rng.integers(-9, 3, (n, 1))).astype(np.float32)
    base[0, 0], delta[0, 0] = np.float32(3e-39), np.float32(-1e-45)  # subnormals add exactly too
    base[1, -1], delta[1, -1] = np.float32(1.0), np.float32(2.0**-24)  # a tie: rounds to even, like numpy
    base_acc, delta_acc = np.abs(base[:, :2]), np.abs(delta[:, :2])
    ids = [f"i{j}" for j in range(n - 1)] + [GLOBAL_ROW]  # the global row is added like any other
    fresh = [f"new{j}" for j in range(5)]
    s.write_vectors(1, "item", ids, base)
    s.write_vectors(1, "item_acc", ids, base_acc)
    fresh_delta = _mat(5, w, seed=k)
    write = _batch(0, None, 0, item_ids=ids + fresh, item_deltas=np.vstack([delta, fresh_delta]),
                   item_acc_deltas=np.vstack([delta_acc, np.ones((5, 2), np.float32)]))  # fmt: skip
    assert s.apply_batch(1, write) is ApplyStatus.APPLIED
    got, found = s.get_vectors(1, "item", ids + fresh)
    assert found.all() and got[:n].tobytes() == (base + delta).tobytes()
    assert got[n:].tobytes() == fresh_delta.tobytes()  # absent rows start at zeros
    acc, _ = s.get_vectors(1, "item_acc", ids)
    assert acc.tobytes() == (base_acc + delta_acc).tobytes()
    assert s.global_bias(1) == float(base[-1, -1] + delta[-1, -1])
    all_ids, rows, glob = s.get_all_items(1)
    assert GLOBAL_ROW not in all_ids and len(all_ids) == n - 1 + 5 and s.item_count(1) == n - 1 + 5
    assert glob == s.global_bias(1) and rows.shape == (n - 1 + 5, w)
    assert len(s.get_all_accumulators(1)[0]) == n - 1 + 5


# ------------------------------------------------------------------- versioned (absolute) item rows
def _versioned(b: BatchWrite, vers: Any, rows: np.ndarray, acc: np.ndarray | None) -> BatchWrite:
    return replace(b, item_versions=vers, item_rows=rows, item_acc=acc)


def test_absolute_rows_are_the_bits_of_the_add(redis_client: redis.Redis) -> None:
    """The same batches applied with versions (rows SET to stored + delta computed in numpy) and without
    (added in Lua) leave identical bytes: rows, accumulators, versions; only the fast path skips the add."""
    stores = [FactorStore(redis_client, ns) for ns in ("plain", "versioned")]
    for s in stores:
        s.ensure_model(K)
    rng = np.random.default_rng(3)
    ids = [f"i{j}" for j in range(300)] + [GLOBAL_ROW]
    base = (rng.standard_normal((len(ids), W)) * 10.0 ** rng.integers(-6, 6, (len(ids), 1))).astype(np.float32)
    for s in stores:
        s.write_vectors(1, "item", ids[:200], base[:200])  # 100 items and the global row are new
    for b in range(3):
        delta = (rng.standard_normal((len(ids), W)) * 10.0 ** rng.integers(-9, 3, (len(ids), 1))).astype(np.float32)
        acc_delta = np.abs(delta[:, :2])
        write = _batch(0, b - 1 if b else None, b, item_ids=ids, item_deltas=delta, item_acc_deltas=acc_delta)
        assert stores[0].apply_batch(1, write)
        st = stores[1].read_batch_state(1, [], [], ids, accumulators=True)
        assert st.item_acc is not None and st.item_versions is not None
        assert st.item_versions.tolist() == [b] * len(ids)  # absent rows and versions read as 0
        vers = st.item_versions.copy()
        vers[-1] = -1  # unknown: added
        assert stores[1].apply_batch(1, _versioned(write, vers, st.item_rows + delta, st.item_acc + acc_delta))
    for table in ("item", "item_acc"):
        plain, versioned = (s.get_vectors(1, table, ids)[0] for s in stores)
        assert plain.tobytes() == versioned.tobytes(), table
    assert stores[0].rows_added == 3 * len(ids) and stores[1].rows_added == 3  # the global row only
    vers = [redis_client.hgetall(s.keys.item_versions(1)) for s in stores]
    assert vers[0] == vers[1] and set(vers[0].values()) == {b"3"} and len(vers[0]) == len(ids)


def test_a_row_written_since_is_added_not_overwritten(store: FactorStore) -> None:
    """The conflict path: worker A read rows at some versions, worker B wrote two of them since. A's batch
    (with deliberately wrong absolute values for every row) SETs only the rows whose version did not move and
    adds its delta to B's rows: B's write survives and A's delta lands once."""
    ids = ["a", "b", "c", "d"]
    init = (np.round(_mat(4) * 8) / 8).astype(np.float32)
    store.write_vectors(1, "item", ids, init)
    a_view = store.read_batch_state(1, [], [], ids, accumulators=True)  # what worker A holds
    assert a_view.item_versions is not None and a_view.item_versions.tolist() == [0, 0, 0, 0]
    b_delta = np.full((2, W), 0.5, np.float32)
    assert store.apply_batch(1, _batch(1, None, 0, item_ids=["b", "d"], item_deltas=b_delta,
                                       item_acc_deltas=np.ones((2, 2), np.float32)))  # fmt: skip
    a_delta, a_acc = np.full((4, W), 0.25, np.float32), np.full((4, 2), 0.125, np.float32)
    wrong = np.full((4, W), 99.0, np.float32)  # as if A's copy were stale: must never reach Redis for b, d
    wrong[[0, 2]] = (a_view.item_rows + a_delta)[[0, 2]]
    wrong_acc = np.full((4, 2), 99.0, np.float32)
    wrong_acc[[0, 2]] = (a_view.item_acc + a_acc)[[0, 2]]  # type: ignore[operator]
    added = store.rows_added
    write = _batch(0, None, 0, item_ids=ids, item_deltas=a_delta, item_acc_deltas=a_acc)
    assert store.apply_batch(1, _versioned(write, a_view.item_versions, wrong, wrong_acc))
    assert store.rows_added - added == 2
    got, _ = store.get_vectors(1, "item", ids)
    expect = init + a_delta
    expect[[1, 3]] += b_delta
    assert got.tobytes() == expect.tobytes()
    acc, _ = store.get_vectors(1, "item_acc", ids)
    np.testing.assert_array_equal(acc, np.array([[0.125] * 2, [1.125] * 2, [0.125] * 2, [1.125] * 2], np.float32))
    st = store.read_batch_state(1, [], [], ids)
    assert st.item_versions is not None and st.item_versions.tolist() == [1, 2, 1, 2]
    # a version that is ahead, unknown (-1) or a replay of an old one never matches either
    for vers in ([5, 5, 5, 5], [-1, -1, -1, -1], [0, 0, 0, 0]):
        before = store.get_vectors(1, "item", ids)[0]
        write = _batch(2, None, 0, item_ids=ids, item_deltas=a_delta)
        store.r.hdel(store.keys.offsets(1), "2")
        assert store.apply_batch(1, _versioned(write, vers, wrong, None))
        assert store.get_vectors(1, "item", ids)[0].tobytes() == (before + a_delta).tobytes()


def test_versions_and_absolute_rows_are_checked(store: FactorStore) -> None:
    store.write_vectors(1, "item", ["hot"], np.full((1, W), 3e38, np.float32))
    write = _batch(0, None, 0, item_ids=["x", "y"], item_deltas=_mat(2))
    with pytest.raises(StoreSchemaError, match="one entry per item id"):
        store.apply_batch(1, _versioned(write, [0], _mat(2), None))
    with pytest.raises(StoreSchemaError, match="one entry per item id"):  # accumulators without absolute ones
        store.apply_batch(1, _versioned(replace(write, item_acc_deltas=_acc(2)), [0, 0], _mat(2), None))
    # an absolute row that overflows goes to the add, which refuses the batch as before
    big = np.full((1, W), 3e38, np.float32)
    hot = _batch(0, None, 0, item_ids=["hot"], item_deltas=big)
    with pytest.raises(ModelDiverged, match="'hot' overflows float32"):
        store.apply_batch(1, _versioned(hot, [0], np.full((1, W), np.inf, np.float32), None))


def test_a_model_written_before_versions_loads_and_takes_the_fast_path(store: FactorStore) -> None:
    """No ``iver`` hash (an older zerocf, or ALS rows): every row is version 0, and writes create it."""
    store.write_vectors(1, "item", ["a"], _mat(1))
    assert not store.r.exists(store.keys.item_versions(1)) and store.item_versions(1) == {}
    st = store.read_batch_state(1, [], [], ["a", "new"])
    assert st.item_versions is not None and st.item_versions.tolist() == [0, 0]
    d = _mat(2, seed=4)
    assert store.apply_batch(1, _versioned(_batch(0, None, 0, item_ids=["a", "new"], item_deltas=d),
                                           [0, 0], st.item_rows + d, None))  # fmt: skip
    assert store.rows_added == 0 and store.item_versions(1) == {"a": 1, "new": 1}
    assert store.get_vectors(1, "item", ["a", "new"])[0].tobytes() == (st.item_rows + d).tobytes()


def test_overflow_nan_and_bad_blobs_refuse_the_whole_batch(store: FactorStore) -> None:
    """Refusals happen before any write: the batch also carries popularity while the generation has no
    reference yet, seen clicks, counts, users and accumulators."""
    big = np.full((1, W), 3e38, np.float32)
    store.write_vectors(1, "item", ["hot", "cold"], np.vstack([big, -big]))
    store.write_vectors(1, "item_acc", ["hot"], np.full((1, 2), 3e38, np.float32))
    store.r.hset(store.keys.vectors(1, "item"), "short", b"\0" * 4 * K)  # a schema-1 row: no bias
    before = _dump(store.r)
    assert store.generation_meta(1).pop_ref_ms == 0

    def batch(ids: list[str], deltas: np.ndarray, acc: np.ndarray | None = None) -> BatchWrite:
        return _batch(0, None, 1, user_ids=["u"], user_rows=_mat(1), item_ids=ids, item_deltas=deltas,
                      user_acc=_acc(1), item_acc_deltas=acc, counts={"ok": 1.0}, popularity={"ok": 1.0},
                      pop_ref_ms=T0, user_increments={"u": 1}, seen=[("u", "ok", T0)])  # fmt: skip

    with pytest.raises(ModelDiverged, match="'hot' overflows float32"):
        store.apply_batch(1, batch(["ok", "hot"], np.vstack([_mat(1), big])))
    with pytest.raises(ModelDiverged, match="'cold' overflows float32"):
        store.apply_batch(1, batch(["ok", "cold"], np.vstack([_mat(1), -big])))
    with pytest.raises(ModelDiverged, match="'hot' overflows float32"):  # in the accumulators (width 2)
        store.apply_batch(1, batch(["ok", "hot"], np.zeros((2, W), np.float32), np.full((2, 2), 3e38, np.float32)))
    with pytest.raises(StoreSchemaError, match="'short' is not 260 bytes"):
        store.apply_batch(1, batch(["ok", "short"], _mat(2)))
    nan = _mat(2)
    nan[1, -1] = np.nan
    with pytest.raises(ModelDiverged, match="'hot'"):  # refused in Python, before the script
        store.apply_batch(1, batch(["ok", "hot"], nan))
    with pytest.raises(ModelDiverged, match="popularity"):
        store.apply_batch(1, _batch(0, None, 1, popularity={"ok": float("nan")}, pop_ref_ms=T0))
    assert _dump(store.r) == before
    assert store.apply_batch(1, batch(["ok"], _mat(1)))  # the same batch without the bad row applies


def test_large_batch_and_noscript_reload(store: FactorStore) -> None:
    store.r.script_flush()
    n_u, n_i = 700, 900  # > the Lua 256-field chunk and many EVALSHA args
    users, items = [f"u{j}" for j in range(n_u)], [f"i{j}" for j in range(n_i)]
    st = store.apply_batch(
        1,
        _batch(
            0,
            None,
            1,
            user_ids=users,
            user_rows=_mat(n_u),
            item_ids=items,
            item_deltas=_mat(n_i, seed=9),
            user_acc=_acc(n_u),
            item_acc_deltas=_acc(n_i, seed=9),
            counts={i: 1.0 for i in items},
            popularity={i: 0.5 for i in items},
            pop_ref_ms=T0,
            user_increments={u: 1 for u in users},
            seen=[(u, "i0", T0) for u in users],
        ),
    )
    assert st and store.item_count(1) == n_i and len(store.user_update_counts(1)) == n_u
    assert len(store.get_all_accumulators(1)[0]) == n_i and len(store.item_popularity(1)) == n_i
    np.testing.assert_array_equal(store.get_vectors(1, "user_acc", users)[0], _acc(n_u))
    assert store.seen_items_many(users[-3:]) == {u: ["i0"] for u in users[-3:]}


def test_two_workers_add_deltas_concurrently_without_losing_any(redis_url: str, store: FactorStore) -> None:
    """Two clients/threads, one partition each, hammer the same items (and the global row); sums are exact
    (dyadic deltas), and both use the same popularity reference, which the first batch sets."""
    items = [f"i{j}" for j in range(40)] + [GLOBAL_ROW]
    n_items = len(items)
    init = (np.round(_mat(n_items) * 8) / 8).astype(np.float32)
    store.write_vectors(1, "item", items, init)
    n_batches = 60
    rng = np.random.default_rng(7)
    deltas = (rng.integers(-4, 5, (2, n_batches, n_items, W)) / 8).astype(np.float32)
    acc_deltas = (rng.integers(0, 5, (2, n_batches, n_items, 2)) / 8).astype(np.float32)
    errors: list[BaseException] = []

    def worker(part: int) -> None:
        try:
            s = FactorStore.from_url(redis_url, NS)
            prev = None
            for b in range(n_batches):
                write = _batch(part, prev, b, user_ids=[f"w{part}"], user_rows=_mat(1), item_ids=items,
                               item_deltas=deltas[part, b], item_acc_deltas=acc_deltas[part, b],
                               counts={i: 1.0 for i in items[:-1]}, popularity={i: 0.5 for i in items[:-1]},
                               pop_ref_ms=T0, user_increments={f"w{part}": 1})  # fmt: skip
                st = s.apply_batch(1, write)
                assert st is ApplyStatus.APPLIED, st
                prev = b
            s.r.close()
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    got, _ = store.get_vectors(1, "item", items)
    np.testing.assert_array_equal(got, init + deltas.sum(axis=(0, 1), dtype=np.float64).astype(np.float32))
    acc, _ = store.get_vectors(1, "item_acc", items)
    np.testing.assert_array_equal(acc, acc_deltas.sum(axis=(0, 1), dtype=np.float64).astype(np.float32))
    assert store.global_bias(1) == float(got[-1, -1])
    assert set(store.item_counts(1).values()) == {2.0 * n_batches}
    assert set(store.item_popularity(1).values()) == {1.0 * n_batches}
    assert store.generation_meta(1).pop_ref_ms == T0
    assert store.user_update_counts(1, ["w0", "w1"]) == {"w0": n_batches, "w1": n_batches}
    assert store.read_batch_state(1, [0, 1], [], []).offsets == {0: n_batches - 1, 1: n_batches - 1}


# ------------------------------------------------------------------- seen sets
def test_seen_retention_is_by_event_time_then_capped(redis_client: redis.Redis) -> None:
    s = FactorStore(redis_client, "seen", seen_cap=4, seen_ttl=TTL)
    s.ensure_model(K)
    ttl_ms = TTL * 1000
    clicks = [("u", "a", T0), ("u", "b", T0 + 1), ("v", "a", T0)]
    assert s.apply_batch(1, _batch(0, None, 0, seen=clicks))
    assert s.seen_items("u") == ["b", "a"] and s.seen_items("v") == ["a"]
    # 'a' was clicked exactly seen_ttl before the newest click: kept; 1 ms more and it goes (for u only)
    assert s.apply_batch(1, _batch(0, 0, 1, seen=[("u", "c", T0 + ttl_ms)]))
    assert s.seen_items("u") == ["c", "b", "a"]
    assert s.apply_batch(1, _batch(0, 1, 2, seen=[("u", "d", T0 + ttl_ms + 1)]))
    assert s.seen_items("u") == ["d", "c", "b"] and s.seen_items("v") == ["a"]
    # a replayed click of 'a' at its old time is outside the window: not re-added; re-clicking 'b' now keeps it
    assert s.apply_batch(1, _batch(0, 2, 3, seen=[("u", "a", T0), ("u", "b", T0 + ttl_ms + 2)]))
    assert s.seen_items("u") == ["b", "d", "c"]
    assert redis_client.zscore(s.keys.seen("u"), "b") == T0 + ttl_ms + 2
    # within the window, the cap keeps the newest seen_cap items
    assert s.apply_batch(1, _batch(0, 3, 4, seen=[("u", f"n{j}", T0 + ttl_ms + 10 + j) for j in range(3)]))
    assert s.seen_items("u") == ["n2", "n1", "n0", "b"]
    assert 0 < redis_client.ttl(s.keys.seen("u")) <= TTL


def test_add_seen_and_apply_batch_keep_the_same_sets(redis_client: redis.Redis) -> None:
    s = FactorStore(redis_client, "same", seen_cap=5, seen_ttl=10)
    s.ensure_model(K)
    rng = np.random.default_rng(3)
    ts = T0 + rng.integers(0, 30_000, 60)
    items = rng.integers(0, 12, 60)
    for j, chunk in enumerate(np.array_split(np.arange(60), 6)):
        s.add_seen([("a", f"i{items[c]}", int(ts[c])) for c in chunk])
        assert s.apply_batch(
            1, _batch(0, j - 1 if j else None, j, seen=[("b", f"i{items[c]}", int(ts[c])) for c in chunk])
        )
    za = redis_client.zrange(s.keys.seen("a"), 0, -1, withscores=True)
    assert za == redis_client.zrange(s.keys.seen("b"), 0, -1, withscores=True)
    newest = int(ts.max())
    assert 0 < len(za) <= 5 and all(score >= newest - 10_000 for _, score in za)


def test_seen_sets_expire(redis_client: redis.Redis) -> None:
    s = FactorStore(redis_client, "exp", seen_cap=10, seen_ttl=1)
    s.ensure_model(K)
    assert s.apply_batch(1, _batch(0, None, 0, seen=[("u", "a", T0)]))
    key = s.keys.seen("u")
    assert s.seen_items("u") == ["a"] and 0 < redis_client.pttl(key) <= 1000
    wait_until("the seen set to expire", lambda: redis_client.exists(key) == 0, timeout=10, every=0.05)
    assert s.seen_items("u") == []


def test_seen_upkeep_flags_prune_and_expire_only_the_users_asked_for(redis_client: redis.Redis) -> None:
    s = FactorStore(redis_client, "upkeep", seen_cap=3, seen_ttl=TTL)
    s.ensure_model(K)
    ttl_ms = TTL * 1000
    first = [("u", "a", T0), ("v", "a", T0), ("v", "b", T0 + 1)]
    assert s.apply_batch(1, _batch(0, None, 0, seen=first, seen_upkeep={"u": SEEN_PRUNE | SEEN_EXPIRE, "v": 0}))
    assert redis_client.ttl(s.keys.seen("u")) > 0 and redis_client.ttl(s.keys.seen("v")) == -1  # -1: no TTL
    late = [("u", "z", T0 + ttl_ms + 5), ("v", "z", T0 + ttl_ms + 5)]
    assert s.apply_batch(1, _batch(0, 0, 1, seen=late, seen_upkeep={"u": 0, "v": SEEN_PRUNE}))
    assert s.seen_items("u") == ["z", "a"]  # not pruned this batch: 'a' waits for the next prune
    assert s.seen_items("v") == ["z"] and redis_client.ttl(s.keys.seen("v")) == -1
    # the cap holds whatever the flags; a click grouped with others of its user keeps the newest ts (GT)
    many = [("u", f"n{j}", T0 + ttl_ms + 10 + j) for j in range(4)] + [("u", "n0", T0)]
    assert s.apply_batch(1, _batch(0, 1, 2, seen=many, seen_upkeep={}))
    assert s.seen_items("u") == ["n3", "n2", "n1"]


# ------------------------------------------------------------------- generations
def test_crash_mid_build_keeps_old_generation_live(store: FactorStore) -> None:
    old = _mat(4, seed=1)
    store.write_vectors(1, "user", ["a", "b", "c", "d"], old)
    g = store.begin_generation()
    store.write_vectors(g, "user", ["a", "b"], _mat(2, seed=2))  # ... and the ALS worker dies here
    before = _dump(store.r)
    with pytest.raises(GenerationError, match="2 user rows, expected n_users=4"):
        store.publish_generation(g, {0: 9}, {}, 0.5, 4, 0)
    assert _dump(store.r) == before  # no global row, no offsets, no state change
    assert store.live_generation() == 1 and store.generation_meta(g).state == "building"
    live = store.live_generation()
    np.testing.assert_array_equal(store.get_vectors(live, "user", ["a", "b", "c", "d"])[0], old)
    assert store.read_batch_state(g, [0], [], []).offsets == {0: None}  # refused publish wrote nothing


def test_publish_flips_atomically_and_retires_previous(store: FactorStore) -> None:
    assert store.apply_batch(1, _batch(0, None, 50, user_ids=["a"], user_rows=_mat(1)))
    g = store.begin_generation()
    new_u, new_i = _mat(3, seed=5), _mat(2, seed=6)
    store.write_vectors(g, "user", ["a", "b", "c"], new_u)
    store.write_vectors(g, "item", ["x", "y"], new_i)
    store.write_counts(g, {"x": 4.0})
    before = _dump(store.r)
    with pytest.raises(GenerationError, match="2 item rows, expected n_items=3"):
        store.publish_generation(g, {}, {}, 0.0, 3, 3)
    assert _dump(store.r) == before
    store.publish_generation(g, {0: 40, 1: 7}, {0: {"it.clicks/0": [3, 1]}}, -1.25, 3, 2, scale=2.5)
    m, gm, old = store.meta(), store.generation_meta(g), store.generation_meta(1)
    assert (m.live_gen, gm.state, gm.bias, gm.scale, gm.n_users, gm.n_items) == (g, "complete", -1.25, 2.5, 3, 2)
    assert gm.offsets == {0: 40, 1: 7} and gm.watermarks == {0: {"it.clicks/0": [3, 1]}}
    assert old.state == "retired" and old.retired_at is not None and gm.published_at is not None
    # the global row: zeros then the bias, excluded from the items
    assert store.get_vectors(g, "item", [GLOBAL_ROW])[0].tolist() == [[0.0] * K + [-1.25]]
    assert store.global_bias(g) == -1.25 and store.item_count(g) == 2
    ids, rows, glob = store.get_all_items(g)
    assert sorted(ids) == ["x", "y"] and glob == -1.25
    np.testing.assert_array_equal(rows[ids.index("y")], new_i[1])
    bs = store.read_batch_state(g, [0, 1, 2], ["b"], ["y"])
    assert bs.live_gen == g and bs.offsets == {0: 40, 1: 7, 2: None}
    assert bs.watermarks == {0: {"it.clicks/0": [3, 1]}}
    np.testing.assert_array_equal(bs.user_rows[0], new_u[1])
    assert store.top_items(store.live_generation(), 1) == [("x", 4.0)]
    # an LMF worker resumes in g behind the snapshot fence, moving the global bias by its deltas;
    # the old generation refuses its writes
    glob_delta = np.zeros((1, W), np.float32)
    glob_delta[0, -1] = 0.5
    resume = _batch(0, 40, 41, user_ids=["a"], user_rows=_mat(1), item_ids=[GLOBAL_ROW], item_deltas=glob_delta)
    assert store.apply_batch(g, resume) is ApplyStatus.APPLIED
    assert store.global_bias(g) == -0.75 and store.generation_meta(g).bias == -1.25 and store.item_count(g) == 2
    assert store.apply_batch(1, _batch(0, 50, 51, user_ids=["a"], user_rows=_mat(1))) is ApplyStatus.NEW_GENERATION
    with pytest.raises(GenerationError, match="state is complete, not building"):
        store.publish_generation(g, {}, {}, 0.0, 3, 2)
    with pytest.raises(GenerationError, match="state is missing"):
        store.publish_generation(99, {}, {}, 0.0, 0, 0)
    for bias, scale in ((float("nan"), 1.0), (0.0, float("inf")), (0.0, 0.0)):
        with pytest.raises(ModelDiverged):
            store.publish_generation(store.begin_generation(), {}, {}, bias, 0, 0, scale=scale)
    assert store.live_generation() == g


def test_gc_drops_old_retired_and_abandoned_only(redis_client: redis.Redis) -> None:
    now = [1000.0]
    s = FactorStore(redis_client, NS, clock=lambda: now[0])
    s.ensure_model(K)
    s.write_vectors(1, "item", ["i"], _mat(1))
    assert s.apply_batch(1, _full(0, None, 1))  # every table, counts, popularity, offsets of generation 1
    g2 = s.begin_generation()  # t=1000, will be published at 1100 (retires 1)
    now[0] = 1050.0
    abandoned = s.begin_generation(lease_s=0.05)  # building since 1050; its builder dies (no renewal)
    s.write_vectors(abandoned, "user", ["u"], _mat(1))
    s.write_popularity(abandoned, {"i": 1.0}, ref_ms=T0)
    now[0] = 1100.0
    s.publish_generation(g2, {}, {}, 0.0, 0, 0)
    assert not redis_client.exists(s.keys.lease(g2))  # published: the lease is released
    now[0] = 1200.0
    fresh = s.begin_generation()  # building since 1200 by a live builder (lease held)
    time.sleep(0.1)  # the abandoned generation's lease expires
    assert s.gc_generations(grace_seconds=120, now=1210.0) == [abandoned]  # at once; 1 retired only 110 s ago
    assert s.gc_generations(grace_seconds=120, now=1230.0) == [1]
    assert s.gc_generations(grace_seconds=120, now=10**9) == []  # a leased build is never collected
    assert s.generations() == [g2, fresh] and s.lease_holder(fresh) == s.owner
    leftovers = [k for k in redis_client.keys("*") if b":g:1:" in k or f":g:{abandoned}:".encode() in k]
    assert leftovers == []
    assert redis_client.exists(s.keys.seen("u9")) == 1  # seen sets belong to the model, not a generation
    with pytest.raises(GenerationError, match="is live"):
        s.drop_generation(g2)
    s.drop_generation(fresh)
    assert s.generations() == [g2] and s.gc_generations(0, now=10**9) == []
    assert s.global_bias(g2) == 0.0 and s.item_count(g2) == 0


def test_a_lease_is_renewed_while_held_and_refused_once_lost(redis_client: redis.Redis) -> None:
    s = FactorStore(redis_client, NS)
    s.ensure_model(K)
    g = s.begin_generation(lease_s=0.2)
    for _ in range(4):  # renewed faster than it expires: kept alive well past its first expiry
        time.sleep(0.1)
        s.renew_lease(g, lease_s=0.2)
    assert s.lease_holder(g) == s.owner
    assert s.gc_generations(0) == [] and s.generations() == [1, g]  # 1 is live, g is being built
    time.sleep(0.3)
    with pytest.raises(GenerationError, match=f"lease on building generation {g}.*expired"):
        s.renew_lease(g)
    assert s.gc_generations(600) == [g]


def test_a_building_generation_of_an_older_zerocf_waits_for_the_grace_period(redis_client: redis.Redis) -> None:
    """A build begun without a lease (older zerocf) cannot be told apart from a live one: grace applies."""
    now = [1000.0]
    s = FactorStore(redis_client, NS, clock=lambda: now[0])
    s.ensure_model(K)
    g = s.begin_generation()
    redis_client.hdel(s.keys.gen_meta(g), "lease")
    redis_client.delete(s.keys.lease(g))
    assert s.gc_generations(120, now=1100.0) == []
    assert s.gc_generations(120, now=1121.0) == [g]


def test_model_id_is_created_once_and_a_lost_or_replaced_model_is_named(redis_client: redis.Redis) -> None:
    s = FactorStore(redis_client, NS)
    s.ensure_model(K)
    mid = s.model_id
    assert len(mid) == 32 and FactorStore(redis_client, NS).model_id == mid
    assert s.ensure_model(K) == 1 and s.model_id == mid  # idempotent
    redis_client.flushdb()  # Redis restarted empty
    for call in (s.live_generation, s.meta, lambda: s.read_batch_state(1, [0], [], [])):
        with pytest.raises(ModelLost, match=f"lost zerocf model {mid} .*zerocf als --once --rebuild"):
            call()
    FactorStore(redis_client, NS).ensure_model(K)  # another process creates a new model
    with pytest.raises(ModelLost, match=f"now holds zerocf model [0-9a-f]{{32}} .*not model {mid}"):
        s.live_generation()
    with pytest.raises(ModelLost):
        s.ensure_model(K)
