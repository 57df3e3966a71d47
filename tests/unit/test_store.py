"""Unit tests of workers/store/ on fakeredis (with lupa, it runs every script but those that pack floats with
``struct``: the float32 delta add of ``apply_batch`` is covered by tests/integration/test_store_redis.py).

Schema 2: a factor row is ``k`` latent values then the bias (width ``k + 1``), AdaGrad accumulators are 2 per
row, the global bias is the bias of the item row ``GLOBAL_ROW``, and each generation keeps a time-decayed
popularity relative to its ``pop_ref_ms``.
"""

from __future__ import annotations

from typing import Any

import fakeredis
import numpy as np
import pytest
import redis

from stream.config import redact_url
from stream.errors import ConfigError
from workers.errors import GenerationError, ModelDiverged, StoreSchemaError
from workers.store import (
    DTYPE,
    GLOBAL_ROW,
    KEY_PREFIX,
    SCHEMA_VERSION,
    TABLES,
    ApplyStatus,
    BatchWrite,
    FactorStore,
    Keys,
    decode,
    encode,
    encode_joined,
)

K = 8
W = K + 1  # floats per factor row: k latent values and the bias
DAY_MS = 86_400_000
TTL = 100  # seen_ttl of the fixture store, seconds
T0 = 1_700_000_000_000  # an event time, ms


@pytest.fixture
def store() -> FactorStore:
    s = FactorStore(fakeredis.FakeRedis(), namespace="zt", seen_cap=3, seen_ttl=TTL, clock=lambda: 1000.0)
    s.ensure_model(K)
    return s


def _mat(n: int, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, w)).astype(np.float32)


def _snapshot(r: Any) -> dict[bytes, Any]:
    """Every key's type, content and whether it expires: equal snapshots = nothing written."""
    out: dict[bytes, Any] = {}
    for key in sorted(r.keys("*")):
        kind = r.type(key)
        if kind == b"hash":
            val: Any = sorted(r.hgetall(key).items())
        elif kind == b"zset":
            val = r.zrange(key, 0, -1, withscores=True)
        else:
            val = r.get(key)
        out[key] = (kind, val, r.ttl(key) > 0)
    return out


def _legacy_model(r: Any, ns: str) -> str:
    """A schema-1 model's meta hash (all that the refusal looks for)."""
    key = Keys(ns).legacy_meta(1)
    r.hset(key, mapping={"schema_version": 1, "k": K, "dtype": DTYPE, "live_gen": 1, "next_gen": 1})
    return key


# -------------------------------------------------------------------------------- encoding
def test_encode_decode_round_trip_is_bit_exact() -> None:
    m = _mat(5)
    m[0, 0] = np.float32(1e-45)  # denormal survives
    m[3, -1] = np.float32(-0.0)  # so does a negative zero bias
    blobs = encode(m, W)
    assert [len(b) for b in blobs] == [4 * W] * 5
    assert blobs[1] == m[1].astype("<f4").tobytes()
    out, found = decode([blobs[0], None, *blobs[1:]], W)
    assert out.dtype == np.float32 and found.tolist() == [True, False, True, True, True, True]
    assert out[found].tobytes() == m.tobytes()
    np.testing.assert_array_equal(out[1], np.zeros(W, np.float32))
    assert encode_joined(m, W, [f"r{j}" for j in range(5)]) == b"".join(blobs)
    assert encode_joined(np.zeros((0, W), np.float32), W, []) == b""


def test_decode_names_the_id_and_dims_of_a_bad_blob() -> None:
    with pytest.raises(StoreSchemaError, match=r"'i9' has 4 float32 values \(16 bytes\), the store expects 9"):
        decode([encode(_mat(1), W)[0], None, b"\0" * 16], W, ids=["i1", "i2", "i9"])
    with pytest.raises(StoreSchemaError, match=r"'row 1' has 8 float32"):
        decode([encode(_mat(1), W)[0], b"\0" * 4 * K], W)  # a schema-1 row: k values, no bias


