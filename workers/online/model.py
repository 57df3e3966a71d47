"""The online LMF model's in-process state and one mini-batch's computation (no Kafka, no Redis).

The worker (``workers/online/worker.py``) does the I/O; this module turns a partition's events into a
:class:`BatchPlan` (users, items, positives, sampled negatives), trains it on the vectors the store
returned, and keeps the caches that make sampling cheap:

- ``items``: item id -> dense index, and ``item_cache`` (n_items, k): the last vectors this worker saw.
  Used only to *choose* hard negatives (a slightly stale score is fine); training always uses the vectors
  fetched from Redis for the batch.
- ``reservoir`` / ``sampler``: popularity sampling P(i) ∝ f_i^α over a reservoir of recent clicks, rebuilt
  from the generation's click counts at start (see :meth:`workers.kernels.sampling.Reservoir.from_counts`).
- ``seen``: each user's recent clicked items (indices), loaded from Redis the first time a user appears on
  this worker (a user has one writer, so the cache stays exact) and never sampled as negatives.
- ``exposure``: impressions not clicked within the window become weighted negatives (optional).

New users get a fold-in least-squares vector against the current item vectors of their clicks in the batch
(bench/bench_lmf_kernel.py measured HR@10 0.088 for fold-in vs 0.0095 for random init on a new user's next
clicks), falling back to a small random vector; new items start at zero (an item written concurrently by
two workers then stays exact: both add their delta to zero).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stream.events import Event
from workers.config import LMFConfig
from workers.kernels.exposure import ExposureTracker
from workers.kernels.lmf import check_finite, event_weights, fold_in_users, init_rows, lmf_sgd
from workers.kernels.sampling import PopularitySampler, Reservoir, positives_csr, sample_negatives

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]


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


@dataclass
class BatchPlan:
    """One partition's mini-batch, ready to fetch and train. Indices are local to the batch."""

    users: list[str]  # unique users of the batch
    items: list[str]  # unique items touched (positives, negatives, exposure)
    item_global: npt.NDArray[np.int32]  # items' indices in OnlineModel.items
    ev_user: npt.NDArray[np.int32]  # (E,) local user index per training event
    ev_pos: npt.NDArray[np.int32]  # (E,) local positive item, -1 for exposure negatives
    ev_neg: npt.NDArray[np.int32]  # (E, n) local negatives, -1 = none
    weights: F32  # (E,) positive weight (click count transform)
    neg_weights: F32  # (E,) weight of the event's negatives
    clicks: list[tuple[str, str, int, float]] = field(default_factory=list)  # (user, item, ts, weight)
    n_events: int = 0  # events applied (clicks + impressions) after de-duplication
    n_exposure: int = 0

    def click_users(self) -> list[str]:
        """The user of each click, in stream order."""
        return [c[0] for c in self.clicks]


@dataclass
class TrainResult:
    """Vectors to write: absolute user rows, item deltas (final - fetched), per-event loss."""

    user_vecs: F32
    item_final: F32
    item_deltas: F32
    loss: float
    finite: bool
    user_acc: F32 | None = None  # AdaGrad row accumulators (absolute), if enabled
    item_acc_deltas: F32 | None = None


