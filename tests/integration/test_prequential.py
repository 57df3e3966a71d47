"""Prequential protocol through the real broker, ingest, LMF worker and ALS re-solves."""

from __future__ import annotations

from collections import Counter

import pytest

from stream.replay.datasets import synthetic_dataset
from workers.evaluation.metrics import prequential_summary
from workers.evaluation.prequential import prequential

N_ITEMS = 300


def test_pipeline_ranks_every_click_once_and_beats_random(zerocf_env: dict[str, str]) -> None:
    rows = synthetic_dataset(200, N_ITEMS, 3000, seed=0)
    ranks, info = prequential(rows, "pipeline", zerocf_env, chunk=500, resolve_every=1000, seed=0,
                              overrides={"factors": 16, "als_reg": 1.0})  # fmt: skip
    # every click ranked exactly once, across two generation switches
    assert len(ranks) == 3000 == info["sent"]
    assert Counter((r[0], r[1]) for r in ranks.rows) == Counter((r.user_id, r.item_id) for r in rows)
    assert [r["generation"] for r in info["resolves"]] == [2, 3] and all(r["scale"] > 0 for r in info["resolves"])
    s = prequential_summary(ranks, k=10, window=1000)
    random_hr = 10 / N_ITEMS
    assert s["model"]["hr"] > 4 * random_hr
    assert s["warm"]["model"]["hr"] > 4 * random_hr  # the model itself, not only the popularity fallback
    # per-click learning: a user is cold only for their very first click
    n_users = len({r.user_id for r in rows})
    assert s["model"]["cold"] == pytest.approx(n_users / 3000, abs=1e-4)
    assert s["warm"]["model"]["clicks"] == 3000 - n_users
    assert len(s["windows"]) == 3