def test_encode_refuses_wrong_dtype_width_and_non_finite() -> None:
    with pytest.raises(StoreSchemaError, match="astype"):
        encode(_mat(2).astype(np.float64), W)
    with pytest.raises(StoreSchemaError, match=r"shape \(2, 9\) \(first id 'u1'\).*\(n, 8\)"):
        encode(_mat(2), K, ids=["u1", "u2"])  # a row without its bias
    bad = _mat(3)
    bad[2, -1] = np.inf  # a non-finite bias counts too
    with pytest.raises(ModelDiverged, match="'u3'"):
        encode(bad, W, ids=["u1", "u2", "u3"])
    with pytest.raises(ModelDiverged, match="'u2'"):
        encode_joined(np.array([[0.0, 1.0], [np.nan, 0.0]], np.float32), 2, ["u1", "u2"])
    with pytest.raises(StoreSchemaError, match=r"\(n, 2\)"):
        encode_joined(np.zeros((2, 3), np.float32), 2, ["a", "b"])


def test_redact_url_hides_passwords() -> None:
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert redact_url("rediss://u:p%40ss@h:1/2") == "rediss://u:***@h:1/2"
    assert "s3cret" not in redact_url("redis://h/0?password=s3cret&db=1")


def test_from_url_keeps_bytes_and_password() -> None:
    s = FactorStore.from_url("redis://app:s3cret@127.0.0.1:1/3", "ns", seen_cap=7, seen_ttl=9, socket_timeout=1)
    kw = s.r.connection_pool.connection_kwargs
    assert (kw["password"], kw["username"], kw["db"], kw["decode_responses"]) == ("s3cret", "app", 3, False)
    assert (s.seen_cap, s.seen_ttl, s.keys.ns, kw["socket_timeout"]) == (7, 9, "ns", 1)


def test_decoding_client_and_bad_seen_limits_are_refused() -> None:
    with pytest.raises(ConfigError, match="decode_responses=False"):
        FactorStore(fakeredis.FakeRedis(decode_responses=True))
    for cap, ttl in ((0, 10), (10, 0)):
        with pytest.raises(ConfigError, match=">= 1"):
            FactorStore(fakeredis.FakeRedis(), seen_cap=cap, seen_ttl=ttl)


def test_real_client_type_is_accepted() -> None:
    FactorStore(redis.Redis(host="127.0.0.1", port=1))  # lazy: no connection made


# -------------------------------------------------------------------------------- keys
def test_every_key_carries_the_v2_prefix_and_hash_tag() -> None:
    assert (SCHEMA_VERSION, KEY_PREFIX, GLOBAL_ROW, TABLES) == (
        2,
        "zcf:v2:",
        "",
        ("user", "item", "user_acc", "item_acc"),
    )
    km = Keys("shop")
    keys = [km.meta, km.gens, km.seen("u:{weird}"), *km.generation_keys(7)]
    assert len(set(keys)) == len(keys) == 15
    for key in keys:
        assert key.startswith("zcf:v2:{shop}:"), key
    gen = set(km.generation_keys(7))
    assert {km.popularity(7), km.counts(7), km.vectors(7, "user_acc"), km.vectors(7, "item_acc")} <= gen
    assert km.popularity(7) == "zcf:v2:{shop}:g:7:pop" and km.legacy_meta(1) == "zcf:v1:{shop}:meta"
    with pytest.raises(ValueError, match="table 'bias'"):
        km.vectors(1, "bias")
    for bad in ("", "a{b", "a}b", "a b", "a\tb"):
        with pytest.raises(ConfigError):
            Keys(bad)


