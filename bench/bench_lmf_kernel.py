"""Benchmark of the LMF kernel and negative sampling, plus the new-user init experiment; prints JSON.

Run: ``python bench/bench_lmf_kernel.py`` (about a minute on one core). Sections:

- ``compile``: first-call time of each numba kernel in this process (a compile, or a load from the
  on-disk cache if ``cache_present_before``).
- ``kernel``: events/s of :func:`workers.kernels.lmf.lmf_sgd` for k=64, 5 negatives, batches of 2000 events over
  10k users x 5k items (compile excluded), with and without AdaGrad, vs :func:`lmf_sgd_reference`.
- ``sampling``: negatives/s of :func:`workers.kernels.sampling.sample_negatives`, popularity only and with
  hard negatives, plus the alias-table rebuild time.
- ``new_user_init``: planted low-rank data; items trained online, then new users with 3 clicks each;
  HR@10 on their next clicks for random init vs fold-in, before and after a few SGD passes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np
from numba.core import config as numba_config

from workers.kernels.lmf import fold_in_user, init_rows, lmf_sgd, lmf_sgd_reference
from workers.kernels.sampling import PopularitySampler, Reservoir, positives_csr, sample_negatives

K, N_NEG, BATCH, N_USERS, N_ITEMS = 64, 5, 2000, 10_000, 5_000


def _timed(fn, *args, **kw) -> float:
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def bench_compile() -> dict:
    here = numba_config.CACHE_DIR or os.path.join(os.path.dirname(__file__), "..", "workers")
    cached = bool(glob.glob(os.path.join(here, "**", "lmf*.nbi"), recursive=True))
    rng = np.random.default_rng(0)
    U, V = init_rows(2, 4, rng), init_rows(3, 4, rng)
    t_lmf = _timed(lmf_sgd, U, V, [0], [1], [[2]], lr=0.1, reg=0.0)
    r = Reservoir(10)
    r.add(np.array([0, 1, 2], np.int32), rng)
    t_vose = _timed(PopularitySampler, r)
    s = PopularitySampler(r)
    t_hard = _timed(
        sample_negatives, s, *positives_csr([[0]]), n_neg=1, rng=rng, hard_share=1.0, user_vecs=U[:1], item_vecs=V
    )
    return {
        "cache_present_before": cached,
        "lmf_sgd_first_call_s": round(t_lmf, 3),
        "vose_first_call_s": round(t_vose, 3),
        "pick_hard_first_call_s": round(t_hard, 3),
    }


def _popularity_setup(rng: np.random.Generator) -> tuple[Reservoir, PopularitySampler]:
    r = Reservoir(100_000)
    r.add((rng.zipf(1.2, 300_000) % N_ITEMS).astype(np.int32), rng)
    return r, PopularitySampler(r, alpha=0.75)


def bench_kernel(rng: np.random.Generator, n_batches: int) -> dict:
    _, s = _popularity_setup(rng)
    U, V = init_rows(N_USERS, K, rng, 0.1), init_rows(N_ITEMS, K, rng, 0.1)
    gu, gv = np.zeros(N_USERS, np.float32), np.zeros(N_ITEMS, np.float32)
    batches = [
        (rng.integers(0, N_USERS, BATCH), s.sample(BATCH, rng), s.sample(BATCH * N_NEG, rng).reshape(BATCH, N_NEG))
        for _ in range(n_batches)
    ]
    out: dict = {}
    for name, acc in (("sgd", None), ("adagrad", (gu, gv))):
        times = [_timed(lmf_sgd, U, V, *b, lr=0.05, reg=0.01, adagrad=acc) for b in batches]
        out[f"numba_{name}_events_per_s"] = round(BATCH / float(np.median(times)))
    t_ref = _timed(lmf_sgd_reference, U, V, *batches[0], lr=0.05, reg=0.01)
    out["reference_events_per_s"] = round(BATCH / t_ref)
    out["speedup_vs_reference"] = round(out["numba_sgd_events_per_s"] / out["reference_events_per_s"], 1)
    out["setup"] = {
        "k": K,
        "n_neg": N_NEG,
        "batch": BATCH,
        "users": N_USERS,
        "items": N_ITEMS,
        "batches_timed": n_batches,
        "stat": "median per batch",
    }
    return out


def bench_sampling(rng: np.random.Generator, n_batches: int) -> dict:
    r, s = _popularity_setup(rng)
    V = init_rows(N_ITEMS, K, rng, 0.1)
    users = init_rows(BATCH, K, rng, 0.1)
    csr = positives_csr([s.sample(20, rng) for _ in range(BATCH)])  # 20 recent clicks per user
    out: dict = {"refresh_5k_items_s": round(_timed(s.refresh), 5)}
    for share in (0.0, 0.4):
        times = [
            _timed(
                sample_negatives,
                s,
                *csr,
                n_neg=N_NEG,
                rng=rng,
                hard_share=share,
                m_candidates=8,
                user_vecs=users,
                item_vecs=V,
            )
            for _ in range(n_batches)
        ]
        out[f"hard_share_{share}_negatives_per_s"] = round(BATCH * N_NEG / float(np.median(times)))
    big = Reservoir(1_000_000)
    big.add(rng.integers(0, 1_000_000, 1_000_000).astype(np.int32), rng)
    out["refresh_1M_slots_~632k_items_s"] = round(_timed(PopularitySampler, big), 3)
    return out


def _planted(rng: np.random.Generator, n_users: int, n_items: int, n_clicks: int) -> np.ndarray:
    """(n_users, n_clicks) distinct clicked items per user from softmax(planted logits)."""
    q = rng.standard_normal((n_items, 16))
    pop = 0.5 * rng.standard_normal(n_items)
    p = rng.standard_normal((n_users, 16))
    logits = 2.5 * p @ q.T / 4.0 + pop
    gumbel = -np.log(-np.log(rng.random(logits.shape)))  # Gumbel top-k = sampling without replacement
    return np.argsort(-(logits + gumbel), axis=1)[:, :n_clicks].astype(np.int32)


def _train(U, V, users, items, s, rng, epochs, pos_by_user):
    """``epochs`` shuffled SGD passes; ``pos_by_user`` (n_users, c) holds each user's known positives."""
    c = pos_by_user.shape[1]
    for _ in range(epochs):
        order = rng.permutation(users.size)
        u, i = users[order], items[order]
        indptr = np.arange(0, (u.size + 1) * c, c, dtype=np.int64)
        neg = sample_negatives(s, indptr, pos_by_user[u].ravel(), n_neg=N_NEG, rng=rng)
        lmf_sgd(U, V, u, i, neg, lr=0.05, reg=0.01)


