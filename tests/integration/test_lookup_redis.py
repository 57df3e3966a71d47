"""Recommender on the real Redis: a published generation is picked up, fallback, seen exclusion, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from workers.serving.lookup import Recommender
from workers.store import FactorStore

K = 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def build(store: FactorStore) -> None:
    """Generation 1: item i<j> = e_(j mod K) * (j+1), user u0 = (1, 0, 0, 0), u1 = (0, 1, 0, 0)."""
    store.ensure_model(K)
    items = np.zeros((8, K), dtype=np.float32)
    for j in range(8):
        items[j, j % K] = (j + 1) / 8
    store.write_vectors(1, "item", [f"i{j}" for j in range(8)], items)
    store.write_vectors(1, "user", ["u0", "u1"], np.eye(K, dtype=np.float32)[:2])
    store.write_counts(1, {"i3": 9, "i1": 7, "i6": 5})


@pytest.fixture()
def store(redis_url: str, topic_prefix: str) -> FactorStore:
    st = FactorStore.from_url(redis_url, topic_prefix)
    build(st)
    return st


def test_ranking_fallback_and_seen_on_real_redis(store: FactorStore) -> None:
    rec = Recommender(store)
    r = rec.recommend("u0", k=2)
    assert (r.items, r.fallback, r.generation) == (["i4", "i0"], False, 1)
    np.testing.assert_allclose(r.scores, [1 / (1 + np.exp(-5 / 8)), 1 / (1 + np.exp(-1 / 8))], rtol=1e-6)
    store.add_seen([("u0", "i4", 1700000000000)])
    assert rec.recommend("u0", k=2).items[0] == "i0"
    assert rec.recommend("u0", k=1, exclude_seen=False).items == ["i4"]
    fb = rec.recommend("visitor", k=2)
    assert (fb.items, fb.fallback) == (["i3", "i1"], True)


def test_published_generation_is_picked_up(store: FactorStore) -> None:
    clock = FakeClock()
    rec = Recommender(store, refresh_s=2.0, clock=clock)
    assert rec.recommend("u1", k=1).items == ["i5"]
    g = store.begin_generation("als")
    store.write_vectors(g, "user", ["u1", "u9"], np.ones((2, K), dtype=np.float32))
    store.write_vectors(g, "item", ["n0", "n1"], np.array([[0.5] * K, [0.1] * K], dtype=np.float32))
    store.write_counts(g, {"n1": 3})
    store.publish_generation(g, {0: 10}, {}, bias=-1.0, n_users=2, n_items=2)
    assert rec.recommend("u1", k=1).generation == 1  # cached until the next check
    clock.now += 2.0
    r = rec.recommend("u1", k=2)
    assert (r.items, r.generation) == (["n0", "n1"], g)
    np.testing.assert_allclose(r.scores, [1 / (1 + np.exp(-(2.0 - 1.0))), 1 / (1 + np.exp(-(0.4 - 1.0)))], rtol=1e-6)
    assert rec.recommend("u0", k=2).fallback  # u0 has no vector in generation g
    assert rec.recommend("u0", k=2).items == ["n1"]  # the new generation's counts
    np.testing.assert_allclose(rec.score("u9", ["n0", "i0"]), [1 / (1 + np.exp(-1.0)), np.nan], rtol=1e-6)


def _cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "recommend", *argv], env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_json_contract(store: FactorStore, zerocf_env: dict[str, str], tmp_path) -> None:
    store.add_seen([("u0", "i4", 1)])
    users = tmp_path / "users.txt"
    users.write_text("visitor\n\nu1\n")
    out = _cli(zerocf_env, "u0", "-k", "2", "--users-file", str(users), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert list(doc) == ["u0", "visitor", "u1"]
    assert len(doc["u0"]) == 2 and doc["u0"][0]["item"] == "i0"  # i4 seen; then one of the zero scores
    assert "i4" not in [e["item"] for e in doc["u0"]]
    assert all(set(e) == {"item", "score"} and isinstance(e["score"], float) for v in doc.values() for e in v)
    assert [e["item"] for e in doc["visitor"]] == ["i3", "i1"]
    assert [e["item"] for e in doc["u1"]] == ["i5", "i1"]
    table = _cli(zerocf_env, "u0", "visitor", "--include-seen")
    assert table.returncode == 0 and "fallback" in table.stdout and "i4" in table.stdout


def test_cli_without_model_exits_2(zerocf_env: dict[str, str], topic_prefix: str) -> None:
    out = _cli(zerocf_env, "u0", "--json")
    assert out.returncode == 2 and out.stdout == ""
    assert f"no model in Redis namespace {topic_prefix} at redis://" in out.stderr
    assert "run `zerocf lmf` or `zerocf als --once` first" in out.stderr