# -------------------------------------------------------------------------------- model meta
def test_ensure_model_creates_once_and_checks_k(store: FactorStore) -> None:
    assert store.ensure_model(K) == 1
    m = store.meta()
    assert (m.schema_version, m.k, m.dtype, m.live_gen, m.next_gen) == (2, K, "<f4", 1, 1)
    assert m.created_at == m.updated_at == 1000.0 and (store.k, store.width) == (K, W)
    gm = store.generation_meta(1)
    assert (gm.state, gm.source, gm.n_users, gm.n_items, gm.bias, gm.offsets) == ("complete", "online", 0, 0, 0.0, {})
    assert (gm.scale, gm.pop_ref_ms, gm.pop_half_life_ms, gm.published_at) == (1.0, 0, DAY_MS, 1000.0)
    with pytest.raises(StoreSchemaError) as e:
        store.ensure_model(64)
    assert str(e.value).startswith(
        "redis model zt has k=8, worker configured k=64; rerun with --factors 8 "
        "(ZEROCF_FACTORS=8), or start a new model under another ZEROCF_TOPIC_PREFIX"
    )
    with pytest.raises(StoreSchemaError, match="k=0 must be >= 1"):
        store.ensure_model(0)
    assert store.meta().k == K and store.generations() == [1]


def test_ensure_model_records_the_popularity_half_life() -> None:
    s = FactorStore(fakeredis.FakeRedis(), "hl")
    s.ensure_model(K, pop_half_life_ms=3_600_000)
    assert s.generation_meta(1).pop_half_life_ms == 3_600_000
    g = s.begin_generation(pop_half_life_ms=60_000)
    assert s.generation_meta(g).pop_half_life_ms == 60_000 and s.generation_meta(g).pop_ref_ms == 0


def test_ensure_model_refuses_other_schema_version_and_dtype(store: FactorStore) -> None:
    store.r.hset(store.keys.meta, "schema_version", 3)
    with pytest.raises(StoreSchemaError, match="schema_version=3"):
        store.ensure_model(K)
    store.r.hset(store.keys.meta, mapping={"schema_version": 2, "dtype": ">f8"})
    with pytest.raises(StoreSchemaError, match="dtype=>f8"):
        store.ensure_model(K)


def test_a_schema_1_model_is_refused_with_the_rebuild_command() -> None:
    r = fakeredis.FakeRedis()
    legacy = _legacy_model(r, "old")
    s = FactorStore(r, "old")
    for call in (lambda: s.ensure_model(K), s.meta, s.live_generation, s.begin_generation):
        with pytest.raises(StoreSchemaError) as e:
            call()
        msg = str(e.value)
        assert "schema-1 zerocf model under namespace 'old'" in msg, msg
        assert "`zerocf als --once --rebuild`" in msg and "zcf:v1:{old}:*" in msg
    assert r.keys("zcf:v2:*") == [] and r.keys("*") == [legacy.encode()]  # nothing created
    # another namespace is unaffected, and a namespace without any model gets the ordinary message
    assert FactorStore(r, "new").ensure_model(K) == 1
    with pytest.raises(StoreSchemaError, match="no zerocf model") as e2:
        FactorStore(r, "none").meta()
    assert "rebuild" not in str(e2.value)


def test_replace_legacy_creates_the_v2_model_beside_the_old_keys() -> None:
    r = fakeredis.FakeRedis()
    legacy = _legacy_model(r, "old")
    s = FactorStore(r, "old")
    assert s.ensure_model(K, replace_legacy=True) == 1
    assert s.meta().schema_version == 2 and r.exists(legacy) == 1  # old keys left for the operator
    assert s.ensure_model(K) == 1  # once the v2 model exists the legacy keys no longer matter
    assert FactorStore(r, "old").live_generation() == 1


def test_missing_model_and_generation_errors_instruct() -> None:
    s = FactorStore(fakeredis.FakeRedis(), "empty")
    with pytest.raises(StoreSchemaError, match="no zerocf model.*'empty'.*zerocf als --once"):
        s.meta()
    with pytest.raises(StoreSchemaError, match="no zerocf model"):
        s.live_generation()
    with pytest.raises(StoreSchemaError, match="no zerocf model"):
        s.k  # noqa: B018
    with pytest.raises(GenerationError, match="generation 3 .* does not exist"):
        s.generation_meta(3)


