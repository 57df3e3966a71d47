"""Helpers shared by the test modules: running ``zerocf`` commands, waiting for conditions, ground-truth
workloads and what the store must hold after them. Test modules import from here, never from each other.

The expected model state is always computed independently of the system under test: from what a test sent
(:class:`Workload`) or from the distinct event ids on ``<p>.events`` (:func:`truth_of`), never from the
worker's own de-duplication.
"""

from __future__ import annotations

import ast
import json
import random
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import redis

from stream import kafka_util
from stream.client.producer import EventProducer
from stream.config import StreamConfig, load
from stream.events import Event, decode_events
from stream.kafka_util import read_topic
from stream.replay.datasets import Interaction
from workers.store import GLOBAL_ROW, FactorStore

TS = 1_700_000_000_000  # a valid event time (2023-11-14)
DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"  # ../shared beside the checkout
ALS_PARTITIONS = 3  # partitions of the ALS tests' topics


# ------------------------------------------------------------------- zerocf commands
def fresh_group(tag: str) -> str:
    """A consumer group no earlier run used (Tansu keeps a group broken after a member died mid-join)."""
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def lmf_cmd(*flags: str) -> list[str]:
    """argv of ``zerocf lmf`` run with this interpreter."""
    return [sys.executable, "-m", "workers.cli", "lmf", *flags]


