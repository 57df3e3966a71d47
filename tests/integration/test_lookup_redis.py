"""Recommender on the real Redis: biased ranking, seen exclusion and popularity fallback through the store's
Lua code, a published generation (its global row) and LMF deltas to the global row picked up, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from workers.serving.lookup import Recommender
from workers.store import GLOBAL_ROW, ApplyStatus, BatchWrite, FactorStore

K = 4
B = 0.5  # generation 1's global bias
TS = 1_700_000_000_000
ITEM_BIAS = [0.6, 0.05, 0.1, -0.1, 0.0, 0.02, 0.2, -0.2]
U0, U1 = 0.2, -0.3  # user biases


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sig(x: float | list[float]) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def build(store: FactorStore) -> None:
    """Generation 1: item i<j> = (e_(j mod K) * (j+1)/8, ITEM_BIAS[j]); u0 = (e_0, U0), u1 = (e_1, U1).

    For u0, ``b_i + p.q`` is i0 .725, i4 .625, i6 .2, i2 .1, i1 .05, i5 .02, i3 -.1, i7 -.2; for u1 it is
    i5 .77, i0 .6 (its bias alone), i1 .3, i6 .2, ...
    """
    store.ensure_model(K)
    items = np.zeros((8, K + 1), dtype=np.float32)
    for j in range(8):
        items[j, j % K] = (j + 1) / 8
    items[:, K] = ITEM_BIAS
    store.write_vectors(1, "item", [f"i{j}" for j in range(8)], items)
    glob = np.zeros((1, K + 1), np.float32)
    glob[0, K] = B
    store.write_vectors(1, "item", [GLOBAL_ROW], glob)
    users = np.zeros((2, K + 1), np.float32)
    users[0, 0], users[0, K], users[1, 1], users[1, K] = 1.0, U0, 1.0, U1
    store.write_vectors(1, "user", ["u0", "u1"], users)
    store.write_counts(1, {"i3": 9, "i1": 7, "i6": 5})
    store.write_popularity(1, {"i6": 3.0, "i1": 2.0, "i2": 1.0}, ref_ms=TS)


@pytest.fixture()
def store(redis_url: str, topic_prefix: str) -> FactorStore:
    st = FactorStore.from_url(redis_url, topic_prefix)
    build(st)
    return st


def test_ranking_fallback_and_seen_on_real_redis(store: FactorStore) -> None:
    rec = Recommender(store)
    r = rec.recommend("u0", k=3)
    assert (r.items, r.fallback, r.generation) == (["i0", "i4", "i6"], False, 1)
    np.testing.assert_allclose(r.scores, sig([B + U0 + 0.725, B + U0 + 0.625, B + U0 + 0.2]), rtol=1e-6)
    assert rec.recommend("u1", k=2).items == ["i5", "i0"]  # i0 by its item bias alone
    store.add_seen([("u0", "i0", TS), ("u0", "i6", TS + 1), ("visitor", "i6", TS)])
    assert rec.recommend("u0", k=2).items == ["i4", "i2"]
    assert rec.recommend("u0", k=1, exclude_seen=False).items == ["i0"]
    fb = rec.recommend("visitor", k=2)  # decayed popularity (not the counts), i6 seen
    assert (fb.items, fb.fallback) == (["i1", "i2"], True)
    np.testing.assert_allclose(fb.scores, sig([B + 0.05, B + 0.1]), rtol=1e-6)
    np.testing.assert_allclose(
        rec.score("u1", ["i5", "nope", GLOBAL_ROW]), [sig(B + U1 + 0.77), np.nan, np.nan], rtol=1e-6
    )


def test_every_seen_item_is_excluded_on_real_redis(store: FactorStore) -> None:
    n, n_seen = 1300, 1200
    rows = np.zeros((n, K + 1), np.float32)
    rows[:, K] = 3.0 - np.arange(n) / 1000  # above every i-item for u0, in index order
    store.write_vectors(1, "item", [f"c{j}" for j in range(n)], rows)
    store.write_popularity(1, {f"c{j}": float(2 * n - j) for j in range(n)}, ref_ms=TS)
    store.add_seen([(u, f"c{j}", TS + j) for u in ("u0", "visitor") for j in range(n_seen)])
    rec = Recommender(store)
    recs = rec.recommend_many(["u0", "visitor"], k=5)
    want = [f"c{j}" for j in range(n_seen, n_seen + 5)]
    assert (recs["u0"].items, recs["u0"].fallback) == (want, False)
    assert (recs["visitor"].items, recs["visitor"].fallback) == (want, True)


def test_published_generation_is_picked_up(store: FactorStore) -> None:
    clock = FakeClock()
    rec = Recommender(store, refresh_s=2.0, clock=clock)
    assert rec.recommend("u1", k=1).items == ["i5"]
    g = store.begin_generation("als")
    store.write_vectors(g, "user", ["u1", "u9"], np.array([[1.0] * K + [0.25], [1.0] * K + [0.0]], np.float32))
    store.write_vectors(g, "item", ["n0", "n1"], np.array([[0.5] * K + [-0.5], [0.1] * K + [0.3]], np.float32))
    store.write_counts(g, {"n1": 3, "n0": 1})
    store.publish_generation(g, {0: 10}, {}, bias=-1.0, n_users=2, n_items=2)
    assert store.global_bias(g) == -1.0 and store.item_count(g) == 2  # publish wrote the global row
    assert rec.recommend("u1", k=1).generation == 1  # cached until the next check
    clock.now += 2.0
    r = rec.recommend("u1", k=3)
    assert (r.items, r.generation, rec.n_items) == (["n0", "n1"], g, 2)  # 2.0 - 0.5 > 0.4 + 0.3
    np.testing.assert_allclose(r.scores, sig([-1.0 + 0.25 + 1.5, -1.0 + 0.25 + 0.7]), rtol=1e-6)
    fb = rec.recommend("u0", k=2)  # u0 has no vector in generation g: g's counts (it has no popularity)
    assert (fb.items, fb.fallback, fb.generation) == (["n1", "n0"], True, g)
    np.testing.assert_allclose(fb.scores, sig([-1.0 + 0.3, -1.0 - 0.5]), rtol=1e-6)
    np.testing.assert_allclose(rec.score("u9", ["n0", "i0"]), [sig(-1.0 + 1.5), np.nan], rtol=1e-6)


def test_lmf_deltas_to_the_global_row_and_item_biases_are_picked_up(store: FactorStore) -> None:
    clock = FakeClock()
    rec = Recommender(store, refresh_s=2.0, clock=clock)
    assert rec.recommend("u0", k=1).items == ["i0"]
    deltas = np.zeros((2, K + 1), np.float32)
    deltas[:, K] = [1.0, 2.0]  # global bias 0.5 -> 1.5, i7's bias -0.2 -> 1.8
    batch = BatchWrite(
        partition=0,
        expected_offset=None,
        new_offset=0,
        watermarks={},
        item_ids=[GLOBAL_ROW, "i7"],
        item_deltas=deltas,
        popularity={"i7": 10.0},
        pop_ref_ms=TS,
    )
    assert store.apply_batch(1, batch) is ApplyStatus.APPLIED
    assert rec.recommend("u0", k=1).items == ["i0"]  # cached until the next check
    clock.now += 2.0  # same item count: reloaded because the content is refresh_s old
    r = rec.recommend("u0", k=2)
    assert r.items == ["i7", "i0"]
    np.testing.assert_allclose(r.scores, sig([1.5 + U0 + 1.8, 1.5 + U0 + 0.725]), rtol=1e-6)
    fb = rec.recommend("visitor", k=2)
    assert (fb.items, fb.fallback) == (["i7", "i6"], True)
    np.testing.assert_allclose(fb.scores, sig([1.5 + 1.8, 1.5 + 0.2]), rtol=1e-6)


def _cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "recommend", *argv], env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_json_contract(store: FactorStore, zerocf_env: dict[str, str], tmp_path) -> None:
    store.add_seen([("u0", "i0", TS)])
    users = tmp_path / "users.txt"
    users.write_text("visitor\n\nu1\n")
    out = _cli(zerocf_env, "u0", "-k", "2", "--users-file", str(users), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert list(doc) == ["u0", "visitor", "u1"]
    assert all(set(e) == {"item", "score"} and isinstance(e["score"], float) for v in doc.values() for e in v)
    assert [e["item"] for e in doc["u0"]] == ["i4", "i6"]  # i0 seen
    assert [e["item"] for e in doc["visitor"]] == ["i6", "i1"]
    assert [e["item"] for e in doc["u1"]] == ["i5", "i0"]
    np.testing.assert_allclose([e["score"] for e in doc["u0"]], sig([B + U0 + 0.625, B + U0 + 0.2]), rtol=1e-6)
    np.testing.assert_allclose([e["score"] for e in doc["visitor"]], sig([B + 0.2, B + 0.05]), rtol=1e-6)
    table = _cli(zerocf_env, "u0", "visitor", "--include-seen")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("user u0  (model") and lines[1].split()[:2] == ["1", "i0"]  # seen, included
    assert any(ln.startswith("user visitor  (fallback") for ln in lines)


def test_cli_without_model_exits_2(zerocf_env: dict[str, str], topic_prefix: str) -> None:
    out = _cli(zerocf_env, "u0", "--json")
    assert out.returncode == 2 and out.stdout == ""
    assert f"no model in Redis namespace {topic_prefix} at redis://" in out.stderr
    assert "run `zerocf lmf` or `zerocf als --once` first" in out.stderr