def test_begin_generation_is_building_and_indexed(store: FactorStore) -> None:
    g = store.begin_generation()
    assert g == 2 and store.begin_generation(source="online") == 3
    gm = store.generation_meta(g)
    assert (gm.state, gm.source, gm.created_at, gm.published_at, gm.retired_at) == (
        "building",
        "als",
        1000.0,
        None,
        None,
    )
    assert (gm.scale, gm.pop_ref_ms, gm.pop_half_life_ms, gm.n_items) == (1.0, 0, DAY_MS, 0)
    assert store.generations() == [1, 2, 3] and store.live_generation() == 1 and store.meta().next_gen == 3


def test_publish_sets_the_global_row_scale_and_excludes_it_from_n_items(store: FactorStore) -> None:
    """PUBLISH_LUA packs no floats (the global row blob comes from Python), so fakeredis runs it."""
    g = store.begin_generation()
    store.write_vectors(g, "item", ["x", "y", GLOBAL_ROW], _mat(3, seed=1))  # a stale global row of the build
    with pytest.raises(GenerationError, match="holds 2 item rows, expected n_items=3"):  # GLOBAL_ROW is no item
        store.publish_generation(g, {}, {}, 0.5, 0, 3)
    store.publish_generation(g, {0: 4}, {}, -1.25, 0, 2, scale=0.5)
    gm = store.generation_meta(g)
    assert (gm.state, gm.bias, gm.scale, gm.n_items, gm.offsets) == ("complete", -1.25, 0.5, 2, {0: 4})
    row, found = store.get_vectors(g, "item", [GLOBAL_ROW])
    assert found.all() and row.tolist() == [[0.0] * K + [-1.25]]  # latent part zero, bias = the global bias
    assert store.global_bias(g) == -1.25 and store.item_count(g) == 2
    for bias, scale in ((float("nan"), 1.0), (0.0, float("inf")), (0.0, 0.0), (0.0, -1.0)):
        with pytest.raises(ModelDiverged):
            store.publish_generation(store.begin_generation(), {}, {}, bias, 0, 0, scale=scale)


# -------------------------------------------------------------------------------- vectors and accumulators
def test_get_vectors_found_mask_and_values(store: FactorStore) -> None:
    m = _mat(3)
    store.write_vectors(1, "user", ["a", "b", "c"], m, chunk=2)
    rows, found = store.get_vectors(1, "user", ["c", "zz", "a"])
    assert found.tolist() == [True, False, True] and rows.shape == (3, W)
    np.testing.assert_array_equal(rows, np.stack([m[2], np.zeros(W, np.float32), m[0]]))
    assert store.get_vectors(1, "user", [])[0].shape == (0, W)
    assert store.get_vectors(1, "item_acc", [])[0].shape == (0, 2)


def test_accumulators_are_two_values_per_row(store: FactorStore) -> None:
    acc = np.array([[0.5, 2.0], [1.0, 0.25], [3.0, 4.0]], np.float32)
    store.write_vectors(1, "item_acc", ["a", "b", GLOBAL_ROW], acc)
    assert store.r.hstrlen(store.keys.vectors(1, "item_acc"), "a") == 8
    got, found = store.get_vectors(1, "item_acc", ["b", "nope"])
    assert found.tolist() == [True, False] and got.tolist() == [[1.0, 0.25], [0.0, 0.0]]
    ids, all_acc = store.get_all_accumulators(1, chunk=1)
    assert sorted(ids) == ["a", "b"] and all_acc.shape == (2, 2)  # the global row's accumulators are not an item's
    np.testing.assert_array_equal(all_acc[ids.index("a")], acc[0])
    for bad in (np.ones((1, 1), np.float32), np.ones((1, W), np.float32)):
        with pytest.raises(StoreSchemaError, match=r"store expects \(n, 2\)"):
            store.write_vectors(1, "user_acc", ["u"], bad)
    store.r.hset(store.keys.vectors(1, "user_acc"), "old", b"\0" * 4 * K)  # a schema-1 accumulator: k values
    with pytest.raises(StoreSchemaError, match="'old' has 8 float32 values .*expects 2"):
        store.get_vectors(1, "user_acc", ["old"])


