"""``zerocf serve``: recommendations over HTTP (``/recommend``, ``/similar``, ``/healthz``, ``/metrics``,
``/openapi.json``) and a dashboard (``/``, ``/api/dashboard``).

Built on :class:`stream.runtime.RoutingServer` (the standard library's ``ThreadingHTTPServer`` with the
bounds it lacks: HTTP/1.1 keep-alive, a 1024-deep listen queue, one deadline for a whole request head, a cap
on connections; the same routing every worker's health endpoint uses). It adds no dependency: the work per
request is a few ms of numpy over the cached item matrix, which an async framework would not make cheaper,
and ``bench/bench_serve.py`` shows the server adding ~1-2 ms over the bare lookup below saturation.
Put a reverse proxy in front for TLS.

- ``GET /recommend?user=U&k=10&exclude_seen=1`` -> 200
  ``{"user": U, "items": [{"item": id, "score": p}], "fallback": bool, "generation": g, "stale": bool}``.
  ``k`` is an integer in ``1..max_k`` (default ``min(10, max_k)``), ``user`` 1..256 bytes of UTF-8 without
  control characters, ``exclude_seen`` 0 or 1 (default 1); anything else is a 400 with a JSON ``error``
  (the rules live in :mod:`workers.serving.queries`).
- ``GET /similar?item=I&k=10`` -> 200
  ``{"item": I, "items": [{"item": id, "score": cosine}], "fallback": bool, "generation": g, "stale": bool}``:
  the items nearest to ``I`` by cosine of the latent vectors, ``I`` itself excluded
  (:meth:`Recommender.similar`). ``item`` and ``k`` are validated as ``user`` and ``k`` above. An item
  without a vector gets the generation's popular items, scored ``sigmoid(b + b_i)``, ``"fallback": true``.
- ``&category=C`` (both routes, optional): only items whose catalogue state lists ``C``; a category no item
  has (or any category while the catalogue is off) gives an empty ``items`` list, not an error.
- Catalogue: ``zerocf serve`` follows ``<p>.items`` (:class:`stream.catalog.CatalogView`, on unless
  ``ZEROCF_SERVE_CATALOG=0``) and never returns an item that is hidden or expired now (user top-k, similar
  items, both fallbacks, stale answers). The view connects in the background: without a reachable broker
  serve still serves (nothing hidden, no categories), logs it once and shows it in ``/healthz``'s
  ``catalog`` detail (which never makes ``/healthz`` fail: the model is still served).
- ``GET /healthz`` -> 200 when Redis answers and holds the model being served, else 503 (JSON either way,
  with a ``reason`` when 503).
- ``GET /metrics`` -> Prometheus text: requests by path and status, latency histogram, cache refreshes,
  fallbacks (of /recommend and, apart, of /similar), stale answers, open connections.
- ``GET /openapi.json`` -> the OpenAPI 3.1 description of these routes (:mod:`workers.serving.openapi`).
- ``GET /`` -> the dashboard page; ``GET /api/dashboard?top=10`` -> its data (:mod:`workers.serving.dashboard`):
  generations, the applied offsets of ``<p>.events`` and their rate, serve's requests, top and trending items.

When the answer cannot come from Redis it is a 503 ``{"error": ..., "reason": R}``, never an empty list:
``no_model`` (nothing trained under the prefix), ``empty_model`` (a model without items), ``store_lost``
(Redis lost the model being served: an empty restart or a flush), ``redis_timeout`` (no reply within
``ZEROCF_SERVE_REDIS_TIMEOUT_S``, 0.25 s, per round trip, no retries), ``redis_unavailable``. With
``ZEROCF_SERVE_STALE_S`` > 0, for that long after Redis last answered, these are instead a 200 from the
cached item matrix alone, with ``"stale": true`` and the ``reason``: for /recommend the generation's popular
items at its last load, seen items *not* excluded, ``"fallback": true``; for /similar the cosine answer of
the cached matrix (itself computed from memory; a fresh answer also asks Redis whether it still holds the
model, so that a lost model is a 503, not a silent answer from a model that no longer exists).

Limits (:class:`~workers.serving.settings.ServeSettings`): ``ZEROCF_SERVE_MAX_CONNECTIONS`` connections at
once (one more gets a 503 and is closed), ``ZEROCF_SERVE_REQUEST_TIMEOUT_S`` to send a request head (a
slow-drip client is cut off; also the keep-alive idle limit), ``ZEROCF_SERVE_COMPUTE_SLOTS`` lookups
computed at once, the others queued first come first served (:mod:`workers.serving.gate`).

HEAD is answered like GET without a body. Unknown paths are 404, other methods 405, and any other failure
500 with a JSON body (the stack trace goes to the log, never to the client). SIGTERM/SIGINT stop the server
gracefully (in-flight requests finish, idle keep-alive connections are closed). :func:`make_server` builds
a server in-process (port 0 picks a free port) for tests and embedding; the caller runs ``serve_forever``
and later ``shutdown``.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.backoff import NoBackoff
from redis.retry import Retry

from stream.catalog import CatalogView, catalog_consumer, items_topic
from stream.config import KAFKA_FIELDS, TOP_LEVEL, KafkaSettings, add_flags, flag_overrides, load
from stream.errors import ConfigError, ServiceUnavailable
from stream.runtime import Response, RoutingServer, health_route, json_response, metrics_route
from workers.config import ServeConfig
from workers.errors import StoreSchemaError
from workers.serving.dashboard import Dashboard, dashboard_page
from workers.serving.gate import FifoGate, usable_cpus
from workers.serving.lookup import NoModel, Recommendation, Recommender, SimilarItems
from workers.serving.openapi import openapi_document
from workers.serving.queries import MAX_ID_BYTES, BadRequest, parse_recommend_query, parse_similar_query
from workers.serving.settings import ServeSettings
from workers.store import FactorStore

log = logging.getLogger(__name__)

__all__ = [
    "BadRequest",
    "RecommendServer",
    "make_server",
    "parse_recommend_query",
    "parse_similar_query",
    "register",
    "run",
]

MAX_USER_BYTES = MAX_ID_BYTES
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _Metrics:
    """Per-server registry, so several in-process servers (tests) never clash."""

    def __init__(self, rec: Recommender, catalog: CatalogView | None = None) -> None:
        self.registry = CollectorRegistry()
        if catalog is not None:
            view = catalog
            Gauge("zerocf_serve_catalog_records", "catalogue records applied", registry=self.registry).set_function(
                lambda: view.records
            )
            Gauge(
                "zerocf_serve_catalog_bad_records", "catalogue records skipped as invalid", registry=self.registry
            ).set_function(lambda: view.bad_records)
            Gauge(
                "zerocf_serve_catalog_hidden_items", "items hidden or expired now", registry=self.registry
            ).set_function(lambda: len(view.hidden_now()))
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
        self.similar_fallbacks = Counter(
            "zerocf_serve_similar_fallbacks",
            "similar-items answers served by popularity fallback (the item had no vector)",
            registry=self.registry,
        )
        self.stale = Counter(
            "zerocf_serve_stale", "answers from the item cache alone while Redis was away", registry=self.registry
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
    """The HTTP server: ``/recommend``, ``/similar``, ``/healthz``, ``/metrics``, ``/openapi.json`` and the
    dashboard (``/``, ``/api/dashboard``) over one :class:`Recommender`."""

    daemon_threads = False  # server_close() joins in-flight requests: a graceful stop finishes them
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        recommender: Recommender,
        max_k: int,
        settings: ServeSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        catalog: CatalogView | None = None,
    ) -> None:
        self.recommender, self.max_k = recommender, int(max_k)
        self.settings = settings or ServeSettings()
        self.catalog = catalog
        self._clock = clock
        self._last_ok = clock()  # the last moment Redis answered a request or a refresh
        self.metrics = _Metrics(recommender, catalog)
        Gauge(
            "zerocf_serve_open_connections", "client connections being served", registry=self.metrics.registry
        ).set_function(lambda: self.open_connections)
        self.openapi = openapi_document(self.max_k)
        openapi_body = json_response(200, self.openapi)  # built once: the document never changes
        page: Response = (200, "text/html; charset=utf-8", dashboard_page())
        self.dashboard = Dashboard(recommender, self.metrics.registry, self.max_k)
        routes = {
            "/recommend": self._recommend,
            "/similar": self._similar,
            "/healthz": health_route(lambda: health(recommender, catalog)),
            "/metrics": metrics_route(self.metrics.registry),
            "/openapi.json": lambda _query: openapi_body,
            "/": lambda _query: page,
            "/api/dashboard": self.dashboard.route,
        }
        super().__init__(
            address,
            routes,
            self._observe,
            max_connections=self.settings.max_connections,
            request_timeout_s=self.settings.request_timeout_s,
        )

    def note_redis_ok(self, at: float) -> None:
        """Redis answered at ``at`` (a cache check of the main loop, same clock): the stale window restarts."""
        self._last_ok = max(self._last_ok, at)

    def _observe(self, path: str, code: int, seconds: float) -> None:
        self.metrics.requests.labels(path, str(code)).inc()
        self.metrics.latency.labels(path).observe(seconds)

    def _only(self, category: str | None) -> frozenset[str] | None:
        """The items of ``category`` (None: no filter); no catalogue means no item has a category."""
        if category is None:
            return None
        return frozenset() if self.catalog is None else self.catalog.items_of(category)

    def _recommend(self, query: str) -> Response:
        try:
            user, k, exclude, category = parse_recommend_query(query, self.max_k)
        except BadRequest as exc:
            return json_response(400, {"error": str(exc)})
        only = self._only(category)
        try:
            rec = self.recommender.recommend(user, k, exclude, only=only)
        except (NoModel, redis.RedisError) as exc:
            return self._unavailable(user, k, exc, only=only)
        self._last_ok = self._clock()
        return self._answer(rec)

    def _similar(self, query: str) -> Response:
        try:
            item, k, category = parse_similar_query(query, self.max_k)
        except BadRequest as exc:
            return json_response(400, {"error": str(exc)})
        only = self._only(category)
        try:
            found = self.recommender.similar(item, k, only=only)
        except (NoModel, redis.RedisError) as exc:
            return self._unavailable(item, k, exc, similar=True, only=only)
        self._last_ok = self._clock()
        return self._answer(found)

    def _answer(self, rec: Recommendation | SimilarItems, reason: str | None = None) -> Response:
        doc: dict[str, Any]
        if isinstance(rec, SimilarItems):
            doc = {"item": rec.item}
            if rec.fallback:
                self.metrics.similar_fallbacks.inc()
        else:
            doc = {"user": rec.user}
            if rec.fallback:
                self.metrics.fallbacks.inc()
        doc["items"] = [{"item": i, "score": s} for i, s in zip(rec.items, rec.scores)]
        doc.update(fallback=rec.fallback, generation=rec.generation, stale=rec.stale)
        if reason:
            doc["reason"] = reason
        return json_response(200, doc)

    def _unavailable(
        self, key: str, k: int, exc: Exception, *, similar: bool = False, only: frozenset[str] | None = None
    ) -> Response:
        """503 with the reason, or within ``stale_s`` of Redis last answering, the cache's stale answer."""
        reason, message = unavailable_reason(exc, self.settings.redis_timeout_s)
        if isinstance(exc, redis.RedisError):
            log.warning("redis error serving %s=%r: %s", "item" if similar else "user", key, exc)
        since = self._clock() - self._last_ok
        if self.settings.stale_s > 0 and since <= self.settings.stale_s and self.recommender.generation is not None:
            self.metrics.stale.inc()
            rec = self.recommender
            stale = rec.similar_stale(key, k, only=only) if similar else rec.recommend_stale(key, k, only=only)
            return self._answer(stale, reason)
        return json_response(503, {"error": message, "reason": reason})


