"""LMF write throughput on one Redis server, a one-primary Redis Cluster and a three-primary one, in one run.

    python -m bench.bench_cluster [--k 64] [--rows 20000] [--batches 10] [--writers 3] [--rounds 3]

Each setup is started by the project's stack code (:meth:`stream.devstack.LocalStack.start_redis`,
:meth:`~stream.devstack.LocalStack.start_redis_cluster`) in a temporary folder and stopped at the end; the store
connects with the URL ``ZEROCF_REDIS_URL`` would hold (``redis://`` or ``redis+cluster://``). A batch is
bench_store's LMF-sized write (2,000 events by 2,000 users on 3,000 items, rows, accumulators, counts,
popularity, counters and seen adds) sent as the worker sends it: :meth:`FactorStore.read_batch_state` of its
items (versions, rows, accumulators) then :meth:`FactorStore.apply_batch` with absolute rows; both are timed
(the store's share of a worker's batch loop). Writers are processes, each fenced on its own events partition.

The three setups run side by side for the whole bench and the scenarios are interleaved: round 1 runs every
scenario on every setup, then round 2, ... (``--rounds``); the figures are the medians over the rounds, each
round's in ``rounds``, so that load from other processes on the machine falls on every setup alike.

Scenarios per setup (events/s = events applied by all writers / wall time from the first start to the last end):

- ``one_writer``: one process, one model;
- ``writers_one_model``: ``--writers`` processes on ONE model (today's layout: every key in the slot of
  ``{ns}``, so on any cluster one primary executes every batch);
- ``writers_own_models``: ``--writers`` processes, each on its own model, the models' hash tags chosen to land
  on different primaries (on the three-primary cluster: one per primary). Not a zerocf deployment (one LMF
  fleet writes one model) but the ceiling a layout spreading one model over slots (issue 14 item 1) could
  approach on these primaries.

``evalsha_calls_by_primary``: EVALSHA calls each primary executed during the scenario (INFO commandstats):
where the work went. ``cpu_count``: the writers and the servers share these cores, which caps any scaling.
Expect +-30 % on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

import numpy as np

from bench.bench_store import G, _absolute, _acc, _ids, _lmf_batch, _rows
from stream.devstack import LocalStack
from workers.store import ApplyStatus, FactorStore
from workers.store.connect import client_from_url, is_cluster

log = logging.getLogger("bench.bench_cluster")
N_EVENTS = 2000  # per batch (bench_store's N_EVENTS)


# ------------------------------------------------------------------- one writer process
def _writer(url: str, ns: str, part: int, k: int, rows: int, batches: int, barrier: Any, out: Any) -> None:
    """Apply ``batches`` LMF batches to model ``ns`` fenced on ``part``; put (start, end, events) on ``out``."""
    store = FactorStore.from_url(url, ns)
    rng = np.random.default_rng(1000 + part)
    users, items = _ids("user", rows), _ids("item", rows)
    writes = [replace(_lmf_batch(rng, users, items, k, i), partition=part) for i in range(batches)]
    writes = [replace(b, watermarks={f"bench.clicks/{part}": [i * N_EVENTS, 0]}) for i, b in enumerate(writes)]
    barrier.wait()
    t0 = time.perf_counter()
    for i in range(batches):
        _absolute(store, writes, i)  # read versions, rows and accumulators, as the worker does before it writes
        status = store.apply_batch(G, writes[i])
        assert status is ApplyStatus.APPLIED, status
    out.put((t0, time.perf_counter(), batches * N_EVENTS))


def _preload(url: str, ns: str, k: int, rows: int) -> None:
    store = FactorStore.from_url(url, ns)
    store.ensure_model(k)
    rng = np.random.default_rng(0)
    users, items = _ids("user", rows), _ids("item", rows)
    store.write_vectors(G, "item", items, _rows(rng, rows, k + 1))
    store.write_vectors(G, "item_acc", items, _acc(rng, rows))
    store.write_vectors(G, "user", users, _rows(rng, rows, k + 1))
    store.write_vectors(G, "user_acc", users, _acc(rng, rows))


def _evalsha_by_primary(url: str) -> dict[str, int]:
    client = client_from_url(url)
    try:
        if not is_cluster(client):
            stats = client.info("commandstats")
            return {"server": int(stats.get("cmdstat_evalsha", {}).get("calls", 0))}
        out = {}
        for node in client.get_primaries():
            stats = client.info("commandstats", target_nodes=node)
            out[f"{node.host}:{node.port}"] = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
        return out
    finally:
        client.close()


def _scenario(url: str, models: list[str], k: int, rows: int, batches: int) -> dict[str, Any]:
    """One writer process per entry of ``models`` (a namespace; repeated = writers on one model)."""
    client = client_from_url(url)
    client.flushdb(**({"target_nodes": "primaries"} if is_cluster(client) else {}))
    client.close()
    for ns in sorted(set(models)):
        _preload(url, ns, k, rows)
    before = _evalsha_by_primary(url)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(models)), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(url, ns, p, k, rows, batches, barrier, out))
             for p, ns in enumerate(models)]  # fmt: skip
    for p in procs:
        p.start()
    done = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"a writer exited {p.exitcode}"
    after = _evalsha_by_primary(url)
    wall = max(e for _, e, _ in done) - min(s for s, _, _ in done)
    events = sum(n for _, _, n in done)
    return {
        "writers": len(models),
        "models": len(set(models)),
        "events": events,
        "wall_s": round(wall, 2),
        "events_per_s": round(events / wall),
        "batch_ms_median": round(1000 * float(np.median([(e - s) / batches for s, e, _ in done])), 1),
        "evalsha_calls_by_primary": {n: after[n] - before.get(n, 0) for n in after},
    }


def _spread_namespaces(url: str, n: int) -> list[str]:
    """``n`` distinct model namespaces whose ``{ns}`` slots go round-robin over the primaries (one per primary on
    three primaries with three writers; all on the one server or primary otherwise)."""
    client = client_from_url(url)
    try:
        if not is_cluster(client):
            return [f"m{i}" for i in range(n)]
        primaries = [f"{p.host}:{p.port}" for p in client.get_primaries()]
        need = -(-n // len(primaries))  # namespaces per primary
        by_node: dict[str, list[str]] = {p: [] for p in primaries}
        for j in range(100_000):
            node = client.nodes_manager.get_node_from_slot(client.keyslot(f"{{m{j}}}")).name
            if len(by_node[node]) < need:
                by_node[node].append(f"m{j}")
            if all(len(v) == need for v in by_node.values()):
                break
        return [by_node[primaries[i % len(primaries)]][i // len(primaries)] for i in range(n)]
    finally:
        client.close()


SCENARIOS = ("one_writer", "writers_one_model", "writers_own_models")


def run(k: int, rows: int, batches: int, writers: int, rounds: int) -> dict[str, Any]:
    res: dict[str, Any] = {"k": k, "rows_preloaded_per_model": rows, "batches_per_writer": batches}
    res |= {"events_per_batch": N_EVENTS, "rounds": rounds, "cpu_count": os.cpu_count()}
    res["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="zcf-bench-cluster-") as tmp:
        single = None
        try:
            single = LocalStack(f"{tmp}/single").start_redis()  # not recorded in a state file: stopped below
            urls = {"single_server": f"redis://127.0.0.1:{single.port}/0"}
            for n, name in ((1, "cluster_1_primary"), (3, "cluster_3_primaries")):
                stack = LocalStack(f"{tmp}/{name}")
                stack.start_redis_cluster(n)
                urls[name] = stack.cluster_url()
            models = {
                name: {"one_writer": ["m0"], "writers_one_model": ["m0"] * writers,
                       "writers_own_models": _spread_namespaces(url, writers)}
                for name, url in urls.items()
            }  # fmt: skip
            runs: dict[str, dict[str, list[dict[str, Any]]]] = {n: {s: [] for s in SCENARIOS} for n in urls}
            for r in range(rounds):
                for name, url in urls.items():
                    for sc in SCENARIOS:
                        runs[name][sc].append(_scenario(url, models[name][sc], k, rows, batches))
                        log.warning("round %d %s %s: %s events/s", r, name, sc, runs[name][sc][-1]["events_per_s"])
        finally:
            if single is not None:
                os.killpg(single.pid, signal.SIGTERM)  # its own session (LocalStack starts it so)
            for name in ("cluster_1_primary", "cluster_3_primaries"):
                LocalStack(f"{tmp}/{name}").down()
    for name, url in urls.items():
        res[name] = {"url": url}
        for sc in SCENARIOS:
            per = runs[name][sc]
            res[name][sc] = per[-1] | {
                "events_per_s": round(float(np.median([x["events_per_s"] for x in per]))),
                "batch_ms_median": round(float(np.median([x["batch_ms_median"] for x in per])), 1),
                "rounds_events_per_s": [x["events_per_s"] for x in per],
                "namespaces": models[name][sc],
            }
            res[name][sc].pop("wall_s")
    one, three = res["cluster_1_primary"], res["cluster_3_primaries"]
    res["summary_events_per_s"] = {
        "single_server_one_writer": res["single_server"]["one_writer"]["events_per_s"],
        "cluster_1_primary_one_model": one["writers_one_model"]["events_per_s"],
        "cluster_3_primaries_one_model": three["writers_one_model"]["events_per_s"],
        "cluster_3_primaries_own_models": three["writers_own_models"]["events_per_s"],
    }
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--rows", type=int, default=20_000, help="users and items preloaded per model (>= 5,000)")
    ap.add_argument("--batches", type=int, default=10, help="batches per writer")
    ap.add_argument("--writers", type=int, default=3, help="writer processes of the multi-writer scenarios")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    a = ap.parse_args(argv)
    if a.rows < 5000:
        ap.error("--rows must be >= 5000 (a batch samples 3,000 distinct items)")
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run(a.k, a.rows, a.batches, a.writers, a.rounds), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