def run_zerocf(
    env: dict[str, str], *argv: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``zerocf ARGV`` in a subprocess; with ``check`` it must exit 0 (the assertion shows its stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", *argv], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert done.returncode == 0, f"zerocf {' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def ingest_synthetic(env: dict[str, str], tmp_path: Path, users: int, items: int, clicks: int, seed: int = 0) -> None:
    """``zerocf synth`` -> ``zerocf produce --format csv`` -> ``zerocf ingest --until-idle``."""
    csv = tmp_path / "synth.csv"
    run_zerocf(
        env,
        "synth",
        str(csv),
        "--users",
        str(users),
        "--items",
        str(items),
        "--clicks",
        str(clicks),
        "--seed",
        str(seed),
    )
    summary = json.loads(run_zerocf(env, "produce", str(csv), "--format", "csv").stdout.strip().splitlines()[-1])
    assert summary["clicks_sent"] == clicks and summary["rejected"] == 0, summary
    run_zerocf(env, "ingest", "--until-idle")


def lmf_summary(stderr: str) -> dict[str, Any]:
    """The stats dict of the ``lmf done: {...}`` log line of a ``zerocf lmf`` run."""
    line = [ln for ln in stderr.splitlines() if "lmf done: " in ln][-1]
    text = re.sub(r"\bnan\b", "None", line.split("lmf done: ", 1)[1])  # loss_ewma of a run with no batch
    return dict(ast.literal_eval(text))


def run_lmf(env: dict[str, str], group: str, *flags: str, timeout: float = 120) -> dict[str, Any]:
    """``zerocf lmf --until-idle --group GROUP``; returns its final stats."""
    return lmf_summary(run_zerocf(env, "lmf", "--until-idle", "--group", group, *flags, timeout=timeout).stderr)


@contextmanager
def background(env: dict[str, str], log_path: Path, *argv: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``zerocf ARGV`` in the background (stderr to ``log_path``); on exit SIGTERM it (SIGKILL after 15 s)
    if still running."""
    with open(log_path, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *argv], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        yield proc
    finally:
        stop_process(proc, 15)


def stop_process(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM ``proc`` if it still runs; SIGKILL it after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def health_status(port: int) -> int | None:
    """HTTP status of ``/healthz`` (None if nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


S = TypeVar("S", bound=socketserver.BaseServer)


@contextmanager
def serving_in_thread(server: S) -> Iterator[S]:
    """Run an in-process HTTP server in a thread; shut it down and close it on exit."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


TINY_BIAS = -0.2  # the global bias of :func:`tiny_model`


def tiny_model(store: FactorStore) -> None:
    """A k = 2 generation 1 for the serving tests. Rows are (latent, bias). For u1 = (2, 1; 0.1),
    b_i + p.q is b 2.5 (by its bias), a 2, c -2."""
    store.ensure_model(2)
    items = np.array([[1, 0, 0], [0, 1, 1.5], [-1, 0, 0], [0, 0, TINY_BIAS]], dtype=np.float32)
    store.write_vectors(1, "item", ["a", "b", "c", GLOBAL_ROW], items)
    store.write_vectors(1, "user", ["u1"], np.array([[2, 1, 0.1]], dtype=np.float32))
    store.write_counts(1, {"c": 5, "b": 3})
    store.write_popularity(1, {"b": 2.0, "c": 1.0}, ref_ms=TS)  # the fallback follows this, not the counts


def http_get(srv: Any, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of ``method path`` on a local server (or port); HTTP errors are returned."""
    port = srv if isinstance(srv, int) else srv.port
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def http_head(srv: Any, path: str) -> tuple[int, dict[str, str], bytes]:
    """A raw HEAD: status, headers and every byte sent after them (http.client would discard a body)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(f"HEAD {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):  # HTTP/1.0: the server closes after the response
            raw += chunk
    head_, _, rest = raw.partition(b"\r\n\r\n")
    status, *lines = head_.decode("latin-1").split("\r\n")
    return int(status.split()[1]), dict(ln.split(": ", 1) for ln in lines), rest


# ------------------------------------------------------------------- waiting
def wait_until(
    what: str, pred: Callable[[], bool], timeout: float, *procs: subprocess.Popen[bytes], every: float = 0.3
) -> float:
    """Poll ``pred`` until true; fail if it is not within ``timeout`` or a watched process exits.

    Returns the seconds it took (reported in docs/drills.md, never asserted on).
    """
    t0 = time.monotonic()
    while not pred():
        for p in procs:
            assert p.poll() is None, f"{p.args[3]} exited with {p.returncode} while waiting for {what}"
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)
    return time.monotonic() - t0


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:]


# ------------------------------------------------------------------- ground truth
@dataclass
class Truth:
    """What ``<p>.events`` holds, from distinct event ids (independent of the worker's Deduper)."""

    user_events: Counter[str] = field(default_factory=Counter)
    item_clicks: Counter[str] = field(default_factory=Counter)
    last_click_ts: dict[str, dict[str, int]] = field(default_factory=dict)  # user -> item -> newest ts
    last_offsets: dict[int, int] = field(default_factory=dict)
    records: int = 0
    distinct: int = 0
    repeated: int = 0
    invalid: int = 0


def truth_of(settings: Any, topic: str) -> Truth:
    """Read the whole events topic (no group) and aggregate its distinct events."""
    t = Truth()
    ids: set[str] = set()
    for rec in read_topic(settings, topic, timeout=60):
        t.records += 1
        t.last_offsets[rec.partition] = max(rec.offset, t.last_offsets.get(rec.partition, -1))
        events, bad = decode_events(rec.value)
        t.invalid += len(bad)
        for ev in events:
            if ev.id in ids:
                t.repeated += 1
                continue
            ids.add(ev.id)
            t.distinct += 1
            t.user_events[ev.user] += 1
            if ev.type == "click":
                t.item_clicks[ev.item] += int(ev.weight)
                seen = t.last_click_ts.setdefault(ev.user, {})
                seen[ev.item] = max(ev.ts, seen.get(ev.item, 0))
    return t


def record_events(rec: Any) -> list[Event]:
    """The events of one ``<p>.events`` record (one event, or a pack of them); an undecodable one fails."""
    events, bad = decode_events(rec.value)
    assert not bad, f"offset {rec.offset}: {bad[0]}"
    return events


def events_of(records: Iterable[Any]) -> list[Event]:
    """The events of ``<p>.events`` records in order (see :func:`record_events`)."""
    return [ev for rec in records for ev in record_events(rec)]


def event_dicts(cfg: Any) -> list[dict[str, Any]]:
    """Every event on ``cfg``'s ``<p>.events`` as the JSON objects on the wire (one event or a pack per record)."""
    out: list[dict[str, Any]] = []
    for rec in read_topic(cfg.kafka, cfg.topics.events, timeout=30):
        got = json.loads(rec.value)
        out += got if isinstance(got, list) else [got]
    return out


def assert_store_matches(store: FactorStore, truth: Truth, seen_cap: int) -> None:
    """Counters, item counts, vectors, seen sets and applied offsets equal what the topic holds."""
    g = store.live_generation()
    counts = store.user_update_counts(g)
    assert sum(counts.values()) == truth.distinct, (sum(counts.values()), truth.distinct)
    assert counts == dict(truth.user_events)
    assert store.item_counts(g) == {i: float(n) for i, n in truth.item_clicks.items()}
    users = sorted(truth.user_events)
    uvecs, ufound = store.get_vectors(g, "user", users)
    assert ufound.all(), [u for u, f in zip(users, ufound) if not f][:5]
    items = sorted(truth.item_clicks)
    ivecs, ifound = store.get_vectors(g, "item", items)
    assert ifound.all(), [i for i, f in zip(items, ifound) if not f][:5]
    assert np.isfinite(uvecs).all() and np.isfinite(ivecs).all()
    assert np.abs(ivecs).max() > 0 and np.abs(uvecs).max() > 0
    seen = store.seen_items_many(sorted(truth.last_click_ts))
    for user, by_item in truth.last_click_ts.items():
        newest_first = sorted(by_item, key=lambda i: (-by_item[i], i))[:seen_cap]
        assert sorted(seen[user]) == sorted(newest_first), user
    parts = sorted(truth.last_offsets)
    assert store.read_batch_state(g, parts, [], []).offsets == truth.last_offsets


def model_dump(r: redis.Redis, ns: str) -> dict[bytes, bytes]:
    """Serialized value of every key of model ``ns``: equal dumps = nothing was written."""
    return {k: r.dump(k) for k in sorted(r.keys(f"*{{{ns}}}*"))}


@dataclass
class Workload:
    """Seeded raw records and the model state they must produce (independent of the system under test)."""

    clicks: list[tuple[str, str, int, int]] = field(default_factory=list)  # user, item, ts, count
    impressions: list[tuple[str, str, list[str], int]] = field(default_factory=list)  # imp id, user, items, ts
    invalid: list[bytes] = field(default_factory=list)

    @classmethod
    def make(cls, seed: int, n: int, users: int = 120, items: int = 80, impressions: bool = True) -> Workload:
        rng = random.Random(seed)
        w = cls()
        for k in range(n):
            user, ts = f"u{rng.randrange(users)}", TS + seed * 10_000_000 + k
            if impressions and rng.random() < 0.15:
                shown = rng.sample([f"i{j}" for j in range(items)], 3)
                w.impressions.append((f"imp-{seed}-{k}", user, shown, ts))
            else:
                w.clicks.append((user, f"i{rng.randrange(items)}", ts, 2 if rng.random() < 0.1 else 1))
        if impressions:
            w.invalid = [b"{not json", b'{"user_id": "", "item_id": "i1", "ts": 1700000000000}']
        return w

    def chunks(self, size: int) -> list[Workload]:
        rows: list[tuple[str, Any]] = [("c", c) for c in self.clicks] + [("i", i) for i in self.impressions]
        rows.sort(key=lambda r: r[1][2] if r[0] == "c" else r[1][3])
        out = []
        for k in range(0, len(rows), size):
            part = rows[k : k + size]
            out.append(
                Workload(
                    [r for t, r in part if t == "c"], [r for t, r in part if t == "i"], self.invalid if k == 0 else []
                )
            )
        return out

    def send(self, bootstrap: str, prefix: str) -> None:
        """Produce every record (invalid ones raw) and wait for all acknowledgements."""
        with EventProducer(bootstrap_servers=bootstrap, topic_prefix=prefix) as p:
            for user, item, ts, count in self.clicks:
                p.send_click(user, item, ts, count=count)
            for imp, user, shown, ts in self.impressions:
                p.send_impression(imp, user, shown, ts)
        if self.invalid:
            cfg = load(StreamConfig, {"ZEROCF_KAFKA_BOOTSTRAP": bootstrap, "ZEROCF_TOPIC_PREFIX": prefix})
            raw = kafka_util.producer(cfg.kafka, client_id="drill-invalid")
            try:
                futures = [raw.send(cfg.topics.clicks, key=b"bad", value=v) for v in self.invalid]
                raw.flush()
                for f in futures:
                    f.get(timeout=10)
            finally:
                raw.close()

    def user_events(self) -> Counter[str]:
        out: Counter[str] = Counter(u for u, _i, _t, _c in self.clicks)
        for _imp, user, shown, _ts in self.impressions:
            out[user] += len(shown)
        return out

    def item_clicks(self) -> dict[str, float]:
        out: Counter[str] = Counter()
        for _u, item, _t, count in self.clicks:
            out[item] += count
        return {i: float(n) for i, n in out.items()}

    @property
    def n_events(self) -> int:
        return sum(self.user_events().values())


# ------------------------------------------------------------------- the ALS tests' stream
def als_stream_cfg(env: dict[str, str]) -> StreamConfig:
    return load(StreamConfig, {**env, "ZEROCF_IDLE_SECONDS": "1", "ZEROCF_EVENTS_PARTITIONS": str(ALS_PARTITIONS)})


def produce_clicks(env: dict[str, str], rows: list[Interaction]) -> None:
    with EventProducer(bootstrap_servers=env["ZEROCF_KAFKA_BOOTSTRAP"], topic_prefix=env["ZEROCF_TOPIC_PREFIX"]) as p:
        for r in rows:
            p.send_click(r.user_id, r.item_id, ts=r.ts_ms)


def last_offsets(cfg: StreamConfig) -> dict[int, int]:
    out: dict[int, int] = {}
    for rec in read_topic(cfg.kafka, cfg.topics.events):
        out[rec.partition] = max(out.get(rec.partition, -1), rec.offset)
    return out


def assert_published(env: dict[str, str], rows: list[Interaction], last: dict[int, int]) -> tuple[Any, ...]:
    """Generation 2 is live, from ALS, complete, covers ``last``, and holds every user/item and the counts.

    Returns ``(store, meta, users, items, U, V)`` for further checks."""
    store = FactorStore.from_url(env["ZEROCF_REDIS_URL"], env["ZEROCF_TOPIC_PREFIX"])
    g = store.live_generation()
    meta = store.generation_meta(g)
    assert (g, meta.source, meta.state) == (2, "als", "complete")
    assert meta.offsets == last and set(last) == set(range(ALS_PARTITIONS))
    users = sorted({r.user_id for r in rows})
    items = sorted({r.item_id for r in rows})
    assert (meta.n_users, meta.n_items) == (len(users), len(items))
    U, fu = store.get_vectors(g, "user", users)
    V, fi = store.get_vectors(g, "item", items)
    assert fu.all() and fi.all() and U.dtype == np.float32 and np.isfinite(U).all() and np.isfinite(V).all()
    assert store.item_counts(g) == {i: float(n) for i, n in Counter(r.item_id for r in rows).items()}
    return store, meta, users, items, U, V


# ------------------------------------------------------------------- pre-started zerocf processes
#: What a pre-started ``zerocf`` process runs: every command module imported (what ``main`` would import first),
#: then ``workers.cli.main(ARGV)`` once a line ``go`` arrives on stdin (EOF or anything else: exit 0, nothing run).
_PRESTARTED = (
    "import sys\n"
    "from workers import cli\n"
    "cli.build_parser()\n"
    "if sys.stdin.readline() == 'go\\n':\n"
    "    sys.exit(cli.main(sys.argv[1:]))\n"
)


def prestart_zerocf(
    env: dict[str, str], log: Any, *argv: str, stdout: Any = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """A ``zerocf ARGV`` process started ahead of its turn: the interpreter and the imports (about 1.3 s) are done
    while something else runs; :func:`release` makes it run ``zerocf ARGV`` (``workers.cli.main``, the console
    script's entry point) at once. ``log`` receives its stderr (a file, or ``subprocess.PIPE``), ``stdout`` its
    standard output. ``args[3]`` is the command, as in :func:`wait_until` messages."""
    return subprocess.Popen(
        [sys.executable, "-c", _PRESTARTED, *argv], env=env, stdin=subprocess.PIPE, stdout=stdout, stderr=log
    )


def release(proc: subprocess.Popen[bytes]) -> None:
    """Let a :func:`prestart_zerocf` process run its command now."""
    assert proc.stdin is not None and proc.poll() is None, f"pre-started {proc.args[3:]} exited {proc.returncode}"
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    proc.stdin = None  # written and closed: nothing for communicate() to flush


def finish_zerocf(
    proc: subprocess.Popen[bytes], timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """:func:`release` a process from :func:`prestart_zerocf` (``stdout`` and ``log`` ``subprocess.PIPE``) and
    wait for it: what :func:`run_zerocf` returns, with the same ``check``."""
    release(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, (out or b"").decode(), (err or b"").decode())
    if check:
        argv = " ".join(map(str, proc.args[3:]))
        assert done.returncode == 0, f"zerocf {argv} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done
