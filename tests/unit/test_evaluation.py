"""Metrics and splits on hand-computed cases, and one contract every model of ours obeys.

The contract (in the spirit of implicit's ``RecommenderBaseTestMixin``) runs the models the holdout scores --
the online LMF (one streaming pass of the production model), the pipeline (LMF + the ALS worker's re-solves and
handoff), ALS alone and most-popular -- on a planted dataset, each through the same scorer: lists are valid,
never hold a training item, are reproducible for a seed, and the personalised models find the planted
structure far better than popularity does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse as sp

from stream.replay.datasets import Interaction
from workers.config import ALSConfig, LMFConfig
from workers.evaluation.data import Data, Holdout, Stream
from workers.evaluation.holdout import _als_alone, _popular
from workers.evaluation.metrics import PrequentialLog, holdout_mask, prequential_summary, rank_metrics, ranking_metrics
from workers.evaluation.offline import popularity, recommend, replay_lmf, replay_pipeline


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
    n0 = (d[0] + d[2]) / (d[0] + d[1] + d[2])
    n1 = d[2] / d[0]  # ideal DCG over min(4, 1) = 1 position
    assert m["precision"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert m["recall"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["ndcg"] == pytest.approx((n0 + n1) / 2)
    assert m["map"] == pytest.approx(((1 + 2 / 3) / 3 + (1 / 3) / 1) / 2)
    assert m["coverage"] == pytest.approx(len({0, 5, 1, 6, 3, 4, 7}) / 10)
    assert m["users"] == 2


def test_recall_caps_at_k_and_users_without_test_are_skipped() -> None:
    test = _test_matrix([list(range(12)), []], 20)
    m = ranking_metrics(np.array([list(range(10)), list(range(10))]), test, np.array([0, 1]), k=10)
    assert m["users"] == 1
    assert m["recall"] == 1.0 and m["ndcg"] == pytest.approx(1.0) and m["map"] == pytest.approx(1.0)


def test_empty_slots_never_hit() -> None:
    m = ranking_metrics(np.array([[-1, -1]]), _test_matrix([[0]], 3), np.array([0]), k=2)
    assert m["precision"] == m["recall"] == m["ndcg"] == 0.0 and m["coverage"] == 0.0


def test_rank_metrics_expect_over_random_tie_breaks() -> None:
    # 3 ahead and 4 tied: the rank is uniform on 3..7, a hit at k=5 for ranks 3 and 4 (2 of 5)
    m = rank_metrics([3], [4], k=5)
    assert m["hr"] == pytest.approx(2 / 5, abs=1e-4)
    assert m["mrr"] == pytest.approx(np.mean([1 / (r + 1) for r in range(3, 8)]), abs=1e-4)
    assert rank_metrics([0, 9, 10], k=10)["hr"] == pytest.approx(2 / 3, abs=1e-4)
    assert rank_metrics([], k=10) == {"hr": 0.0, "mrr": 0.0, "clicks": 0}


def test_prequential_summary_serves_the_fallback_to_cold_clicks() -> None:
    log = PrequentialLog()
    assert log  # an empty log is still a hook
    # (user, item, model g/t, count g/t, decayed g/t, warm)
    log([("a", "x", 0, 0, 30, 0, 40, 0, 1), ("b", "x", 99, 0, 2, 0, 1, 0, 0), ("a", "y", 20, 0, 0, 0, 12, 0, 1)])
    s = prequential_summary(log, k=10, window=2)
    assert s["model"]["hr"] == pytest.approx(2 / 3, abs=1e-4)  # cold click b: the decayed rank 1 is served
    assert s["model"]["cold"] == pytest.approx(1 / 3, abs=1e-4)
    assert s["popularity"]["hr"] == pytest.approx(2 / 3, abs=1e-4) and s["decayed"]["hr"] == pytest.approx(
        1 / 3, abs=1e-4
    )
    assert s["warm"]["model"]["clicks"] == 2 and s["warm"]["model"]["hr"] == pytest.approx(0.5, abs=1e-4)
    assert [w["model_hr"] for w in s["windows"]] == [1.0, 0.0]


def test_temporal_split_by_hand() -> None:
    # user 0: 10 interactions, ts descending with index -> the 2 earliest indices are the latest in time
    # user 1: 4 interactions (< 5) -> all train; user 2: 5 -> round(1.0) = 1 test, the latest
    user = np.array([0] * 10 + [1] * 4 + [2] * 5)
    ts = np.concatenate([np.arange(10)[::-1], np.arange(4), [5, 1, 9, 3, 7]])
    assert np.flatnonzero(holdout_mask(user, ts, 3)).tolist() == [0, 1, 16]


def test_split_without_timestamps_is_seeded_and_per_user() -> None:
    user = np.repeat(np.arange(50), 10)
    a = holdout_mask(user, None, 50, seed=3)
    assert np.array_equal(a, holdout_mask(user, None, 50, seed=3))
    assert not np.array_equal(a, holdout_mask(user, None, 50, seed=4))
    assert np.bincount(user[a], minlength=50).tolist() == [2] * 50


def test_validation_is_carved_out_of_training_only() -> None:
    rows = [Interaction(f"u{u}", f"i{(u + t) % 30}", 946_684_800_000 + 1000 * t, 1, t) for u in range(20)
            for t in range(10)]  # fmt: skip
    h = Holdout(Data.from_rows(rows), seed=0)
    assert not (h.val & h.test).any() and not (h.fit_mask & (h.val | h.test)).any()
    assert (h.fit_mask | h.val | h.test).all() and h.val.sum() == h.test.sum() == 40


# ---------------------------------------------------------------------------------------------- contract
def _planted(n_users: int = 120, n_items: int = 120, groups: int = 4, per_user: int = 14,
             seed: int = 0) -> tuple[Data, np.ndarray, np.ndarray]:  # fmt: skip
    """Each user clicks items of its own group, in a random order over time; no item is globally popular."""
    rng = np.random.default_rng(seed)
    ug, ig = np.arange(n_users) % groups, np.arange(n_items) % groups
    rows = []
    for u in range(n_users):
        for i in rng.choice(np.flatnonzero(ig == ug[u]), per_user, replace=False):
            rows.append((u, int(i)))
    order = rng.permutation(len(rows))
    out = [Interaction(f"u{rows[n][0]:03d}", f"i{rows[n][1]:03d}", 946_684_800_000 + 1000 * t, 1, t)
           for t, n in enumerate(order)]  # fmt: skip
    return Data.from_rows(out), ug, ig


def _lmf(stream: Stream) -> object:
    return replay_lmf(stream, LMFConfig(factors=16, seed=1), seed=1)


def _pipeline(stream: Stream) -> object:
    return replay_pipeline(stream, LMFConfig(factors=16, seed=1), ALSConfig(factors=16, als_iterations=10), 600, 1)


def _als(stream: Stream) -> object:
    return _als_alone(stream, ALSConfig(factors=16, als_iterations=10))


MODELS: dict[str, tuple[Callable[[Stream], object] | None, bool]] = {
    "lmf": (_lmf, True),
    "pipeline": (_pipeline, True),
    "als": (_als, True),
    "popularity": (None, False),
}


def _lists(name: str, data: Data, h: Holdout) -> tuple[np.ndarray, sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    tr, train, test, users = h.split(False)
    fit, _ = MODELS[name]
    if fit is None:
        return _popular(popularity(train), train, users, 10), train, test, users
    return recommend(fit(data.stream(tr, 0)), train, users, 10), train, test, users  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def planted() -> tuple[Data, Holdout, np.ndarray, np.ndarray]:
    data, ug, ig = _planted()
    return data, Holdout(data, 0), ug, ig


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lists_are_valid_and_never_hold_a_training_item(name: str, planted: tuple) -> None:
    data, h, _ug, _ig = planted
    top, train, _test, users = _lists(name, data, h)
    assert top.shape == (users.size, 10) and top.max() < data.n_items
    for r, u in enumerate(users):
        got = top[r][top[r] >= 0]
        assert len(set(got.tolist())) == got.size, f"{name}: duplicate item for user {u}"
        assert not set(got.tolist()) & set(train[u].indices.tolist()), f"{name}: training item recommended"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_seed_reproduces_the_lists(name: str, planted: tuple) -> None:
    data, h, _ug, _ig = planted
    assert np.array_equal(_lists(name, data, h)[0], _lists(name, data, h)[0])


@pytest.mark.parametrize("name", sorted(n for n, (_f, personal) in MODELS.items() if personal))
def test_personalised_models_find_the_planted_groups(name: str, planted: tuple) -> None:
    data, h, ug, ig = planted
    top, _train, test, users = _lists(name, data, h)
    item_group = ig[[int(i[1:]) for i in data.items]]  # dense item index -> planted group
    user_group = ug[[int(u[1:]) for u in data.users]]
    own = np.mean([(item_group[top[r][top[r] >= 0]] == user_group[u]).mean() for r, u in enumerate(users)])
    pop = ranking_metrics(_lists("popularity", data, h)[0], test, users, 10, data.n_items)["ndcg"]
    ndcg = ranking_metrics(top, test, users, 10, data.n_items)["ndcg"]
    assert own > 0.9, f"{name}: only {own:.2f} of the recommended items are of the user's own group"
    assert ndcg > 2 * pop, f"{name}: NDCG {ndcg:.3f} vs popularity {pop:.3f}"