def test_get_all_items_excludes_the_global_row_and_returns_its_bias(store: FactorStore) -> None:
    m = _mat(25, seed=3)
    ids = [f"i{j}" for j in range(25)]
    store.write_vectors(1, "item", ids, m)
    got_ids, got, bias = store.get_all_items(1, chunk=4)
    assert sorted(got_ids) == sorted(ids) and got.shape == (25, W) and bias == 0.0  # no global row: the meta's
    assert store.item_count(1) == 25 and store.global_bias(1) == 0.0
    np.testing.assert_array_equal(got[got_ids.index("i17")], m[17])
    glob = np.zeros((1, W), np.float32)
    glob[0, -1] = 0.375
    store.write_vectors(1, "item", [GLOBAL_ROW], glob)
    got_ids, got, bias = store.get_all_items(1, chunk=4)
    assert GLOBAL_ROW not in got_ids and len(got_ids) == got.shape[0] == 25 and bias == 0.375
    assert store.item_count(1) == 25 and store.global_bias(1) == 0.375
    np.testing.assert_array_equal(got[got_ids.index("i3")], m[3])


def test_global_bias_falls_back_to_the_generation_meta(store: FactorStore) -> None:
    store.r.hset(store.keys.gen_meta(1), "bias", "-0.5")  # an ALS generation's published bias, no row yet
    assert store.global_bias(1) == -0.5 and store.get_all_items(1)[2] == -0.5
    assert store.item_count(1) == 0 and store.get_all_items(1)[0] == []


def test_stored_blob_of_other_width_is_reported(store: FactorStore) -> None:
    store.r.hset(store.keys.vectors(1, "item"), "old", b"\0" * 4 * K)  # a schema-1 row (no bias)
    with pytest.raises(StoreSchemaError, match="'old' has 8 float32 values .*expects 9"):
        store.get_vectors(1, "item", ["old"])
    with pytest.raises(StoreSchemaError, match="'old' has 8 float32"):
        store.get_all_items(1)


def test_write_vectors_refuses_mismatch_and_nan(store: FactorStore) -> None:
    with pytest.raises(StoreSchemaError, match="ids has 2 ids but matrix has 3 rows"):
        store.write_vectors(1, "user", ["a", "b"], _mat(3))
    bad = _mat(2)
    bad[1, 0] = np.nan
    with pytest.raises(ModelDiverged, match="'b'"):
        store.write_vectors(1, "user", ["a", "b"], bad)
    with pytest.raises(StoreSchemaError, match=r"\(n, 9\)"):
        store.write_vectors(1, "item", ["a"], _mat(1, K))
    assert store.r.hlen(store.keys.vectors(1, "user")) == 0 and store.r.hlen(store.keys.vectors(1, "item")) == 0


def test_read_batch_state_one_pipeline(store: FactorStore) -> None:
    store.write_vectors(1, "user", ["u1"], _mat(1, seed=1))
    store.write_vectors(1, "item", ["i1"], _mat(1, seed=2))
    store.write_vectors(1, "item_acc", ["i1"], np.array([[2.0, 3.0]], np.float32))
    store.write_vectors(1, "user_acc", ["u2"], np.array([[5.0, 7.0]], np.float32))
    store.write_offsets(1, {0: 41}, {0: {"zt.clicks/0": [9, 0]}})
    store.add_seen([("u1", "a", T0), ("u1", "b", T0 + 1)])
    st = store.read_batch_state(1, [0, 1], ["u1", "u2"], ["i1"], accumulators=True, seen_users=["u1", "u3"])
    assert st.live_gen == 1 and st.offsets == {0: 41, 1: None}
    assert st.watermarks == {0: {"zt.clicks/0": [9, 0]}}
    assert st.user_found.tolist() == [True, False] and st.item_found.tolist() == [True]
    assert st.user_rows.shape == (2, W) and st.item_rows.shape == (1, W)
    np.testing.assert_array_equal(st.user_rows[0], _mat(1, seed=1)[0])
    np.testing.assert_array_equal(st.item_rows[0], _mat(1, seed=2)[0])
    assert st.item_acc is not None and st.item_acc.tolist() == [[2.0, 3.0]]
    assert st.user_acc is not None and st.user_acc.tolist() == [[0.0, 0.0], [5.0, 7.0]]
    assert st.seen == {"u1": ["b", "a"], "u3": []}
    plain = store.read_batch_state(1, [], [], [])
    assert plain.user_acc is None and plain.item_acc is None and plain.seen is None
    assert plain.offsets == {} and plain.user_rows.shape == (0, W)


