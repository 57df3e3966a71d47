"""The in-memory twin of the real path, for fast sweeps (no Kafka, no Redis).

- :func:`replay_lmf` replays training clicks in stream order through the production
  :class:`workers.online.model.OnlineModel` in mini-batches of ``cfg.batch`` clicks, with an in-memory table in
  place of Redis: exactly what ``zerocf lmf`` computes for one partition written by one worker (the real path
  spreads users over partitions and interleaves their batches; ``tests/integration/test_eval_real_path.py``
  checks that both give the same NDCG within noise).
- :func:`replay_pipeline` adds the ALS worker's re-solve after every ``resolve_every`` clicks, through the
  same :mod:`workers.batch.solve` functions the worker calls (warm start from the previous solve's raw
  factors, calibration), keeping the online learner's AdaGrad step sizes as the worker does, followed by the
  generation switch the LMF worker performs.

The models are returned as :class:`Factors`: rows of ``k`` latent values + bias for every dense user and item
index, and the global bias; :func:`scores` ranks items by ``b_i + p_u · q_i``, as the lookups do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from stream.events import Event
from workers.batch.solve import fit, handoff_rows
from workers.config import ALSConfig, LMFConfig
from workers.evaluation.data import Stream
from workers.evaluation.metrics import PrequentialLog
from workers.kernels.calibration import Calibration
from workers.kernels.topk import recommend_from_factors
from workers.online.model import OnlineModel, rank_rows

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
TS0 = 946_684_800_000  # 2000-01-01: event times of streams without timestamps start here, 1 s apart

__all__ = ["Factors", "popularity", "recommend", "replay_lmf", "replay_pipeline"]


@dataclass
class Factors:
    """A trained model in dense indices: ``U`` (n_users, k + 1), ``V`` (n_items, k + 1), global ``bias``."""

    U: F32
    V: F32
    bias: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def item_scores(self, users: npt.ArrayLike) -> F32:
        """``b_i + p_u · q_i`` for each of ``users`` (rows) and every item (columns)."""
        U = self.U[np.asarray(users)]
        aug = np.hstack([U[:, :-1], np.ones((U.shape[0], 1), np.float32)])
        return (aug @ self.V.T).astype(np.float32)


def recommend(model: Factors, train: sp.csr_matrix, users: npt.ArrayLike, k: int = 10) -> I32:
    """Top-k items per user by ``b_i + p_u · q_i``, the user's training items excluded."""
    users = np.asarray(users)
    aug = np.hstack([model.U[users, :-1], np.ones((users.size, 1), np.float32)]).astype(np.float32)
    ids, _ = recommend_from_factors(aug, model.V, train[users], k=k)
    return ids


def popularity(train: sp.csr_matrix) -> npt.NDArray[np.float64]:
    """Number of training users per item (the most-popular baseline's score).

    >>> popularity(sp.csr_matrix(np.array([[1, 0, 3], [0, 0, 1]], np.float32))).tolist()
    [1.0, 0.0, 2.0]
    """
    return np.bincount(train.indices, minlength=train.shape[1]).astype(np.float64)


class _Replay:
    """One LMF worker over an in-memory table: the production model, batch by batch."""

    def __init__(self, stream: Stream, cfg: LMFConfig, seed: int, rank: int) -> None:
        self.stream, self.cfg, self.rank = stream, cfg, rank
        self.users = [str(u) for u in range(stream.n_users)]
        self.items = [str(i) for i in range(stream.n_items)]
        self.model = OnlineModel(cfg, seed=seed)
        self.model.warm([], np.zeros((0, cfg.factors + 1), np.float32), 0.0, {}, {}, 0, cfg.pop_half_life_ms)
        self.U = np.zeros((stream.n_users, cfg.factors + 1), np.float32)
        self.GU = np.zeros((stream.n_users, 2), np.float32)
        self.found = np.zeros(stream.n_users, np.bool_)
        self.seen: dict[str, list[str]] = {}
        self.ranks = PrequentialLog()
        self.ts = stream.ts if stream.ts is not None else TS0 + 1000 * np.arange(len(stream), dtype=np.int64)

    def run(self, lo: int, hi: int) -> None:
        for start in range(lo, hi, self.cfg.batch):
            self._batch(start, min(hi, start + self.cfg.batch))

    def _batch(self, lo: int, hi: int) -> None:
        s = self.stream
        events = [Event(f"t:0:{n}:0", "click", self.users[u], self.items[i], int(t), float(c), None, None, f"t/0/{n}")
                  for n, u, i, c, t in zip(range(lo, hi), s.user[lo:hi].tolist(), s.item[lo:hi].tolist(),
                                           s.count[lo:hi].tolist(), self.ts[lo:hi].tolist())]  # fmt: skip
        m = self.model
        plan = m.plan(0, events)
        rows = np.array([int(u) for u in plan.fetch_users], np.int64)
        m.load_users(plan.fetch_users, self.U[rows], self.found[rows], self.GU[rows],
                     {u: self.seen.get(u, []) for u in plan.fetch_users}, plan)  # fmt: skip
        new_ref = m.rescale_due(plan.ev_ts)
        if new_ref is not None:
            m.rescale(new_ref)
        result = m.train(plan, rank_every=self.rank)
        if not result.finite:
            raise FloatingPointError(f"LMF replay diverged at clicks {lo}..; lower the learning rate")
        m.commit(plan, result)
        idx = np.array([int(u) for u in plan.users], np.int64)
        self.U[idx], self.GU[idx], self.found[idx] = result.user_rows, result.user_acc, True
        for user, item, _ts in plan.seen_adds():
            self.seen.setdefault(user, []).insert(0, item)
        if self.rank:
            self.ranks(rank_rows(plan, result))

    def factors(self) -> Factors:
        m = self.model
        V = np.zeros((self.stream.n_items, self.cfg.factors + 1), np.float32)
        for j, name in enumerate(self.items):
            row = m.items.get(name)
            if row is not None:
                V[j] = m.V[row]
        return Factors(self.U.copy(), V, float(m.glob[0]))