def unavailable_reason(exc: Exception, redis_timeout_s: float) -> tuple[str, str]:
    """``(reason, message)`` of a 503: ``no_model``, ``store_lost``, ``empty_model``, ``redis_timeout`` or
    ``redis_unavailable``; the message says what to do.

    >>> unavailable_reason(redis.TimeoutError("Timeout reading from socket"), 0.25)[0]
    'redis_timeout'
    """
    if isinstance(exc, NoModel):
        return exc.reason, str(exc)
    if isinstance(exc, redis.TimeoutError):
        return "redis_timeout", (
            f"Redis did not answer within {redis_timeout_s:g} s (ZEROCF_SERVE_REDIS_TIMEOUT_S); retry later, "
            "and check that Redis is up and not blocked"
        )
    return "redis_unavailable", f"Redis unavailable ({type(exc).__name__}); retry later, and check that Redis is up"


def catalog_detail(catalog: CatalogView | None) -> dict[str, Any]:
    """``/healthz``'s ``catalog`` entry: the view's status, or ``{"state": "off"}``."""
    return {"state": "off"} if catalog is None else catalog.status()


def health(rec: Recommender, catalog: CatalogView | None = None) -> tuple[bool, dict[str, Any]]:
    """``(ok, detail)``: ok when Redis answers, holds a model, and has not lost the one being served.

    ``detail["catalog"]`` tells how the catalogue follower is doing; it never makes the answer not ok (the
    model is served either way, without hiding anything when the catalogue is away).
    """
    ok, detail = _model_health(rec)
    return ok, {**detail, "catalog": catalog_detail(catalog)}