def test_read_batch_state_of_a_missing_model_raises_the_instructive_error() -> None:
    with pytest.raises(StoreSchemaError, match="no zerocf model"):
        FactorStore(fakeredis.FakeRedis(), "gone").read_batch_state(1, [0], [], [])


def test_apply_batch_validates_before_touching_redis(store: FactorStore) -> None:
    store.write_vectors(1, "item", ["i1"], _mat(1, seed=4))
    before = _snapshot(store.r)
    none = np.zeros((0, W), np.float32)
    nan_row = _mat(1)
    nan_row[0, -1] = np.nan  # the bias
    cases: list[tuple[type[Exception], str, BatchWrite]] = [
        (ModelDiverged, "'u1'", BatchWrite(0, None, 5, {}, user_ids=["u1"], user_rows=nan_row)),
        (ModelDiverged, "'i1'", BatchWrite(0, None, 5, {}, item_ids=["i1"], item_deltas=nan_row)),
        (StoreSchemaError, "item_ids has 1 ids but item_deltas has 2 rows",
         BatchWrite(0, None, 5, {}, item_ids=["i1"], item_deltas=_mat(2))),  # fmt: skip
        (StoreSchemaError, r"\(n, 9\)", BatchWrite(0, None, 5, {}, user_ids=["u1"], user_rows=_mat(1, K))),
        (StoreSchemaError, "1 ids but user_acc has 2 rows",
         BatchWrite(0, None, 5, {}, user_ids=["u1"], user_rows=_mat(1), user_acc=np.ones((2, 2), np.float32))),
        (ModelDiverged, "'i1'", BatchWrite(0, None, 5, {}, item_ids=["i1"], item_deltas=_mat(1),
                                           item_acc_deltas=np.array([[1.0, np.inf]], np.float32))),
        (ModelDiverged, "count", BatchWrite(0, None, 5, {}, item_ids=[], item_deltas=none,
                                            counts={"i": float("nan")})),
        (ModelDiverged, "popularity", BatchWrite(0, None, 5, {}, popularity={"i": float("inf")}, pop_ref_ms=T0)),
    ]  # fmt: skip
    for exc, match, write in cases:
        with pytest.raises(exc, match=match):  # i1 exists: reaching the script would fail on fakeredis' Lua
            store.apply_batch(1, write)
    assert _snapshot(store.r) == before


def test_apply_status_truthiness() -> None:
    assert {s.name: bool(s) for s in ApplyStatus} == {
        "APPLIED": True,
        "STALE": False,
        "NEW_GENERATION": False,
        "POPULARITY_MOVED": False,
    }


# -------------------------------------------------------------------------------- counts and popularity
def test_top_items_and_item_counts(store: FactorStore) -> None:
    store.write_counts(1, {"a": 3, "b": 10, "c": 1.5}, chunk=2)
    assert store.top_items(1, 2) == [("b", 10.0), ("a", 3.0)]
    assert store.top_items(1, 0) == [] and store.top_items(2, 5) == []
    assert store.item_counts(1) == {"a": 3.0, "b": 10.0, "c": 1.5}
    with pytest.raises(ModelDiverged):
        store.write_counts(1, {"x": float("inf")})
    assert "x" not in store.item_counts(1)


