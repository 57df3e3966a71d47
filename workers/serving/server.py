"""``zerocf serve``: recommendations over HTTP (``/recommend``, ``/healthz``, ``/metrics``).

Built on :class:`stream.runtime.RoutingServer` (the standard library's ``ThreadingHTTPServer``, the same
routing every worker's health endpoint uses): it adds no dependency, the
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

HEAD is answered like GET without a body. Unknown paths are 404, other methods 405, Redis or model
unavailability 503, and any other failure 500
with a JSON body (the stack trace goes to the log, never to the client). SIGTERM/SIGINT stop the server
gracefully (in-flight requests finish). :func:`make_server` builds a server in-process (port 0 picks a
free port) for tests and embedding; the caller runs ``serve_forever`` and later ``shutdown``.
"""

from __future__ import annotations

import argparse
import logging
import threading
import unicodedata
from typing import Any
from urllib.parse import parse_qsl

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stream.config import KAFKA_FIELDS, TOP_LEVEL, add_flags, flag_overrides, load
from stream.errors import ServiceUnavailable
from stream.runtime import Response, RoutingServer, health_route, json_response, metrics_route
from workers.config import ServeConfig
from workers.errors import StoreSchemaError
from workers.serving.lookup import NoModel, Recommender
from workers.store import FactorStore

log = logging.getLogger(__name__)

__all__ = ["BadRequest", "RecommendServer", "make_server", "parse_recommend_query", "register", "run"]

MAX_USER_BYTES = 256
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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
        self.requests = Counter(
            "zerocf_serve_requests", "HTTP requests by path and status", ["path", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "zerocf_serve_request_seconds",
            "HTTP request latency by path",
            ["path"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "zerocf_serve_fallbacks", "recommendations served by popularity fallback", registry=self.registry
        )
        Gauge(
            "zerocf_serve_cache_refreshes", "full reloads of the cached item matrix", registry=self.registry
        ).set_function(lambda: rec.refreshes)
        Gauge("zerocf_serve_cached_items", "items in the cached matrix", registry=self.registry).set_function(
            lambda: rec.n_items
        )
        Gauge(
            "zerocf_serve_cached_generation", "generation of the cached matrix (0 = none)", registry=self.registry
        ).set_function(lambda: rec.generation or 0)


class RecommendServer(RoutingServer):
    """The HTTP server: ``/recommend``, ``/healthz`` and ``/metrics`` over one :class:`Recommender`."""

    daemon_threads = False  # server_close() joins in-flight requests: a graceful stop finishes them
    block_on_close = True

    def __init__(self, address: tuple[str, int], recommender: Recommender, max_k: int) -> None:
        self.recommender, self.max_k = recommender, int(max_k)
        self.metrics = _Metrics(recommender)
        routes = {
            "/recommend": self._recommend,
            "/healthz": health_route(lambda: health(recommender)),
            "/metrics": metrics_route(self.metrics.registry),
        }
        super().__init__(address, routes, self._observe)

    def _observe(self, path: str, code: int, seconds: float) -> None:
        self.metrics.requests.labels(path, str(code)).inc()
        self.metrics.latency.labels(path).observe(seconds)

    def _recommend(self, query: str) -> Response:
        try:
            user, k, exclude = parse_recommend_query(query, self.max_k)
        except BadRequest as exc:
            return json_response(400, {"error": str(exc)})
        try:
            rec = self.recommender.recommend(user, k, exclude)
        except NoModel as exc:
            return json_response(503, {"error": str(exc)})
        except redis.RedisError as exc:
            log.warning("redis error serving user=%r: %s", user, exc)
            return json_response(503, {"error": f"Redis unavailable ({type(exc).__name__}); retry later"})
        if rec.fallback:
            self.metrics.fallbacks.inc()
        return json_response(
            200,
            {
                "user": rec.user,
                "items": [{"item": i, "score": s} for i, s in zip(rec.items, rec.scores)],
                "fallback": rec.fallback,
                "generation": rec.generation,
            },
        )


def health(rec: Recommender) -> tuple[bool, dict[str, Any]]:
    """``(ok, detail)``: ok when Redis answers and holds a model."""
    try:
        live = rec.store.live_generation()
    except StoreSchemaError:
        return False, {
            "error": f"no model in Redis namespace {rec.store.keys.ns!r}; run `zerocf lmf` or `zerocf als --once` first"
        }
    except redis.RedisError as exc:
        return False, {"error": f"Redis did not answer ({type(exc).__name__})"}
    return True, {"live_generation": live, "cached_generation": rec.generation, "cached_items": rec.n_items}


def make_server(
    source: ServeConfig | Recommender, host: str | None = None, port: int | None = None, *, max_k: int | None = None
) -> RecommendServer:
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
    log.info(
        "recommendations on http://%s:%d/recommend (max_k=%d)", server.server_address[0], server.port, server.max_k
    )
    return server


def register(subparsers: Any) -> None:
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
