"""Benchmark :class:`workers.serving.lookup.Recommender` against the bare numpy limit; prints one JSON object.

For each catalogue size (10k and 100k items, k=64 factors) it writes a random model into a private
redis-server (started here with :meth:`stream.devstack.LocalStack.start_redis`, shut down at the end) and
measures, in the same process and run:

- ``single``: ``recommend(user, k=10)`` latency p50/p99 (ms) for known users with 20 seen items each
  (user HMGET + seen read from Redis, matrix-vector product, masking, argpartition, sigmoid);
- ``bare_single``: the limit, ``Q @ p`` + argpartition + sort of the top 10 on an in-memory matrix
  (timed interleaved with ``single``, call by call, so both see the same load on a shared machine);
- ``batch``: ``recommend_many`` throughput (users/s, best of 3), vs ``bare_batch``: chunked
  ``U @ Q.T`` + row argpartition (best of 3);
- ``fallback``: p50/p99 of unknown users (popularity), and ``load_s``: one full item-matrix load.

BLAS is pinned to one thread (as in the workers) so both sides see the same machine.

Run: ``python -m bench.bench_lookup [--items 10000 100000] [--calls 1000]``.
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
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import redis  # noqa: E402

from stream.devstack import LocalStack  # noqa: E402
from workers.serving.lookup import Recommender  # noqa: E402
from workers.store import FactorStore  # noqa: E402

log = logging.getLogger("bench.lookup")
FACTORS, TOPK, N_USERS, SEEN = 64, 10, 2000, 20


def _pct(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def _timed(fn: Any, args: list[Any]) -> list[float]:
    out = []
    for a in args:
        t = time.perf_counter()
        fn(a)
        out.append(time.perf_counter() - t)
    return out


def build(store: FactorStore, n_items: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    store.ensure_model(FACTORS)
    items = (rng.normal(size=(n_items, FACTORS)) * 0.1).astype(np.float32)
    users = (rng.normal(size=(N_USERS, FACTORS)) * 0.1).astype(np.float32)
    store.write_vectors(1, "item", [f"i{j}" for j in range(n_items)], items)
    store.write_vectors(1, "user", [f"u{j}" for j in range(N_USERS)], users)
    store.write_counts(1, {f"i{j}": float(1000 - j) for j in range(1000)})
    seen = rng.integers(0, n_items, size=(N_USERS, SEEN))
    store.add_seen((f"u{u}", f"i{j}", 1 + n) for u in range(N_USERS) for n, j in enumerate(seen[u]))
    return items, users


def bare_single(items: np.ndarray, p: np.ndarray) -> np.ndarray:
    s = items @ p
    top = np.argpartition(-s, TOPK - 1)[:TOPK]
    return top[np.argsort(-s[top])]


def bare_batch(items: np.ndarray, users: np.ndarray, chunk: int) -> None:
    for c in range(0, len(users), chunk):
        s = users[c : c + chunk] @ items.T
        np.argpartition(-s, TOPK - 1, axis=1)[:, :TOPK]


def run_size(client: redis.Redis, n_items: int, calls: int, batch_users: int) -> dict[str, Any]:
    rng = np.random.default_rng(n_items)
    store = FactorStore(client, namespace=f"bench{n_items}")
    t = time.perf_counter()
    items, users = build(store, n_items, rng)
    write_s = time.perf_counter() - t
    rec = Recommender(store, refresh_s=3600.0)
    t = time.perf_counter()
    rec.refresh(force=True)
    load_s = time.perf_counter() - t
    picks = [f"u{j}" for j in rng.integers(0, N_USERS, size=calls)]
    single: list[float] = []
    bare: list[float] = []
    for n, u in enumerate(picks):  # interleaved, so both sides see the same machine load and caches
        t0 = time.perf_counter()
        rec.recommend(u, TOPK)
        t1 = time.perf_counter()
        bare_single(items, users[int(u[1:])])
        t2 = time.perf_counter()
        if n >= 50:  # the first 50 warm up
            single.append(t1 - t0)
            bare.append(t2 - t1)
    fallback = _timed(lambda u: rec.recommend(u, TOPK), [f"x{j}" for j in range(min(calls, 300))])
    batch_ids = [f"u{j}" for j in range(batch_users)]
    batch_s = bare_batch_s = float("inf")
    for _ in range(3):  # best of 3, alternating
        t = time.perf_counter()
        rec.recommend_many(batch_ids, TOPK)
        batch_s = min(batch_s, time.perf_counter() - t)
        t = time.perf_counter()
        bare_batch(items, users[:batch_users], max(1, (1 << 22) // n_items))
        bare_batch_s = min(bare_batch_s, time.perf_counter() - t)
    s, b = _pct(single), _pct(bare)
    return {
        "items": n_items,
        "factors": FACTORS,
        "k": TOPK,
        "calls": calls,
        "write_s": round(write_s, 2),
        "load_s": round(load_s, 3),
        "single": s,
        "bare_single": b,
        "single_ratio_p50": round(s["p50_ms"] / b["p50_ms"], 2),
        "single_ratio_p99": round(s["p99_ms"] / b["p99_ms"], 2),
        "fallback": _pct(fallback),
        "batch_users_per_s": round(batch_users / batch_s),
        "bare_batch_users_per_s": round(batch_users / bare_batch_s),
        "batch_ratio": round((batch_users / bare_batch_s) / (batch_users / batch_s), 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--batch-users", type=int, default=500)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="zerocf-bench-") as tmp:
        svc = LocalStack(tmp).start_redis()
        client = redis.Redis(port=svc.port, decode_responses=False)
        try:
            results = [run_size(client, n, args.calls, args.batch_users) for n in args.items]
        finally:
            try:
                client.shutdown(nosave=True)
            except redis.ConnectionError:
                pass  # the server closed the connection as it shut down
            except redis.RedisError:
                os.killpg(svc.pid, signal.SIGTERM)  # our own redis-server (its own session)
            client.close()
    print(
        json.dumps(
            {"bench": "lookup", "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "results": results}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
