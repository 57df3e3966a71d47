"""The online LMF model's in-process state and one mini-batch's computation (no Kafka, no Redis).

The worker (:mod:`workers.online.worker`) does the I/O; this module turns a partition's events into a
:class:`BatchPlan`, trains it click by click with :func:`workers.kernels.lmf.lmf_train`, and keeps:

- ``items`` / ``V`` / ``GV``: every item row of the generation (``k`` latent values + bias) and its AdaGrad
  accumulators, plus the global bias ``glob``. The kernel trains on these in place and the worker sends each
  touched row's change as an additive delta, so rows other workers update are never overwritten; rows this
  worker has not read since another worker changed them are stale until the next refresh (bounded by the
  worker's ``ZEROCF_LMF_ITEM_REFRESH_S``; with one worker the rows are exact).
- ``user_cache``: user rows and accumulators (a user has one writer: the worker of its partition, so the
  cache is never older than Redis), and ``seen``: each user's seen items, all of them within the retention
  window, never sampled as negatives.
- ``reservoir`` / ``sampler``: the popularity proposal ``P(j) ∝ f_j^α`` over a reservoir of recent clicks.
- ``count`` / ``decayed``: all-time and time-decayed click weight per item (the popularity baselines of the
  prequential ranks; the decayed one is what the store's fallback serves).
- ``exposure``: impressions not clicked within the window become weighted negatives (optional).
- explicit negatives (``"negative"`` events: a feedback type of negative weight, e.g. a dislike) are one
  negative step each, of the event's weight; their items join the user's seen items (never recommended again,
  not sampled as negatives: the explicit step already taught them) but not the popularity counts.
- ``hidden``: the catalogue's hidden or expired items (the worker sets it from :class:`stream.catalog.CatalogView`
  before each batch): never drawn as negatives (a withdrawn item says nothing about what a user dislikes).
- ``tombstones``: erased users (:mod:`stream.erasure`): :meth:`OnlineModel.erase` applies the rule to a batch
  and forgets the erased users' cached state (the worker loads the tombstones from Redis with the generation).

New users start from a small random vector (``ZEROCF_LMF_INIT_SCALE``), new items at zero, so two workers
that create the same item concurrently both add their deltas to zero and the row stays exact.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from stream.erasure import Tombstones
from stream.events import Event
from workers.config import LMFConfig
from workers.kernels.exposure import ExposureTracker
from workers.kernels.lmf import LMFParams, Touched, check_finite, event_weights, init_rows, lmf_train, positive_set
from workers.kernels.sampling import PopularitySampler, Reservoir
from workers.online.stored import StoredRows
from workers.store import GLOBAL_ROW, SEEN_EXPIRE, SEEN_PRUNE

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
USER_CACHE_LIMIT = 1_000_000  # users whose rows and seen items a worker keeps (LRU)
DECAY_RESCALE = 500.0  # half-lives past the reference after which the decayed popularity is rescaled


class IdMap:
    """String id <-> dense int32 index, growing.

    >>> m = IdMap()
    >>> m.index_many(["a", "b", "a"]).tolist(), m.ids
    ([0, 1, 0], ['a', 'b'])
    """

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self.ids: list[str] = []
        self._index: dict[str, int] = {}
        for i in ids:
            self.index(i)

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, key: str) -> int:
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = len(self.ids)
            self.ids.append(key)
        return idx

    def index_many(self, keys: Sequence[str]) -> npt.NDArray[np.int32]:
        return np.fromiter((self.index(k) for k in keys), dtype=np.int32, count=len(keys))

    def get(self, key: str) -> int | None:
        return self._index.get(key)


def lmf_params(cfg: LMFConfig) -> LMFParams:
    """The kernel's hyper-parameters from the worker's config."""
    return LMFParams(lr=cfg.lr, reg=cfg.reg, lr_bias=cfg.lr_bias, reg_bias=cfg.reg_bias, lr_global=cfg.lr_global,
                     clip=cfg.clip, negatives=cfg.negatives, hard_share=cfg.hard_share,
                     hard_candidates=cfg.hard_candidates, uniform_mix=cfg.uniform_mix,
                     adagrad=cfg.adagrad)  # fmt: skip


class SeenItems:
    """One user's seen item rows: insertion order for the cap (oldest first), an int32 array for the kernel.

    A re-click moves the item to the newest end and leaves the array alone (a set's content, not its order,
    is what the sampler needs), so building a batch's positive set is one concatenation of arrays instead of a
    Python loop over every user's whole history.

    >>> s = SeenItems([3, 5]); s.add(7, cap=3); s.add(3, cap=3); s.add(9, cap=3)
    >>> list(s), sorted(s.array().tolist())
    ([7, 3, 9], [3, 7, 9])
    """

    __slots__ = ("_order", "_buf", "_n", "pruned_ts", "expired_s")

    def __init__(self, items: Iterable[int] = ()) -> None:
        self._order: dict[int, None] = dict.fromkeys(items)
        self._buf = np.fromiter(self._order, np.int32, len(self._order))
        self._n = self._buf.size
        self.pruned_ts: int | None = None  # event time of the last retention prune this worker asked Redis for
        self.expired_s: float | None = None  # wall time of the last TTL refresh this worker asked Redis for

    def add(self, item: int, cap: int) -> None:
        if item in self._order:
            del self._order[item]
            self._order[item] = None
            return
        self._order[item] = None
        if self._n == self._buf.size:
            self._buf = np.concatenate([self._buf, np.empty(max(8, self._n), np.int32)])
        self._buf[self._n] = item
        self._n += 1
        while len(self._order) > cap:
            oldest = next(iter(self._order))
            del self._order[oldest]
            at = int(np.flatnonzero(self._buf[: self._n] == oldest)[0])
            self._n -= 1
            self._buf[at] = self._buf[self._n]

    def array(self) -> npt.NDArray[np.int32]:
        return self._buf[: self._n]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


@dataclass
class BatchPlan:
    """One partition's mini-batch, ready to fetch and train. Item indices are rows of the model's ``V``."""

    users: list[str]  # unique users of the batch (row order of the batch's user matrix)
    ev_user: I32  # (E,) user row per training event
    ev_item: I32  # (E,) item row per training event
    ev_weight: F32  # (E,) SGD weight (click-count transform, or the exposure weight)
    ev_exposure: npt.NDArray[np.bool_]  # (E,) a negative step (explicit negative, or shown and not clicked)
    ev_ts: npt.NDArray[np.int64]  # (E,) event time, ms
    clicks: list[tuple[str, str, int, float]] = field(default_factory=list)  # (user, item, ts, count)
    new_items: list[str] = field(default_factory=list)  # items with no row here yet: fetch them first
    fetch_users: list[str] = field(default_factory=list)  # users not in the cache: fetch rows and seen items
    n_events: int = 0  # events applied (clicks + impressions) after de-duplication
    n_exposure: int = 0
    negatives: list[tuple[str, str, int, float]] = field(default_factory=list)  # explicit (user, item, ts, weight)
    erased: dict[str, int] = field(default_factory=dict)  # users erased by this batch -> erased_at ms

    def click_users(self) -> list[str]:
        """The user of each click, in stream order."""
        return [c[0] for c in self.clicks]

    def seen_adds(self) -> list[tuple[str, str, int]]:
        """``(user, item, ts)`` the batch adds to seen sets: its clicks, then its explicit negatives."""
        return [(u, i, ts) for u, i, ts, _w in self.clicks + self.negatives]


@dataclass
class TrainResult:
    """What one batch changed: absolute user rows, additive item deltas (the global row included)."""

    user_rows: F32
    user_acc: F32
    item_ids: list[str]
    item_deltas: F32
    item_acc_deltas: F32
    counts: dict[str, float]
    popularity: dict[str, float]
    loss: float
    finite: bool
    touched: Touched
    glob_before: float
    ranks: npt.NDArray[np.int64] | None = None  # (clicks, 7), see lmf_train
    ranked: npt.NDArray[np.bool_] | None = None  # which clicks were ranked
    # per item id: the stored version the write is based on (-1 unknown) and stored row (accumulators) + delta
    item_versions: npt.NDArray[np.int64] | None = None
    item_rows: F32 | None = None
    item_acc: F32 | None = None


def rank_rows(plan: BatchPlan, result: TrainResult) -> list[tuple[Any, ...]]:
    """``(user, item, ranks...)`` per click of a trained batch, for a prequential log (see ``lmf_train``)."""
    if result.ranks is None or result.ranked is None:
        return []
    return [(c[0], c[1], *map(int, r)) for c, r, ok in zip(plan.clicks, result.ranks, result.ranked) if ok]


class OnlineModel:
    """Sampler, caches and training of the online worker; see the module docstring.

    >>> from workers.config import LMFConfig
    >>> m = OnlineModel(LMFConfig(factors=4), seed=0)
    >>> m.warm(["i1", "i2"], np.zeros((2, 5), np.float32), -8.0, {"i1": 5.0, "i2": 1.0}, {}, 0, 86_400_000)
    >>> m.n_items, float(m.glob[0])
    (2, -8.0)
    """

    def __init__(self, cfg: LMFConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.k = cfg.factors
        self.params = lmf_params(cfg)
        self.rng = np.random.default_rng(seed)
        # user -> (row (k+1,), accumulators (2,), whether the user had a vector before: found or trained)
        self.user_cache: OrderedDict[str, tuple[F32, F32, bool]] = OrderedDict()
        self.seen: OrderedDict[str, SeenItems] = OrderedDict()  # user -> seen item rows, oldest first
        self.users = IdMap()  # only for the exposure trackers' integer keys
        self.exp_items = IdMap()  # likewise (never self.items: a shown item has no row until trained)
        self.clicks_trained = 0
        self.exposure: dict[int, ExposureTracker] = {}
        self.tombstones = Tombstones()
        self.hidden: frozenset[str] = frozenset()  # catalogue: hidden or expired items, never drawn as negatives
        self._banned: tuple[frozenset[str], int, npt.NDArray[np.bool_]] | None = None  # (hidden, rows, mask)
        self.warm([], np.zeros((0, self.k + 1), np.float32), 0.0, {}, {}, 0, 86_400_000)

    # -------------------------------------------------------------- state
    @property
    def n_items(self) -> int:
        return len(self.items)

    def banned(self) -> npt.NDArray[np.bool_]:
        """One flag per item row: hidden or expired in the catalogue (:attr:`hidden`), never a sampled negative.
        Rebuilt only when the hidden set or the number of rows changed."""
        rows = self.V.shape[0]
        got = self._banned
        if got is None or got[0] is not self.hidden or got[1] != rows:
            mask = np.zeros(rows, np.bool_)
            idx = [j for j in map(self.items.get, self.hidden) if j is not None]
            mask[idx] = True
            got = self._banned = (self.hidden, rows, mask)
        return got[2]

    def _grow(self) -> None:
        n = len(self.items)
        if n > self.V.shape[0]:
            cap = max(n, 2 * self.V.shape[0])
            for name, width in (("V", self.k + 1), ("GV", 2)):
                new = np.zeros((cap, width), np.float32)
                new[: getattr(self, name).shape[0]] = getattr(self, name)
                setattr(self, name, new)
            for name in ("count", "decayed"):
                grown = np.zeros(cap)
                grown[: getattr(self, name).shape[0]] = getattr(self, name)
                setattr(self, name, grown)
            self.stored.grow(cap)

    def warm(self, item_ids: Sequence[str], rows: F32, glob: float, counts: dict[str, float],
             popularity: dict[str, float], pop_ref_ms: int, half_life_ms: int,
             item_acc: F32 | None = None, versions: dict[str, int] | None = None) -> None:  # fmt: skip
        """Reset from a generation: its item rows (+ accumulators), global bias, all-time counts (they seed the
        sampler's reservoir) and decayed popularity with its reference time and half-life.

        ``versions``: the item rows' stored versions, read before the rows (:class:`StoredRows`); without
        them every row is unknown and the first write of each adds its delta in Redis."""
        self.items = IdMap(item_ids)
        for item in counts:
            self.items.index(item)
        cap = max(1024, len(self.items))
        self.V = np.zeros((cap, self.k + 1), np.float32)
        self.GV = np.zeros((cap, 2), np.float32)
        self.count, self.decayed = np.zeros(cap), np.zeros(cap)
        if len(item_ids):
            self.V[: len(item_ids)] = rows
            if item_acc is not None:
                self.GV[: len(item_ids)] = item_acc
        self.stored = StoredRows(self.k + 1, cap)
        self.stored.set(np.arange(len(self.items)), self.V[: len(self.items)], self.GV[: len(self.items)],
                        _versions(self.items.ids, versions))  # fmt: skip
        self.glob = np.array([glob], np.float64)
        for item, n in counts.items():
            self.count[self.items.index(item)] = n
        for item, s in popularity.items():
            j = self.items.get(item)
            if j is not None:
                self.decayed[j] = s
        self.pop_ref_ms, self.half_life_ms = int(pop_ref_ms), int(half_life_ms)
        c = np.rint(self.count[: len(self.items)]).astype(np.int64)
        self.reservoir = Reservoir.from_counts(c, self.cfg.reservoir, self.rng) if c.sum() else \
            Reservoir(self.cfg.reservoir)  # fmt: skip
        self.sampler = PopularitySampler(self.reservoir, self.cfg.sample_alpha, max(1000, self.cfg.reservoir // 10))
        log.debug("online model warmed: %d items, %d clicks, global bias %.3f", len(self.items), int(c.sum()), glob)

    def refresh_items(self, item_ids: Sequence[str], rows: F32, glob: float, acc_ids: Sequence[str],
                      acc: F32, versions: dict[str, int] | None = None) -> None:  # fmt: skip
        """Replace the rows and accumulators of known items by what Redis holds now (other workers' deltas);
        ``versions`` as in :meth:`warm` (read before the rows)."""
        for ids, values, target in ((item_ids, rows, self.V), (acc_ids, acc, self.GV)):
            for n, item in enumerate(ids):
                j = self.items.get(item)
                if j is not None:
                    target[j] = values[n]
        self.glob[0] = glob
        got = np.array([j for j in map(self.items.get, item_ids) if j is not None], np.int64)
        with_acc = np.array([j for j in map(self.items.get, acc_ids) if j is not None], np.int64)
        acc_rows = np.where(np.isin(got, with_acc)[:, None], self.GV[got], np.float32(0))  # absent: zeros
        self.stored.set(got, self.V[got], acc_rows, _versions([self.items.ids[j] for j in got], versions))

    def forget_users(self) -> None:
        """Drop per-user caches (after a rebalance or a refused write: another writer may have run)."""
        self.seen.clear()
        self.user_cache.clear()
        self.exposure.clear()

    def erase(self, events: Sequence[Event]) -> tuple[list[Event], dict[str, int]]:
        """The tombstone rule (:class:`stream.erasure.Tombstones`) on a batch: the events kept and the users it
        erases (``user -> erased_at``). Each erased user restarts here as a new user (a fresh row, no seen items,
        no pending impressions) without a read of Redis, where the batch's write deletes the old state."""
        kept, erased = self.tombstones.apply(events)
        for user in erased:
            fresh = init_rows(1, self.k, self.rng, self.cfg.init_scale)[0]
            self.user_cache[user] = (fresh, np.zeros(2, np.float32), False)
            self.user_cache.move_to_end(user)
            self.seen[user] = SeenItems()
            self.seen.move_to_end(user)
            j = self.users.get(user)
            if j is not None:
                for tracker in self.exposure.values():
                    tracker.forget_user(j)
        if erased:
            log.info("erased %d user(s) (stream.erasure): %d of %d events kept", len(erased), len(kept), len(events))
        return kept, erased

    def load_users(self, users: Sequence[str], rows: F32, found: npt.NDArray[np.bool_], acc: F32 | None,
                   seen: dict[str, list[str]], plan: BatchPlan | None = None) -> None:  # fmt: skip
        """Cache users read from Redis (new ones get their initial row) and their seen items.

        A new user's row is random (``ZEROCF_LMF_INIT=random``), or with ``foldin`` the ridge fit of
        ``p·q_i ≈ 1`` on the items the user clicks in ``plan`` (random where that fails)."""
        fresh = init_rows(len(users), self.k, self.rng, self.cfg.init_scale)
        if self.cfg.init == "foldin" and plan is not None:
            self._fold_in(users, found, fresh, plan)
        for n, user in enumerate(users):
            row = rows[n].copy() if found[n] else fresh[n]
            a = acc[n].copy() if (acc is not None and found[n]) else np.zeros(2, np.float32)
            self.user_cache[user] = (row, a, bool(found[n]))
            known = [self.items.get(i) for i in reversed(seen.get(user, []))]
            self.seen[user] = SeenItems(j for j in known if j is not None)
        self._trim_users()

    def _fold_in(self, users: Sequence[str], found: npt.NDArray[np.bool_], out: F32, plan: BatchPlan) -> None:
        k = self.k
        by_user: dict[str, list[int]] = {}
        for (user, _i, _ts, _w), j in zip(plan.clicks, plan.ev_item.tolist()):
            by_user.setdefault(user, []).append(j)
        for n, user in enumerate(users):
            if found[n] or user not in by_user:
                continue
            Q = self.V[np.unique(np.array(by_user[user], np.int64))][:, :k].astype(np.float64)
            p = np.linalg.solve(Q.T @ Q + 0.1 * np.eye(k), Q.T @ np.ones(Q.shape[0]))
            if np.isfinite(p).all() and np.abs(p).max() >= 1e-6:
                out[n, :k] = p

    def seen_upkeep(self, plan: BatchPlan, now_s: float) -> dict[str, int]:
        """``SEEN_PRUNE | SEEN_EXPIRE`` flags per clicking user of the batch (:class:`BatchWrite.seen_upkeep`):
        both on this worker's first write of a user, then a prune once the user's newest click is 1 % of the
        retention past the last one and a TTL refresh once 1 % of the TTL passed. A set thus holds clicks at
        most ~1.01x the retention old and expires within 1 % of the TTL after the user's last click."""
        retention_ms = self.cfg.seen_ttl_days * 86_400_000
        ttl_s = self.cfg.seen_ttl_days * 86_400
        newest: dict[str, int] = {}
        for user, _item, ts in plan.seen_adds():
            newest[user] = max(ts, newest.get(user, ts))
        out: dict[str, int] = {}
        for user, ts in newest.items():
            got = self.seen.get(user)
            if got is None:
                got = self.seen[user] = SeenItems()
            flags = 0
            if got.pruned_ts is None or ts - got.pruned_ts >= retention_ms / 100:
                flags |= SEEN_PRUNE
                got.pruned_ts = ts
            if got.expired_s is None or now_s - got.expired_s >= ttl_s / 100:
                flags |= SEEN_EXPIRE
                got.expired_s = now_s
            out[user] = flags
        return out

    def _trim_users(self) -> None:
        while len(self.user_cache) > USER_CACHE_LIMIT:
            self.user_cache.popitem(last=False)
        while len(self.seen) > USER_CACHE_LIMIT:
            self.seen.popitem(last=False)

    # -------------------------------------------------------------- planning
    def plan(self, partition: int, events: Sequence[Event], erased: dict[str, int] | None = None) -> BatchPlan:
        """Map a partition's de-duplicated events to rows: clicks in stream order, then explicit negatives, then
        exposure negatives.

        ``erased``: the users :meth:`erase` erased in this batch (its ``events`` are what it kept)."""
        return self.plan_many([(partition, events)], erased)

    def plan_many(self, parts: Sequence[tuple[int, Sequence[Event]]], erased: dict[str, int] | None = None
                  ) -> BatchPlan:  # fmt: skip
        """:meth:`plan` for the events of several partitions in one batch (``(partition, events)`` each; a user's
        events are all in one partition, so each keeps its stream order)."""
        cfg = self.cfg
        events = [e for _p, evs in parts for e in evs]
        clicks = [e for e in events if e.type == "click"]
        negs = [e for e in events if e.type == "negative"]
        exp_users, exp_items, exp_ts = [], [], []
        for p, evs in parts:
            pu, pi, pt = self._exposures(p, evs, [e for e in evs if e.type == "click" or e.type == "negative"])
            exp_users += pu
            exp_items += pi
            exp_ts += pt
        known_before = len(self.items)
        items = self.items.index_many([e.item for e in clicks] + [e.item for e in negs] + exp_items)
        self._grow()
        new_items = [self.items.ids[j] for j in np.unique(items) if j >= known_before]
        ev_users = [e.user for e in clicks] + [e.user for e in negs] + exp_users
        users = list(dict.fromkeys(ev_users))
        row = {u: n for n, u in enumerate(users)}
        ev_user = np.fromiter((row[u] for u in ev_users), np.int32, len(items))
        weights = np.concatenate([event_weights([e.weight for e in clicks]), event_weights([e.weight for e in negs]),
                                  np.full(len(exp_users), cfg.exposure_weight, np.float32)])  # fmt: skip
        exposure = np.arange(len(items)) >= len(clicks)
        ts = np.array([e.ts for e in clicks] + [e.ts for e in negs] + exp_ts, np.int64)
        fetch = [u for u in users if u not in self.user_cache]
        return BatchPlan(users, ev_user, items, weights.astype(np.float32), exposure, ts,
                         clicks=[(e.user, e.item, e.ts, e.weight) for e in clicks], new_items=new_items,
                         fetch_users=fetch, n_events=len(events), n_exposure=len(exp_users),
                         negatives=[(e.user, e.item, e.ts, e.weight) for e in negs],
                         erased=dict(erased or {}))  # fmt: skip

    def _exposures(self, partition: int, events: Sequence[Event], clicks: Sequence[Event]
                   ) -> tuple[list[str], list[str], list[int]]:  # fmt: skip
        """Impressions of ``events`` enter the partition's tracker; clicked pairs leave it; due pairs return."""
        if self.cfg.exposure_window_s <= 0 or not events:
            return [], [], []
        tracker = self.exposure.setdefault(partition, ExposureTracker())
        shows = [e for e in events if e.type == "impression"]
        if shows:
            tracker.shown(self.users.index_many([e.user for e in shows]),
                          self.exp_items.index_many([e.item for e in shows]), [e.ts for e in shows])  # fmt: skip
        if clicks:
            tracker.clicked(self.users.index_many([e.user for e in clicks]),
                            self.exp_items.index_many([e.item for e in clicks]))  # fmt: skip
        now = max(e.ts for e in events)
        du, di = tracker.due(now, int(self.cfg.exposure_window_s * 1000))
        return [self.users.ids[u] for u in du], [self.exp_items.ids[i] for i in di], [now] * len(du)

    def absorb_items(self, plan: BatchPlan, rows: F32, found: npt.NDArray[np.bool_], acc: F32 | None,
                     versions: npt.NDArray[np.int64] | None = None) -> None:  # fmt: skip
        """Rows of the plan's new items as Redis holds them (another worker may have created them), with their
        stored ``versions`` (read before the rows) when given."""
        for n, item in enumerate(plan.new_items):
            if found[n]:
                j = self.items.index(item)
                self.V[j] = rows[n]
                if acc is not None:
                    self.GV[j] = acc[n]
        if versions is not None and acc is not None and plan.new_items:
            idx = self.items.index_many(plan.new_items)
            self.stored.set(idx, np.where(found[:, None], rows, np.float32(0)),
                            np.where(found[:, None], acc, np.float32(0)), versions)  # fmt: skip

    # -------------------------------------------------------------- training
    def decay_weights(self, ts: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """``2^((ts - ref) / half_life)`` per event; sets the reference at the first click if it is unset."""
        if ts.size and self.pop_ref_ms == 0:
            self.pop_ref_ms = int(ts.min())
        return np.exp2((ts - self.pop_ref_ms) / self.half_life_ms)

    def rescale_due(self, ts: npt.NDArray[np.int64]) -> int | None:
        """A new reference time when the batch's newest event is too many half-lives past the current one."""
        if ts.size and self.pop_ref_ms and (int(ts.max()) - self.pop_ref_ms) / self.half_life_ms > DECAY_RESCALE:
            return int(ts.max())
        return None

    def rescale(self, new_ref_ms: int) -> None:
        """Move the in-process decayed popularity to ``new_ref_ms`` (the store does the same, atomically)."""
        self.decayed *= 2.0 ** (-(new_ref_ms - self.pop_ref_ms) / self.half_life_ms)
        self.pop_ref_ms = int(new_ref_ms)

    def train(self, plan: BatchPlan, rank_every: int = 0) -> TrainResult:
        """Run the kernel over the plan, click by click, on the cached rows (updated in place).

        ``rank_every`` (prequential evaluation): rank every n-th click this model trains (0: none)."""
        n_u = len(plan.users)
        U = np.empty((n_u, self.k + 1), np.float32)
        GU = np.zeros((n_u, 2), np.float32)
        warm = np.zeros(n_u, np.bool_)
        known: list[npt.NDArray[np.int32]] = []
        for n, user in enumerate(plan.users):
            U[n], GU[n], warm[n] = self.user_cache[user]
            got = self.seen.get(user)
            known.append(got.array() if got is not None else np.empty(0, np.int32))
        sizes = np.array([a.size for a in known], np.int64)
        pos_u = np.repeat(np.arange(n_u, dtype=np.int32), sizes)
        pos_i = np.concatenate(known) if known else np.empty(0, np.int32)
        hs = positive_set(pos_u, pos_i, self.V.shape[0], extra=len(plan.clicks))
        self.sampler.maybe_refresh()
        dw = self.decay_weights(plan.ev_ts)
        counts_w = np.array([c[3] for c in plan.clicks] + [0.0] * (len(plan.negatives) + plan.n_exposure),
                            np.float64)  # fmt: skip
        glob_before = float(self.glob[0])
        rank_at = None
        if rank_every > 0:
            nth = (self.clicks_trained + np.cumsum(~plan.ev_exposure)) % rank_every == 0
            rank_at = ~plan.ev_exposure & nth
        self.clicks_trained += len(plan.clicks)
        loss, touched, ranks = lmf_train(
            U, GU, self.V, self.GV, self.glob, (plan.ev_user, plan.ev_item, plan.ev_weight, plan.ev_exposure),
            hs, self.n_items, self.sampler.tables(), self.params, int(self.rng.integers(2**31)), rank_at=rank_at,
            user_warm=warm, popularity=(self.count, self.decayed, counts_w, counts_w * dw),
            banned=self.banned())  # fmt: skip
        idx = touched.idx
        deltas = np.vstack([self.V[idx] - touched.rows, np.zeros((1, self.k + 1), np.float32)])
        deltas[-1, -1] = np.float32(self.glob[0] - glob_before)
        acc_deltas = np.vstack([self.GV[idx] - touched.acc, np.zeros((1, 2), np.float32)])
        finite = check_finite(U, GU, deltas, acc_deltas, loss)
        counts: dict[str, float] = {}
        popularity: dict[str, float] = {}
        for (_u, item, _ts, w), d in zip(plan.clicks, dw):
            counts[item] = counts.get(item, 0.0) + w
            popularity[item] = popularity.get(item, 0.0) + w * float(d)
        ids = [self.items.ids[j] for j in idx] + [GLOBAL_ROW]
        deltas, acc_deltas = deltas.astype(np.float32), acc_deltas.astype(np.float32)
        vers, rows, acc = self.stored.absolute(idx, deltas[:-1], acc_deltas[:-1])
        rows, acc = np.vstack([rows, deltas[-1:]]), np.vstack([acc, acc_deltas[-1:]])  # the global row: added
        return TrainResult(U, GU, ids, deltas, acc_deltas, counts, popularity,
                           float(loss.sum()) if finite else float("nan"), finite, touched, glob_before,
                           ranks[: len(plan.clicks)] if ranks is not None else None,
                           None if rank_at is None else rank_at[: len(plan.clicks)],
                           np.append(vers, -1), rows, acc)  # fmt: skip

    def rollback(self, result: TrainResult) -> None:
        """Undo a refused batch's factor updates (non-finite values) in the cached item rows and global bias.

        The batch's click statistics (counts, decayed popularity, seen items, reservoir) stand: the worker still
        records them, so the caches keep matching the store; :meth:`commit` follows as for any batch.
        """
        t = result.touched
        self.V[t.idx] = t.rows
        self.GV[t.idx] = t.acc
        self.glob[0] = result.glob_before

    def commit(self, plan: BatchPlan, result: TrainResult) -> None:
        """The batch was recorded: the user cache (trained batches only), the seen items and the reservoir; the
        stored item rows as the write leaves them (trained batches only)."""
        if result.finite and result.item_versions is not None and result.item_rows is not None \
                and result.item_acc is not None:  # fmt: skip
            idx = result.touched.idx
            self.stored.wrote(idx, result.item_versions[:-1], result.item_rows[:-1], result.item_acc[:-1])
        for n, user in enumerate(plan.users if result.finite else ()):
            self.user_cache[user] = (result.user_rows[n].copy(), result.user_acc[n].copy(), True)
            self.user_cache.move_to_end(user)
        if plan.clicks:
            self.reservoir.add(plan.ev_item[: len(plan.clicks)], self.rng)
        answered = len(plan.clicks) + len(plan.negatives)
        if answered:
            cap = self.cfg.seen_cap
            for (user, _item, _ts, _w), p in zip(plan.clicks + plan.negatives, plan.ev_item[:answered].tolist()):
                got = self.seen.get(user)
                if got is None:
                    got = self.seen[user] = SeenItems()
                got.add(p, cap)
                self.seen.move_to_end(user)
        self._trim_users()


def _versions(ids: Sequence[str], versions: dict[str, int] | None) -> npt.NDArray[np.int64]:
    """Stored versions of ``ids`` (absent: 0, the row was never written); all -1 (unknown) without them."""
    if versions is None:
        return np.full(len(ids), -1, np.int64)
    return np.fromiter((versions.get(i, 0) for i in ids), np.int64, len(ids))