def _model_health(rec: Recommender) -> tuple[bool, dict[str, Any]]:
    ns = rec.store.keys.ns
    try:
        live = rec.store.live_generation()
    except StoreSchemaError:
        if rec.generation is not None:
            lost = f"Redis lost model {ns!r} (generation {rec.generation} was being served)"
            return False, {"reason": "store_lost", "error": f"{lost}; restore it or run `zerocf als --once`"}
        fix = "run `zerocf lmf` or `zerocf als --once` first"
        return False, {"reason": "no_model", "error": f"no model in Redis namespace {ns!r}; {fix}"}
    except redis.RedisError as exc:
        reason = "redis_timeout" if isinstance(exc, redis.TimeoutError) else "redis_unavailable"
        return False, {"reason": reason, "error": f"Redis did not answer ({type(exc).__name__})"}
    detail = {"live_generation": live, "cached_generation": rec.generation, "cached_items": rec.n_items}
    if rec.generation is not None and live < rec.generation:
        return False, {"reason": "store_lost", "error": f"model went back from generation {rec.generation} "
                       f"to {live}: Redis lost its data", **detail}  # fmt: skip
    return True, detail


def serving_stores(
    cfg: ServeConfig, settings: ServeSettings, *, check: bool = False
) -> tuple[FactorStore, FactorStore]:
    """``(requests, reloads)``: two clients of the model's Redis. Requests wait at most
    ``redis_timeout_s`` per reply and never retry (a retry would multiply the wait); the full item reloads
    of the main loop get a longer timeout and one retry. ``check`` PINGs first, so that a wrong password
    fails at start (:class:`ConfigError`); an unreachable Redis only makes requests 503 until it answers.
    """
    t = settings.redis_timeout_s
    fast: dict[str, Any] = {"socket_timeout": t, "socket_connect_timeout": t, "retry": Retry(NoBackoff(), 0)}
    slow: dict[str, Any] = {"socket_timeout": max(2.0, 8 * t), "socket_connect_timeout": max(1.0, 4 * t)}
    slow["retry"] = Retry(NoBackoff(), 1)
    url, ns = cfg.redis_url, cfg.topic_prefix
    store = None
    if check:
        try:
            store = FactorStore.connect(url, ns, **fast)
        except ServiceUnavailable as exc:
            log.warning("%s; serving 503 until it answers", exc)
    return store or FactorStore.from_url(url, ns, **fast), FactorStore.from_url(url, ns, **slow)


