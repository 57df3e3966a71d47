"""Benchmark of the factor store (``workers/store/``) on a private redis-server; prints one JSON object.

    python -m bench.bench_store [--k 64] [--rows 50000] [--repeats 10]

Starts ``redis-server`` (:func:`stream.devstack.redis_binary`) on a free port without persistence, preloads
``--rows`` users and items (rows of ``k + 1`` float32: latent values and the bias, plus their two AdaGrad
accumulators) and 20 seen items per user, measures, and stops the server. Times are medians over
``--repeats`` calls; expect +-30 % on a shared machine. Ids are 13 bytes (``user-00000042``), a typical
length.

Fields (``load_avg_1m_at_start``: the machine's 1-minute load average when the bench started):

- ``apply_batch``: one :meth:`FactorStore.apply_batch` of an LMF-sized :class:`BatchWrite` as the worker
  sends it: 2,000 events by 2,000 users on 3,000 items, i.e. 2,000 user rows + accumulators (SET), 3,000
  item deltas + accumulator deltas and the global row (ADDED in Lua), 2,000 counts and decayed-popularity
  increments, 2,000 update counters and 2,000 seen adds (with retention and cap), fenced on the previous
  offset; the item rows carry their stored versions and ``stored + delta`` (read right before each call,
  untimed, as the worker holds them), so Redis SETs them. ``all_rows_added_*``: the same batches without
  versions (every item row added in Lua: the cost when every version moved). ``events_per_s`` = 2,000 /
  median. ``cumulative_sections_ms``: the same batches cut down to their
  first sections (``rows``: user rows and item deltas; ``+ accumulators``; ``+ counts, popularity, update
  counters``; ``+ seen adds``), so successive differences are what each section costs; ``server_*`` is the
  time Redis spent executing the script (``INFO commandstats``), the rest is the client (encoding, argument
  packing, the socket).
- ``read_batch_state``: the worker's fetch for another such batch with every user and item cold
  (``full_median_ms``: rows, accumulators and the seen sets of the 2,000 users, one pipelined round trip),
  ``rows_and_accumulators`` and ``rows_only``.
- ``lua_vector_adds_per_s``: item rows added per second by ``apply_batch`` calls that carry only 1,000 item
  deltas; ``lua_vector_adds_with_acc_per_s`` the same with their accumulator deltas (what the worker sends).
- ``hmget_rows_per_s``: :meth:`FactorStore.get_vectors` of 1,000 item rows per call.
- ``write_vectors_rows_per_s``: pipelined :meth:`FactorStore.write_vectors` of the item preload.
- ``memory`` (``MEMORY USAGE key SAMPLES 0`` of a large key before/after adding entries, per entry; the
  allocator is ``mem_allocator``): ``bytes_per_user_row`` (k + 1 floats), ``bytes_per_accumulator_row``,
  ``bytes_per_item_count``, ``bytes_per_popularity_entry``, ``bytes_per_update_counter``;
  ``mib_per_million_users`` = row + accumulator + counter; ``seen_set_bytes``: one user's seen set after
  100, 1,000 and 10,000 (the default cap) distinct clicks, and per click.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import redis

from stream.devstack import free_port, redis_binary
from workers.store import GLOBAL_ROW, ApplyStatus, BatchWrite, FactorStore

log = logging.getLogger("bench.bench_store")
F32 = npt.NDArray[np.float32]
G = 1  # the generation ensure_model creates
T0 = 1_700_000_000_000  # event time of the benchmark's clicks, ms
N_EVENTS, N_USERS, N_ITEMS, N_ADDS, N_GET = 2000, 2000, 3000, 1000, 1000
SEEN_PRELOAD = 20  # seen items per preloaded user
SEEN_SIZES = (100, 1000, 10_000)


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{j:08d}" for j in range(n)]


def _script_usec(r: Any) -> int:
    """Microseconds Redis has spent in EVALSHA so far (the Lua scripts, their redis.call()s included)."""
    return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))


def _rows(rng: np.random.Generator, n: int, w: int, scale: float = 1.0) -> F32:
    return (rng.standard_normal((n, w)) * scale).astype(np.float32)


def _acc(rng: np.random.Generator, n: int, scale: float = 1.0) -> F32:
    return (np.abs(rng.standard_normal((n, 2))) * scale).astype(np.float32)


# ------------------------------------------------------------------- server
def run(k: int, rows: int, repeats: int) -> dict[str, Any]:
    """Start redis-server, measure, stop it; return the numbers."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="zcf-bench-store-") as workdir:
        argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen([*argv, "--dir", workdir], stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            info = client.info("server") | client.info("memory")
            head = {"redis_version": info["redis_version"], "mem_allocator": info["mem_allocator"],
                    "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}  # fmt: skip
            return head | _measure(FactorStore(client, "bench"), k, rows, repeats)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


# ------------------------------------------------------------------- throughput
def _preload(store: FactorStore, k: int, rows: int, rng: np.random.Generator) -> tuple[list[str], list[str], float]:
    users, items = _ids("user", rows), _ids("item", rows)
    t0 = time.perf_counter()
    store.write_vectors(G, "item", items, _rows(rng, rows, k + 1))
    write_rows_s = rows / (time.perf_counter() - t0)
    store.write_vectors(G, "item", [GLOBAL_ROW], np.zeros((1, k + 1), np.float32))
    store.write_vectors(G, "item_acc", [*items, GLOBAL_ROW], _acc(rng, rows + 1))
    store.write_vectors(G, "user", users, _rows(rng, rows, k + 1))
    store.write_vectors(G, "user_acc", users, _acc(rng, rows))
    seen = rng.integers(0, rows, (rows, SEEN_PRELOAD))
    for c in range(0, rows, 500):  # one Lua call per 500 users
        store.add_seen((users[u], items[j], T0 - 1000 + n) for u in range(c, min(rows, c + 500))
                       for n, j in enumerate(seen[u]))  # fmt: skip
    return users, items, write_rows_s


def _lmf_batch(rng: np.random.Generator, users: Sequence[str], items: Sequence[str], k: int, i: int) -> BatchWrite:
    """An LMF-sized write, shaped as :meth:`LMFWorker._submit` builds it (offsets fenced on partition 0)."""
    ub = [users[j] for j in rng.choice(len(users), N_USERS, replace=False)]
    ib = [items[j] for j in rng.choice(len(items), N_ITEMS, replace=False)]
    clicked = ib[:N_EVENTS]
    return BatchWrite(
        partition=0,
        expected_offset=None if i == 0 else (i - 1) * N_EVENTS,
        new_offset=i * N_EVENTS,
        watermarks={"bench.clicks/0": [i * N_EVENTS, 0]},
        user_ids=ub,
        user_rows=_rows(rng, N_USERS, k + 1),
        item_ids=[*ib, GLOBAL_ROW],
        item_deltas=_rows(rng, N_ITEMS + 1, k + 1, 1e-3),
        user_acc=_acc(rng, N_USERS),
        item_acc_deltas=_acc(rng, N_ITEMS + 1, 1e-3),
        counts={it: 1.0 for it in clicked},
        popularity={it: 0.9 for it in clicked},
        pop_ref_ms=T0,
        user_increments={u: 1 for u in ub},
        seen=[(u, it, T0 + i) for u, it in zip(ub, clicked)],
    )


def _sections(b: BatchWrite, level: int, partition: int) -> BatchWrite:
    """``b`` cut down to its first ``level`` sections (see ``APPLY_SECTIONS``), unfenced on ``partition``."""
    cut = replace(b, partition=partition, expected_offset=None, new_offset=0, seen=())
    cut = replace(cut, user_acc=None, item_acc_deltas=None, counts={}, popularity={}, user_increments={})
    if level >= 2:
        cut = replace(cut, user_acc=b.user_acc, item_acc_deltas=b.item_acc_deltas)
    if level >= 3:
        cut = replace(cut, counts=b.counts, popularity=b.popularity, user_increments=b.user_increments)
    return replace(cut, seen=b.seen) if level >= 4 else cut


APPLY_SECTIONS = ("rows", "accumulators", "counts_popularity_updates", "seen")


def _interleaved(
    r: Any,
    calls: dict[str, Callable[[int], object]],
    repeats: int,
    prepare: dict[str, Callable[[int], object]] | None = None,
) -> dict[str, tuple[float, float]]:
    """Median wall and Redis script seconds of each ``calls[name](i)``, ``i`` in ``range(repeats)``, the calls
    interleaved (``i`` = 0 of every name, then 1, ...) so that every one sees the same load; ``prepare[name](i)``
    runs right before, untimed."""
    wall: dict[str, list[float]] = {name: [] for name in calls}
    server: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(repeats):
        for name, call in calls.items():
            if prepare and name in prepare:
                prepare[name](i)
            usec = _script_usec(r)
            t0 = time.perf_counter()
            call(i)
            wall[name].append(time.perf_counter() - t0)
            server[name].append((_script_usec(r) - usec) / 1e6)
    return {name: (statistics.median(wall[name]), statistics.median(server[name])) for name in calls}


def _absolute(store: FactorStore, writes: list[BatchWrite], i: int) -> None:
    """Give ``writes[i]`` what the worker sends with its deltas: the stored versions (read first, as the worker
    does), stored rows + deltas and accumulators + deltas (the global row: unknown, added)."""
    b = writes[i]
    st = store.read_batch_state(G, [], [], b.item_ids, accumulators=True)
    vers = st.item_versions if st.item_versions is not None else np.zeros(0, np.int64)
    assert b.item_deltas is not None and st.item_acc is not None
    acc = None if b.item_acc_deltas is None else st.item_acc + b.item_acc_deltas
    writes[i] = replace(b, item_versions=np.where(np.array(b.item_ids) == GLOBAL_ROW, -1, vers),
                        item_rows=st.item_rows + b.item_deltas, item_acc=acc)  # fmt: skip


def _throughput(store: FactorStore, k: int, users: list[str], items: list[str], repeats: int,
                rng: np.random.Generator) -> dict[str, Any]:  # fmt: skip
    def apply(writes: list[BatchWrite], i: int) -> None:
        status = store.apply_batch(G, writes[i])
        assert status is ApplyStatus.APPLIED, status

    def batches() -> list[BatchWrite]:  # every variant its own batches: every seen add is a new click
        return [_lmf_batch(rng, users, items, k, i) for i in range(repeats)]

    full, added = batches(), [replace(b, partition=999) for b in batches()]  # fenced on their own partition
    calls: dict[str, Callable[[int], object]] = {"full": partial(apply, full), "added": partial(apply, added)}
    prepare: dict[str, Callable[[int], object]] = {"full": partial(_absolute, store, full)}
    for level, name in enumerate(APPLY_SECTIONS, 1):  # unfenced, one partition per call
        cut = [_sections(b, level, 1000 * level + i) for i, b in enumerate(batches())]
        calls[name], prepare[name] = partial(apply, cut), partial(_absolute, store, cut)
    writes = _interleaved(store.r, calls, repeats, prepare)
    added_s, added_server_s = writes.pop("added")

    cold = batches()  # other users and items than the writes'

    def read(acc: bool, seen: bool, i: int) -> None:
        b = cold[i]
        store.read_batch_state(G, [0], b.user_ids, b.item_ids, accumulators=acc, seen_users=b.user_ids if seen else ())

    kinds = {"full": (True, True), "rows_and_accumulators": (True, False), "rows_only": (False, False)}
    reads = _interleaved(store.r, {name: partial(read, *kind) for name, kind in kinds.items()}, repeats)
    ids, deltas, acc = items[:N_ADDS], _rows(rng, N_ADDS, k + 1, 1e-3), _acc(rng, N_ADDS, 1e-3)
    only_items = {  # item deltas only, one partition per call
        "rows": [BatchWrite(10_000 + i, None, 0, {}, item_ids=ids, item_deltas=deltas) for i in range(repeats)],
        "with_acc": [BatchWrite(20_000 + i, None, 0, {}, item_ids=ids, item_deltas=deltas, item_acc_deltas=acc)
                     for i in range(repeats)],
    }  # fmt: skip
    adds = _interleaved(store.r, {name: partial(apply, ws) for name, ws in only_items.items()}, repeats)
    get_ids = [items[j] for j in rng.choice(len(items), N_GET, replace=False)]
    get_s, _ = _interleaved(store.r, {"get": lambda i: store.get_vectors(G, "item", get_ids)}, 3 * repeats)["get"]
    apply_s, server_s = writes.pop("full")
    return {
        "apply_batch": {
            "events": N_EVENTS,
            "users": N_USERS,
            "items": N_ITEMS,
            "median_ms": round(1000 * apply_s, 1),
            "events_per_s": round(N_EVENTS / apply_s),
            "server_median_ms": round(1000 * server_s, 1),
            "all_rows_added_median_ms": round(1000 * added_s, 1),
            "all_rows_added_server_median_ms": round(1000 * added_server_s, 1),
            "cumulative_sections_ms": {name: round(1000 * t, 1) for name, (t, _) in writes.items()},
            "cumulative_sections_server_ms": {name: round(1000 * t, 1) for name, (_, t) in writes.items()},
        },
        "read_batch_state": {
            "users": N_USERS,
            "items": N_ITEMS,
            "seen_per_user": SEEN_PRELOAD,
            **{f"{name}_median_ms": round(1000 * t, 1) for name, (t, _) in reads.items()},
        },
        "lua_vector_adds_per_s": round(N_ADDS / adds["rows"][0]),
        "lua_vector_adds_with_acc_per_s": round(N_ADDS / adds["with_acc"][0]),
        "hmget_rows_per_s": round(N_GET / get_s),
    }


# ------------------------------------------------------------------- memory
def _bytes_per_entry(r: Any, key: str, write: Callable[[slice], None], n: int) -> float:
    """MEMORY USAGE growth of ``key`` from n/5 to n entries, per entry (the key is rewritten from scratch)."""
    r.delete(key)
    n0 = n // 5
    write(slice(0, n0))
    before = r.memory_usage(key, samples=0)
    write(slice(n0, n))
    return float(r.memory_usage(key, samples=0) - before) / (n - n0)


def _memory(store: FactorStore, k: int, rows: int, rng: np.random.Generator) -> dict[str, Any]:
    r, km = store.r, store.keys
    ids = _ids("user", rows)
    mat, acc = _rows(rng, rows, k + 1), _acc(rng, rows)
    vals = {i: float(n) for n, i in enumerate(ids)}

    def counts(s: slice) -> None:
        store.write_counts(G, {i: vals[i] for i in ids[s]})

    def popularity(s: slice) -> None:
        store.write_popularity(G, {i: vals[i] for i in ids[s]}, T0)

    out: dict[str, Any] = {
        "bytes_per_user_row": _bytes_per_entry(r, km.vectors(G, "user"),
                                               lambda s: store.write_vectors(G, "user", ids[s], mat[s]), rows),
        "bytes_per_accumulator_row": _bytes_per_entry(r, km.vectors(G, "user_acc"),
                                                      lambda s: store.write_vectors(G, "user_acc", ids[s], acc[s]),
                                                      rows),
        "bytes_per_item_count": _bytes_per_entry(r, km.counts(G), counts, rows),
        "bytes_per_popularity_entry": _bytes_per_entry(r, km.popularity(G), popularity, rows),
        "bytes_per_update_counter": _bytes_per_entry(
            r, km.updates(G), lambda s: r.hset(km.updates(G), mapping={i: 7 for i in ids[s]}), rows
        ),
    }  # fmt: skip
    out = {name: round(v, 1) for name, v in out.items()}
    per_user = out["bytes_per_user_row"] + out["bytes_per_accumulator_row"] + out["bytes_per_update_counter"]
    out["mib_per_million_users"] = round(per_user * 1e6 / 2**20, 1)
    out["seen_set_bytes"] = _seen_sizes(store)
    return out


def _seen_sizes(store: FactorStore) -> dict[str, Any]:
    """One user's seen set after n distinct clicks (13-byte item ids, ts one second apart)."""
    out: dict[str, Any] = {}
    for n in SEEN_SIZES:
        user = f"seen-{n:08d}"
        for c in range(0, n, 1000):
            store.add_seen((user, f"item-{j:08d}", T0 + 1000 * j) for j in range(c, min(n, c + 1000)))
        size = store.r.memory_usage(store.keys.seen(user), samples=0)
        held = store.r.zcard(store.keys.seen(user))
        out[str(n)] = {"bytes": size, "bytes_per_click": round(size / held, 1), "held": held}
    return out


def _measure(store: FactorStore, k: int, rows: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    store.ensure_model(k)
    t0 = time.perf_counter()
    users, items, write_rows_s = _preload(store, k, rows, rng)
    preload_s = time.perf_counter() - t0
    res: dict[str, Any] = {"k": k, "width": k + 1, "rows_preloaded": rows, "seen_per_user": SEEN_PRELOAD}
    res |= {"seen_cap": store.seen_cap, "repeats": repeats, "preload_s": round(preload_s, 1)}
    res |= _throughput(store, k, users, items, repeats, rng)
    res["write_vectors_rows_per_s"] = round(write_rows_s)
    res["memory"] = _memory(store, k, rows, rng)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--rows", type=int, default=50_000, help="users and items preloaded (>= 5,000)")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args(argv)
    if a.rows < 5000:
        ap.error("--rows must be >= 5000 (a batch samples 3,000 distinct items)")
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run(a.k, a.rows, a.repeats), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
