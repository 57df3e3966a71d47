"""Prequential protocol through the real broker, ingest, LMF worker and ALS re-solves."""

from __future__ import annotations

from collections import Counter

from stream.replay.datasets import synthetic_dataset
from workers.evaluation.metrics import prequential_summary
from workers.evaluation.prequential import prequential

N_ITEMS = 300


def test_pipeline_ranks_every_click_once_and_beats_random(zerocf_env: dict[str, str]) -> None:
    rows = synthetic_dataset(200, N_ITEMS, 3000, seed=0)
    ranks, info = prequential(
        rows, "pipeline", zerocf_env, chunk=500, resolve_every=1000, factors=16, seed=0, timeout=45
    )
    # every click ranked exactly once, across two generation switches
    assert len(ranks) == 3000 == info["sent"]
    assert Counter((r[0], r[1]) for r in ranks.rows) == Counter((r.user_id, r.item_id) for r in rows)
    published = [r for r in info["resolves"] if r["outcome"] == "published"]
    assert len(published) == 2 and all(r["scale"] > 0 for r in published)
    s = prequential_summary(ranks.model_ranks(), ranks.pop_ranks(), k=10, window=1000)
    random_hr = 10 / N_ITEMS
    assert s["model"]["hr"] > 4 * random_hr
    assert s["warm"]["model"]["hr"] > 4 * random_hr  # the model itself, not only the popularity fallback
    assert 0 < s["model"]["cold"] < 1 and s["warm"]["model"]["clicks"] == round(3000 * (1 - s["model"]["cold"]))
    assert len(s["windows"]) == 3
