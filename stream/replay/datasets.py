"""Dataset readers (csv, MovieLens, Last.fm HetRec) and a synthetic generator (pure apart from file I/O).

Readers yield :class:`Interaction` rows. A corrupted line is never dropped silently: it is handed to the
``on_bad_line`` callback as a :class:`BadLine` (line number, text, reason), or, without a callback,
raises :class:`BadDataLine`. Blank lines are skipped. Lines are read as UTF-8, one record per line.

Formats
-------
``csv``
    Header ``user_id,item_id,timestamp[,count]``. ``timestamp`` is epoch seconds (an integer below 1e11),
    epoch milliseconds (1e11 or more) or an ISO-8601 string (naive = UTC); empty means unknown.
    ``count`` defaults to 1.
``movielens``
    ``u.data`` (``user \\t item \\t rating \\t ts-seconds``) or ``ratings.dat`` (``::``-separated),
    detected from the first line. Every rating is one click with count 1; ``min_rating`` keeps only
    ratings >= it (the others are filtered on purpose, not reported).
``lastfm``
    HetRec 2011 ``user_artists.dat``: header ``userID\\tartistID\\tweight`` (a missing header is logged),
    CRLF; ``count`` = play count (weight); no timestamps (``ts_ms`` is None, file order is kept).
"""

from __future__ import annotations

import csv
import gzip
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from stream.errors import InvalidEvent, ZerocfError
from stream.events import MAX_COUNT, MAX_ITEMS, RawClick, RawImpression, check_id, iso_to_ms

log = logging.getLogger(__name__)

_SECONDS_BELOW = 100_000_000_000  # integer timestamps below this are epoch seconds, else ms
_LASTFM_HEADER = ["userID", "artistID", "weight"]
Format = Literal["csv", "movielens", "lastfm"]
FORMATS: tuple[str, ...] = ("csv", "movielens", "lastfm")
_CSV_HEADER = ["user_id", "item_id", "timestamp", "count"]


class Interaction(NamedTuple):
    """One user-item interaction; ``line_no`` is the 1-based line in the source file."""

    user_id: str
    item_id: str
    ts_ms: int | None
    count: int  # type: ignore[assignment]  # the field shadows tuple.count, on purpose: it is the click count
    line_no: int


class BadLine(NamedTuple):
    """A corrupted input line and why it was rejected."""

    line_no: int
    text: str
    reason: str


class BadDataLine(ZerocfError, ValueError):
    """A corrupted line was met and no ``on_bad_line`` callback was given."""

    def __init__(self, bad: BadLine) -> None:
        super().__init__(
            f"line {bad.line_no}: {bad.reason}: {bad.text[:200]!r}; fix the line or pass "
            "on_bad_line= to collect bad lines"
        )
        self.bad = bad


