"""Benchmark of the per-click LMF kernel and its popularity sampler; prints one JSON object.

Run: ``python -m bench.bench_lmf_kernel [--batches 30] [--seed 0]`` (about a minute on one core).

Setup: k = 64, mini-batches of 2,000 clicks (``ZEROCF_LMF_BATCH``) by 10k users on 5k items (Zipf
popularity), 20 known positives per user, the production hyper-parameters (``LMFConfig()`` defaults through
:func:`workers.online.model.lmf_params`: 10 negatives, ``hard_share`` 0.5 with 8 candidates, ``uniform_mix``
0.2, AdaGrad) and the production proposal (alias table over a 100k-click reservoir, ``alpha`` 0.25). Each
timed batch gets a fresh :func:`~workers.kernels.lmf.positive_set` (the kernel adds the batch's clicks to
it), built outside the timing. Figures are medians per batch of the thread's CPU time
(``time.thread_time``: on a shared machine the wall time also counts the time other processes hold the
core; ``setup.cpu_share_of_wall`` says how much of the wall time the benchmark thread got), variants
interleaved batch by batch so that every one sees the same machine; ratios compare runs of this process.

Fields:

- ``load_avg_1m_at_start``: the machine's 1-minute load average when the bench started (other processes
  share its cores).
- ``compile`` (wall and CPU seconds): ``cold`` is each kernel's first call in a child process whose numba
  cache is an empty temporary directory (a true compile); ``first_call`` is the first call in this process,
  which loads the on-disk cache when ``cache_present_before`` (else it compiles and writes it). The first
  kernel called (``positive_set``, the hash-set build) also pays numba's one-time initialisation of the
  process; ``alias_table`` is the Vose table build; ``lmf_train`` compiles the whole training kernel
  (sampling, DNS and ranking are compiled into it).
- ``kernel``: events/s of :func:`~workers.kernels.lmf.lmf_train` with production parameters
  (``production_events_per_s``), with ``hard_share`` 0 (``hard_share_0_events_per_s``; the gap is the cost
  of scoring 8 candidates per hard negative), and with prequential ranking of every click
  (``rank_every_1_events_per_s``, what ``zerocf eval --protocol prequential`` does by default;
  ``us_per_ranked_click`` is the extra cost of one rank, a pass over the 5k items). ``given_negatives_events_per_s``
  is the kernel on pre-drawn negatives, the same work as the pure-Python
  :func:`~workers.kernels.lmf.lmf_train_reference` (``reference_events_per_s``, on the first
  ``reference_events`` clicks of a batch); ``speedup_vs_reference`` is their ratio.
  ``positive_set_ms`` is building the known-positive table of one batch (the worker does it per batch).
- ``sampling``: ``alias_rebuild_5k_items_ms`` (a 100k-click reservoir over 5k items, the kernel setup)
  and ``alias_rebuild_632k_items_ms`` (a 1M-click reservoir over 1M items: ~632k distinct) of
  :meth:`~workers.kernels.sampling.PopularitySampler.refresh`, median of ``rebuild_repeats``; the worker
  rebuilds every ``reservoir / 10`` clicks.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from workers.config import LMFConfig
from workers.kernels.lmf import LMFParams, init_rows, lmf_train, lmf_train_reference, positive_set
from workers.kernels.sampling import PopularitySampler, Reservoir
from workers.online.model import lmf_params

K, BATCH, N_USERS, N_ITEMS, SEEN_PER_USER = 64, 2000, 10_000, 5_000, 20
REFERENCE_EVENTS = 200
REBUILD_REPEATS = 5
F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
KERNELS_DIR = Path(__file__).resolve().parents[1] / "workers" / "kernels"


# ------------------------------------------------------------------------------------- compile
def _first_call(out: dict[str, dict[str, float]], name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn(*args)``, record its wall and CPU seconds under ``name``, return its result."""
    wall, cpu = time.perf_counter(), time.thread_time()
    result = fn(*args)
    out[name] = {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.thread_time() - cpu, 3)}
    return result


def first_calls() -> dict[str, dict[str, float]]:
    """Wall and CPU seconds of the first call of each compiled kernel in this process, on tiny inputs."""
    rng = np.random.default_rng(0)
    r = Reservoir(10)
    r.add(np.array([0, 1, 2], np.int32), rng)
    U, V = init_rows(2, 4, rng), init_rows(3, 4, rng)
    GU, GV, glob_bias = np.zeros((2, 2), np.float32), np.zeros((3, 2), np.float32), np.zeros(1)
    events = (np.array([0, 1], np.int32), np.array([1, 2], np.int32), np.ones(2, np.float32))
    out: dict[str, dict[str, float]] = {}
    pos = _first_call(out, "positive_set", positive_set, [0], [1], 3, 2)
    sampler = _first_call(out, "alias_table", PopularitySampler, r)
    _first_call(out, "lmf_train", lmf_train, U, GU, V, GV, glob_bias, events, pos, 3, sampler.tables(),
                LMFParams(negatives=1), 0)  # fmt: skip
    return out


