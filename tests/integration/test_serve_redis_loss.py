"""`zerocf serve` when Redis is empty, lost or paused (issue 11.4), on the real Redis.

An empty or lost store is a 503 with a JSON reason, never ``200 {"items": [], "fallback": true}``; a request
during a Redis pause answers within a bounded, short time (``ZEROCF_SERVE_REDIS_TIMEOUT_S``) instead of the
client's 15 s socket timeout; with ``--stale-s`` the last good item cache keeps answering, flagged stale.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from stream.devstack import free_port
from tests.helpers import http_get, tiny_model, wait_until
from workers.serving.lookup import Recommender
from workers.serving.server import make_server
from workers.store import FactorStore

PAUSE_MS = 5000


@pytest.fixture()
def store(redis_url: str, topic_prefix: str) -> FactorStore:
    return FactorStore.from_url(redis_url, topic_prefix)


@contextmanager
def serve(env: dict[str, str], *flags: str) -> Iterator[int]:
    """``zerocf serve`` in a subprocess on a free port; yields the port once it answers /healthz."""
    with servers(env, flags) as (port,):
        yield port


@contextmanager
def servers(env: dict[str, str], *flag_sets: tuple[str, ...]) -> Iterator[tuple[int, ...]]:
    """One ``zerocf serve`` subprocess per flag set, started together (their start-ups overlap); yields their
    ports once every one answers /healthz."""
    ports = [free_port() for _ in flag_sets]
    procs: list[subprocess.Popen[str]] = []
    try:
        for port, flags in zip(ports, flag_sets):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "workers.cli", "serve", *flags],
                    env={**env, "ZEROCF_SERVE_HOST": "127.0.0.1", "ZEROCF_SERVE_PORT": str(port)},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for port, proc in zip(ports, procs):
            wait_until("serve answers /healthz", lambda port=port: _status(port, "/healthz") == 200, 60, proc)
        yield tuple(ports)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def _status(port: int, path: str) -> int | None:
    try:
        return http_get(port, path)[0]
    except OSError:
        return None


def timed_get(port: int, path: str, timeout: float) -> tuple[int, dict[str, Any], float]:
    """``(status, JSON body, seconds)``; a hang beyond ``timeout`` fails the test (socket timeout)."""
    import urllib.error
    import urllib.request

    t = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            code, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        code, body = err.code, err.read()
    return code, json.loads(body), time.monotonic() - t


def test_an_empty_model_is_503_not_an_empty_list(store: FactorStore) -> None:
    """Before: 200 {"items": [], "fallback": true} for every user of a model without items."""
    store.ensure_model(2)
    srv = make_server(Recommender(store, refresh_s=0.0), "127.0.0.1", 0, max_k=10)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        code, _, body = http_get(srv, "/recommend?user=u1")
        doc = json.loads(body)
        assert code == 503 and doc["reason"] == "empty_model" and "has no items yet" in doc["error"], doc
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_lost_store_is_503_with_a_reason(zerocf_env: dict[str, str], store: FactorStore) -> None:
    """Before: after Redis lost its data every user got 200 {"items": [], "fallback": true}, /healthz 503."""
    tiny_model(store)
    with serve(zerocf_env) as port:
        assert timed_get(port, "/recommend?user=u1&k=2", 5)[0] == 200
        store.r.flushdb()  # what an empty restart leaves: the server's connections survive, the data does not
        for user in ("u1", "stranger"):
            code, doc, _ = timed_get(port, f"/recommend?user={user}&k=2", 5)
            assert code == 503 and doc["reason"] == "store_lost", doc
            assert "is gone from Redis" in doc["error"] and "items" not in doc
        code, doc, _ = timed_get(port, "/healthz", 5)
        assert code == 503 and doc["reason"] == "store_lost", doc


def test_a_redis_pause_is_a_quick_503_or_a_flagged_stale_answer(
    zerocf_env: dict[str, str], store: FactorStore, redis_client: redis.Redis
) -> None:
    """Before: each request during a Redis pause hung until Redis answered (15 s socket timeout)."""
    tiny_model(store)
    with servers(zerocf_env, (), ("--stale-s", "60")) as (strict, lenient):
        for port in (strict, lenient):
            code, doc, _ = timed_get(port, "/recommend?user=u1&k=2", 5)
            assert (code, doc["stale"]) == (200, False), doc
        redis_client.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
        paused = time.monotonic()
        code, doc, took = timed_get(strict, "/recommend?user=u1&k=2", timeout=3)
        assert code == 503 and doc["reason"] == "redis_timeout", doc
        assert "ZEROCF_SERVE_REDIS_TIMEOUT_S" in doc["error"]
        code, doc, took = timed_get(lenient, "/recommend?user=u1&k=2", timeout=3)
        assert code == 200 and (doc["stale"], doc["fallback"], doc["reason"]) == (True, True, "redis_timeout"), doc
        assert [e["item"] for e in doc["items"]] == ["b", "c"]  # the cached popular items, seen not excluded
        assert time.monotonic() - paused < PAUSE_MS / 1000, "the pause ended before the requests were answered"
        wait_until("Redis answers again", lambda: _status(strict, "/recommend?user=u1&k=2") == 200, 30)
        code, doc, _ = timed_get(lenient, "/recommend?user=u1&k=2", 5)
        assert (code, doc["stale"], doc["fallback"]) == (200, False, False), doc
