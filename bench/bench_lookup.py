"""Benchmark :class:`workers.serving.lookup.Recommender` against the bare numpy limit; prints one JSON object.

Run: ``python -m bench.bench_lookup [--items 10000 100000] [--calls 1000] [--batch-users 500]``, and the
million-item case of the approximate index: ``python -m bench.bench_lookup --million [--ann-items 1000000]``
(writes ``bench/results/lookup_1m.json`` as well as printing it).

For each catalogue size it writes a random schema-2 model (rows of k = 64 latent values + bias, a global
bias row, decayed popularity of every item) into a private redis-server (started here with
:meth:`stream.devstack.LocalStack.start_redis`, shut down at the end; the database is flushed between sizes)
and measures, in the same process and run, top-10 lookups for two groups of known users: ``light``
(2,000 users with 20 seen items each) and ``heavy`` (200 users with 1,000 seen items each). Every seen
item is excluded from a user's recommendations. BLAS is pinned to one thread (as in the workers), so both
sides see the same machine.

Fields per size (``results[]``) and per group (``light``, ``heavy``):

- ``single``: ``recommend(user, k=10)`` latency p50/p99 (ms): user HMGET + seen ZREVRANGE from Redis,
  ``[p_u, 1] . [q_i, b_i]`` over the cached matrix, masking the seen items, argpartition, sigmoid.
- ``bare_single``: the limit, the same product, masking of the same seen items (already as row indices),
  argpartition and sort of the top 10 on in-memory arrays, timed interleaved with ``single`` call by call
  (the first 50 calls of both warm up and are dropped); ``single_ratio_p50``/``p99`` = single / bare.
- ``batch_users_per_s``: ``recommend_many`` over ``--batch-users`` users (best of 3) vs
  ``bare_batch_users_per_s`` (chunked ``U @ Q.T``, masking, row argpartition, best of 3, alternating);
  ``batch_ratio`` = bare users/s ÷ ours (1 = at the limit).

``load_avg_1m_at_start`` is the machine's 1-minute load average when the bench started. Per size also:
``fallback`` p50/p99 (ms) of users without a vector and without seen items (the generation's top items by
time-decayed popularity, ``sigmoid(b + b_i)``), ``load_s`` (one full item-matrix load,
:meth:`Recommender.refresh` forced, the unit matrix of similar items included) and ``write_s`` (writing
the model, not a lookup figure).

``similar`` per size: ``similar(item, k=10)`` p50/p99 (ms) of random items (one ``live_gen`` read from
Redis, then the cosine top-k over the unit matrix cached at load) vs ``bare_single`` (the same product
against an in-memory unit matrix, self masked, argpartition and sort), interleaved call by call, and
``batch_items_per_s`` of ``similar_many`` over ``--batch-users`` items vs the bare chunked product.

``--million`` (:func:`run_million`): the same model and user groups at ``--ann-items`` (1M) items, plus
``latent`` (500 users with 20 seen items whose latent vectors are 5x longer, N(0, 0.5^2): their ranking
depends on the latent part, not mostly on the item bias as for the other groups, so it is the harder recall
case), served by two recommenders over the same Redis data: ``exact`` (``ann_min_items=0``, the full
product) and ``ann`` (the default threshold: the faiss IVF index of :mod:`workers.kernels.ann`, candidates
re-scored exactly). Per group, ``recommend(user, k=10)`` of both for the same users, in alternating blocks
of ``BLOCK`` (250) calls: call by call, each exact scan of 260 MB would evict the index from the caches,
which a server that only runs indexed lookups never does (4 of the 1,000 timed calls still follow a
switch). p50/p99 (ms), and
``recall_at_10`` = mean overlap of the two answers / 10 (seen items excluded on both sides). Also
``load_s`` of each (the ANN one without its build), ``index`` (build seconds with 2 OpenMP threads, cells,
nprobe, the lift's norm bound, bytes of the index, RSS growth of the process across the build), and
``add_new_items``: 1,000 new items written to the live generation, the forced reload that adds them to the
index without retraining (seconds), how many went to the side list (longer than the bound: the first is made
10x a user's vector) and whether that item made to be a user's best comes back first after it.
``ann_vs_exact_p50``/``p99`` per group = exact / index (how many times faster).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import redis  # noqa: E402

from stream.devstack import LocalStack  # noqa: E402
from workers.serving.lookup import Recommender  # noqa: E402
from workers.serving.settings import ServeSettings  # noqa: E402
from workers.store import GLOBAL_ROW, FactorStore  # noqa: E402

log = logging.getLogger("bench.lookup")
FACTORS, TOPK, GLOBAL_BIAS = 64, 10, -3.0
GROUPS = {"light": (2000, 20), "heavy": (200, 1000)}  # name -> (users, seen items per user)
LATENT = ("latent", 500, 20, 5.0)  # --million only: name, users, seen items, latent scale
T0 = 1_700_000_000_000  # event time of the seen clicks, ms
WARMUP = 50
BLOCK = 250  # --million: calls of one recommender in a row (a 260 MB exact scan evicts the other's caches)
F32 = npt.NDArray[np.float32]


@dataclass
class Group:
    """Known users of one group: ids, rows ``(n, k + 1)`` and seen items as row indices ``(n, seen)``."""

    ids: list[str]
    rows: F32
    seen: npt.NDArray[np.int64]


def _pct(samples: Sequence[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def _rows(rng: np.random.Generator, n: int) -> F32:
    """``n`` rows of ``k`` latent values (N(0, 0.1^2)) and a bias (N(0, 0.5^2))."""
    out = (rng.normal(size=(n, FACTORS + 1)) * 0.1).astype(np.float32)
    out[:, -1] *= 5.0
    return out


def build(store: FactorStore, n_items: int, rng: np.random.Generator) -> tuple[F32, dict[str, Group]]:
    """Write items (+ the global row and decayed popularity) and both user groups with their seen items."""
    store.ensure_model(FACTORS)
    item_ids = [f"i{j}" for j in range(n_items)]
    items = _rows(rng, n_items)
    store.write_vectors(1, "item", item_ids, items)
    glob = np.zeros((1, FACTORS + 1), np.float32)
    glob[0, -1] = GLOBAL_BIAS
    store.write_vectors(1, "item", [GLOBAL_ROW], glob)
    store.write_popularity(1, {i: float(s) for i, s in zip(item_ids, rng.pareto(1.0, n_items))}, T0)
    groups = {}
    for name, (n_users, n_seen) in GROUPS.items():
        ids = [f"{name}{j}" for j in range(n_users)]
        g = Group(ids, _rows(rng, n_users), np.stack([rng.choice(n_items, n_seen, replace=False) for _ in ids]))
        store.write_vectors(1, "user", ids, g.rows)
        for u, seen in zip(ids, g.seen):
            store.add_seen((u, item_ids[j], T0 + n) for n, j in enumerate(seen.tolist()))
        groups[name] = g
    return items, groups


def _augmented(p: F32) -> F32:
    """``[p_u, 1]``, so that one product gives ``p_u . q_i + b_i`` against rows ``[q_i, b_i]``."""
    a = np.array(p, np.float32, copy=True, ndmin=2)
    a[:, -1] = 1.0
    return a


def bare_single(items: F32, p: F32, seen: npt.NDArray[np.int64]) -> npt.NDArray[np.intp]:
    s = items @ _augmented(p)[0]
    s[seen] = -np.inf
    top = np.argpartition(-s, TOPK - 1)[:TOPK]
    return top[np.argsort(-s[top])]


def bare_batch(items: F32, users: F32, seen: npt.NDArray[np.int64], chunk: int) -> None:
    aug = _augmented(users)
    for c in range(0, len(users), chunk):
        s = aug[c : c + chunk] @ items.T
        np.put_along_axis(s, seen[c : c + chunk], -np.inf, axis=1)
        np.argpartition(-s, TOPK - 1, axis=1)[:, :TOPK]


def _best_of_3(fns: Sequence[Callable[[], object]]) -> list[float]:
    best = [float("inf")] * len(fns)
    for _ in range(3):  # alternating, so both see the same load
        for n, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[n] = min(best[n], time.perf_counter() - t)
    return best


def run_group(rec: Recommender, items: F32, g: Group, calls: int, batch_users: int,
              rng: np.random.Generator) -> dict[str, Any]:  # fmt: skip
    picks = rng.integers(0, len(g.ids), size=calls + WARMUP)
    single: list[float] = []
    bare: list[float] = []
    for n, u in enumerate(picks.tolist()):  # interleaved, so both sides see the same load and caches
        t0 = time.perf_counter()
        rec.recommend(g.ids[u], TOPK)
        t1 = time.perf_counter()
        bare_single(items, g.rows[u], g.seen[u])
        t2 = time.perf_counter()
        if n >= WARMUP:
            single.append(t1 - t0)
            bare.append(t2 - t1)
    nb = min(batch_users, len(g.ids))
    chunk = max(1, (1 << 22) // len(items))
    ours_s, bare_s = _best_of_3([lambda: rec.recommend_many(g.ids[:nb], TOPK),
                                 lambda: bare_batch(items, g.rows[:nb], g.seen[:nb], chunk)])  # fmt: skip
    s, b = _pct(single), _pct(bare)
    return {
        "users": len(g.ids),
        "seen_per_user": int(g.seen.shape[1]),
        "single": s,
        "bare_single": b,
        "single_ratio_p50": round(s["p50_ms"] / b["p50_ms"], 2),
        "single_ratio_p99": round(s["p99_ms"] / b["p99_ms"], 2),
        "batch_users": nb,
        "batch_users_per_s": round(nb / ours_s),
        "bare_batch_users_per_s": round(nb / bare_s),
        "batch_ratio": round(ours_s / bare_s, 2),
    }


def bare_similar(unit: F32, rows: npt.NDArray[np.int64]) -> None:
    for c in range(0, len(rows), 1024):
        s = unit[rows[c : c + 1024]] @ unit.T
        s[np.arange(len(s)), rows[c : c + 1024]] = -np.inf
        np.argpartition(-s, TOPK - 1, axis=1)[:, :TOPK]


def run_similar(rec: Recommender, items: F32, calls: int, batch: int, rng: np.random.Generator) -> dict[str, Any]:
    lat = items[:, :-1]
    unit = (lat / np.linalg.norm(lat, axis=1, keepdims=True)).astype(np.float32)
    picks = rng.integers(0, len(items), size=calls + WARMUP)
    ours: list[float] = []
    bare: list[float] = []
    for n, j in enumerate(picks.tolist()):
        t0 = time.perf_counter()
        r = rec.similar(f"i{j}", TOPK)
        t1 = time.perf_counter()
        s = unit @ unit[j]
        s[j] = -np.inf
        top = np.argpartition(-s, TOPK - 1)[:TOPK]
        top[np.argsort(-s[top])]
        t2 = time.perf_counter()
        assert not r.fallback and len(r.items) == TOPK, j
        if n >= WARMUP:
            ours.append(t1 - t0)
            bare.append(t2 - t1)
    rows = np.array(list(dict.fromkeys(picks[:batch].tolist())))  # similar_many collapses duplicates
    ids = [f"i{j}" for j in rows.tolist()]
    ours_s, bare_s = _best_of_3([lambda: rec.similar_many(ids, TOPK), lambda: bare_similar(unit, rows)])
    s, b = _pct(ours), _pct(bare)
    return {"single": s, "bare_single": b, "single_ratio_p50": round(s["p50_ms"] / b["p50_ms"], 2),
            "batch_items": len(rows), "batch_items_per_s": round(len(rows) / ours_s),
            "bare_batch_items_per_s": round(len(rows) / bare_s)}  # fmt: skip


def run_size(client: redis.Redis, n_items: int, calls: int, batch_users: int) -> dict[str, Any]:
    rng = np.random.default_rng(n_items)
    store = FactorStore(client, namespace=f"bench{n_items}")
    t = time.perf_counter()
    items, groups = build(store, n_items, rng)
    write_s = time.perf_counter() - t
    rec = Recommender(store, refresh_s=3600.0)
    t = time.perf_counter()
    rec.refresh(force=True)
    load_s = time.perf_counter() - t
    assert rec.n_items == n_items, (rec.n_items, n_items)
    out: dict[str, Any] = {"items": n_items, "factors": FACTORS, "k": TOPK, "calls": calls}
    out |= {name: run_group(rec, items, g, calls, batch_users, rng) for name, g in groups.items()}
    strangers = [f"x{j}" for j in range(min(calls, 300) + WARMUP)]
    fallback = []
    for u in strangers:
        t = time.perf_counter()
        r = rec.recommend(u, TOPK)
        fallback.append(time.perf_counter() - t)
        assert r.fallback, u
    out["fallback"] = _pct(fallback[WARMUP:])
    out["similar"] = run_similar(rec, items, calls, batch_users, rng)
    out |= {"load_s": round(load_s, 3), "write_s": round(write_s, 2)}
    return out


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def run_ann_group(ann: Recommender, exact: Recommender, g: Group, calls: int, rng: np.random.Generator
                  ) -> dict[str, Any]:  # fmt: skip
    picks = rng.integers(0, len(g.ids), size=calls + WARMUP).tolist()
    times: dict[int, list[float]] = {0: [], 1: []}
    answers: dict[int, list[list[str]]] = {0: [], 1: []}
    for lo in range(0, len(picks), BLOCK):  # alternating blocks: both see the same load over the run
        for side, rec in enumerate((ann, exact)):
            for n in range(lo, min(lo + BLOCK, len(picks))):
                t = time.perf_counter()
                r = rec.recommend(g.ids[picks[n]], TOPK)
                if n >= WARMUP:
                    times[side].append(time.perf_counter() - t)
                    answers[side].append(r.items)
    t_ann, t_exact = times[0], times[1]
    overlap = [len(set(a) & set(e)) / TOPK for a, e in zip(answers[0], answers[1])]
    a, e = _pct(t_ann), _pct(t_exact)
    return {"users": len(g.ids), "seen_per_user": int(g.seen.shape[1]), "calls": len(t_ann),
            "ann": a, "exact": e, "ann_vs_exact_p50": round(e["p50_ms"] / a["p50_ms"], 1),
            "ann_vs_exact_p99": round(e["p99_ms"] / a["p99_ms"], 1),
            "recall_at_10": round(float(np.mean(overlap)), 4),
            "recall_at_10_min": round(float(np.min(overlap)), 2)}  # fmt: skip


def _latent_group(store: FactorStore, n_items: int, rng: np.random.Generator) -> Group:
    """The ``latent`` users of ``--million`` (see the module docstring), written with their seen items."""
    name, n_users, n_seen, scale = LATENT
    ids = [f"{name}{j}" for j in range(n_users)]
    rows = _rows(rng, n_users)
    rows[:, :-1] *= scale
    g = Group(ids, rows, np.stack([rng.choice(n_items, n_seen, replace=False) for _ in ids]))
    store.write_vectors(1, "user", ids, g.rows)
    for u, seen in zip(ids, g.seen):
        store.add_seen((u, f"i{j}", T0 + n) for n, j in enumerate(seen.tolist()))
    return g


def _add_new_items(store: FactorStore, ann: Recommender, g: Group, rng: np.random.Generator) -> dict[str, Any]:
    """1,000 new items (one made the best of user 0 of ``g``), then a forced reload of ``ann``."""
    new = _rows(rng, 1000)
    new[0, :-1], new[0, -1] = g.rows[0, :-1] * 10, 10.0
    store.write_vectors(1, "item", [f"new{j}" for j in range(len(new))], new)
    t = time.perf_counter()
    ann.refresh(force=True)
    took = time.perf_counter() - t
    cache = ann._cache
    assert cache is not None and cache.ann is not None
    return {"items": len(new), "reload_s": round(took, 2), "indexed": cache.ann.n,
            "retrained": cache.ann.trained_n != cache.ann.n - len(new), "side_list": cache.ann.overflow_n,
            "new_best_first": ann.recommend(g.ids[0], TOPK).items[0] == "new0"}  # fmt: skip


def run_million(client: redis.Redis, n_items: int, calls: int) -> dict[str, Any]:
    """Exact vs approximate ``recommend()`` at ``n_items`` items (see the module docstring)."""
    rng = np.random.default_rng(n_items)
    store = FactorStore(client, namespace=f"bench{n_items}")
    t = time.perf_counter()
    _items, groups = build(store, n_items, rng)
    groups[LATENT[0]] = _latent_group(store, n_items, rng)
    write_s = time.perf_counter() - t
    exact = Recommender(store, refresh_s=3600.0, ann_min_items=0)
    t = time.perf_counter()
    exact.refresh(force=True)
    exact_load_s = time.perf_counter() - t
    threshold = ServeSettings().ann_min_items
    assert n_items >= threshold, f"--ann-items {n_items} is below ZEROCF_SERVE_ANN_MIN_ITEMS' default {threshold}"
    ann = Recommender(store, refresh_s=3600.0, ann_threads=2)
    rss, t = _rss_bytes(), time.perf_counter()
    ann.refresh(force=True)
    ann_total_s, rss_after = time.perf_counter() - t, _rss_bytes()
    cache = ann._cache
    assert cache is not None and cache.ann is not None and exact.n_items == ann.n_items == n_items
    idx = cache.ann
    out: dict[str, Any] = {"items": n_items, "factors": FACTORS, "k": TOPK, "ann_min_items": threshold}
    out["index"] = {"kind": "faiss IVF-Flat over rows lifted to L2 (MIPS)", "build_s": round(idx.build_seconds, 1),
                    "build_threads": 2, "search_threads": 1, "cells": idx.nlist, "nprobe": idx.nprobe,
                    "norm_bound": round(idx.bound2**0.5, 3), "side_list": idx.overflow_n,
                    "index_bytes": idx.memory_bytes, "rss_growth_bytes_at_load": rss_after - rss,
                    "matrix_bytes": int(cache.matrix.nbytes)}  # fmt: skip
    out |= {name: run_ann_group(ann, exact, g, calls, rng) for name, g in groups.items()}
    out["add_new_items"] = _add_new_items(store, ann, groups["light"], rng)
    out |= {"exact_load_s": round(exact_load_s, 2), "ann_load_s": round(ann_total_s - idx.build_seconds, 2),
            "write_s": round(write_s, 1)}  # fmt: skip
    return out


@contextmanager
def private_redis() -> Iterator[tuple[redis.Redis, int, Path]]:
    """A redis-server of the benchmark's own in a temporary folder: (client, port, folder); shut down on exit."""
    with tempfile.TemporaryDirectory(prefix="zerocf-bench-") as tmp:
        svc = LocalStack(tmp).start_redis()
        client = redis.Redis(port=svc.port, decode_responses=False)
        try:
            yield client, svc.port, Path(tmp)
        finally:
            try:
                client.shutdown(nosave=True)
            except redis.ConnectionError:
                pass  # the server closed the connection as it shut down
            except redis.RedisError:
                os.killpg(svc.pid, signal.SIGTERM)  # our own redis-server (its own session)
            client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--calls", type=int, default=1000, help="timed single calls per group (after 50 warm-up)")
    ap.add_argument("--batch-users", type=int, default=500)
    ap.add_argument("--million", action="store_true", help="only the exact-vs-index case at --ann-items items")
    ap.add_argument("--ann-items", type=int, default=1_000_000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lookup_1m.json"),
                    help="where --million writes its JSON too")  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    load = round(os.getloadavg()[0], 2)
    if args.million:
        with private_redis() as (client, _port, _folder):
            result = run_million(client, args.ann_items, args.calls)
        head = {"bench": "lookup_1m", "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                "load_avg_1m_at_start": load, "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}  # fmt: skip
        groups = {**GROUPS, LATENT[0]: LATENT[1:]}
        text = json.dumps({**head, "groups": groups, "result": result}, indent=1)
        Path(args.out).write_text(text + "\n")
        print(text)
        return 0
    with private_redis() as (client, _port, _folder):
        results = []
        for n in args.items:
            results.append(run_size(client, n, args.calls, args.batch_users))
            client.flushdb()
    head = {"bench": "lookup", "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "load_avg_1m_at_start": load}
    print(json.dumps({**head, "groups": GROUPS, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
