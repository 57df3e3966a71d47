"""Benchmark of workers/store/factor_store.py on a real redis-server it starts on a free port (and stops). Prints JSON.

    python -m bench.bench_store [--k 64] [--rows 50000] [--repeats 10]

Measures: ``apply_batch`` for an LMF-sized batch (2,000 events touching ~2,000 users and ~3,000 items),
the ``read_batch_state`` round trip for the same batch, Lua float32 vector adds per second
(``apply_batch`` with 1,000 item deltas and nothing else per EVALSHA), HMGET rows per second
(``get_vectors``, 1,000 ids per call),
pipelined ``write_vectors`` rows per second, Redis bytes per user row (``MEMORY USAGE key SAMPLES 0``
of the user hash before/after adding rows), per item-count entry, per update counter and per full
(``seen_cap``) seen set. Medians over ``--repeats``; expect +-30 % noise on a shared box.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import redis

from stream.devstack import free_port, redis_binary
from workers.store import FactorStore

log = logging.getLogger("bench.bench_store")


def _median_seconds(fn: Callable[[int], object], repeats: int) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bytes_per_row(store: FactorStore, k: int, n0: int, n1: int, rng: np.random.Generator) -> float:
    """MEMORY USAGE (exact, SAMPLES 0) of a user hash holding n1 rows minus n0 rows, per row."""
    key = store.keys.vectors(1, "user")
    store.r.delete(key)
    ids = [f"user-{j:08d}" for j in range(n1)]  # 13-byte ids, a typical length
    mat = rng.standard_normal((n1, k)).astype(np.float32)
    store.write_vectors(1, "user", ids[:n0], mat[:n0])
    before = store.r.memory_usage(key, samples=0)
    store.write_vectors(1, "user", ids[n0:], mat[n0:])
    after = store.r.memory_usage(key, samples=0)
    return (after - before) / (n1 - n0)


def run(k: int, rows: int, repeats: int) -> dict[str, object]:
    """Start redis-server, measure, stop it; return the numbers."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="zcf-bench-store-")
    proc = subprocess.Popen(
        [
            redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        version = client.info("server")["redis_version"]
        return {"redis_version": version, **_measure(FactorStore(client, "bench"), k, rows, repeats)}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _measure(store: FactorStore, k: int, rows: int, repeats: int) -> dict[str, object]:
    rng = np.random.default_rng(0)
    store.ensure_model(k)
    users, items = [f"u{j}" for j in range(rows)], [f"i{j}" for j in range(rows)]
    t0 = time.perf_counter()
    store.write_vectors(1, "item", items, rng.standard_normal((rows, k)).astype(np.float32))
    write_rows_s = rows / (time.perf_counter() - t0)
    store.write_vectors(1, "user", users, rng.standard_normal((rows, k)).astype(np.float32))

    n_events, n_users, n_items = 2000, 2000, 3000
    batches = []
    for _ in range(repeats):
        ub = [users[j] for j in rng.choice(rows, n_users, replace=False)]
        ib = [items[j] for j in rng.choice(rows, n_items, replace=False)]
        batches.append(
            (
                ub,
                ib,
                rng.standard_normal((n_users, k)).astype(np.float32),
                (rng.standard_normal((n_items, k)) * 1e-3).astype(np.float32),
            )
        )

    def apply(i: int) -> None:
        ub, ib, uv, idl = batches[i]
        prev = None if i == 0 else i - 1
        ok = store.apply_batch(
            1,
            0,
            prev,
            i,
            {"bench.clicks/0": [i, 0]},
            ub,
            uv,
            ib,
            idl,
            counts={it: 1.0 for it in ib[:n_events]},
            user_increments={u: 1 for u in ub},
            seen=[(u, ib[j], 1_700_000_000_000 + i) for j, u in enumerate(ub)],
        )
        assert ok, ok

    apply_s = _median_seconds(apply, repeats)
    read_s = _median_seconds(lambda i: store.read_batch_state(1, [0], batches[i][0], batches[i][1]), repeats)
    add_ids = items[:1000]
    add_d = (rng.standard_normal((1000, k)) * 1e-3).astype(np.float32)
    no_users = np.zeros((0, k), np.float32)  # item deltas only, each repeat on a fresh partition fence
    add_s = _median_seconds(
        lambda i: store.apply_batch(1, 1000 + i, None, 0, {}, [], no_users, add_ids, add_d), repeats
    )
    get_ids = [items[j] for j in rng.choice(rows, 1000, replace=False)]
    get_s = _median_seconds(lambda i: store.get_vectors(1, "item", get_ids), repeats * 3)
    per_row = _bytes_per_row(store, k, n0=rows // 5, n1=rows, rng=rng)
    upd = store.keys.updates(1)
    per_counter = store.r.memory_usage(upd, samples=0) / store.r.hlen(upd)
    store.write_counts(1, {it: 1.0 for it in items})
    per_count = store.r.memory_usage(store.keys.counts(1), samples=0) / rows
    store.add_seen([("seen-user", f"item-{j:07d}", 1_700_000_000_000 + j) for j in range(store.seen_cap)])
    per_seen_user = store.r.memory_usage(store.keys.seen("seen-user"), samples=0)
    return {
        "k": k,
        "rows_preloaded": rows,
        "repeats": repeats,
        "apply_batch": {
            "events": n_events,
            "users": n_users,
            "items": n_items,
            "median_s": round(apply_s, 4),
            "events_per_s": round(n_events / apply_s),
            "item_vector_adds_per_s": round(n_items / apply_s),
        },
        "read_batch_state": {
            "users": n_users,
            "items": n_items,
            "median_s": round(read_s, 4),
            "rows_per_s": round((n_users + n_items) / read_s),
        },
        "lua_vector_adds_per_s": round(1000 / add_s),
        "hmget_rows_per_s": round(1000 / get_s),
        "write_vectors_rows_per_s": round(write_rows_s),
        "bytes_per_user_row": round(per_row, 1),
        "mib_per_million_rows": round(per_row * 1e6 / 2**20, 1),
        "bytes_per_count_entry": round(per_count, 1),
        "bytes_per_update_counter": round(per_counter, 1),
        "bytes_per_full_seen_set": per_seen_user,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run(a.k, a.rows, a.repeats), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