class OnlineModel:
    """Sampler, caches and training of the online worker; see the module docstring.

    >>> from workers.config import LMFConfig
    >>> m = OnlineModel(LMFConfig(factors=4, negatives=2, hard_share=0.0), seed=0)
    >>> m.warm(["i1", "i2", "i3"], np.zeros((3, 4), np.float32), {"i1": 5, "i2": 1, "i3": 1})
    >>> m.n_items
    3
    """

    def __init__(self, cfg: LMFConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.k = cfg.factors
        self.rng = np.random.default_rng(seed)
        self.items = IdMap()
        self.item_cache: F32 = np.zeros((1024, self.k), np.float32)
        self.reservoir = Reservoir(cfg.reservoir)
        self.sampler = PopularitySampler(
            self.reservoir, alpha=cfg.sample_alpha, refresh_every=max(1000, cfg.reservoir // 10)
        )
        self.seen: OrderedDict[str, list[int]] = OrderedDict()  # LRU of users' recent clicks
        self.user_cache: OrderedDict[str, F32] = OrderedDict()  # exact: this worker is their only writer
        self.seen_limit = 1_000_000
        self.users = IdMap()  # only for the exposure trackers' integer keys
        self.exposure: dict[int, ExposureTracker] = {}

    # -------------------------------------------------------------- caches
    @property
    def n_items(self) -> int:
        return len(self.items)

    def _grow(self) -> None:
        if len(self.items) > self.item_cache.shape[0]:
            new = np.zeros((max(len(self.items), 2 * self.item_cache.shape[0]), self.k), np.float32)
            new[: self.item_cache.shape[0]] = self.item_cache
            self.item_cache = new

    def warm(self, item_ids: Sequence[str], item_matrix: F32, counts: dict[str, float]) -> None:
        """Reset from a generation: its item vectors and click counts (rebuilds the sampler)."""
        self.items = IdMap(item_ids)
        for item in counts:
            self.items.index(item)
        self.item_cache = np.zeros((max(1024, len(self.items)), self.k), np.float32)
        if len(item_ids):
            self.item_cache[: len(item_ids)] = item_matrix
        c = np.zeros(len(self.items), np.int64)
        for item, n in counts.items():
            c[self.items.index(item)] = int(round(n))
        self.reservoir = (
            Reservoir.from_counts(c, self.cfg.reservoir, self.rng) if c.sum() else Reservoir(self.cfg.reservoir)
        )
        self.sampler = PopularitySampler(
            self.reservoir, alpha=self.cfg.sample_alpha, refresh_every=max(1000, self.cfg.reservoir // 10)
        )
        self.sampler.refresh()
        log.info("sampler rebuilt from %d items, %d clicks", len(self.items), int(c.sum()))

    def users_missing_seen(self, users: Iterable[str]) -> list[str]:
        return [u for u in dict.fromkeys(users) if u not in self.seen]

    def load_seen(self, seen: dict[str, list[str]]) -> None:
        """Cache users' recent clicks as read from Redis (newest first there, oldest first here)."""
        for user, items in seen.items():
            self.seen[user] = [self.items.index(i) for i in reversed(items[: self.cfg.seen_cap])]
        self._grow()
        while len(self.seen) > self.seen_limit:
            self.seen.popitem(last=False)

    def forget_users(self) -> None:
        """Drop per-user caches (after a rebalance or a stale batch: another writer may have run)."""
        self.seen.clear()
        self.user_cache.clear()
        self.exposure.clear()

    # -------------------------------------------------------------- planning
    def plan(self, partition: int, events: Sequence[Event]) -> BatchPlan:
        """Turn de-duplicated events of one partition into training arrays (samples negatives)."""
        cfg = self.cfg
        clicks = [e for e in events if e.type == "click"]
        tracker = self.exposure.setdefault(partition, ExposureTracker()) if cfg.exposure_window_s > 0 else None
        if tracker is not None:
            shows = [e for e in events if e.type == "impression"]
            if shows:
                tracker.shown(
                    self.users.index_many([e.user for e in shows]),
                    self.items.index_many([e.item for e in shows]),
                    [e.ts for e in shows],
                )
            if clicks:
                tracker.clicked(
                    self.users.index_many([e.user for e in clicks]), self.items.index_many([e.item for e in clicks])
                )
        exp_users: list[str] = []
        exp_items: list[str] = []
        if tracker is not None and events:
            du, di = tracker.due(max(e.ts for e in events), int(cfg.exposure_window_s * 1000))
            exp_users = [self.users.ids[u] for u in du]
            exp_items = [self.items.ids[i] for i in di]
        pos_global = self.items.index_many([e.item for e in clicks])
        self._grow()
        # Known positives per click: the user's recent clicks plus everything they click in this batch.
        in_batch: dict[str, list[int]] = {}
        for e, p in zip(clicks, pos_global):
            in_batch.setdefault(e.user, []).append(int(p))
        per_event = [np.asarray(self.seen.get(e.user, []) + in_batch[e.user], np.int32) for e in clicks]
        users = list(dict.fromkeys([e.user for e in clicks] + exp_users))
        uidx = {u: n for n, u in enumerate(users)}
        ev_user = np.fromiter((uidx[e.user] for e in clicks), np.int32, len(clicks))
        n_neg = cfg.negatives
        neg_global = np.full((len(clicks), n_neg), -1, np.int32)
        if clicks and n_neg and self.sampler.n_items:
            self.sampler.maybe_refresh()
            indptr, pos_items = positives_csr(per_event)
            hard = cfg.hard_share if self.sampler.n_items > 1 else 0.0
            uvec = self._user_guess(clicks, pos_global) if hard > 0 else None
            neg_global = sample_negatives(
                self.sampler,
                indptr,
                pos_items,
                n_neg,
                self.rng,
                hard_share=hard,
                m_candidates=cfg.hard_candidates,
                user_vecs=uvec,
                item_vecs=self.item_cache,
                n_items=self.n_items,
            )
        exp_global = self.items.index_many(exp_items)
        touched = np.concatenate([pos_global, neg_global[neg_global >= 0].ravel(), exp_global])
        item_global, inv = np.unique(touched, return_inverse=True)
        local = np.full(max(self.n_items, 1), -1, np.int32)
        local[item_global] = np.arange(item_global.size, dtype=np.int32)
        ev_pos = local[pos_global] if len(clicks) else np.zeros(0, np.int32)
        ev_neg = np.where(neg_global >= 0, local[np.maximum(neg_global, 0)], -1).astype(np.int32)
        weights = event_weights([e.weight for e in clicks], mode="log") if clicks else np.zeros(0, np.float32)
        neg_w = np.ones(len(clicks), np.float32)
        if exp_users:  # exposure negatives: no positive, the shown item as the only negative
            eu = np.fromiter((uidx[u] for u in exp_users), np.int32, len(exp_users))
            en = np.full((len(exp_users), n_neg or 1), -1, np.int32)
            en[:, 0] = local[exp_global]
            if n_neg == 0:
                ev_neg = np.zeros((len(clicks), 1), np.int32) - 1
            ev_user = np.concatenate([ev_user, eu])
            ev_pos = np.concatenate([ev_pos, np.full(len(exp_users), -1, np.int32)])
            ev_neg = np.concatenate([ev_neg, en])
            weights = np.concatenate([weights, np.zeros(len(exp_users), np.float32)])
            neg_w = np.concatenate([neg_w, np.full(len(exp_users), cfg.exposure_weight, np.float32)])
        return BatchPlan(
            users=users,
            items=[self.items.ids[i] for i in item_global],
            item_global=item_global,
            ev_user=ev_user,
            ev_pos=ev_pos.astype(np.int32),
            ev_neg=ev_neg,
            weights=weights,
            neg_weights=neg_w,
            clicks=[(e.user, e.item, e.ts, e.weight) for e in clicks],
            n_events=len(events),
            n_exposure=len(exp_users),
        )

    def drop_known_negatives(self, plan: BatchPlan, users: Iterable[str]) -> int:
        """After ``users``' recent clicks were loaded (:meth:`load_seen`), un-sample any negative of theirs
        that turns out to be a known positive (set to -1: skipped by the kernel). Returns how many."""
        rows = {u: n for n, u in enumerate(plan.users)}
        dropped = 0
        for user in users:
            u = rows.get(user)
            known = set(self.seen.get(user, ()))
            if u is None or not known:
                continue
            for e in np.flatnonzero(plan.ev_user[: len(plan.clicks)] == u):
                for j, local in enumerate(plan.ev_neg[e]):
                    if local >= 0 and int(plan.item_global[local]) in known:
                        plan.ev_neg[e, j] = -1
                        dropped += 1
        return dropped

    def _user_guess(self, clicks: Sequence[Event], pos_global: npt.NDArray[np.int32]) -> F32:
        """User vectors for hard-negative scoring: the cached row (exact), else a proxy -- the mean item
        vector of the user's recent clicks, or of the clicked item for a user with no history here."""
        out = self.item_cache[pos_global]
        for n, e in enumerate(clicks):
            cached = self.user_cache.get(e.user)
            if cached is not None:
                out[n] = cached
            else:
                hist = self.seen.get(e.user)
                if hist:
                    out[n] = self.item_cache[hist[-20:]].mean(axis=0)
        return out

    # -------------------------------------------------------------- prequential evaluation
    def ranks_before_learning(
        self, plan: BatchPlan, user_vecs: F32, user_found: npt.NDArray[np.bool_]
    ) -> list[tuple[str, str, int, int]]:
        """0-based rank of each clicked item among all known items, before the batch is learned.

        Returns ``(user, item, model_rank, popularity_rank)`` per click; ``model_rank`` is -1 for a user
        with no vector yet (cold). Items the user clicked before are excluded (as a recommender would);
        popularity ranks use the all-time click counts. Scores use the cached item vectors.
        """
        n = self.n_items
        counts = np.zeros(n, np.float64)
        c = self.reservoir.counts
        counts[: min(n, c.size)] = c[:n]
        out = []
        for e in range(len(plan.clicks)):
            u = int(plan.ev_user[e])
            user, item = plan.clicks[e][0], plan.clicks[e][1]
            target = int(plan.item_global[plan.ev_pos[e]])
            mask = np.ones(n, bool)
            seen = [s for s in self.seen.get(user, []) if s != target]
            mask[seen] = False
            pop = counts[mask]
            prank = int(np.sum(pop > counts[target]))
            mrank = -1
            if user_found[u]:
                scores = self.item_cache[:n] @ user_vecs[u]
                mrank = int(np.sum(scores[mask] > scores[target]))
            out.append((user, item, mrank, prank))
        return out

    # -------------------------------------------------------------- training
    def train(
        self,
        plan: BatchPlan,
        user_vecs: F32,
        user_found: npt.NDArray[np.bool_],
        item_vecs: F32,
        bias: float = 0.0,
        user_acc: F32 | None = None,
        item_acc: F32 | None = None,
    ) -> TrainResult:
        """Run the SGD kernel on copies of the fetched vectors; new users are initialised first.

        With AdaGrad, ``user_acc``/``item_acc`` are the stored (n, k) accumulator rows; the kernel's
        accumulator is one scalar per row, kept in column 0 of the stored row (the store's rows are k wide).
        """
        cfg = self.cfg
        U = np.array(user_vecs, dtype=np.float32, copy=True)
        V0 = np.array(item_vecs, dtype=np.float32, copy=True)
        V = V0.copy()
        new = np.flatnonzero(~user_found)
        if new.size:
            init = init_rows(new.size, self.k, self.rng, cfg.init_scale)
            if cfg.init == "foldin":
                slot = np.full(U.shape[0], -1, np.int64)
                slot[new] = np.arange(new.size)
                sel = (slot[plan.ev_user] >= 0) & (plan.ev_pos >= 0)
                if sel.any():
                    fold = fold_in_users(V, slot[plan.ev_user[sel]], plan.ev_pos[sel], new.size, reg=0.1)
                    ok = np.isfinite(fold).all(axis=1) & (np.abs(fold).max(axis=1) >= 1e-6)
                    init[ok] = fold[ok]
            U[new] = init
        ada = None
        if user_acc is not None and item_acc is not None:
            ada = (np.ascontiguousarray(user_acc[:, 0], np.float32), np.ascontiguousarray(item_acc[:, 0], np.float32))
            gv0 = ada[1].copy()
        losses = lmf_sgd(
            U,
            V,
            plan.ev_user,
            plan.ev_pos,
            plan.ev_neg,
            cfg.lr,
            cfg.reg,
            bias=bias,
            clip=cfg.clip,
            adagrad=ada,
            weights=plan.weights,
            neg_weights=plan.neg_weights,
        )
        finite = check_finite(U, V, losses)
        result = TrainResult(
            U, V, (V - V0).astype(np.float32), float(np.sum(losses)) if finite else float("nan"), finite
        )
        if ada is not None:
            result.user_acc = np.zeros_like(U)
            result.user_acc[:, 0] = ada[0]
            result.item_acc_deltas = np.zeros_like(V)
            result.item_acc_deltas[:, 0] = ada[1] - gv0
        return result

    def commit(self, plan: BatchPlan, result: TrainResult) -> None:
        """The batch was written: update the caches and the reservoir."""
        self.item_cache[plan.item_global] = result.item_final
        for user, vec in zip(plan.users, result.user_vecs):
            self.user_cache[user] = vec
            self.user_cache.move_to_end(user)
        while len(self.user_cache) > self.seen_limit:
            self.user_cache.popitem(last=False)
        if plan.clicks:
            pos = self.items.index_many([c[1] for c in plan.clicks])
            self.reservoir.add(pos, self.rng)
            for (user, _item, _ts, _w), p in zip(plan.clicks, pos):
                lst = self.seen.setdefault(user, [])
                if int(p) in lst:
                    lst.remove(int(p))
                lst.append(int(p))
                if len(lst) > self.cfg.seen_cap:
                    del lst[0]
                self.seen.move_to_end(user)
            self.sampler.maybe_refresh()