def replay_lmf(stream: Stream, cfg: LMFConfig, seed: int = 0, rank: int = 0) -> Factors:
    """One streaming pass of the production LMF over ``stream``; ``rank=n`` records every n-th click's ranks in
    ``info["ranks"]`` (a :class:`~workers.evaluation.metrics.PrequentialLog`, as the worker's rank hook).

    >>> s = Stream(np.array([0, 1, 0], np.int32), np.array([1, 1, 2], np.int32), np.ones(3, np.float32), 2, 3)
    >>> f = replay_lmf(s, LMFConfig(factors=4))
    >>> f.U.shape, f.V.shape, bool(np.isfinite(f.U).all() and f.bias < 0)
    ((2, 5), (3, 5), True)
    """
    r = _Replay(stream, cfg, seed, rank)
    r.run(0, len(stream))
    f = r.factors()
    f.info["ranks"] = r.ranks
    return f


def replay_pipeline(stream: Stream, cfg: LMFConfig, als: ALSConfig, resolve_every: int, seed: int = 0,
                    rank: int = 0, checkpoints: tuple[int, ...] = ()) -> Factors:  # fmt: skip
    """One LMF pass with the ALS worker's re-solve + handoff after every ``resolve_every`` clicks.

    Re-solves happen at clicks ``N, 2N, ... < len(stream)``; clicks after the last one are learned by LMF only
    (the live state between two re-solves). At each: ALS on all clicks so far, warm-started from the previous
    solve's raw factors; calibration and zero biases (:func:`workers.batch.solve.handoff_rows`); then the switch
    the LMF worker makes: items, counts, decayed popularity and global bias from the new generation, user rows
    from it, user caches dropped. ``checkpoints`` (click positions) snapshot the model into
    ``info["checkpoints"]`` (to measure NDCG right after a swap and later).
    """
    if resolve_every < 1:
        raise ValueError(f"resolve_every={resolve_every} must be >= 1 click")
    r = _Replay(stream, cfg, seed, rank)
    n = len(stream)
    marks = sorted({*range(resolve_every, n, resolve_every), *[c for c in checkpoints if 0 < c < n], n})
    info: dict[str, Any] = {"resolves": [], "checkpoints": {}}
    raw: tuple[F32, F32] | None = None
    lo = 0
    for hi in marks:
        r.run(lo, hi)
        lo = hi
        if hi in checkpoints:
            info["checkpoints"][hi] = r.factors()
        if hi == n or hi % resolve_every:
            continue
        raw, cal = _resolve(r, stream.head(hi), als, raw)
        info["resolves"].append({"at": hi, "scale": cal.scale, "bias": cal.bias})
    f = r.factors()
    f.info.update(info, ranks=r.ranks)
    return f


def _resolve(r: _Replay, part: Stream, als: ALSConfig, raw: tuple[F32, F32] | None
             ) -> tuple[tuple[F32, F32], Calibration]:  # fmt: skip
    """What ``zerocf als --once`` publishes at this point, and the LMF worker's switch to it."""
    csr = part.csr()
    U, V, _loss = fit(csr, als, raw)  # warm: the previous solve's raw rows (all indices are dense already)
    U_rows, V_rows, cal = handoff_rows(U, V, csr, als)
    counts = np.asarray(csr.sum(axis=0)).ravel()
    clicked = np.flatnonzero(counts)
    users = np.flatnonzero(np.diff(csr.indptr))
    m = r.model
    keep = {m.items.ids[j]: m.GV[j].copy() for j in range(m.n_items)}  # the handoff keeps the step sizes
    ts = r.ts[: len(part)]
    ref = int(ts.min())
    decay = np.zeros(part.n_items)
    np.add.at(decay, part.item, part.count * np.exp2((ts - ref) / m.half_life_ms))
    item_acc = np.array([keep.get(r.items[i], np.zeros(2)) for i in clicked], np.float32)
    m.warm([r.items[i] for i in clicked], V_rows[clicked], cal.bias, {r.items[i]: float(counts[i]) for i in clicked},
           {r.items[i]: float(decay[i]) for i in clicked}, ref, m.half_life_ms, item_acc.reshape(-1, 2))  # fmt: skip
    m.forget_users()
    r.U[users] = U_rows[users]  # user accumulators (r.GU) are kept as they are
    r.found[:] = False
    r.found[users] = True
    log.info("pipeline re-solve at click %d: scale %.4g bias %.4g", len(part), cal.scale, cal.bias)
    return (U, V), cal
