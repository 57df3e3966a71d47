"""Metrics and split on hand-computed cases; the offline LMF replay learns a planted structure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from workers.evaluation.metrics import (
    PrequentialLog,
    holdout_mask,
    prequential_summary,
    rank_metrics,
    ranking_metrics,
)
from workers.evaluation.offline import (
    Stream,
    lmf_config,
    popularity,
    recommend,
    recommend_popular,
    replay_lmf,
)


def _test_matrix(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    dense = np.zeros((len(rows), n_items), np.float32)
    for u, items in enumerate(rows):
        dense[u, items] = 1
    return sp.csr_matrix(dense)


def test_metrics_by_hand() -> None:
    # user 0: test {0, 1, 2}, list [0, 5, 1, 6] at k=4 -> hits at ranks 0 and 2
    # user 1: test {7}, list [3, 4, 7, 5] -> hit at rank 2
    test = _test_matrix([[0, 1, 2], [7]], 10)
    top = np.array([[0, 5, 1, 6], [3, 4, 7, 5]])
    m = ranking_metrics(top, test, np.array([0, 1]), k=4)
    d = [1 / math.log2(r + 2) for r in range(4)]
    p0, p1 = 2 / 4, 1 / 4
    r0, r1 = 2 / 3, 1 / 1  # hits / min(k, |test|)
    n0 = (d[0] + d[2]) / (d[0] + d[1] + d[2])
    n1 = d[2] / d[0]  # ideal DCG over min(4, 1) = 1 position
    ap0 = (1 / 1 + 2 / 3) / 3  # precision at each hit, over min(k, |test|)
    ap1 = (1 / 3) / 1
    assert m["precision"] == pytest.approx((p0 + p1) / 2)
    assert m["recall"] == pytest.approx((r0 + r1) / 2)
    assert m["ndcg"] == pytest.approx((n0 + n1) / 2)
    assert m["map"] == pytest.approx((ap0 + ap1) / 2)
    assert m["coverage"] == pytest.approx(len({0, 5, 1, 6, 3, 4, 7}) / 10)
    assert m["users"] == 2


def test_recall_caps_at_k_and_users_without_test_are_skipped() -> None:
    test = _test_matrix([list(range(12)), []], 20)
    m = ranking_metrics(np.array([list(range(10)), list(range(10))]), test, np.array([0, 1]), k=10)
    assert m["users"] == 1
    assert m["recall"] == 1.0 and m["ndcg"] == pytest.approx(1.0) and m["map"] == pytest.approx(1.0)
    assert m["precision"] == 1.0


def test_empty_slots_never_hit() -> None:
    test = _test_matrix([[0]], 3)
    m = ranking_metrics(np.array([[-1, -1]]), test, np.array([0]), k=2)
    assert m["precision"] == m["recall"] == m["ndcg"] == 0.0 and m["coverage"] == 0.0


def test_rank_metrics_and_windows() -> None:
    assert rank_metrics([0, 9, 10, -1], k=10) == pytest.approx(
        {"hr": 0.5, "mrr": (1 + 1 / 10 + 1 / 11) / 4, "clicks": 4, "cold": 0.25}
    )
    s = prequential_summary([0, -1, 4, 30], [1, 1, 50, 50], k=5, window=2)
    # the cold click (-1) is served the popularity fallback, whose rank 1 is a hit at k=5
    assert [w["model_hr"] for w in s["windows"]] == [1.0, 0.5]
    assert s["model"]["cold"] == 0.25
    assert [w["pop_hr"] for w in s["windows"]] == [1.0, 0.0]
    assert s["warm"]["model"]["clicks"] == 3 and s["warm"]["popularity"]["hr"] == pytest.approx(1 / 3)
    log = PrequentialLog()
    assert log  # an empty log must still count as a hook
    log([("u", "i", 3, 7)])
    assert log.model_ranks().tolist() == [3] and log.pop_ranks().tolist() == [7]


def test_temporal_split_by_hand() -> None:
    # user 0: 10 interactions, ts descending with index -> the 2 earliest indices are the latest in time
    # user 1: 4 interactions (< 5) -> all train; user 2: 5 -> round(1.0) = 1 test, the latest
    user = np.array([0] * 10 + [1] * 4 + [2] * 5)
    ts = np.concatenate([np.arange(10)[::-1], np.arange(4), [5, 1, 9, 3, 7]])
    mask = holdout_mask(user, ts, 3)
    assert np.flatnonzero(mask).tolist() == [0, 1, 16]


def test_split_without_timestamps_is_seeded_and_per_user() -> None:
    user = np.repeat(np.arange(50), 10)
    a = holdout_mask(user, None, 50, seed=3)
    assert np.array_equal(a, holdout_mask(user, None, 50, seed=3))
    assert not np.array_equal(a, holdout_mask(user, None, 50, seed=4))
    assert np.bincount(user[a], minlength=50).tolist() == [2] * 50


def test_popularity_excludes_training_items() -> None:
    train = sp.csr_matrix(np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], np.float32))
    pop = popularity(train)
    assert pop.tolist() == [3, 2, 1, 0]
    assert recommend_popular(pop, train, [0, 2], k=2).tolist() == [[1, 2], [3, -1]]


def _planted(
    n_users: int = 120, n_items: int = 120, groups: int = 4, per_user: int = 12, seed: int = 0
) -> tuple[Stream, np.ndarray, np.ndarray]:
    """Each user clicks items of its own group (popular items across groups are not favoured)."""
    rng = np.random.default_rng(seed)
    ug = np.arange(n_users) % groups
    ig = np.arange(n_items) % groups
    users, items = [], []
    for u in range(n_users):
        mine = np.flatnonzero(ig == ug[u])
        users += [u] * per_user
        items += rng.choice(mine, per_user, replace=False).tolist()
    order = rng.permutation(len(users))
    s = Stream(
        np.array(users, np.int32)[order],
        np.array(items, np.int32)[order],
        np.ones(len(users), np.float32),
        n_users,
        n_items,
    )
    return s, ug, ig


def test_offline_lmf_learns_planted_groups_better_than_popularity() -> None:
    s, ug, ig = _planted()
    n = s.user.size
    is_test = holdout_mask(s.user, np.arange(n), s.n_users, seed=0)
    train = Stream(s.user[~is_test], s.item[~is_test], s.count[~is_test], s.n_users, s.n_items)
    test = sp.csr_matrix(
        (np.ones(is_test.sum(), np.float32), (s.user[is_test], s.item[is_test])), shape=(s.n_users, s.n_items)
    )
    users = np.flatnonzero(np.diff(test.indptr))
    U, V = replay_lmf(train, lmf_config(16, seed=0, lr=0.2, batch=200), epochs=6, seed=0)
    tr = train.csr()
    lmf = ranking_metrics(recommend(U, V, tr, users, 10), test, users, 10)
    pop = ranking_metrics(recommend_popular(popularity(tr), tr, users, 10), test, users, 10)
    top = recommend(U, V, tr, users, 10)
    same_group = np.mean(ig[top] == ug[users][:, None])
    assert same_group > 0.8
    assert lmf["ndcg"] > pop["ndcg"] + 0.1
