"""Tests of stream.replay.datasets: readers with corrupted lines, ordering, impressions, synthetic data."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stream.events import (
    MIN_TS_MS,
    encode_click,
    encode_impression,
    parse_click,
    parse_impression,
)
from stream.replay.datasets import (
    BadDataLine,
    BadLine,
    Interaction,
    planted_structure,
    read_interactions,
    synthesize_impressions,
    synthetic_dataset,
    time_ordered,
    write_csv,
)
from tests.helpers import DATASETS

ML100K = DATASETS / "ml-100k" / "u.data"
LASTFM = DATASETS / "lastfm-2k" / "user_artists.dat"


def read(tmp_path: Path, data: bytes, fmt: str, **kw: object) -> tuple[list[Interaction], list[BadLine]]:
    f = tmp_path / "data"
    f.write_bytes(data)
    bad: list[BadLine] = []
    rows = list(read_interactions(f, fmt, on_bad_line=bad.append, **kw))  # type: ignore[arg-type]
    return rows, bad


def test_csv_reader_timestamps_counts_and_bad_lines(tmp_path: Path) -> None:
    data = (
        b"user_id,item_id,timestamp,count\n"
        b"u1,i1,1700000000,2\n"  # seconds
        b"u1,i2,1700000000123,\n"  # ms, empty count
        b'"u,2",i3,2023-11-14T22:13:20Z,1\n'
        b"u3,i4\n"  # wrong field count
        b"u3,i4,yesterday,1\n"  # bad ts
        b",i4,1700000000,1\n"  # empty id
        b"\n"
        b"u4,i5,1700000000,0\n"  # count out of range
        b"u5,\xff,1700000000,1\n"
    )  # not UTF-8
    rows, bad = read(tmp_path, data, "csv")
    assert rows == [
        Interaction("u1", "i1", 1_700_000_000_000, 2, 2),
        Interaction("u1", "i2", 1_700_000_000_123, 1, 3),
        Interaction("u,2", "i3", 1_700_000_000_000, 1, 4),
    ]
    assert [(b.line_no, b.text) for b in bad] == [
        (5, "u3,i4"),
        (6, "u3,i4,yesterday,1"),
        (7, ",i4,1700000000,1"),
        (9, "u4,i5,1700000000,0"),
        (10, "u5,\ufffd,1700000000,1"),
    ]
    reasons = [b.reason for b in bad]
    assert "has 2 fields" in reasons[0] and "'yesterday'" in reasons[1] and "user_id '' is empty" in reasons[2]
    assert "count 0 is out of range" in reasons[3] and "UTF-8" in reasons[4]


def test_csv_requires_header(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not the header"):
        read(tmp_path, b"u1,i1,1700000000\n", "csv")


def test_bad_line_without_callback_raises_with_line_number(tmp_path: Path) -> None:
    f = tmp_path / "u.data"
    f.write_bytes(b"1\t2\t3\t881250949\n1\t2\n")
    it = read_interactions(f, "movielens")
    assert next(it).line_no == 1
    with pytest.raises(BadDataLine, match="line 2: has 2 fields") as info:
        next(it)
    assert info.value.bad.line_no == 2


def test_movielens_both_layouts_and_min_rating(tmp_path: Path) -> None:
    rows, bad = read(tmp_path, b"196\t242\t3\t881250949\n186\t302\t5\t891717742\n22\t377\t1\tnope\n", "movielens")
    assert [(r.user_id, r.item_id, r.ts_ms, r.count) for r in rows] == [
        ("196", "242", 881_250_949_000, 1),
        ("186", "302", 891_717_742_000, 1),
    ]
    assert bad == [BadLine(3, "22\t377\t1\tnope", "timestamp 'nope' is not an integer")]
    rows, bad = read(
        tmp_path, b"1::1193::5::978300760\r\n1::661::3::978302109\r\n1::914\r\n", "movielens", min_rating=4
    )
    assert [(r.item_id, r.line_no) for r in rows] == [("1193", 1)]
    assert [b.line_no for b in bad] == [3]
    rows, bad = read(tmp_path, b"\n1::2::5::978300760\n", "movielens")  # separator from first non-blank line
    assert [(r.item_id, r.line_no) for r in rows] == [("2", 2)] and not bad


def test_lastfm_header_crlf_weights(tmp_path: Path) -> None:
    data = b"userID\tartistID\tweight\r\n2\t51\t13883\r\n2\t52\tabc\r\n3\t\t5\r\n2\t53\t1\t9\r\n4\t7\t1\r\n"
    rows, bad = read(tmp_path, data, "lastfm")
    assert rows == [Interaction("2", "51", None, 13883, 2), Interaction("4", "7", None, 1, 6)]
    assert [b.line_no for b in bad] == [3, 4, 5]
    assert "weight 'abc'" in bad[0].reason and "item_id ''" in bad[1].reason and "has 4 fields" in bad[2].reason
    rows, bad = read(tmp_path, b"2\t51\t13883\n", "lastfm")  # headerless copy: line 1 is data
    assert len(rows) == 1 and not bad


def test_time_ordered_sorts_stably_and_rebases() -> None:
    rows = [Interaction("u", "a", 3000, 1, 1), Interaction("u", "b", 1000, 1, 2), Interaction("u", "c", 1000, 1, 3)]
    assert [r.item_id for r in time_ordered(rows)] == ["b", "c", "a"]
    assert [r.ts_ms for r in time_ordered(rows, base_ts_ms=MIN_TS_MS)] == [MIN_TS_MS, MIN_TS_MS, MIN_TS_MS + 2000]
    with pytest.raises(ValueError, match="1 of 2 interactions have no timestamp"):
        time_ordered([rows[0], Interaction("u", "d", None, 1, 4)])


def test_time_ordered_without_timestamps_keeps_order_in_the_past() -> None:
    rows = [Interaction("u", x, None, 1, n) for n, x in enumerate("zyx")]
    out = time_ordered(rows)
    assert [r.item_id for r in out] == ["z", "y", "x"]
    assert [b.ts_ms - a.ts_ms for a, b in zip(out, out[1:])] == [1000, 1000]  # type: ignore[operator]
    now_ms = time.time_ns() // 1_000_000
    assert all(MIN_TS_MS <= r.ts_ms <= now_ms for r in out)  # type: ignore[operator]


def test_synthesize_impressions_links_and_validates() -> None:
    clicks = time_ordered(synthetic_dataset(50, 200, 300, seed=5))
    rng = np.random.default_rng(7)
    pairs = synthesize_impressions(clicks, 10, rng)
    again = synthesize_impressions(clicks, 10, np.random.default_rng(7))
    assert pairs == again and len(pairs) == 300
    for (imp, click), src in zip(pairs, clicks):
        assert len(set(imp.item_ids)) == 10 and click.item_id in imp.item_ids
        assert click.impression_id == imp.impression_id and imp.user_id == src.user_id
        now = click.ts
        assert parse_impression(encode_impression(imp.impression_id, imp.user_id, imp.item_ids, imp.ts), now) == imp
        assert (
            parse_click(encode_click(click.user_id, click.item_id, click.ts, click.impression_id, click.count), now)
            == click
        )
    assert len({imp.impression_id for imp, _ in pairs}) == 300
    positions = Counter(imp.item_ids.index(c.item_id) for imp, c in pairs)
    assert len(positions) == 10  # clicked item appears at every display position


def test_synthesize_impressions_is_popularity_weighted() -> None:
    clicks = [Interaction("u", "c", 1_700_000_000_000, 1, 1)] * 2000
    pop = {"c": 1.0, "hot": 100.0, "warm": 10.0, "cold": 1.0, "zero": 0.0}
    shown = Counter(
        x
        for imp, _ in synthesize_impressions(clicks, 2, np.random.default_rng(0), pop)
        for x in imp.item_ids
        if x != "c"
    )
    assert shown["zero"] == 0 and shown["hot"] > 5 * shown["warm"] > 0
    with pytest.raises(ValueError, match="n_shown 6"):
        synthesize_impressions(clicks, 6, np.random.default_rng(0), pop)


def test_synthetic_dataset_deterministic_and_increasing() -> None:
    a = synthetic_dataset(100, 300, 5000, seed=11)
    assert a == synthetic_dataset(100, 300, 5000, seed=11)
    assert a != synthetic_dataset(100, 300, 5000, seed=12)
    ts = [r.ts_ms for r in a]
    assert all(x < y for x, y in zip(ts, ts[1:])) and ts[0] > 1_700_000_000_000  # type: ignore[operator]
    assert [r.line_no for r in a[:3]] == [1, 2, 3]


def test_synthetic_dataset_power_law_and_planted_groups() -> None:
    n_items, k = 1000, 8
    rows = synthetic_dataset(500, n_items, 50_000, k_latent=k, seed=3)
    counts = np.array(sorted(Counter(r.item_id for r in rows).values(), reverse=True))
    assert counts[: n_items // 10].sum() / counts.sum() > 0.5  # top 10% of items get most clicks
    truth = planted_structure(500, n_items, k_latent=k, seed=3)
    same = np.mean([truth.user_group[int(r.user_id[1:])] == truth.item_group[int(r.item_id[1:])] for r in rows])
    assert same > 0.5  # without planted structure it would be about 1/k = 0.125


def test_write_csv_round_trip(tmp_path: Path) -> None:
    rows = synthetic_dataset(20, 30, 100, seed=1) + [Interaction("a,b", "é", None, 7, 101)]
    f = tmp_path / "s.csv"
    assert write_csv(rows, f) == 101
    back = list(read_interactions(f, "csv"))
    assert [r[:4] for r in back] == [r[:4] for r in rows]
    assert back[0].line_no == 2  # line 1 is the header


@pytest.mark.skipif(not ML100K.exists(), reason="ml-100k not present")
def test_real_movielens_100k() -> None:
    bad: list[BadLine] = []
    rows = list(read_interactions(ML100K, "movielens", on_bad_line=bad.append))
    assert not bad and len(rows) == 100_000
    assert len({r.user_id for r in rows}) == 943 and len({r.item_id for r in rows}) == 1682


@pytest.mark.skipif(not LASTFM.exists(), reason="lastfm-2k not present")
def test_real_lastfm() -> None:
    bad: list[BadLine] = []
    rows = list(read_interactions(LASTFM, "lastfm", on_bad_line=bad.append))
    assert not bad and len(rows) == 92_834 and max(r.count for r in rows) == 352_698