def test_popular_items_prefer_the_decayed_popularity_and_fall_back_to_counts(store: FactorStore) -> None:
    store.write_counts(1, {"old": 100, "new": 2, "mid": 50})
    assert store.popular_items(1, 2) == [("old", 100.0), ("mid", 50.0)]  # nothing decayed yet: all-time counts
    assert store.item_popularity(1) == {}
    store.write_popularity(1, {"old": 0.125, "new": 3.5, "mid": 1.0}, ref_ms=T0, chunk=2)
    assert store.popular_items(1, 2) == [("new", 3.5), ("mid", 1.0)]
    assert store.popular_items(1, 0) == [] and store.popular_items(1, 10)[-1] == ("old", 0.125)
    assert store.item_popularity(1) == {"old": 0.125, "new": 3.5, "mid": 1.0}
    assert store.generation_meta(1).pop_ref_ms == T0
    assert store.top_items(1, 1) == [("old", 100.0)]  # counts untouched


def test_write_popularity_refuses_non_finite_and_keeps_the_reference(store: FactorStore) -> None:
    store.write_popularity(1, {"a": 1.0}, ref_ms=T0)
    with pytest.raises(ModelDiverged, match="popularity"):
        store.write_popularity(1, {"b": float("nan")}, ref_ms=T0 + 5)
    assert store.item_popularity(1) == {"a": 1.0} and store.generation_meta(1).pop_ref_ms == T0


def test_rescale_popularity_moves_the_reference_once(store: FactorStore) -> None:
    hl = 1000
    store.write_popularity(1, {"a": 8.0, "b": 2.0, "c": 1.0}, ref_ms=T0)
    assert store.rescale_popularity(1, T0, T0 + 2 * hl, hl)  # two half-lives: a quarter
    assert store.item_popularity(1) == {"a": 2.0, "b": 0.5, "c": 0.25}
    assert store.generation_meta(1).pop_ref_ms == T0 + 2 * hl
    # a second worker still holding the old reference is refused and changes nothing
    assert not store.rescale_popularity(1, T0, T0 + 3 * hl, hl)
    assert store.item_popularity(1) == {"a": 2.0, "b": 0.5, "c": 0.25}
    assert store.generation_meta(1).pop_ref_ms == T0 + 2 * hl
    assert store.popular_items(1, 1) == [("a", 2.0)]


def test_rescale_without_popularity_moves_only_the_reference(store: FactorStore) -> None:
    assert store.rescale_popularity(1, 0, T0, DAY_MS)  # the reference was unset (0)
    assert store.generation_meta(1).pop_ref_ms == T0 and store.r.exists(store.keys.popularity(1)) == 0
    assert not store.rescale_popularity(1, 0, T0 + 1, DAY_MS)


# -------------------------------------------------------------------------------- seen sets
def test_seen_is_capped_newest_first_expiring_and_replay_safe(store: FactorStore) -> None:
    store.add_seen([("u", f"i{t}", T0 + t) for t in range(5)] + [("v", "x", T0)])
    assert store.seen_items("u") == ["i4", "i3", "i2"]  # cap 3 keeps the newest
    assert 0 < store.r.ttl(store.keys.seen("u")) <= TTL and 0 < store.r.ttl(store.keys.seen("v")) <= TTL
    store.add_seen([("u", "i3", T0 - 50)])  # a replayed older click must not demote it
    assert store.seen_items("u", limit=2) == ["i4", "i3"] and store.seen_items("u", limit=0) == []
    assert store.r.zscore(store.keys.seen("u"), "i3") == T0 + 3
    assert store.seen_items_many(["u", "v", "nobody"], limit=1) == {"u": ["i4"], "v": ["x"], "nobody": []}
    assert store.seen_items_many(["u"], limit=0) == {"u": []} and store.seen_items("nobody") == []


def test_seen_keeps_items_by_event_time_relative_to_the_newest_click() -> None:
    s = FactorStore(fakeredis.FakeRedis(), "ret", seen_cap=100, seen_ttl=TTL)
    s.ensure_model(K)
    ttl_ms = TTL * 1000
    s.add_seen([("u", "ancient", 5), ("u", "older", 6)])  # event times far in the past: no wall clock involved
    assert s.seen_items("u") == ["older", "ancient"]
    s.add_seen([("u", "edge", 5 + ttl_ms)])  # exactly seen_ttl after 'ancient': kept
    assert s.seen_items("u") == ["edge", "older", "ancient"]
    s.add_seen([("u", "next", 6 + ttl_ms)])  # now 'ancient' is more than seen_ttl before the newest
    assert s.seen_items("u") == ["next", "edge", "older"]
    s.add_seen([("u", "late", 6 + 2 * ttl_ms)])  # exactly seen_ttl after 'next', 1 ms more after 'edge'
    assert s.seen_items("u") == ["late", "next"]
    # a replayed click older than the retention window is not kept at all; other users are independent
    s.add_seen([("u", "replayed", 1), ("w", "replayed", 1)])
    assert s.seen_items("u") == ["late", "next"] and s.seen_items("w") == ["replayed"]