def bench_compile() -> dict[str, Any]:
    cached = bool(glob.glob(str(KERNELS_DIR / "__pycache__" / "lmf._train-*.nbi")))
    warm = first_calls()
    with tempfile.TemporaryDirectory(prefix="zerocf-numba-cache-") as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        code = "import json; from bench.bench_lmf_kernel import first_calls; print(json.dumps(first_calls()))"
        root = str(Path(__file__).resolve().parents[1])
        proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"cold-compile child failed:\n{proc.stderr[-2000:]}")
        cold = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"cache_present_before": cached, "cold": cold, "first_call": warm}


# ------------------------------------------------------------------------------------- kernel
@dataclass
class Model:
    """Rows, accumulators, popularity and the known positives of the benchmark's users."""

    U: F32
    GU: F32
    V: F32
    GV: F32
    glob: npt.NDArray[np.float64]
    count: npt.NDArray[np.float64]
    decayed: npt.NDArray[np.float64]
    warm: npt.NDArray[np.bool_]
    seen: I32  # (N_USERS, SEEN_PER_USER) known positives per user


def _zipf_items(rng: np.random.Generator, n: int, n_items: int) -> I32:
    return ((rng.zipf(1.2, n) - 1) % n_items).astype(np.int32)


def make_model(rng: np.random.Generator) -> tuple[Model, PopularitySampler]:
    cfg = LMFConfig()
    reservoir = Reservoir(cfg.reservoir)
    reservoir.add(_zipf_items(rng, 3 * cfg.reservoir, N_ITEMS), rng)
    sampler = PopularitySampler(reservoir, cfg.sample_alpha)
    m = Model(
        U=init_rows(N_USERS, K, rng, 0.1),
        GU=np.zeros((N_USERS, 2), np.float32),
        V=init_rows(N_ITEMS, K, rng, 0.1),
        GV=np.zeros((N_ITEMS, 2), np.float32),
        glob=np.array([-8.0]),
        count=np.zeros(N_ITEMS),
        decayed=np.zeros(N_ITEMS),
        warm=np.ones(N_USERS, np.bool_),
        seen=_zipf_items(rng, N_USERS * SEEN_PER_USER, N_ITEMS).reshape(N_USERS, SEEN_PER_USER),
    )
    return m, sampler


def make_batches(rng: np.random.Generator, n: int) -> list[tuple[I32, I32, F32]]:
    return [
        (rng.integers(0, N_USERS, BATCH).astype(np.int32), _zipf_items(rng, BATCH, N_ITEMS), np.ones(BATCH, np.float32))
        for _ in range(n)
    ]


def _positives(m: Model, users: I32) -> npt.NDArray[np.int64]:
    """The known-positive table of a batch's users, as the worker builds it (their seen items)."""
    uniq = np.unique(users)
    return positive_set(np.repeat(uniq, SEEN_PER_USER), m.seen[uniq].ravel(), N_ITEMS, extra=users.size)


def _train_batch(m: Model, sampler: PopularitySampler, ev: tuple[I32, I32, F32], params: LMFParams, seed: int,
                 rank: bool = False, given_neg: I32 | None = None) -> float:  # fmt: skip
    """One ``lmf_train`` call as the worker makes it; returns its thread CPU seconds (the positive table
    excluded)."""
    pos = _positives(m, ev[0])
    ones = np.ones(BATCH)
    t0 = time.thread_time()
    lmf_train(m.U, m.GU, m.V, m.GV, m.glob, ev, pos, N_ITEMS, sampler.tables(), params, seed,
              given_neg=given_neg, rank_at=np.ones(BATCH, np.bool_) if rank else None, user_warm=m.warm,
              popularity=(m.count, m.decayed, ones, ones))  # fmt: skip
    return time.thread_time() - t0


def _eps(seconds: list[float], events: int = BATCH) -> int:
    """Events per second of the median of ``seconds``."""
    return round(events / statistics.median(seconds))


