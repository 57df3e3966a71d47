"""Benchmark ``zerocf serve`` under concurrent load against the bare lookup; prints one JSON object.

Run: ``python -m bench.bench_serve [--items 100000] [--clients 50] [--requests 5000] [--rates 100 0.5]
[--slowloris 20] [--out FILE]`` (``--out`` also writes the JSON to FILE; nothing is written otherwise).

It starts a private redis-server (:meth:`stream.devstack.LocalStack.start_redis`), writes the model of
``bench.bench_lookup`` (100k items, k = 64, a global bias row, decayed popularity; 2,000 "light" users with
20 seen items each, whose top-10 lists are requested) and runs the real ``zerocf serve`` in a subprocess
with its defaults. The load comes from this process: ``--clients`` threads on loopback, each request
``GET /recommend?user=<random light user>&k=10`` (every seen item excluded). Phases:

- ``closed_keepalive`` / ``closed_new_conn``: every client sends its next request as soon as the previous
  one is answered (zero think time), over one kept-alive connection per client, or a new connection
  (``Connection: close``) per request; ``--requests`` in all. This is a saturation test: with C clients
  each request queues behind the others, so latency ~ C x service time / cores (Little's law), whatever the
  server; ``queueing_floor_ms`` is that estimate from the bare lookup's p50.
- ``open_<rate>_keepalive`` / ``open_<rate>_new_conn``: requests are *scheduled* at a fixed rate
  (``--rates``: a number is requests/s, a value <= 1 is that share of the closed-loop keep-alive throughput)
  and spread over the same clients; latency is measured from the scheduled time, so a late start counts
  (no coordinated omission). This is the realistic case: a service below saturation.
- ``slowloris``: ``--slowloris`` connections each send a request line and then one header line per second
  (far more often than any per-read timeout) while the open-loop load at the first rate runs; reported:
  latency of the normal requests, and when the server cut each slow connection off.
- ``redis_pause``: ``CLIENT PAUSE 3000`` on Redis, then requests one after the other: their status codes
  and the slowest answer (bounded by ``ZEROCF_SERVE_REDIS_TIMEOUT_S``, 0.25 s).

``bare_recommend``: ``Recommender.recommend`` for the same users in this process (Redis reads + numpy, no
HTTP), p50/p99, measured before the load; every phase reports ``p50_ratio`` = its p50 / the bare p50.
Each phase: ``requests``, ``errors`` (non-200 or a failed connection), ``p50_ms``, ``p99_ms``, ``max_ms``,
``throughput_rps``, ``codes`` (status counts, ``conn_error``), ``tcp_drops`` (machine-wide deltas of the
kernel's ``ListenOverflows`` and ``TCPSynRetrans`` during the phase: dropped or retried connection
attempts) and ``load_avg_1m`` at its end. ``load_avg_1m_at_start``: the machine's load when the bench
started (2 shared cores).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import http.client  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import redis  # noqa: E402

from bench.bench_lookup import build, private_redis  # noqa: E402
from stream.devstack import free_port  # noqa: E402
from workers.serving.lookup import Recommender  # noqa: E402
from workers.store import FactorStore  # noqa: E402

log = logging.getLogger("bench.serve")
NAMESPACE, TOPK, CORES = "benchserve", 10, 2


# ------------------------------------------------------------------ the service
@contextmanager
def zerocf_serve(redis_port: int, log_path: Path) -> Iterator[int]:
    """``zerocf serve`` (defaults) on a free port; yields the port once its cache holds the model."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROCF_")}
    env |= {"ZEROCF_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "ZEROCF_TOPIC_PREFIX": NAMESPACE}
    env |= {"ZEROCF_SERVE_HOST": "127.0.0.1", "ZEROCF_SERVE_PORT": str(port), "ZEROCF_LOG_LEVEL": "WARNING"}
    with log_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "serve"], env=env, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"zerocf serve did not come up: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                    if json.loads(resp.read()).get("cached_items"):
                        break
            except OSError:
                pass
            time.sleep(0.2)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ clients