def test_seen_cap_applies_after_retention_and_per_user() -> None:
    s = FactorStore(fakeredis.FakeRedis(), "cap", seen_cap=2, seen_ttl=TTL)
    s.ensure_model(K)
    s.add_seen([("u", f"i{t}", T0 + 10 * t) for t in (3, 0, 2, 1)] + [("v", "a", T0), ("v", "b", T0 + 1)])
    assert s.seen_items("u") == ["i3", "i2"] and s.seen_items("v") == ["b", "a"]
    s.add_seen([("u", "i0", T0 + 25)])  # an item re-clicked later is newer than i2 again
    assert s.seen_items("u") == ["i3", "i0"]
    assert s.r.zcard(s.keys.seen("u")) == 2


def test_seen_expiry_is_refreshed_by_each_click(store: FactorStore) -> None:
    key = store.keys.seen("u")
    store.add_seen([("u", "a", T0)])
    store.r.expire(key, 5)  # as if most of the ttl had passed
    store.add_seen([("u", "b", T0 + 1)])
    assert store.r.ttl(key) > 5 and store.r.ttl(key) <= TTL


def test_user_update_counts_default_zero(store: FactorStore) -> None:
    store.r.hincrby(store.keys.updates(1), "u1", 4)
    assert store.user_update_counts(1, ["u1", "u2"]) == {"u1": 4, "u2": 0}
    assert store.user_update_counts(1) == {"u1": 4} and store.user_update_counts(1, []) == {}


def test_write_methods_queue_on_a_given_pipeline(store: FactorStore) -> None:
    pipe = store.r.pipeline(transaction=True)
    store.write_vectors(1, "user", ["a"], _mat(1), pipeline=pipe)
    store.write_counts(1, {"a": 1}, pipeline=pipe)
    store.write_offsets(1, {0: 3}, {0: {"w": 1}}, pipeline=pipe)
    store.add_seen([("a", "b", T0)], pipeline=pipe)
    assert store.r.hlen(store.keys.vectors(1, "user")) == 0  # nothing until the caller executes
    assert store.seen_items("a") == [] and store.top_items(1, 1) == []
    pipe.execute()
    assert store.r.hlen(store.keys.vectors(1, "user")) == 1
    assert store.top_items(1, 1) == [("a", 1.0)] and store.seen_items("a") == ["b"]
    assert store.read_batch_state(1, [0], [], []).offsets == {0: 3}


def test_user_rows_and_seen_in_one_round_trip_equal_the_two_reads(store: FactorStore) -> None:
    m = _mat(2)
    store.write_vectors(1, "user", ["a", "b"], m)
    store.add_seen([("a", "i1", T0), ("a", "i2", T0 + 1), ("c", "i3", T0)])
    users = ["a", "b", "c", "nobody"]
    vecs, found, seen = store.user_rows_and_seen(1, users)
    want_vecs, want_found = store.get_vectors(1, "user", users)
    np.testing.assert_array_equal(vecs, want_vecs)
    assert found.tolist() == want_found.tolist() == [True, True, False, False]
    assert seen == store.seen_items_many(users) == {"a": ["i2", "i1"], "b": [], "c": ["i3"], "nobody": []}
    assert store.user_rows_and_seen(1, users, limit=1)[2]["a"] == ["i2"]
    assert store.user_rows_and_seen(1, users, limit=0)[2] == {}
    assert store.user_rows_and_seen(1, [])[0].shape == (0, W)