def bench_kernel(rng: np.random.Generator, n_batches: int) -> dict[str, Any]:
    m, sampler = make_model(rng)
    prod = lmf_params(LMFConfig())
    no_hard = replace(prod, hard_share=0.0)
    batches = make_batches(rng, n_batches)
    given = [sampler.sample(BATCH * prod.negatives, rng).reshape(BATCH, prod.negatives) for _ in batches]
    for ev in batches[:3]:  # warm-up: the rows leave their initial state, caches fill
        _train_batch(m, sampler, ev, prod, 0)
    n_slow = max(3, n_batches // 5)  # batches timed for ranking and the reference (each ~0.5 s)
    times: dict[str, list[float]] = defaultdict(list)
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    for s, (ev, g) in enumerate(zip(batches, given)):  # interleaved: every variant sees the same load
        times["production"].append(_train_batch(m, sampler, ev, prod, s))
        times["hard_share_0"].append(_train_batch(m, sampler, ev, no_hard, s))
        times["given_negatives"].append(_train_batch(m, sampler, ev, prod, s, given_neg=g))
        if s < n_slow:
            times["rank_every_1"].append(_train_batch(m, sampler, ev, prod, s, rank=True))
            times["reference"].append(_reference_seconds(m, ev, g, prod))
        times["positive_set"].append(_cpu_seconds(_positives, m, ev[0]))
    cpu_share = (time.thread_time() - cpu0) / (time.perf_counter() - wall0)
    out: dict[str, Any] = {
        f"{name}_events_per_s": _eps(times[name]) for name in ("production", "hard_share_0", "rank_every_1")
    }
    rank_s = statistics.median(times["rank_every_1"]) - statistics.median(times["production"])
    out["us_per_ranked_click"] = round(1e6 * rank_s / BATCH, 1)
    out["given_negatives_events_per_s"] = _eps(times["given_negatives"])
    out["reference_events_per_s"] = _eps(times["reference"], REFERENCE_EVENTS)
    out["reference_events"] = REFERENCE_EVENTS
    out["speedup_vs_reference"] = round(out["given_negatives_events_per_s"] / out["reference_events_per_s"], 1)
    out["positive_set_ms"] = round(1000 * statistics.median(times["positive_set"]), 3)
    out["setup"] = {"k": K, "batch": BATCH, "users": N_USERS, "items": N_ITEMS, "seen_per_user": SEEN_PER_USER,
                    "negatives": prod.negatives, "hard_share": prod.hard_share,
                    "hard_candidates": prod.hard_candidates, "uniform_mix": prod.uniform_mix,
                    "adagrad": prod.adagrad, "batches_timed": n_batches, "slow_batches_timed": n_slow,
                    "stat": "median per batch of thread CPU time, variants interleaved",
                    "cpu_share_of_wall": round(cpu_share, 2)}  # fmt: skip
    return out


def _reference_seconds(m: Model, ev: tuple[I32, I32, F32], given: I32, params: LMFParams) -> float:
    """Thread CPU seconds of the pure-Python reference on the first clicks of a batch (on copies of the rows)."""
    n = REFERENCE_EVENTS
    arrays = [a.copy() for a in (m.U, m.GU, m.V, m.GV, m.glob)]
    head = (ev[0][:n], ev[1][:n], ev[2][:n])
    t0 = time.thread_time()
    lmf_train_reference(*arrays, head, given[:n], params)
    return time.thread_time() - t0


def _cpu_seconds(fn: Callable[..., object], *args: Any) -> float:
    """Thread CPU seconds of ``fn(*args)``."""
    t0 = time.thread_time()
    fn(*args)
    return time.thread_time() - t0


# ------------------------------------------------------------------------------------- sampling
def bench_sampling(rng: np.random.Generator) -> dict[str, Any]:
    cfg = LMFConfig()
    small = Reservoir(cfg.reservoir)
    small.add(_zipf_items(rng, 3 * cfg.reservoir, N_ITEMS), rng)
    big = Reservoir(1_000_000)
    big.add(rng.integers(0, 1_000_000, 1_000_000).astype(np.int32), rng)
    out: dict[str, Any] = {}
    for name, reservoir in (("5k", small), ("632k", big)):
        sampler = PopularitySampler(reservoir, cfg.sample_alpha)
        seconds = statistics.median(_cpu_seconds(sampler.refresh) for _ in range(REBUILD_REPEATS))
        out[f"alias_rebuild_{name}_items_ms"] = round(1000 * seconds, 2)
        out[f"distinct_items_{name}"] = int(sampler.support.size)
    out["rebuild_repeats"] = REBUILD_REPEATS
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    res: dict[str, Any] = {"load_avg_1m_at_start": round(os.getloadavg()[0], 2), "compile": bench_compile()}
    res |= {"kernel": bench_kernel(rng, args.batches), "sampling": bench_sampling(rng)}
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
