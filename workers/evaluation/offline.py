"""In-memory training of our models for the holdout protocol (no Kafka, no Redis).

- :func:`replay_lmf` replays training clicks in stream order through the production
  :class:`workers.online.model.OnlineModel` (same planning, negative sampling, fold-in and SGD kernel as
  ``zerocf lmf``), in mini-batches of ``cfg.batch`` clicks, with an in-memory factor table in place of
  Redis: user rows in an array, item rows in the model's own item cache (written back after every batch,
  exactly what the worker's Redis write + :meth:`OnlineModel.commit` amount to for one writer).
  ``epochs`` repeats the whole replay in the same order.
- :func:`replay_pipeline` is the production loop: one LMF pass over the stream, and after every
  ``resolve_every`` clicks an ALS re-solve on all clicks so far (warm-started from the live online
  vectors), calibrated by the ALS worker's :func:`workers.kernels.calibration.calibrate`; LMF then continues from
  the calibrated ALS factors and bias.
- :func:`fit_als`, :func:`popularity` and :func:`recommend` are thin wrappers of :mod:`workers.kernels.als`.

Rows of the stream are ``(user index, item index, count)`` arrays; see :class:`Stream`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from stream.events import Event
from workers.config import LMFConfig
from workers.kernels.als import Scaling, als_fit
from workers.kernels.topk import recommend_from_factors
from workers.online.model import OnlineModel

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]


@dataclass(frozen=True)
class Stream:
    """Clicks in stream order (dense indices), the universe they live in."""

    user: I32
    item: I32
    count: F32
    n_users: int
    n_items: int

    def csr(self, binary: bool = False) -> sp.csr_matrix:
        """User x item float32 CSR of the counts (1.0 per pair with ``binary``), duplicates summed."""
        m = sp.csr_matrix((self.count, (self.user, self.item)), shape=(self.n_users, self.n_items), dtype=np.float32)
        m.sum_duplicates()
        if binary:
            m.data[:] = 1.0
        return m

    def head(self, n: int) -> Stream:
        return Stream(self.user[:n], self.item[:n], self.count[:n], self.n_users, self.n_items)


def popularity(train: sp.csr_matrix) -> npt.NDArray[np.float64]:
    """Number of training users per item (the most-popular baseline's score).

    >>> popularity(sp.csr_matrix(np.array([[1, 0, 3], [0, 0, 1]], np.float32))).tolist()
    [1.0, 0.0, 2.0]
    """
    return np.bincount(train.indices, minlength=train.shape[1]).astype(np.float64)


def recommend(U: F32, V: F32, train: sp.csr_matrix, users: npt.ArrayLike, k: int = 10) -> I32:
    """Top-k items per user by ``U[u] . V[i]``, the user's training items excluded."""
    users = np.asarray(users)
    ids, _ = recommend_from_factors(np.ascontiguousarray(U[users], np.float32), V, train[users], k=k)
    return ids


def recommend_popular(scores: npt.ArrayLike, train: sp.csr_matrix, users: npt.ArrayLike, k: int = 10) -> I32:
    """Top-k items by a global score, each user's training items excluded.

    >>> train = sp.csr_matrix(np.array([[1, 0, 0]], np.float32))
    >>> recommend_popular([5.0, 3.0, 1.0], train, [0], k=2).tolist()
    [[1, 2]]
    """
    s = np.asarray(scores, np.float32)[None, :]
    users = np.asarray(users)
    ids, _ = recommend_from_factors(np.ones((users.size, 1), np.float32), s.T.copy(), train[users], k=k)
    return ids


def fit_als(
    train: sp.csr_matrix,
    factors: int = 64,
    reg: float = 0.05,
    alpha: float = 1.0,
    iterations: int = 15,
    scaling: Scaling = "linear",
    seed: int = 0,
    init: tuple[F32 | None, F32 | None] | None = None,
) -> tuple[F32, F32]:
    """Our implicit ALS (CG, 3 steps) on the training counts; returns (U, V)."""
    U, V, _ = als_fit(
        train,
        factors=factors,
        reg=reg,
        alpha=alpha,
        iterations=iterations,
        scaling=scaling,
        rng=np.random.default_rng(seed),
        init=init,
        compute_loss=False,
    )
    return U, V


class _Table:
    """The in-memory stand-in for the Redis factor table of one LMF model."""

    def __init__(self, n_users: int, k: int) -> None:
        self.U = np.zeros((n_users, k), np.float32)
        self.found = np.zeros(n_users, bool)


def _events(stream: Stream, lo: int, hi: int, names: tuple[list[str], list[str]]) -> list[Event]:
    users, items = names
    return [
        Event(
            id=f"offline:0:{n}:0",
            type="click",
            user=users[u],
            item=items[i],
            ts=n,
            weight=float(c),
            pos=None,
            imp=None,
            src=f"offline/0/{n}",
        )
        for n, u, i, c in zip(
            range(lo, hi), stream.user[lo:hi].tolist(), stream.item[lo:hi].tolist(), stream.count[lo:hi].tolist()
        )
    ]


def _lmf_pass(
    model: OnlineModel,
    table: _Table,
    stream: Stream,
    lo: int,
    hi: int,
    bias: float,
    names: tuple[list[str], list[str]],
    user_index: dict[str, int],
) -> float:
    """Plan, fetch (from the table), train and write back the clicks ``[lo, hi)`` batch by batch."""
    loss, batch = 0.0, model.cfg.batch
    for start in range(lo, hi, batch):
        plan = model.plan(0, _events(stream, start, min(hi, start + batch), names))
        rows = np.fromiter((user_index[u] for u in plan.users), np.int64, len(plan.users))
        model._grow()
        result = model.train(plan, table.U[rows], table.found[rows], model.item_cache[plan.item_global], bias)
        if not result.finite:
            raise FloatingPointError(f"LMF replay diverged at clicks {start}..; lower lr or raise reg")
        table.U[rows] = result.user_vecs
        table.found[rows] = True
        model.commit(plan, result)  # writes item_final into the item cache = our item table
        loss += result.loss
    return loss


def _item_matrix(model: OnlineModel, n_items: int, items: list[str]) -> F32:
    V = np.zeros((n_items, model.k), np.float32)
    for j, name in enumerate(items):
        idx = model.items.get(name)
        if idx is not None:
            V[j] = model.item_cache[idx]
    return V


def replay_lmf(
    stream: Stream,
    cfg: LMFConfig,
    epochs: int = 1,
    seed: int = 0,
    callback: Callable[[int, F32, F32], None] | None = None,
) -> tuple[F32, F32]:
    """Train the online LMF model offline: ``epochs`` replays of ``stream``; returns (U, V) in dense ids.

    ``callback(epoch, U, V)`` is called after every epoch (validation curves without refitting).

    >>> s = Stream(np.array([0, 1, 0], np.int32), np.array([1, 1, 2], np.int32), np.ones(3, np.float32), 2, 3)
    >>> U, V = replay_lmf(s, LMFConfig(factors=4), epochs=2)
    >>> U.shape, V.shape, bool(np.isfinite(U).all())
    ((2, 4), (3, 4), True)
    """
    names = ([f"u{u}" for u in range(stream.n_users)], [f"i{i}" for i in range(stream.n_items)])
    user_index = {u: n for n, u in enumerate(names[0])}
    model = OnlineModel(cfg, seed=seed)
    table = _Table(stream.n_users, cfg.factors)
    for epoch in range(epochs):
        loss = _lmf_pass(model, table, stream, 0, stream.user.size, 0.0, names, user_index)
        log.debug("lmf replay epoch %d: mean loss %.4f", epoch, loss / max(1, stream.user.size))
        if callback is not None:
            callback(epoch, table.U, _item_matrix(model, stream.n_items, names[1]))
    return table.U.copy(), _item_matrix(model, stream.n_items, names[1])


@dataclass(frozen=True)
class ALSParams:
    """ALS settings of the pipeline's re-solves (and of ``--model als``)."""

    reg: float = 0.05
    alpha: float = 1.0
    iterations: int = 15
    scaling: Scaling = "linear"


def replay_pipeline(
    stream: Stream, cfg: LMFConfig, als: ALSParams, resolve_every: int, seed: int = 0, calib_samples: int = 20_000
) -> tuple[F32, F32, dict[str, Any]]:
    """One online pass with an ALS re-solve + calibrated handoff after every ``resolve_every`` clicks.

    Emulates ``zerocf lmf`` + periodic ``zerocf als --once`` in memory. Re-solves happen at clicks
    ``N, 2N, ... < len(stream)``; the clicks after the last one are learned by LMF only (the state of a
    live system between two re-solves). Each re-solve does what the ALS worker does: fit ALS on all clicks
    so far, warm-started from the live (online-updated) vectors, new rows seeded ``U[0, 0.01)``; calibrate
    ``(scale, bias)`` with :func:`workers.kernels.calibration.calibrate` (``calib_samples`` clicks, 1 negative
    each); fold ``sqrt(scale)`` into both factor sets. LMF then continues from those factors with the
    calibrated ``bias`` and a sampler rebuilt from the click counts so far (its user caches dropped and
    the users' recent-click lists reloaded, as the worker does on a generation switch).
    Returns (U, V, info) with the re-solve points and calibrations.
    """
    from workers.kernels.calibration import calibrate, fold_scale

    if resolve_every < 1:
        raise ValueError(f"resolve_every={resolve_every} must be >= 1 click")
    names = ([f"u{u}" for u in range(stream.n_users)], [f"i{i}" for i in range(stream.n_items)])
    user_index = {u: n for n, u in enumerate(names[0])}
    rng = np.random.default_rng(seed)
    model = OnlineModel(cfg, seed=seed)
    table = _Table(stream.n_users, cfg.factors)
    bias = 0.0
    info: dict[str, Any] = {"resolves": []}
    n = stream.user.size
    lo = 0
    for hi in list(range(resolve_every, n, resolve_every)) + [n]:
        _lmf_pass(model, table, stream, lo, hi, bias, names, user_index)
        lo = hi
        if hi == n:
            break
        part = stream.head(hi).csr()
        V_live = _item_matrix(model, stream.n_items, names[1])
        known_items = np.zeros(stream.n_items, bool)
        known_items[[int(i[1:]) for i in model.items.ids]] = True
        seed_u = (rng.random(table.U.shape) * 0.01).astype(np.float32)
        seed_v = (rng.random(V_live.shape) * 0.01).astype(np.float32)
        init = (np.where(table.found[:, None], table.U, seed_u), np.where(known_items[:, None], V_live, seed_v))
        U, V = fit_als(part, cfg.factors, als.reg, als.alpha, als.iterations, als.scaling, seed, init=init)
        cal = calibrate(U, V, part, calib_samples, np.random.default_rng([seed, 1]), negatives=1)
        U, V = fold_scale(U, V, cal.scale)
        bias = cal.bias
        counts = np.asarray(part.sum(axis=0)).ravel()
        clicked = np.flatnonzero(counts)
        saved_seen = {u: [model.items.ids[j] for j in lst] for u, lst in model.seen.items()}
        model.warm([names[1][i] for i in clicked], V[clicked], {names[1][i]: float(counts[i]) for i in clicked})
        model.forget_users()
        model.load_seen(saved_seen)
        active = np.diff(part.indptr) > 0
        table.U[active] = U[active]
        table.found |= active
        info["resolves"].append({"at": hi, "scale": cal.scale, "bias": cal.bias})
        log.info("pipeline re-solve at click %d: scale %.4g bias %.4g", hi, cal.scale, cal.bias)
    return table.U.copy(), _item_matrix(model, stream.n_items, names[1]), info


def lmf_config(factors: int, seed: int = 0, **overrides: object) -> LMFConfig:
    """The production LMF defaults with ``factors``/``seed`` (and any field override) set."""
    return replace(LMFConfig(factors=factors, seed=seed), **overrides)  # type: ignore[arg-type]
