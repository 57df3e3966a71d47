"""Feedback types: the weights map, the raw field, the events, and what LMF and ALS do with explicit negatives."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import scipy.sparse as sp

from stream.config import StreamConfig, load
from stream.errors import ConfigError, InvalidEvent
from stream.events import (
    DEFAULT_FEEDBACK,
    Event,
    RawClick,
    decode_events,
    encode_click,
    encode_events,
    event_records,
    parse_click,
    parse_feedback_weights,
    to_events,
)
from workers.batch.interactions import InteractionMatrix
from workers.config import LMFConfig
from workers.kernels.als import als_fit, confidence, fold_in, wmf_loss
from workers.online.model import OnlineModel

TS = 1_700_000_000_000
WEIGHTS = {"click": 1.0, "like": 2.0, "purchase": 5.0, "dislike": -1.0, "skip": -0.25}


# ------------------------------------------------------------------- the map and the raw field
def test_feedback_weights_parse_and_refuse_with_the_rule() -> None:
    assert parse_feedback_weights("") == {"click": 1.0} == dict(DEFAULT_FEEDBACK)
    assert parse_feedback_weights("click:0.5,skip:-0.25") == {"click": 0.5, "skip": -0.25}
    for bad, rule in [("like", "type:weight"), ("Like:2", "type:weight"), ("like:x", "non-zero"),
                      ("like:0", "non-zero"), ("like:1e9", "<= 1000"), ("like:nan", "non-zero"),
                      ("click:-1", "plain clicks are positive")]:  # fmt: skip
        with pytest.raises(ValueError, match=rule):
            parse_feedback_weights(bad)
    assert load(StreamConfig, {"ZEROCF_FEEDBACK_WEIGHTS": "like:2,dislike:-1"}).feedback == {
        "click": 1.0, "like": 2.0, "dislike": -1.0}  # fmt: skip
    with pytest.raises(ConfigError, match="ZEROCF_FEEDBACK_WEIGHTS='like:0'"):
        load(StreamConfig, {"ZEROCF_FEEDBACK_WEIGHTS": "like:0"})


def test_raw_feedback_field_is_optional_and_checked() -> None:
    assert parse_click(encode_click("u", "i", TS), TS).feedback == "click"
    assert parse_click(b'{"user_id": "u", "item_id": "i", "ts": %d, "feedback": null}' % TS, TS).feedback == "click"
    assert parse_click(encode_click("u", "i", TS, count=3, feedback="play"), TS) == RawClick("u", "i", TS, None, 3,
                                                                                             "play")  # fmt: skip
    for bad in (b'"Like"', b'""', b"7", b'"x' + b"y" * 40 + b'"', b'"a b"'):
        with pytest.raises(InvalidEvent, match="is not a feedback type"):
            parse_click(b'{"user_id": "u", "item_id": "i", "ts": %d, "feedback": %s}' % (TS, bad), TS)


# ------------------------------------------------------------------- events
def test_events_carry_the_weighted_type_and_negatives() -> None:
    def one(feedback: str, count: int = 1) -> Event:
        return to_events(RawClick("u", "i", TS, None, count, feedback), "p.clicks", 1, 9, WEIGHTS)[0]

    plain, like, buy, dislike, skip = one("click", 2), one("like"), one("purchase", 3), one("dislike"), one("skip", 2)
    assert (plain.type, plain.weight, plain.fb) == ("click", 2.0, None)
    assert (like.type, like.weight, like.fb) == ("click", 2.0, "like")
    assert (buy.type, buy.weight, buy.fb) == ("click", 15.0, "purchase")
    assert (dislike.type, dislike.weight, dislike.fb) == ("negative", 1.0, "dislike")
    assert (skip.type, skip.weight, skip.fb) == ("negative", 0.5, "skip")
    assert b'"fb"' not in plain.to_json()  # a plain click keeps the nine keys older readers expect
    for e in (plain, like, buy, dislike, skip):
        assert Event.from_json(e.to_json()) == e and decode_events(encode_events([e])) == ([e], [])
        raw = RawClick("u", "i", TS, None, int(e.weight / abs(WEIGHTS[e.fb or "click"])), e.fb or "click")
        assert event_records(raw, "p.clicks", 1, 9, WEIGHTS) == [(e.key, e.to_json())]
    with pytest.raises(InvalidEvent, match=r"feedback 'wow' is not configured \(known: click, dislike, like"):
        to_events(RawClick("u", "i", TS, None, 1, "wow"), "p.clicks", 1, 9, WEIGHTS)
    with pytest.raises(InvalidEvent, match="not configured"):
        event_records(RawClick("u", "i", TS, None, 1, "like"), "p.clicks", 1, 9)  # the default map: clicks only


def test_event_reader_refuses_inconsistent_feedback_fields() -> None:
    good = to_events(RawClick("u", "i", TS, None, 1, "dislike"), "p.clicks", 0, 3, WEIGHTS)[0]
    cases = {
        b'"fb":"dislike"': b'"fb":"click"',  # "click" is never named
        b'"type":"negative"': b'"type":"impression"',  # fb only on clicks and negatives
        b',"fb":"dislike"': b"",  # a negative names its type
        b'"weight":1.0': b'"weight":0.0',
    }
    for old, new in cases.items():
        events, bad = decode_events(good.to_json().replace(old, new))
        assert events == [] and len(bad) == 1, (new, bad)


# ------------------------------------------------------------------- ALS: observed zeros
def test_interaction_matrix_sums_signed_weights() -> None:
    m = InteractionMatrix()
    m.add_batch(["u", "u", "u", "v"], ["a", "a", "b", "b"], [2.0, -1.0, -1.0, 0.0])
    assert m.to_csr().toarray().tolist() == [[1.0, -1.0], [0.0, 0.0]]


def _dense_objective(F: np.ndarray, U: np.ndarray, V: np.ndarray, reg: float, alpha: float) -> float:
    pref = (F > 0).astype(np.float64)
    conf = 1.0 + alpha * np.abs(F)
    return float((conf * (pref - U.astype(np.float64) @ V.T.astype(np.float64)) ** 2).sum()
                 + reg * ((U.astype(np.float64) ** 2).sum() + (V.astype(np.float64) ** 2).sum()))  # fmt: skip


def _random_signed(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    F = np.where(rng.random((30, 20)) < 0.25, rng.integers(1, 4, (30, 20)), 0).astype(np.float32)
    F[rng.random(F.shape) < 0.08] = -1.0  # explicit negatives, some where there was nothing
    return F


def test_confidence_and_loss_read_negative_entries_as_observed_zeros() -> None:
    F = _random_signed()
    c = confidence(sp.csr_matrix(F), alpha=2.0)
    np.testing.assert_array_equal(c.toarray(), 2.0 * F)
    log = confidence(sp.csr_matrix(F), alpha=2.0, scaling="log")
    np.testing.assert_allclose(log.toarray(), np.sign(F) * 2.0 * np.log1p(np.abs(F)), rtol=1e-6)
    rng = np.random.default_rng(1)
    U, V = rng.standard_normal((30, 3)).astype(np.float32), rng.standard_normal((20, 3)).astype(np.float32)
    assert wmf_loss(c, U, V, 0.1) == pytest.approx(_dense_objective(F, U, V, 0.1, 2.0), rel=1e-5)


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_als_rows_solve_the_weighted_problem_with_observed_zeros(solver: str) -> None:
    F, reg, alpha = _random_signed(2), 0.1, 2.0
    U, V, _ = als_fit(sp.csr_matrix(F), factors=3, reg=reg, alpha=alpha, iterations=3, solver=solver, cg_steps=8,
                      rng=np.random.default_rng(0))  # fmt: skip
    U64 = U.astype(np.float64)
    for i in range(F.shape[1]):  # the last half-sweep solved the items against U: compare with the closed form
        conf, pref = 1.0 + alpha * np.abs(F[:, i]), (F[:, i] > 0).astype(np.float64)
        A = (U64 * conf[:, None]).T @ U64 + reg * np.eye(3)
        want = np.linalg.solve(A, U64.T @ (conf * pref))
        np.testing.assert_allclose(V[i], want, rtol=1e-3, atol=1e-3)
    # the same item factors without the negatives differ: the observed zeros were used
    U2, V2, _ = als_fit(sp.csr_matrix(np.maximum(F, 0)), factors=3, reg=reg, alpha=alpha, iterations=3,
                        solver=solver, cg_steps=8, rng=np.random.default_rng(0))  # fmt: skip
    assert not np.allclose(V, V2, atol=1e-3)


def test_fold_in_of_a_user_with_a_dislike() -> None:
    rng = np.random.default_rng(3)
    V = rng.standard_normal((6, 2)).astype(np.float32)
    got = fold_in(V, [0, 1], [2.0, -1.0], reg=0.5, alpha=1.0)
    V64 = V.astype(np.float64)
    conf = np.ones(6)
    conf[[0, 1]] = [3.0, 2.0]
    pref = np.zeros(6)
    pref[0] = 1.0
    want = np.linalg.solve((V64 * conf[:, None]).T @ V64 + 0.5 * np.eye(2), V64.T @ (conf * pref))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ------------------------------------------------------------------- LMF: a negative step
def _event(kind: str, user: str, item: str, n: int, weight: float, fb: str | None) -> Event:
    return Event(f"t.clicks:0:{n}:0", kind, user, item, TS + n, weight, None, None, f"t.clicks/0/{n}", fb)  # type: ignore[arg-type]


def test_lmf_plans_explicit_negatives_as_weighted_negative_steps_and_learns_them() -> None:
    cfg = LMFConfig(factors=4, negatives=2, reservoir=100)
    m = OnlineModel(cfg, seed=0)
    rng = np.random.default_rng(0)
    rows = np.hstack([rng.standard_normal((5, 4)) * 0.3, np.zeros((5, 1))]).astype(np.float32)
    m.warm([f"i{j}" for j in range(5)], rows, -1.0, {f"i{j}": 1.0 for j in range(5)}, {}, TS, 3_600_000)
    events = [_event("click", "u", "i0", 0, 2.0, "like"), _event("negative", "u", "i1", 1, 3.0, "dislike"),
              _event("click", "v", "i1", 2, 1.0, None)]  # fmt: skip
    plan = m.plan(0, events)
    assert [c[1] for c in plan.clicks] == ["i0", "i1"] and plan.negatives == [("u", "i1", TS + 1, 3.0)]
    assert plan.ev_exposure.tolist() == [False, False, True] and plan.n_exposure == 0
    np.testing.assert_allclose(plan.ev_weight, [1 + np.log(2.0), 1.0, 1 + np.log(3.0)], rtol=1e-6)
    assert plan.seen_adds() == [("u", "i0", TS), ("v", "i1", TS + 2), ("u", "i1", TS + 1)]
    user = np.hstack([rows[1, :4] * 2, [0.0]]).astype(np.float32)  # u starts out liking i1
    m.load_users(plan.fetch_users, np.stack([user, user]), np.array([True, True]), np.zeros((2, 2), np.float32),
                 {}, plan)  # fmt: skip
    before = float(user @ m.V[1])
    result = m.train(plan)
    u_row = result.user_rows[plan.users.index("u")]
    assert float(u_row @ m.V[1]) < before  # the dislike pushed u away from i1
    assert result.counts == {"i0": 2.0, "i1": 1.0}  # the dislike counts in no popularity
    m.commit(plan, result)
    assert set(m.seen["u"]) == {0, 1}  # the disliked item is seen: never offered, never sampled again


def test_event_reader_accepts_exactly_the_nine_keys_or_the_nine_and_fb() -> None:
    good = to_events(RawClick("u", "i", TS, None, 1, "like"), "p.clicks", 0, 3, WEIGHTS)[0]
    base = dict(orjson.loads(good.to_json()))
    assert decode_events(orjson.dumps(base))[0] == [good]
    variants = [
        {k: v for k, v in base.items() if k != "src"},  # 9 keys, one missing
        {**{k: v for k, v in base.items() if k != "src"}, "extra": 1},  # 10 keys with fb, one swapped
        {**{k: v for k, v in base.items() if k != "fb"}, "extra": 1},  # 10 keys without fb
        {**base, "extra": 1},  # 11 keys
        {k: v for k, v in base.items() if k not in ("fb", "imp")},  # 8 keys
    ]
    for obj in variants:
        events, bad = decode_events(orjson.dumps(obj))
        assert events == [] and bad[0].startswith("event has keys"), (sorted(obj), bad)