def tcp_counters() -> dict[str, int]:
    """Machine-wide TCP counters that show dropped connection attempts (``/proc/net/netstat``)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    ext = [ln.split()[1:] for ln in lines if ln.startswith("TcpExt:")]
    table = dict(zip(ext[0], map(int, ext[1]))) if len(ext) == 2 else {}
    return {k: table[k] for k in ("ListenOverflows", "TCPSynRetrans") if k in table}


class Phase:
    """Latencies and errors of one phase, collected by many client threads."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.errors = 0
        self.codes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._tcp = tcp_counters()

    def record(self, seconds: float, code: int | None) -> None:
        name = "conn_error" if code is None else str(code)
        with self._lock:
            self.lat.append(seconds)
            self.codes[name] = self.codes.get(name, 0) + 1
            if code != 200:
                self.errors += 1

    def summary(self, wall: float, bare_p50_ms: float) -> dict[str, Any]:
        a = np.asarray(self.lat) * 1000.0
        p50 = float(np.percentile(a, 50)) if a.size else float("nan")
        return {
            "requests": int(a.size),
            "errors": self.errors,
            "p50_ms": round(p50, 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2) if a.size else None,
            "max_ms": round(float(a.max()), 1) if a.size else None,
            "throughput_rps": round(a.size / wall, 1),
            "p50_ratio": round(p50 / bare_p50_ms, 2),
            "codes": dict(sorted(self.codes.items())),
            "tcp_drops": {k: v - self._tcp.get(k, 0) for k, v in tcp_counters().items()},
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }


class Client:
    """One client connection: kept alive, or a new one per request."""

    def __init__(self, port: int, keepalive: bool) -> None:
        self.port, self.keepalive = port, keepalive
        self.conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> int:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            self.conn.request("GET", path, headers={} if self.keepalive else {"Connection": "close"})
            resp = self.conn.getresponse()
            resp.read()
            code = resp.status
            if not self.keepalive or resp.will_close:
                self.close()
            return code
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def run_clients(n: int, body: Callable[[int], None]) -> float:
    """Run ``body(client_index)`` in ``n`` threads; the wall time."""
    threads = [threading.Thread(target=body, args=(c,), daemon=True) for c in range(n)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def closed_loop(port: int, users: list[str], clients: int, requests: int, keepalive: bool) -> tuple[Phase, float]:
    phase, counter = Phase(), itertools.count()

    def body(c: int) -> None:
        rng, cl = np.random.default_rng(c), Client(port, keepalive)
        while next(counter) < requests:
            t = time.perf_counter()
            try:
                code: int | None = cl.get(f"/recommend?user={users[rng.integers(len(users))]}&k={TOPK}")
            except OSError:
                code = None
            phase.record(time.perf_counter() - t, code)
        cl.close()

    return phase, run_clients(clients, body)


def open_loop(port: int, users: list[str], clients: int, rate: float, seconds: float, keepalive: bool
              ) -> tuple[Phase, float]:  # fmt: skip
    """Requests scheduled at ``rate``/s over ``clients`` connections; latency from the scheduled time."""
    phase, counter, total = Phase(), itertools.count(), int(rate * seconds)
    start = time.perf_counter() + 0.2

    def body(c: int) -> None:
        rng, cl = np.random.default_rng(1000 + c), Client(port, keepalive)
        while (i := next(counter)) < total:
            due = start + i / rate
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            try:
                code: int | None = cl.get(f"/recommend?user={users[rng.integers(len(users))]}&k={TOPK}")
            except OSError:
                code = None
            phase.record(time.perf_counter() - due, code)
        cl.close()

    return phase, run_clients(clients, body)


def slowloris(port: int, n: int, stop: threading.Event) -> list[float | None]:
    """``n`` connections dripping one header line per second; seconds until the server closed each one."""
    closed: list[float | None] = [None] * n

    def drip(j: int) -> None:
        t = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(f"GET /recommend?user=light{j}&k=10 HTTP/1.1\r\nHost: bench\r\n".encode())
                while not stop.wait(1.0):
                    s.sendall(b"X-Slow: 1\r\n")
                    s.settimeout(0.01)
                    try:
                        if s.recv(1) == b"":
                            break
                    except TimeoutError:
                        pass
        except OSError:
            pass  # reset by the server
        if not stop.is_set():
            closed[j] = round(time.monotonic() - t, 1)

    threads = [threading.Thread(target=drip, args=(j,), daemon=True) for j in range(n)]
    for th in threads:
        th.start()
    stop.wait()
    for th in threads:
        th.join(5)
    return closed


def redis_pause(port: int, client: redis.Redis, users: list[str], pause_ms: int = 3000) -> dict[str, Any]:
    client.execute_command("CLIENT", "PAUSE", pause_ms, "ALL")
    end, codes, slowest = time.monotonic() + pause_ms / 1000 - 0.5, [], 0.0
    cl = Client(port, keepalive=True)
    while time.monotonic() < end:
        t = time.perf_counter()
        try:
            codes.append(cl.get(f"/recommend?user={users[len(codes) % len(users)]}&k={TOPK}"))
        except OSError:
            codes.append(0)
        slowest = max(slowest, time.perf_counter() - t)
    cl.close()
    time.sleep(max(0.0, end + 0.6 - time.monotonic()))
    return {"pause_ms": pause_ms, "requests": len(codes), "codes": {str(c): codes.count(c) for c in set(codes)},
            "max_ms": round(slowest * 1000, 1)}  # fmt: skip


# ------------------------------------------------------------------ the run
def bare(rec: Recommender, users: list[str], calls: int) -> dict[str, float]:
    rng, lat = np.random.default_rng(0), []
    for n in range(calls + 50):
        t = time.perf_counter()
        rec.recommend(users[rng.integers(len(users))], TOPK)
        if n >= 50:
            lat.append(time.perf_counter() - t)
    a = np.asarray(lat) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}


