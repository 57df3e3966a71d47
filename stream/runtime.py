"""Process lifecycle shared by every worker: logging, warm/cold stop, and the health/metrics endpoint.

Signals: the first SIGTERM or SIGINT asks the loop to stop after its current batch (warm stop); a second
one exits at once (cold stop, exit code 130). Only entry points call :func:`setup_logging` and
:meth:`StopFlag.install`.

The endpoint serves ``/healthz`` (200 when the worker's health callback says ready, else 503, JSON body)
and ``/metrics`` (Prometheus text from ``prometheus_client``: the standard exposition format, which is why
that library is a dependency rather than hand-rolled text).
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
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


class _HeadReader(io.RawIOBase):
    """Socket reads under one deadline for a whole request head (line + headers), not a timeout per read.

    A per-read timeout lets a client that sends one byte just before each timeout hold a thread forever;
    here every ``recv`` waits at most until the deadline, after which reads raise :class:`TimeoutError`
    (``BaseHTTPRequestHandler`` then drops the connection). Between heads (the body-less GETs we serve have
    nothing else to read) reads fall back to the per-operation timeout.
    """

    def __init__(self, sock: socket.socket, op_timeout: float) -> None:
        super().__init__()
        self._sock, self._op_timeout = sock, op_timeout
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        timeout = self._op_timeout
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError("the request line and headers did not arrive in time")
        self._sock.settimeout(timeout)
        return self._sock.recv_into(buf)

    def disarm(self) -> None:
        self.deadline = None
        self._sock.settimeout(self._op_timeout)  # writes of the response get the per-operation timeout


class RoutingHandler(BaseHTTPRequestHandler):
    """GET (and HEAD: same headers, no body) by path to ``server.routes``; JSON 404/405/500 otherwise.

    HTTP/1.1 with keep-alive (HTTP/1.0 clients get one response per connection, as they expect). A client
    has ``server.request_timeout_s`` from connecting, or from its previous response, to send a complete
    request line and headers (one deadline for the whole head, so a slow-drip client is cut off; it is also
    the keep-alive idle limit). Headers and body go out in one write with ``TCP_NODELAY``, so a keep-alive
    client never waits for a delayed ACK. Every response is reported to ``server.observe(path_label,
    status, seconds)`` (metrics); the stack trace of a failing route goes to the log, never to the client.
    """

    server: RoutingServer
    server_version = "zerocf"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = None  # set per server in setup(); reads are bounded by the request deadline
    wbufsize = 1 << 16  # headers + body coalesce into one send (flushed after each request)

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout_s)  # per socket operation: bounds writes
        self.rfile.close()
        self._reader = _HeadReader(self.connection, self.server.request_timeout_s)
        self.rfile = io.BufferedReader(self._reader)
        self.busy = False
        self.server.track(self, True)

    def handle_one_request(self) -> None:
        self.busy = False
        self._reader.deadline = time.monotonic() + self.server.request_timeout_s
        super().handle_one_request()
        if self.server.closing:
            self.close_connection = True

    def parse_request(self) -> bool:
        ok = super().parse_request()  # reads the headers, under the deadline
        self.busy = True
        self._reader.disarm()
        return ok

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the client went away before its response was flushed
        finally:
            self.server.track(self, False)

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
        has_body = self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers
        if self.server.closing or has_body:  # a request body is never read: it must not become the next request
            self.close_connection = True
            headers["Connection"] = "close"
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
    """A threading HTTP server over a path -> :data:`Route` table (see :class:`RoutingHandler`).

    Bounded: at most ``max_connections`` connections are served at once (a thread each); one more is
    answered ``503`` (JSON, ``Retry-After: 1``) and closed by the accepting thread, without a thread of
    its own. ``backlog`` is the listen queue (the kernel caps it at ``net.core.somaxconn``), so a burst of
    new connections waits for ``accept`` instead of having its SYNs dropped (socketserver's default of 5
    turned a 50-client burst into 1-3 s connect retries). ``request_timeout_s`` bounds the time a client
    may take to send a request head (see :class:`RoutingHandler`). :meth:`server_close` closes idle
    keep-alive connections at once and lets in-flight requests finish.
    """

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        routes: dict[str, Route],
        observe: Callable[[str, int, float], None] | None = None,
        *,
        max_connections: int = 256,
        request_timeout_s: float = 10.0,
        backlog: int = 1024,
    ) -> None:
        if max_connections < 1 or not request_timeout_s > 0 or backlog < 1:
            raise ValueError(
                f"max_connections={max_connections}, backlog={backlog} must be >= 1 and "
                f"request_timeout_s={request_timeout_s} > 0"
            )
        self.routes = routes
        self.observe = observe or (lambda _path, _code, _seconds: None)
        self.max_connections, self.request_timeout_s = int(max_connections), float(request_timeout_s)
        self.request_queue_size = int(backlog)
        self.closing = False
        self._lock = threading.Lock()
        self._active = 0
        self._handlers: set[RoutingHandler] = set()
        super().__init__(address, RoutingHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def open_connections(self) -> int:
        """Connections being served now (each holds a thread)."""
        return self._active

    def track(self, handler: RoutingHandler, alive: bool) -> None:
        with self._lock:
            (self._handlers.add if alive else self._handlers.discard)(handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = self._active >= self.max_connections
            self._active += 0 if full else 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # no thread could be started: refuse this one, keep serving the others
            self._release()
            self._refuse(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._active -= 1

    def _refuse(self, request: socket.socket) -> None:
        body = json.dumps(
            {"error": f"server busy: {self.max_connections} connections open (its limit); retry in a second"}
        ).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        try:
            request.settimeout(0.2)
            request.sendall(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)
        self.observe("refused", 503, 0.0)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a client that reset or vanished: routine, not a server fault
            log.debug("http %s: connection dropped (%s)", client_address, exc)
        else:
            log.exception("http %s: unexpected error", client_address)

    def server_close(self) -> None:
        """Stop accepting, close idle keep-alive connections, then wait for in-flight requests."""
        self.closing = True
        with self._lock:
            idle = [h for h in self._handlers if not h.busy]
        for h in idle:
            try:
                h.connection.shutdown(socket.SHUT_RD)  # its blocked read returns EOF: the thread ends
            except OSError:
                pass
        super().server_close()


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