def compute_gate(settings: ServeSettings) -> FifoGate:
    """The first-come-first-served gate of the lookups' numpy part (:mod:`workers.serving.gate`)."""
    return FifoGate(settings.compute_slots or usable_cpus())


def make_server(
    source: ServeConfig | Recommender,
    host: str | None = None,
    port: int | None = None,
    *,
    max_k: int | None = None,
    settings: ServeSettings | None = None,
    catalog: CatalogView | None = None,
) -> RecommendServer:
    """Bind a :class:`RecommendServer` (not yet serving: run ``serve_forever`` in a thread).

    ``source`` is a config (a store and recommender are built from it, refreshing on the request path)
    or a ready :class:`Recommender`. ``host``/``port`` default to the config's, or ``127.0.0.1``/0 (a
    free port, read back from ``server.port``) for a recommender; ``max_k`` likewise (1000); ``settings``
    (timeouts, connection limit, stale serving) default to :class:`ServeSettings`'s defaults. ``catalog``
    (a started :class:`CatalogView`) serves ``category`` and ``/healthz``'s catalogue detail; a recommender
    built here from a config also hides its ``hidden_now()`` (a ready recommender brings its own hook).
    """
    settings = settings or ServeSettings()
    if isinstance(source, ServeConfig):
        store, reload_store = serving_stores(source, settings)
        hidden = None if catalog is None else catalog.hidden_now
        rec = Recommender(
            store, source.item_refresh_s, reload_store=reload_store, gate=compute_gate(settings), hidden=hidden,
            ann_min_items=settings.ann_min_items,
        )  # fmt: skip
        host = source.host if host is None else host
        port = source.port if port is None else port
        max_k = source.max_k if max_k is None else max_k
    else:
        rec = source
    server = RecommendServer((host or "127.0.0.1", int(port or 0)), rec, max_k or 1000, settings, catalog=catalog)
    log.info(
        "serving http://%s:%d/ (dashboard), /recommend, /similar and /openapi.json "
        "(max_k=%d, max_connections=%d, redis_timeout_s=%g, stale_s=%g)",
        server.server_address[0],
        server.port,
        server.max_k,
        settings.max_connections,
        settings.redis_timeout_s,
        settings.stale_s,
    )
    return server


