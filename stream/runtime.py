"""Process lifecycle shared by every worker: logging, warm/cold stop, and the health/metrics endpoint.

Signals: the first SIGTERM or SIGINT asks the loop to stop after its current batch (warm stop); a second
one exits at once (cold stop, exit code 130). Only entry points call :func:`setup_logging` and
:meth:`StopFlag.install`.

The endpoint serves ``/healthz`` (200 when the worker's health callback says ready, else 503, JSON body)
and ``/metrics`` (Prometheus text from ``prometheus_client``: the standard exposition format, which is why
that library is a dependency rather than hand-rolled text).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname,
                               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Configure the root logger to stderr (entry points only)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))


class StopFlag:
    """Set by the first SIGTERM/SIGINT; the second one exits immediately.

    >>> flag = StopFlag()
    >>> flag.is_set()
    False
    >>> flag.set("test")
    >>> flag.is_set(), flag.reason
    (True, 'test')
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str = "requested") -> None:
        self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def install(self) -> StopFlag:
        """Route SIGTERM and SIGINT to this flag (main thread only)."""

        def handler(signum: int, _frame: object) -> None:
            name = signal.Signals(signum).name
            if self.is_set():
                log.warning("second %s: exiting now", name)
                os._exit(130)
            log.info("%s received: finishing the current batch, then stopping", name)
            self.set(name)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        return self


HealthCheck = Callable[[], "tuple[bool, dict[str, Any]]"]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            try:
                ok, detail = self.server.health()
            except Exception as exc:  # a broken check is "unhealthy", never a crash
                ok, detail = False, {"error": str(exc)}
            self._send(200 if ok else 503, "application/json", json.dumps({"ok": ok, **detail}).encode())
        elif path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
        else:
            self._send(404, "application/json", b'{"error": "not found; use /healthz or /metrics"}')

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("http: " + fmt, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    health: HealthCheck
    registry: Any


def start_http(port: int, health: HealthCheck, registry: Any = None, host: str = "0.0.0.0") -> _Server:
    """Serve /healthz and /metrics on ``port`` in a daemon thread; returns the server (``.shutdown()``)."""
    from prometheus_client import REGISTRY

    server = _Server((host, port), _Handler)
    server.health = health
    server.registry = registry or REGISTRY
    threading.Thread(target=server.serve_forever, name="zerocf-http", daemon=True).start()
    log.info("health and metrics on http://%s:%d/healthz and /metrics", host, server.server_port)
    return server


class Backoff:
    """Exponential back-off for reconnect loops: 0.2 s doubling to ``cap`` seconds.

    >>> b = Backoff(cap=1.0)
    >>> [b.next_delay() for _ in range(5)]
    [0.2, 0.4, 0.8, 1.0, 1.0]
    """

    def __init__(self, first: float = 0.2, cap: float = 10.0) -> None:
        self.first, self.cap, self._delay = first, cap, 0.0

    def next_delay(self) -> float:
        self._delay = self.first if self._delay == 0 else min(self.cap, self._delay * 2)
        return self._delay

    def reset(self) -> None:
        self._delay = 0.0

    def sleep(self, stop: StopFlag | None = None) -> None:
        delay = self.next_delay()
        if stop is not None:
            stop.wait(delay)
        else:
            time.sleep(delay)
