"""The holdout protocol: train on the training part of :class:`~workers.evaluation.data.Holdout`, score the
top-10 of every user with test clicks against those clicks (the user's training items are never hits).

Our models are trained **through the real path** (:class:`~workers.evaluation.realpath.RealPath`): the
training clicks, in stream order, go through the broker, ``Ingest`` and ``LMFWorker`` in one pass
(``lmf``); the same with ``ALSWorker`` re-solving every ``resolve_every`` clicks (``pipeline``, the live
state between two re-solves); or the same with one ``als --once --rebuild`` at the end (``als``: ALS alone,
nothing carried over from the online learner, served with the product's seen sets). The lists scored are what
``Recommender.recommend_many`` returns (the ``zerocf recommend`` path), seen items excluded by the store, and
``seen_slots`` counts recommended items the user had clicked in training (the target is 0).

The references run in memory on the same split: most-popular (training users per item) and implicit's ALS
(our production ALS settings) and BPR. ``twin=True`` trains our models with the in-memory twin instead
(:mod:`workers.evaluation.offline`), for fast sweeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from stream.config import load
from workers.config import ALSConfig, LMFConfig, ModelSettings
from workers.evaluation.data import Data, Holdout, Split
from workers.evaluation.metrics import ranking_metrics
from workers.evaluation.offline import Factors, popularity, recommend, replay_lmf, replay_pipeline
from workers.evaluation.realpath import RealPath, stream_rows
from workers.kernels.als import confidence
from workers.kernels.topk import recommend_from_factors

log = logging.getLogger(__name__)

OURS = ("lmf", "pipeline", "als", "popularity", "recent_popularity")
REFERENCES = ("implicit_als", "implicit_bpr")

__all__ = ["OURS", "REFERENCES", "run_holdout"]


def run_holdout(data: Data, models: Sequence[str], env: dict[str, str], *, k: int = 10, seed: int = 0,
                resolve_every: int = 25_000, chunk: int = 5000, validation: bool = False,
                twin: bool = False, split: Split = "user") -> dict[str, Any]:  # fmt: skip
    """Every model of ``models`` (``all`` = ours and the references) on the split; ``{"models": {...}, ...}``."""
    h = Holdout(data, seed, split)
    tr, train, test, users = h.split(validation)
    want = list(OURS + REFERENCES) if "all" in models else list(models)
    out: dict[str, Any] = {}
    for name in want:
        t0 = time.perf_counter()
        if name == "popularity":
            ids = _popular(popularity(train), train, users, k)
            out[name] = ranking_metrics(ids, test, users, k, data.n_items)
        elif name == "recent_popularity":
            half_life = load(ModelSettings, env).pop_half_life_ms
            ids = _popular(recent_popularity(data, tr, half_life), train, users, k)
            out[name] = ranking_metrics(ids, test, users, k, data.n_items)
        elif name in REFERENCES:
            res = _implicit(name, train, seed)
            if res is None:
                continue
            out[name] = ranking_metrics(recommend(res, train, users, k), test, users, k, data.n_items)
        elif twin:
            f = _twin(name, data, tr, env, seed, resolve_every)
            out[name] = ranking_metrics(recommend(f, train, users, k), test, users, k, data.n_items)
        else:
            out[name] = _real(name, data, tr, train, test, users, env, k, seed, resolve_every, chunk)
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
        log.info("%s: %s", name, out[name])
    params = {"k": k, "seed": seed, "train": int(tr.sum()), "eval": int(test.nnz), "users": int(users.size),
              "split": split, "scored": "validation" if validation else "test", "path": "twin" if twin else "real",
              "resolve_every": resolve_every}  # fmt: skip
    return {"protocol": "holdout", "models": out, "params": params}


def _real(name: str, data: Data, tr: np.ndarray, train: sp.csr_matrix, test: sp.csr_matrix, users: np.ndarray,
          env: dict[str, str], k: int, seed: int, resolve_every: int, chunk: int) -> dict[str, Any]:  # fmt: skip
    """Train ``name`` through the real path and score what the lookups return."""
    order = data.order(tr, seed)
    rows = stream_rows(data.users, data.items, data.user[order].tolist(), data.item[order].tolist(),
                       data.count[order].tolist(), None if data.ts is None else data.ts[order].tolist())  # fmt: skip
    every = max(1, -(-resolve_every // chunk)) if name == "pipeline" else 0
    with RealPath(env, overrides={"seed": seed, "als_seed": seed}, progress=len(rows)) as path:
        for n, lo in enumerate(range(0, len(rows), chunk), 1):
            path.send(rows[lo : lo + chunk])
            if every and n % every == 0 and lo + chunk < len(rows):
                path.resolve()
        if name == "als":  # the README's chain: ingest, lmf, `als --once`, lmf replays the rest (nothing)
            path.resolve(alone=True)
        recs = path.recommend([data.users[u] for u in users], k)
    index = {i: n for n, i in enumerate(data.items)}
    top = np.full((users.size, k), -1, np.int64)
    for r, u in enumerate(users):
        got = [index[i] for i in recs[data.users[u]].items]
        top[r, : len(got)] = got
    metrics = ranking_metrics(top, test, users, k, data.n_items)
    seen = train[users]
    metrics["seen_slots"] = int(sum(np.isin(top[r][top[r] >= 0], seen[r].indices).sum() for r in range(users.size)))
    metrics["fallback_users"] = int(sum(recs[data.users[u]].fallback for u in users))
    return metrics


def _twin(name: str, data: Data, tr: np.ndarray, env: dict[str, str], seed: int, resolve_every: int) -> Factors:
    """``name`` trained in memory with the configuration the real path would load from ``env``."""
    stream = data.stream(tr, seed)
    lcfg, acfg = load(LMFConfig, env, {"seed": seed}), load(ALSConfig, env, {"als_seed": seed})
    if name == "lmf":
        return replay_lmf(stream, lcfg, seed)
    if name == "pipeline":
        return replay_pipeline(stream, lcfg, acfg, resolve_every, seed)
    return _als_alone(stream, acfg)


def _als_alone(stream: Any, cfg: ALSConfig) -> Factors:
    from workers.batch.solve import fit, handoff_rows

    U, V, _ = fit(stream.csr(), cfg, None)
    Ur, Vr, cal = handoff_rows(U, V, stream.csr(), cfg)
    return Factors(Ur, Vr, cal.bias)


def recent_popularity(data: Data, mask: np.ndarray, half_life_ms: int) -> np.ndarray:
    """Click weight per item decayed to the last training click (what the lookups' fallback serves); the
    all-time counts for data without timestamps.

    >>> from stream.replay.datasets import Interaction
    >>> d = Data.from_rows([Interaction("u", "a", 0, 1, 1), Interaction("v", "b", 1000, 1, 2)])
    >>> recent_popularity(d, np.ones(2, bool), 1000).tolist()
    [0.5, 1.0]
    """
    w = data.count[mask].astype(np.float64)
    if data.ts is not None:
        ts = data.ts[mask]
        w = w * np.exp2((ts - ts.max()) / half_life_ms)
    return np.bincount(data.item[mask], weights=w, minlength=data.n_items)


def _popular(scores: np.ndarray, train: sp.csr_matrix, users: np.ndarray, k: int) -> np.ndarray:
    s = np.asarray(scores, np.float32)[:, None]
    ids, _ = recommend_from_factors(np.ones((users.size, 1), np.float32), s, train[users], k=k)
    return ids


def _implicit(name: str, train: sp.csr_matrix, seed: int) -> Factors | None:
    """implicit 0.7.3 on the training part: ALS at our production ALS settings (fed ``c`` itself, see
    docs/als.md), BPR with k 64, reg 0.05, 15 iterations on binarised clicks; None when not installed."""
    try:
        from implicit.cpu.als import AlternatingLeastSquares
        from implicit.cpu.bpr import BayesianPersonalizedRanking
    except ImportError:
        log.info("implicit is not installed (pip install -e '.[bench]'): skipping %s", name)
        return None
    cfg = ALSConfig()
    if name == "implicit_als":
        m = sp.csr_matrix(confidence(train, cfg.als_alpha, cfg.als_confidence, cfg.als_eps), dtype=np.float32)
        m.data += np.float32(1.0)  # implicit reads the stored value as the confidence c itself
        kw = {"regularization": cfg.als_reg, "alpha": 1.0, "iterations": cfg.als_iterations}
        model: Any = AlternatingLeastSquares(factors=cfg.factors, random_state=seed, num_threads=2, **kw)
    else:
        m = train.copy()
        m.data[:] = 1.0
        model = BayesianPersonalizedRanking(factors=cfg.factors, regularization=0.05, iterations=15, random_state=seed,
                                            num_threads=2)  # fmt: skip
    m.indptr = m.indptr.astype(np.int32)
    model.fit(m, show_progress=False)
    U = np.ascontiguousarray(model.user_factors, np.float32)
    V = np.ascontiguousarray(model.item_factors, np.float32)
    if name == "implicit_bpr":  # implicit's BPR rows already end in (1, item bias): our row layout
        return Factors(U, V)
    return Factors(np.hstack([U, np.zeros((U.shape[0], 1), np.float32)]),
                   np.hstack([V, np.zeros((V.shape[0], 1), np.float32)]))  # fmt: skip
