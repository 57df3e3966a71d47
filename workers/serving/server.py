"""``zerocf serve``: recommendations over HTTP (``/recommend``, ``/healthz``, ``/metrics``).

Built on the standard library's :class:`http.server.ThreadingHTTPServer`: it adds no dependency, the
handler is a few lines of routing and validation, and the work per request is one numpy matrix-vector
product over the cached item matrix (numpy releases the GIL), so an async framework would buy nothing.
Put a reverse proxy in front for TLS and connection limits.

- ``GET /recommend?user=U&k=10&exclude_seen=1`` -> 200
  ``{"user": U, "items": [{"item": id, "score": p}], "fallback": bool, "generation": g}``.
  ``k`` is an integer in ``1..max_k`` (default ``min(10, max_k)``), ``user`` 1..256 bytes of UTF-8 without
  control characters, ``exclude_seen`` 0 or 1 (default 1); anything else is a 400 with a JSON ``error``.
- ``GET /healthz`` -> 200 when Redis answers and a model exists, else 503 (JSON either way).
- ``GET /metrics`` -> Prometheus text: requests by path and status, latency histogram, cache refreshes,
  fallbacks.

Unknown paths are 404, other methods 405, Redis or model unavailability 503, and any other failure 500
with a JSON body (the stack trace goes to the log, never to the client). SIGTERM/SIGINT stop the server
gracefully (in-flight requests finish). :func:`make_server` builds a server in-process (port 0 picks a
free port) for tests and embedding; the caller runs ``serve_forever`` and later ``shutdown``.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import unicodedata
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from stream.config import KAFKA_FIELDS, TOP_LEVEL, add_flags, flag_overrides, load
from stream.errors import ServiceUnavailable
from workers.config import ServeConfig
from workers.errors import StoreSchemaError
from workers.serving.lookup import NoModel, Recommender
from workers.store import FactorStore

log = logging.getLogger(__name__)

__all__ = ["BadRequest", "RecommendServer", "make_server", "parse_recommend_query", "register", "run"]

MAX_USER_BYTES = 256
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_PATHS = ("/recommend", "/healthz", "/metrics")


class BadRequest(ValueError):
    """A request parameter is invalid; the message says which and what is accepted (sent as a 400)."""


def parse_recommend_query(query: str, max_k: int) -> tuple[str, int, bool]:
    """Validate the query string of ``/recommend``; return ``(user, k, exclude_seen)``.

    >>> parse_recommend_query("user=u%C3%A9&k=5&exclude_seen=0", 100)
    ('ué', 5, False)
    >>> parse_recommend_query("user=u1&k=0", 100)
    Traceback (most recent call last):
    ...
    workers.serving.server.BadRequest: k='0' must be an integer in 1..100
    """
    try:
        pairs = parse_qsl(query, keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("the query string is not valid percent-encoded UTF-8") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in ("user", "k", "exclude_seen"):
            raise BadRequest(f"unknown parameter {name!r}; use user, k and exclude_seen")
        if name in params:
            raise BadRequest(f"parameter {name!r} given twice; give it once")
        params[name] = value
    user = params.get("user")
    if user is None:
        raise BadRequest("missing parameter user; call /recommend?user=<id>&k=10")
    if not 1 <= len(user.encode("utf-8")) <= MAX_USER_BYTES:
        raise BadRequest(f"user must be 1..{MAX_USER_BYTES} bytes of UTF-8, got {len(user.encode('utf-8'))}")
    if any(unicodedata.category(c) == "Cc" for c in user):
        raise BadRequest("user contains control characters; send the id as printable UTF-8")
    raw_k = params.get("k", str(min(10, max_k)))
    if not (raw_k.isascii() and raw_k.isdigit() and len(raw_k) <= 9 and 1 <= int(raw_k) <= max_k):
        raise BadRequest(f"k={raw_k[:20]!r} must be an integer in 1..{max_k}")
    raw_ex = params.get("exclude_seen", "1")
    if raw_ex not in ("0", "1"):
        raise BadRequest(f"exclude_seen={raw_ex[:20]!r} must be 0 or 1")
    return user, int(raw_k), raw_ex == "1"


class _Metrics:
    """Per-server registry, so several in-process servers (tests) never clash."""

    def __init__(self, rec: Recommender) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("zerocf_serve_requests", "HTTP requests by path and status",
                                ["path", "status"], registry=self.registry)
        self.latency = Histogram("zerocf_serve_request_seconds", "HTTP request latency by path", ["path"],
                                 buckets=_BUCKETS, registry=self.registry)
        self.fallbacks = Counter("zerocf_serve_fallbacks", "recommendations served by popularity fallback",
                                 registry=self.registry)
        Gauge("zerocf_serve_cache_refreshes", "full reloads of the cached item matrix",
              registry=self.registry).set_function(lambda: rec.refreshes)
        Gauge("zerocf_serve_cached_items", "items in the cached matrix",
              registry=self.registry).set_function(lambda: rec.n_items)
        Gauge("zerocf_serve_cached_generation", "generation of the cached matrix (0 = none)",
              registry=self.registry).set_function(lambda: rec.generation or 0)


class RecommendServer(ThreadingHTTPServer):
    """The HTTP server; ``recommender``, ``max_k`` and ``metrics`` are read by the handler."""

    daemon_threads = False  # server_close() joins in-flight requests: a graceful stop finishes them
    block_on_close = True

    def __init__(self, address: tuple[str, int], recommender: Recommender, max_k: int) -> None:
        self.recommender, self.max_k = recommender, int(max_k)
        self.metrics = _Metrics(recommender)
        super().__init__(address, _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: RecommendServer
    server_version = "zerocf"
    timeout = 30  # seconds a client may take to send its request (a stalled client cannot block shutdown)

    def _dispatch(self) -> None:
        started = time.perf_counter()
        path, _, query = self.path.partition("?")
        routes: dict[str, Callable[[str], tuple[int, str, bytes]]] = {
            "/recommend": self._recommend, "/healthz": self._healthz, "/metrics": self._metrics}
        headers: dict[str, str] = {}
        try:
            if path not in routes:
                code, ctype, body = _json(404, {"error": f"no such path {path[:100]!r}; use {', '.join(_PATHS)}"})
            elif self.command != "GET":
                headers["Allow"] = "GET"
                code, ctype, body = _json(405, {"error": f"method {self.command} not allowed; use GET"})
            else:
                code, ctype, body = routes[path](query)
        except Exception:  # the request boundary: log it, never send a trace
            log.exception("internal error serving %s", self.path[:300])
            code, ctype, body = _json(500, {"error": "internal error; see the server log"})
        label = path if path in routes else "other"
        self.server.metrics.requests.labels(label, str(code)).inc()
        self.server.metrics.latency.labels(label).observe(time.perf_counter() - started)
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch  # noqa: N815

    def _recommend(self, query: str) -> tuple[int, str, bytes]:
        try:
            user, k, exclude = parse_recommend_query(query, self.server.max_k)
        except BadRequest as exc:
            return _json(400, {"error": str(exc)})
        try:
            rec = self.server.recommender.recommend(user, k, exclude)
        except NoModel as exc:
            return _json(503, {"error": str(exc)})
        except redis.RedisError as exc:
            log.warning("redis error serving user=%r: %s", user, exc)
            return _json(503, {"error": f"Redis unavailable ({type(exc).__name__}); retry later"})
        if rec.fallback:
            self.server.metrics.fallbacks.inc()
        return _json(200, {"user": rec.user, "items": [{"item": i, "score": s} for i, s in
                                                       zip(rec.items, rec.scores)],
                           "fallback": rec.fallback, "generation": rec.generation})

    def _healthz(self, _query: str) -> tuple[int, str, bytes]:
        ok, detail = health(self.server.recommender)
        return _json(200 if ok else 503, {"ok": ok, **detail})

    def _metrics(self, _query: str) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.server.metrics.registry)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("http %s: " + fmt, self.client_address[0], *args)


def _json(code: int, obj: dict[str, Any]) -> tuple[int, str, bytes]:
    return code, "application/json", json.dumps(obj, ensure_ascii=False).encode("utf-8")


def health(rec: Recommender) -> tuple[bool, dict[str, Any]]:
    """``(ok, detail)``: ok when Redis answers and holds a model."""
    try:
        live = rec.store.live_generation()
    except StoreSchemaError:
        return False, {"error": f"no model in Redis namespace {rec.store.keys.ns!r}; run `zerocf lmf` or "
                                "`zerocf als --once` first"}
    except redis.RedisError as exc:
        return False, {"error": f"Redis did not answer ({type(exc).__name__})"}
    return True, {"live_generation": live, "cached_generation": rec.generation, "cached_items": rec.n_items}


def make_server(source: ServeConfig | Recommender, host: str | None = None, port: int | None = None,
                *, max_k: int | None = None) -> RecommendServer:
    """Bind a :class:`RecommendServer` (not yet serving: run ``serve_forever`` in a thread).

    ``source`` is a config (a store and recommender are built from it, refreshing on the request path)
    or a ready :class:`Recommender`. ``host``/``port`` default to the config's, or ``127.0.0.1``/0 (a
    free port, read back from ``server.port``) for a recommender; ``max_k`` likewise (1000).
    """
    if isinstance(source, ServeConfig):
        store = FactorStore.from_url(source.redis_url, source.topic_prefix)
        rec = Recommender(store, source.item_refresh_s)
        host = source.host if host is None else host
        port = source.port if port is None else port
        max_k = source.max_k if max_k is None else max_k
    else:
        rec = source
    server = RecommendServer((host or "127.0.0.1", int(port or 0)), rec, max_k or 1000)
    log.info("recommendations on http://%s:%d/recommend (max_k=%d)", server.server_address[0], server.port,
             server.max_k)
    return server


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``zerocf serve``."""
    p = subparsers.add_parser("serve", help="serve recommendations over HTTP (/recommend, /healthz, /metrics)")
    add_flags(p, ServeConfig, skip=TOP_LEVEL + KAFKA_FIELDS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; the item cache is refreshed from this (main) thread, off the request path."""
    from stream.runtime import StopFlag, start_http

    cfg = load(ServeConfig, args.env, flag_overrides(args, ServeConfig))
    try:  # a wrong password fails fast; an unreachable Redis only makes /healthz 503 until it answers
        store = FactorStore.connect(cfg.redis_url, cfg.topic_prefix)
    except ServiceUnavailable as exc:
        log.warning("%s; serving 503 until it answers", exc)
        store = FactorStore.from_url(cfg.redis_url, cfg.topic_prefix, socket_timeout=5)
    rec = Recommender(store, cfg.item_refresh_s, auto_refresh=False)
    last_error = _refresh(rec, "")
    server = make_server(rec, cfg.host, cfg.port, max_k=cfg.max_k)
    stop = StopFlag().install()
    thread = threading.Thread(target=server.serve_forever, name="zerocf-serve", daemon=True)
    thread.start()
    extra = None
    if cfg.runtime.metrics_port and cfg.runtime.metrics_port != server.port:
        extra = start_http(cfg.runtime.metrics_port, lambda: health(rec), server.metrics.registry, cfg.host)
    try:
        while not stop.wait(min(1.0, max(0.05, cfg.item_refresh_s))):
            last_error = _refresh(rec, last_error)
    finally:
        log.info("stopping (%s): finishing in-flight requests", stop.reason or "exit")
        server.shutdown()
        server.server_close()
        if extra is not None:
            extra.shutdown()
    return 0


def _refresh(rec: Recommender, last_error: str) -> str:
    """Refresh the cache if due; log an error only when it changes. Returns the current error ('' if ok)."""
    try:
        rec.refresh()
        err = ""
    except (NoModel, redis.RedisError, StoreSchemaError) as exc:
        err = str(exc)
    if err and err != last_error:
        log.warning("item cache not refreshed: %s", err)
    elif last_error and not err:
        log.info("item cache refreshed again (generation %s, %d items)", rec.generation, rec.n_items)
    return err