def _int(text: str, field: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{field} {text!r} is not an integer") from None
    if not low <= value <= high:
        raise ValueError(f"{field} {value} is out of range {low}..{high}")
    return value


def _csv_ts(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if text.isdigit() and text.isascii():
        value = int(text)
        return value * 1000 if value < _SECONDS_BELOW else value
    try:
        return iso_to_ms(text)
    except (ValueError, OverflowError):
        raise ValueError(f"timestamp {text!r} is neither epoch seconds/ms nor ISO-8601") from None


def _row(fields: list[str], fmt: str, line_no: int, min_rating: float | None) -> Interaction | None:
    if fmt == "csv":
        if len(fields) not in (3, 4):
            raise ValueError(f"has {len(fields)} fields; expected 3 or 4 (user_id,item_id,timestamp[,count])")
        count = _int(fields[3], "count", 1, MAX_COUNT) if len(fields) == 4 and fields[3].strip() else 1
        ts = _csv_ts(fields[2])
    elif fmt == "movielens":
        if len(fields) != 4:
            raise ValueError(f"has {len(fields)} fields; expected 4 (user, item, rating, timestamp)")
        try:
            rating = float(fields[2])
        except ValueError:
            raise ValueError(f"rating {fields[2]!r} is not a number") from None
        ts = _int(fields[3], "timestamp", 0, _SECONDS_BELOW) * 1000
        if min_rating is not None and rating < min_rating:
            return None
        count = 1
    else:
        if len(fields) != 3:
            raise ValueError(f"has {len(fields)} fields; expected 3 (userID, artistID, weight)")
        count, ts = _int(fields[2], "weight", 1, MAX_COUNT), None
    try:
        user, item = check_id(fields[0].strip(), "user_id"), check_id(fields[1].strip(), "item_id")
    except InvalidEvent as e:
        raise ValueError(e.reason) from None
    return Interaction(user, item, ts, count, line_no)


def _is_header(text: str, fmt: str, path: str | Path) -> bool:
    """Whether the first line is the format's header; csv requires one, lastfm tolerates its absence."""
    if fmt == "lastfm":
        if [h.strip() for h in text.split("\t")] == _LASTFM_HEADER:
            return True
        log.warning("%s: no 'userID\\tartistID\\tweight' header; reading line 1 as data", path)
    elif fmt == "csv":
        if [h.strip() for h in next(csv.reader([text]))] in (_CSV_HEADER[:3], _CSV_HEADER):
            return True
        raise ValueError(
            f"{path}: first line {text[:100]!r} is not the header 'user_id,item_id,timestamp[,count]'; add it"
        )
    return False


def read_interactions(
    path: str | Path,
    fmt: Format,
    *,
    on_bad_line: Callable[[BadLine], None] | None = None,
    min_rating: float | None = None,
) -> Iterator[Interaction]:
    """Read a dataset file (gzip-compressed if its name ends in ``.gz``) as interactions, in file order.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); f = os.path.join(d, "u.data")
    >>> _ = open(f, "w").write("196\\t242\\t3\\t881250949\\n186\\t302\\tx\\t891717742\\n")
    >>> bad = []
    >>> list(read_interactions(f, "movielens", on_bad_line=bad.append))
    [Interaction(user_id='196', item_id='242', ts_ms=881250949000, count=1, line_no=1)]
    >>> bad[0].line_no, bad[0].reason
    (2, "rating 'x' is not a number")
    """
    if fmt not in ("csv", "movielens", "lastfm"):
        raise ValueError(f"fmt {fmt!r} is unknown; use 'csv', 'movielens' or 'lastfm'")
    sep, first = "\t", True
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                reason = f"not valid UTF-8 (byte {e.start})"
            else:
                if not text.strip():
                    continue
                if first:  # the first non-blank line: header check, separator detection
                    first = False
                    sep = "::" if fmt == "movielens" and "::" in text else sep
                    if _is_header(text, fmt, path):
                        continue
                fields = next(csv.reader([text])) if fmt == "csv" else text.split(sep)
                try:
                    row = _row(fields, fmt, line_no, min_rating)
                except ValueError as e:
                    reason = str(e)
                else:
                    if row is not None:
                        yield row
                    continue
            bad = BadLine(line_no, text, reason)
            if on_bad_line is None:
                raise BadDataLine(bad)
            on_bad_line(bad)


def time_ordered(interactions: Iterable[Interaction], base_ts_ms: int | None = None) -> list[Interaction]:
    """Order interactions by time for replay.

    With timestamps: a stable sort by ``ts_ms`` (ties keep file order); if *base_ts_ms* is given, all
    timestamps are shifted (gaps kept) so the earliest is *base_ts_ms* (MovieLens 100K dates from 1997,
    before the 2000 limit of ingest). Without any timestamps: file order is kept and row i gets
    ``base + i`` seconds, with ``base`` defaulting to now - N seconds (reads the clock) so every
    timestamp is in the past. A mix of rows with and without timestamps raises ``ValueError``.

    >>> rows = [Interaction("u", "a", None, 1, 2), Interaction("u", "b", None, 1, 3)]
    >>> [r.ts_ms for r in time_ordered(rows, base_ts_ms=1_700_000_000_000)]
    [1700000000000, 1700000001000]
    """
    rows = list(interactions)
    missing = sum(r.ts_ms is None for r in rows)
    if 0 < missing < len(rows):
        raise ValueError(f"{missing} of {len(rows)} interactions have no timestamp; give all or none one")
    if missing:
        if base_ts_ms is None:
            import time

            base_ts_ms = time.time_ns() // 1_000_000 - len(rows) * 1000
        return [r._replace(ts_ms=base_ts_ms + i * 1000) for i, r in enumerate(rows)]
    stamped = sorted(((int(r.ts_ms or 0), r) for r in rows), key=lambda tr: tr[0])  # every ts is set here
    if base_ts_ms is not None and stamped:
        shift = base_ts_ms - stamped[0][0]
        return [r._replace(ts_ms=ts + shift) for ts, r in stamped]
    return [r for _, r in stamped]


def _sample_others(cdf: npt.NDArray[np.float64], k: int, exclude: int, rng: np.random.Generator) -> list[int]:
    """k distinct indices != exclude, drawn successively with probability ∝ weight (rejection of repeats)."""
    chosen: dict[int, None] = {}
    for _ in range(1000):
        need = k - len(chosen)
        for j in np.searchsorted(cdf, rng.random(2 * need + 4) * cdf[-1], side="right").tolist():
            if j != exclude and j not in chosen:
                chosen[j] = None
                if len(chosen) == k:
                    return list(chosen)
    raise ValueError(f"could not draw {k} distinct items; too few items have positive popularity")


def synthesize_impressions(
    clicks: Iterable[Interaction],
    n_shown: int,
    rng: np.random.Generator,
    popularity: Mapping[str, float] | None = None,
    id_prefix: str = "imp-",
) -> list[tuple[RawImpression, RawClick]]:
    """Wrap every click in an impression of *n_shown* items and link the click to it.

    The impression shows the clicked item plus ``n_shown - 1`` distinct other items drawn by
    *popularity* (item id -> weight; default: click counts of *clicks*), in random display order,
    with id ``f"{id_prefix}{i}"`` (i = click index) and the click's timestamp (send the impression
    first). Clicks need timestamps (run :func:`time_ordered`).

    >>> clicks = [Interaction("u1", "a", 1_700_000_000_000, 1, 1), Interaction("u2", "b", 1_700_000_001_000, 1, 2)]
    >>> imp, click = synthesize_impressions(clicks, 2, np.random.default_rng(0))[0]
    >>> sorted(imp.item_ids), click.impression_id == imp.impression_id == "imp-0"
    (['a', 'b'], True)
    """
    clicks = list(clicks)
    if popularity is None:
        counts: dict[str, float] = {}
        for c in clicks:
            counts[c.item_id] = counts.get(c.item_id, 0.0) + c.count
        popularity = counts
    items = list(popularity)
    if not 1 <= n_shown <= min(MAX_ITEMS, len(items)):
        raise ValueError(f"n_shown {n_shown} must be 1..{min(MAX_ITEMS, len(items))} (items known, limit {MAX_ITEMS})")
    weights = np.array([popularity[i] for i in items], dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("popularity weights must be finite and >= 0")
    cdf = np.cumsum(weights)
    index = {item: j for j, item in enumerate(items)}
    out = []
    for i, c in enumerate(clicks):
        if c.ts_ms is None:
            raise ValueError(f"click {i} (line {c.line_no}) has no timestamp; run time_ordered() first")
        others = _sample_others(cdf, n_shown - 1, index.get(c.item_id, -1), rng) if n_shown > 1 else []
        shown = [c.item_id] + [items[j] for j in others if items[j] != c.item_id]
        order = rng.permutation(len(shown))
        imp_id = f"{id_prefix}{i}"
        out.append(
            (
                RawImpression(imp_id, c.user_id, tuple(shown[o] for o in order), c.ts_ms),
                RawClick(c.user_id, c.item_id, c.ts_ms, imp_id, c.count),
            )
        )
    return out


class Planted(NamedTuple):
    """Ground truth of :func:`synthetic_dataset`: latent group of each user and item, item popularity."""

    user_group: npt.NDArray[np.int64]
    item_group: npt.NDArray[np.int64]
    item_popularity: npt.NDArray[np.float64]


def planted_structure(n_users: int, n_items: int, k_latent: int = 8, zipf_a: float = 1.1, seed: int = 0) -> Planted:
    """The latent groups and power-law popularity (∝ rank^-zipf_a, ranks shuffled) behind a synthetic set.

    >>> p = planted_structure(4, 6, k_latent=2, seed=1)
    >>> p.user_group.shape, p.item_group.shape, round(float(p.item_popularity.sum()), 6)
    ((4,), (6,), 1.0)
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
    pop = np.arange(1, n_items + 1, dtype=np.float64) ** -zipf_a
    pop = pop[rng.permutation(n_items)]
    return Planted(rng.integers(0, k_latent, n_users), rng.integers(0, k_latent, n_items), pop / pop.sum())


def synthetic_dataset(
    n_users: int,
    n_items: int,
    n_clicks: int,
    k_latent: int = 8,
    zipf_a: float = 1.1,
    seed: int = 0,
    start_ts_ms: int = 1_700_000_000_000,
    affinity: float = 3.0,
    beta: float = 1.0,
) -> list[Interaction]:
    """Clicks with planted structure: P(item | user) ∝ popularity^beta × exp(affinity · [same group]).

    Users (``"u<n>"``) are drawn with mildly skewed activity (∝ rank^-0.5), items (``"i<n>"``) from the
    user's group distribution; see :func:`planted_structure` (same seed) for the truth. Timestamps
    strictly increase from *start_ts_ms* (gaps 1..2000 ms); ``line_no`` is the 1-based row index.

    >>> rows = synthetic_dataset(10, 20, 5, seed=3)
    >>> len(rows), rows == synthetic_dataset(10, 20, 5, seed=3), rows[0].ts_ms > 1_700_000_000_000
    (5, True, True)
    """
    if min(n_users, n_items, k_latent) < 1 or n_clicks < 0:
        raise ValueError("n_users, n_items and k_latent must be >= 1 and n_clicks >= 0")
    truth = planted_structure(n_users, n_items, k_latent, zipf_a, seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    activity = np.arange(1, n_users + 1, dtype=np.float64) ** -0.5
    users = rng.choice(n_users, size=n_clicks, p=activity[rng.permutation(n_users)] / activity.sum())
    base = truth.item_popularity**beta
    groups = truth.user_group[users]
    items = np.empty(n_clicks, dtype=np.int64)
    for g in range(k_latent):
        mask = groups == g
        cdf = np.cumsum(base * np.exp(affinity * (truth.item_group == g)))
        picks = np.searchsorted(cdf, rng.random(int(mask.sum())) * cdf[-1], side="right")
        items[mask] = np.minimum(picks, n_items - 1)
    ts = start_ts_ms + np.cumsum(rng.integers(1, 2001, n_clicks))
    return [
        Interaction(f"u{u}", f"i{i}", t, 1, n + 1)
        for n, (u, i, t) in enumerate(zip(users.tolist(), items.tolist(), ts.tolist()))
    ]


def write_csv(interactions: Iterable[Interaction], path: str | Path) -> int:
    """Write interactions as ``csv`` (header, timestamp in ms, empty if unknown); returns the row count.

    >>> import tempfile, os
    >>> f = os.path.join(tempfile.mkdtemp(), "s.csv")
    >>> write_csv(synthetic_dataset(3, 4, 2, seed=0), f)
    2
    >>> [r.count for r in read_interactions(f, "csv")]
    [1, 1]
    """
    n = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(_CSV_HEADER)
        for r in interactions:
            writer.writerow([r.user_id, r.item_id, "" if r.ts_ms is None else r.ts_ms, r.count])
            n += 1
    return n