def _hr10(U, V, seen, nxt) -> float:
    scores = U @ V.T
    np.put_along_axis(scores, seen, -np.inf, axis=1)
    top = np.argpartition(-scores, 10, axis=1)[:, :10]
    return float(np.mean([np.isin(n, t).mean() for n, t in zip(nxt, top, strict=True)]))


def bench_new_user_init(rng: np.random.Generator) -> dict:
    n_items, n_old, n_new, k = 2000, 4000, 1000, 32
    clicks = _planted(rng, n_old + n_new, n_items, 40)
    old, new = clicks[:n_old], clicks[n_old:]
    users = np.repeat(np.arange(n_old, dtype=np.int32), 39)
    items = old[:, :39].ravel()
    r = Reservoir(200_000)
    r.add(items, rng)
    s = PopularitySampler(r)
    U, V = init_rows(n_old, k, rng), init_rows(n_items, k, rng)
    t0 = time.perf_counter()
    _train(U, V, users, items, s, rng, 10, old[:, :39])
    out: dict = {
        "train_s": round(time.perf_counter() - t0, 2),
        "old_users_hr10_heldout": round(_hr10(U, V, old[:, :39], old[:, 39:]), 4),
    }
    seen, nxt = new[:, :3], new[:, 3:13]
    counts = np.zeros((n_items, 1))
    counts[: r.n_items, 0] = r.counts
    out["popularity_hr10"] = round(_hr10(np.ones((n_new, 1)), counts, seen, nxt), 4)
    gram = V.astype(np.float64).T @ V
    inits = {
        "random": lambda: init_rows(n_new, k, rng),
        "fold_in_clicked_only": lambda: np.stack([fold_in_user(V, x, reg=0.1) for x in seen]),
        "fold_in_implicit_als": lambda: np.stack([fold_in_user(V, x, reg=0.1, gram=gram) for x in seen]),
    }
    nu = np.repeat(np.arange(n_new, dtype=np.int32), 3)
    for name, make in inits.items():
        Un, Vn = np.ascontiguousarray(make(), dtype=np.float32), V.copy()
        res = {"init_only": round(_hr10(Un, Vn, seen, nxt), 4)}
        for sweep in range(1, 4):
            _train(Un, Vn, nu, seen.ravel(), s, rng, 1, seen)
            res[f"after_{sweep}_sgd_pass"] = round(_hr10(Un, Vn, seen, nxt), 4)
        out[name] = res
    out["setup"] = {
        "items": n_items,
        "train_users": n_old,
        "new_users": n_new,
        "k": k,
        "planted_rank": 16,
        "new_user_seen_clicks": 3,
        "next_clicks_scored": 10,
        "train_epochs": 10,
        "metric": "share of next clicks in top-10 excluding seen",
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-experiment", action="store_true", help="only the throughput numbers")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    res = {
        "compile": bench_compile(),
        "kernel": bench_kernel(rng, args.batches),
        "sampling": bench_sampling(rng, args.batches),
    }
    if not args.skip_experiment:
        res["new_user_init"] = bench_new_user_init(rng)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
