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

from stream.errors import ConfigError

log = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Configure the root logger to stderr (entry points only)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
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
Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[str], Response]  # query string -> response


def json_response(code: int, obj: dict[str, Any]) -> Response:
    """A JSON response (UTF-8, non-ASCII kept)."""
    return code, "application/json", json.dumps(obj, ensure_ascii=False).encode("utf-8")


def health_route(health: HealthCheck) -> Route:
    """``/healthz``: 200 when ``health()`` says ready, else 503; a check that raises is "unhealthy"."""

    def route(_query: str) -> Response:
        try:
            ok, detail = health()
        except Exception as exc:  # noqa: BLE001 - a broken check is "unhealthy", never a crash
            ok, detail = False, {"error": str(exc)}
        return json_response(200 if ok else 503, {"ok": ok, **detail})

    return route


def metrics_route(registry: Any) -> Route:
    """``/metrics``: the Prometheus text exposition of ``registry``."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return lambda _query: (200, CONTENT_TYPE_LATEST, generate_latest(registry))


class RoutingHandler(BaseHTTPRequestHandler):
    """GET (and HEAD: same headers, no body) by path to ``server.routes``; JSON 404/405/500 otherwise.

    Every response is reported to ``server.observe(path_label, status, seconds)`` (metrics); the stack trace
    of a failing route goes to the log, never to the client.
    """

    server: RoutingServer
    server_version = "zerocf"
    timeout = 30  # seconds a client may take to send its request (a stalled client cannot block shutdown)

    def _dispatch(self) -> None:
        started = time.perf_counter()
        path, _, query = self.path.partition("?")
        routes = self.server.routes
        headers: dict[str, str] = {}
        try:
            if path not in routes:
                code, ctype, body = json_response(
                    404, {"error": f"no such path {path[:100]!r}; use {', '.join(routes)}"}
                )
            elif self.command not in ("GET", "HEAD"):
                headers["Allow"] = "GET, HEAD"
                code, ctype, body = json_response(405, {"error": f"method {self.command} not allowed; use GET"})
            else:
                code, ctype, body = routes[path](query)
        except Exception:  # noqa: BLE001 - the request boundary: log it, never send a trace
            log.exception("internal error serving %s", self.path[:300])
            code, ctype, body = json_response(500, {"error": "internal error; see the server log"})
        self.server.observe(path if path in routes else "other", code, time.perf_counter() - started)
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch  # noqa: N815

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("http %s: " + fmt, self.client_address[0], *args)


class RoutingServer(ThreadingHTTPServer):
    """A threading HTTP server over a path -> :data:`Route` table (see :class:`RoutingHandler`)."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        routes: dict[str, Route],
        observe: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.routes = routes
        self.observe = observe or (lambda _path, _code, _seconds: None)
        super().__init__(address, RoutingHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


def start_http(port: int, health: HealthCheck, registry: Any = None, host: str = "127.0.0.1") -> RoutingServer:
    """Serve /healthz and /metrics on ``host:port`` in a daemon thread; returns the server (``.shutdown()``).

    Raises :class:`ConfigError` when the address cannot be bound (port in use, no such interface).
    """
    from prometheus_client import REGISTRY

    routes = {"/healthz": health_route(health), "/metrics": metrics_route(registry or REGISTRY)}
    try:
        server = RoutingServer((host, port), routes)
    except (OSError, OverflowError) as exc:
        raise ConfigError(
            f"cannot serve /healthz and /metrics on {host}:{port}: {exc}; pick a free port "
            "(ZEROCF_METRICS_PORT / --metrics-port, 0 = off) or another interface (ZEROCF_METRICS_HOST)"
        ) from None
    threading.Thread(target=server.serve_forever, name="zerocf-http", daemon=True).start()
    log.info("health and metrics on http://%s:%d/healthz and /metrics", host, server.port)
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
