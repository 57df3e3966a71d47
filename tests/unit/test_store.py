"""Unit tests of workers/store/ on fakeredis (scripts that pack floats are covered by the integration tier)."""

from __future__ import annotations

import fakeredis
import numpy as np
import pytest
import redis

from stream.config import redact_url
from stream.errors import ConfigError
from workers.errors import GenerationError, ModelDiverged, StoreSchemaError
from workers.store import (
    KEY_PREFIX,
    ApplyStatus,
    FactorStore,
    Keys,
    decode,
    encode,
)

K = 8


@pytest.fixture
def store() -> FactorStore:
    s = FactorStore(fakeredis.FakeRedis(), namespace="zt", seen_cap=3, seen_ttl=100, clock=lambda: 1000.0)
    s.ensure_model(K)
    return s


def _mat(n: int, k: int = K, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


# -------------------------------------------------------------------------------- encoding
def test_encode_decode_round_trip_is_bit_exact() -> None:
    m = _mat(5)
    m[0, 0] = np.float32(1e-45)  # denormal survives
    blobs = encode(m, K)
    assert [len(b) for b in blobs] == [4 * K] * 5
    assert blobs[1] == m[1].astype("<f4").tobytes()
    out, found = decode([blobs[0], None, *blobs[1:]], K)
    assert out.dtype == np.float32 and found.tolist() == [True, False, True, True, True, True]
    np.testing.assert_array_equal(out[found], m)
    np.testing.assert_array_equal(out[1], np.zeros(K, np.float32))


def test_decode_names_the_id_and_dims_of_a_bad_blob() -> None:
    with pytest.raises(StoreSchemaError, match=r"'i9' has 4 float32 values \(16 bytes\), store expects k=8"):
        decode([encode(_mat(1), K)[0], None, b"\0" * 16], K, ids=["i1", "i2", "i9"])


def test_encode_refuses_wrong_dtype_width_and_non_finite() -> None:
    with pytest.raises(StoreSchemaError, match="astype"):
        encode(_mat(2).astype(np.float64), K)
    with pytest.raises(StoreSchemaError, match=r"first id 'u1'.*\(n, 4\)"):
        encode(_mat(2), 4, ids=["u1", "u2"])
    bad = _mat(3)
    bad[2, 5] = np.inf
    with pytest.raises(ModelDiverged, match="'u3'"):
        encode(bad, K, ids=["u1", "u2", "u3"])


def test_redact_url_hides_passwords() -> None:
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert redact_url("rediss://u:p%40ss@h:1/2") == "rediss://u:***@h:1/2"
    assert "s3cret" not in redact_url("redis://h/0?password=s3cret&db=1")


def test_from_url_keeps_bytes_and_password() -> None:
    s = FactorStore.from_url("redis://app:s3cret@127.0.0.1:1/3", "ns", seen_cap=7, socket_timeout=1)
    kw = s.r.connection_pool.connection_kwargs
    assert (kw["password"], kw["username"], kw["db"], kw["decode_responses"]) == ("s3cret", "app", 3, False)
    assert s.seen_cap == 7 and s.keys.ns == "ns"


def test_decoding_client_is_refused() -> None:
    with pytest.raises(ConfigError, match="decode_responses=False"):
        FactorStore(fakeredis.FakeRedis(decode_responses=True))


# -------------------------------------------------------------------------------- keys and meta
def test_every_key_carries_prefix_and_hash_tag() -> None:
    km = Keys("shop")
    keys = [km.meta, km.gens, km.seen("u:{weird}"), *km.generation_keys(7)]
    assert len(set(keys)) == len(keys) == 12
    for key in keys:
        assert key.startswith(KEY_PREFIX + "{shop}:"), key
    for bad in ("", "a{b", "a}b", "a b"):
        with pytest.raises(ConfigError):
            Keys(bad)


def test_ensure_model_creates_once_and_checks_k(store: FactorStore) -> None:
    assert store.ensure_model(K) == 1
    m = store.meta()
    assert (m.schema_version, m.k, m.dtype, m.live_gen, m.next_gen) == (1, K, "<f4", 1, 1)
    assert m.created_at == m.updated_at == 1000.0
    gm = store.generation_meta(1)
    assert (gm.state, gm.source, gm.n_users, gm.bias, gm.offsets) == ("complete", "online", 0, 0.0, {})
    with pytest.raises(StoreSchemaError) as e:
        store.ensure_model(64)
    assert str(e.value).startswith(
        "redis model zt has k=8, worker configured k=64; rerun with --factors 8 "
        "(ZEROCF_FACTORS=8), or start a new model under another ZEROCF_TOPIC_PREFIX"
    )


def test_ensure_model_refuses_other_schema_version(store: FactorStore) -> None:
    store.r.hset(store.keys.meta, "schema_version", 2)
    with pytest.raises(StoreSchemaError, match="schema_version=2"):
        store.ensure_model(K)


def test_missing_model_and_generation_errors_instruct() -> None:
    s = FactorStore(fakeredis.FakeRedis(), "empty")
    with pytest.raises(StoreSchemaError, match="no zerocf model.*'empty'.*zerocf als --once"):
        s.meta()
    with pytest.raises(StoreSchemaError):
        s.live_generation()
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
    assert store.generations() == [1, 2, 3] and store.live_generation() == 1 and store.meta().next_gen == 3


# -------------------------------------------------------------------------------- vectors
def test_get_vectors_found_mask_and_values(store: FactorStore) -> None:
    m = _mat(3)
    store.write_vectors(1, "user", ["a", "b", "c"], m, chunk=2)
    vecs, found = store.get_vectors(1, "user", ["c", "zz", "a"])
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(vecs, np.stack([m[2], np.zeros(K, np.float32), m[0]]))
    assert store.get_vectors(1, "user", [])[0].shape == (0, K)


def test_get_all_items_and_count(store: FactorStore) -> None:
    m = _mat(25, seed=3)
    ids = [f"i{j}" for j in range(25)]
    store.write_vectors(1, "item", ids, m)
    got_ids, got = store.get_all_items(1, chunk=4)
    assert sorted(got_ids) == sorted(ids) and store.item_count(1) == 25
    np.testing.assert_array_equal(got[got_ids.index("i17")], m[17])


def test_stored_blob_of_other_k_is_reported(store: FactorStore) -> None:
    store.r.hset(store.keys.vectors(1, "item"), "old", b"\0" * 4 * (K + 1))
    with pytest.raises(StoreSchemaError, match="'old' has 9 float32"):
        store.get_vectors(1, "item", ["old"])


def test_write_vectors_refuses_mismatch_and_nan(store: FactorStore) -> None:
    with pytest.raises(StoreSchemaError, match="ids has 2 ids but matrix has 3 rows"):
        store.write_vectors(1, "user", ["a", "b"], _mat(3))
    bad = _mat(2)
    bad[1, 0] = np.nan
    with pytest.raises(ModelDiverged, match="'b'"):
        store.write_vectors(1, "user", ["a", "b"], bad)
    assert store.r.hlen(store.keys.vectors(1, "user")) == 0


def test_read_batch_state_one_pipeline(store: FactorStore) -> None:
    store.write_vectors(1, "user", ["u1"], _mat(1, seed=1))
    store.write_vectors(1, "item", ["i1"], _mat(1, seed=2))
    store.write_vectors(1, "item_acc", ["i1"], np.ones((1, K), np.float32))
    store.write_offsets(1, {0: 41}, {0: {"zt.clicks/0": [9, 0]}})
    st = store.read_batch_state(1, [0, 1], ["u1", "u2"], ["i1"], accumulators=True)
    assert st.live_gen == 1 and st.offsets == {0: 41, 1: None}
    assert st.watermarks == {0: {"zt.clicks/0": [9, 0]}}
    assert st.user_found.tolist() == [True, False] and st.item_found.tolist() == [True]
    np.testing.assert_array_equal(st.user_vecs[0], _mat(1, seed=1)[0])
    assert st.item_acc is not None and st.item_acc.sum() == K and st.user_acc_found.tolist() == [False, False]
    plain = store.read_batch_state(1, [], [], [])
    assert plain.user_acc is None and plain.offsets == {} and plain.user_vecs.shape == (0, K)


def test_apply_batch_validates_before_touching_redis(store: FactorStore) -> None:
    bad = _mat(1)
    bad[0, 3] = np.nan
    with pytest.raises(ModelDiverged, match="'u1'"):  # fakeredis has no EVAL: raising here proves no call
        store.apply_batch(1, 0, None, 5, {}, ["u1"], bad, [], np.zeros((0, K), np.float32))
    with pytest.raises(StoreSchemaError, match="item_ids has 1 ids but item_deltas has 2 rows"):
        store.apply_batch(1, 0, None, 5, {}, [], np.zeros((0, K), np.float32), ["i1"], _mat(2))
    with pytest.raises(ModelDiverged, match="count"):
        store.apply_batch(
            1,
            0,
            None,
            5,
            {},
            [],
            np.zeros((0, K), np.float32),
            [],
            np.zeros((0, K), np.float32),
            counts={"i": float("nan")},
        )


def test_apply_status_truthiness() -> None:
    assert [bool(s) for s in ApplyStatus] == [True, False, False]


# -------------------------------------------------------------------------------- popularity, seen, counters
def test_top_items_and_item_counts(store: FactorStore) -> None:
    store.write_counts(1, {"a": 3, "b": 10, "c": 1.5}, chunk=2)
    assert store.top_items(1, 2) == [("b", 10.0), ("a", 3.0)]
    assert store.top_items(1, 0) == [] and store.top_items(2, 5) == []
    assert store.item_counts(1) == {"a": 3.0, "b": 10.0, "c": 1.5}
    with pytest.raises(ModelDiverged):
        store.write_counts(1, {"x": float("inf")})


def test_seen_is_capped_newest_first_expiring_and_replay_safe(store: FactorStore) -> None:
    store.add_seen([("u", f"i{t}", 100 + t) for t in range(5)] + [("v", "x", 1)])
    assert store.seen_items("u") == ["i4", "i3", "i2"]  # cap 3 keeps the newest
    assert 0 < store.r.ttl(store.keys.seen("u")) <= 100
    store.add_seen([("u", "i3", 50)])  # a replayed older click must not demote it
    assert store.seen_items("u", limit=2) == ["i4", "i3"] and store.seen_items("u", limit=0) == []
    assert store.seen_items_many(["u", "v", "nobody"], limit=1) == {"u": ["i4"], "v": ["x"], "nobody": []}


def test_user_update_counts_default_zero(store: FactorStore) -> None:
    store.r.hincrby(store.keys.updates(1), "u1", 4)
    assert store.user_update_counts(1, ["u1", "u2"]) == {"u1": 4, "u2": 0}
    assert store.user_update_counts(1) == {"u1": 4}


def test_write_methods_queue_on_a_given_pipeline(store: FactorStore) -> None:
    pipe = store.r.pipeline(transaction=True)
    store.write_vectors(1, "user", ["a"], _mat(1), pipeline=pipe)
    store.write_counts(1, {"a": 1}, pipeline=pipe)
    store.add_seen([("a", "b", 5)], pipeline=pipe)
    assert store.r.hlen(store.keys.vectors(1, "user")) == 0  # nothing until the caller executes
    pipe.execute()
    assert store.r.hlen(store.keys.vectors(1, "user")) == 1
    assert store.top_items(1, 1) == [("a", 1.0)] and store.seen_items("a") == ["b"]


def test_real_client_type_is_accepted() -> None:
    FactorStore(redis.Redis(host="127.0.0.1", port=1))  # lazy: no connection made