def measure(args: argparse.Namespace, client: redis.Redis, redis_port: int, tmp: Path) -> dict[str, Any]:
    store = FactorStore(client, namespace=NAMESPACE)
    t = time.perf_counter()
    _, groups = build(store, args.items, np.random.default_rng(args.items))
    write_s = time.perf_counter() - t
    users = groups["light"].ids
    rec = Recommender(store, refresh_s=3600.0)
    rec.refresh(force=True)
    ref = bare(rec, users, 500)
    out: dict[str, Any] = {"items": args.items, "factors": 64, "k": TOPK, "clients": args.clients}
    out |= {"bare_recommend": ref, "queueing_floor_ms": round(args.clients * ref["p50_ms"] / CORES, 1)}
    phases: dict[str, Any] = {}
    with zerocf_serve(redis_port, tmp / "serve.log") as port:
        closed_loop(port, users, args.clients, 300, True)  # warm-up: threads, connections, caches
        for keepalive in (True, False):
            name = "closed_keepalive" if keepalive else "closed_new_conn"
            phase, wall = closed_loop(port, users, args.clients, args.requests, keepalive)
            phases[name] = phase.summary(wall, ref["p50_ms"])
            log.warning("%s: %s", name, phases[name])
        saturation = phases["closed_keepalive"]["throughput_rps"]
        rates = [round(r * saturation) if r <= 1 else round(r) for r in args.rates]
        for rate in rates:
            for keepalive in (True, False):
                name = f"open_{rate}rps_{'keepalive' if keepalive else 'new_conn'}"
                phase, wall = open_loop(port, users, args.clients, rate, args.seconds, keepalive)
                phases[name] = phase.summary(wall, ref["p50_ms"]) | {"rate_rps": rate}
                log.warning("%s: %s", name, phases[name])
        stop = threading.Event()
        box: dict[str, list[float | None]] = {}
        th = threading.Thread(target=lambda: box.update(closed=slowloris(port, args.slowloris, stop)), daemon=True)
        th.start()
        time.sleep(0.5)
        phase, wall = open_loop(port, users, args.clients, rates[0], max(args.seconds, 15.0), True)
        stop.set()
        th.join(10)
        cut = [c for c in box.get("closed", []) if c is not None]
        phases["slowloris"] = phase.summary(wall, ref["p50_ms"]) | {
            "rate_rps": rates[0],
            "slow_connections": args.slowloris,
            "slow_cut_off": len(cut),
            "slow_cut_off_after_s": [min(cut), max(cut)] if cut else None,
        }
        log.warning("slowloris: %s", phases["slowloris"])
        phases["redis_pause"] = redis_pause(port, client, users)
        log.warning("redis_pause: %s", phases["redis_pause"])
    return out | {"phases": phases, "write_s": round(write_s, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=5000, help="requests per closed-loop phase")
    ap.add_argument("--rates", type=float, nargs="+", default=[100.0, 0.5],
                    help="open-loop rates: requests/s, or (<= 1) a share of the closed-loop throughput")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each open-loop phase")
    ap.add_argument("--slowloris", type=int, default=20, help="slow connections in the slowloris phase")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    load = round(os.getloadavg()[0], 2)
    with private_redis() as (client, port, folder):
        result = measure(args, client, port, folder)
    text = json.dumps({"bench": "serve", "load_avg_1m_at_start": load, **result}, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