def register(subparsers: Any) -> None:
    """Add ``zerocf serve``."""
    p = subparsers.add_parser("serve", help="serve /recommend, /similar, the dashboard (/), /healthz, /metrics")
    add_flags(p, ServeConfig, ServeSettings, skip=TOP_LEVEL + KAFKA_FIELDS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; the item cache is refreshed from this (main) thread, off the request path."""
    from stream.runtime import StopFlag, start_http

    cfg = load(ServeConfig, args.env, flag_overrides(args, ServeConfig))
    settings = load(ServeSettings, args.env, flag_overrides(args, ServeSettings))
    _pin_blas()
    store, reload_store = serving_stores(cfg, settings, check=True)
    gate = compute_gate(settings)
    catalog = start_catalog(args.env, cfg.topic_prefix) if settings.catalog else None
    hidden = None if catalog is None else catalog.hidden_now
    rec = Recommender(
        store, cfg.item_refresh_s, auto_refresh=False, reload_store=reload_store, gate=gate, hidden=hidden,
        ann_min_items=settings.ann_min_items,
    )  # fmt: skip
    last_error = _refresh(rec, "")
    try:
        server = make_server(rec, cfg.host, cfg.port, max_k=cfg.max_k, settings=settings, catalog=catalog)
    except (OSError, OverflowError) as exc:
        raise ConfigError(
            f"cannot serve on {cfg.host}:{cfg.port}: {exc}; pick a free port (ZEROCF_SERVE_PORT / --port) "
            "or another interface (ZEROCF_SERVE_HOST / --host)"
        ) from None
    stop = StopFlag().install()
    thread = threading.Thread(target=server.serve_forever, name="zerocf-serve", daemon=True)
    thread.start()
    extra = None
    if cfg.runtime.metrics_port and cfg.runtime.metrics_port != server.port:
        extra = start_http(cfg.runtime.metrics_port, lambda: health(rec, catalog), server.metrics.registry, cfg.host)
    try:
        while not stop.wait(min(1.0, max(0.05, cfg.item_refresh_s))):
            last_error = _refresh(rec, last_error)
            server.note_redis_ok(rec.last_checked)
    finally:
        log.info("stopping (%s): finishing in-flight requests", stop.reason or "exit")
        server.shutdown()
        server.server_close()
        if extra is not None:
            extra.shutdown()
        if catalog is not None:
            catalog.stop()
    return 0


def start_catalog(env: Any, prefix: str) -> CatalogView:
    """Follow ``<prefix>.items`` in the background with the Kafka settings of the environment (serve has no
    Kafka flags): returns at once; a broker that does not answer only leaves the catalogue empty."""
    kafka = load(KafkaSettings, env)
    topic = items_topic(prefix)
    log.info("catalogue: following %s at %s (ZEROCF_SERVE_CATALOG=0 turns it off)", topic, kafka.bootstrap)
    return CatalogView(lambda: catalog_consumer(kafka, "zerocf-serve-catalog"), topic).start()


def _pin_blas() -> None:
    """One BLAS thread per request thread: request threads already use both cores, and OpenBLAS's own pool
    would make concurrent requests queue for it (as the workers pin it, STYLE 9)."""
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
    except ImportError:
        log.info("threadpoolctl not installed: BLAS threads not pinned (set OPENBLAS_NUM_THREADS=1)")
        return
    threadpool_limits(1, user_api="blas")


def _refresh(rec: Recommender, last_error: str) -> str:
    """Refresh the cache if due; log an error only when it changes. Returns the current error ('' if ok)."""
    try:
        rec.refresh()
        err = ""
    except (NoModel, redis.RedisError, StoreSchemaError) as exc:
        err = str(exc) or type(exc).__name__
    if err and err != last_error:
        log.warning("item cache not refreshed: %s", err)
    elif last_error and not err:
        log.info("item cache refreshed again (generation %s, %d items)", rec.generation, rec.n_items)
    return err
