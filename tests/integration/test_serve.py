"""`zerocf serve` over HTTP against the real Redis: contract, validation, health, metrics, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

from stream.devstack import free_port
from workers.serving.lookup import Recommender
from workers.serving.server import RecommendServer, make_server
from workers.store import FactorStore

MAX_K = 50


@pytest.fixture()
def store(redis_url: str, topic_prefix: str) -> FactorStore:
    return FactorStore.from_url(redis_url, topic_prefix)


@pytest.fixture()
def server(store: FactorStore) -> Iterator[RecommendServer]:
    srv = make_server(Recommender(store, refresh_s=0.0), "127.0.0.1", 0, max_k=MAX_K)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


def build(store: FactorStore) -> None:
    store.ensure_model(2)
    store.write_vectors(1, "item", ["a", "b", "c"], np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32))
    store.write_vectors(1, "user", ["u1"], np.array([[2, 1]], dtype=np.float32))
    store.write_counts(1, {"c": 5, "b": 3})


def get(srv: RecommendServer, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_recommend_contract(server: RecommendServer, store: FactorStore) -> None:
    build(store)
    code, headers, body = get(server, "/recommend?user=u1&k=2")
    assert code == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert set(doc) == {"user", "items", "fallback", "generation"}
    assert (doc["user"], doc["fallback"], doc["generation"]) == ("u1", False, 1)
    assert [e["item"] for e in doc["items"]] == ["a", "b"]
    np.testing.assert_allclose(
        [e["score"] for e in doc["items"]], [1 / (1 + np.exp(-2)), 1 / (1 + np.exp(-1))], rtol=1e-6
    )
    store.add_seen([("u1", "a", 1)])
    assert [e["item"] for e in json.loads(get(server, "/recommend?user=u1&k=2")[2])["items"]] == ["b", "c"]
    assert [e["item"] for e in json.loads(get(server, "/recommend?user=u1&k=1&exclude_seen=0")[2])["items"]] == ["a"]
    doc = json.loads(get(server, "/recommend?user=%C3%A9l%C3%A8ve")[2])
    assert (doc["user"], doc["fallback"], [e["item"] for e in doc["items"]]) == ("élève", True, ["c", "b"])


@pytest.mark.parametrize(
    "query, fragment",
    [
        ("user=u1&k=0", "k='0' must be an integer in 1..50"),
        (f"user=u1&k={MAX_K + 1}", "k='51' must be an integer in 1..50"),
        ("user=u1&k=abc", "k='abc' must be an integer"),
        ("user=u1&k=-3", "must be an integer"),
        ("k=5", "missing parameter user"),
        ("user=", "user must be 1..256 bytes"),
        ("user=" + "x" * 257, "got 257"),
        ("user=u%0A1", "control characters"),
        ("user=u%7F", "control characters"),
        ("user=%FF", "not valid percent-encoded UTF-8"),
        ("user=u1&exclude_seen=yes", "exclude_seen='yes' must be 0 or 1"),
        ("user=u1&user=u2", "given twice"),
        ("user=u1&kk=2", "unknown parameter 'kk'"),
    ],
)
def test_recommend_validation(server: RecommendServer, store: FactorStore, query: str, fragment: str) -> None:
    build(store)
    code, headers, body = get(server, "/recommend?" + query)
    assert code == 400 and headers["Content-Type"] == "application/json"
    assert fragment in json.loads(body)["error"]


def test_paths_methods_and_health(server: RecommendServer, store: FactorStore) -> None:
    code, _, body = get(server, "/healthz")
    assert code == 503 and json.loads(body)["ok"] is False and "no model" in json.loads(body)["error"]
    code, _, body = get(server, "/recommend?user=u1")
    assert code == 503 and "zerocf als --once" in json.loads(body)["error"]
    build(store)
    code, _, body = get(server, "/healthz")
    assert code == 200 and json.loads(body)["ok"] is True and json.loads(body)["live_generation"] == 1
    code, _, body = get(server, "/nope")
    assert code == 404 and "use /recommend" in json.loads(body)["error"]
    code, headers, body = get(server, "/recommend?user=u1", method="POST")
    assert code == 405 and headers["Allow"] == "GET, HEAD" and "use GET" in json.loads(body)["error"]
    assert get(server, "/recommend?user=ghost")[0] == 200
    code, headers, body = get(server, "/metrics")
    text = body.decode()
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'zerocf_serve_requests_total{path="/recommend",status="200"} 1.0' in text
    assert 'zerocf_serve_requests_total{path="/recommend",status="503"} 1.0' in text
    assert 'zerocf_serve_requests_total{path="other",status="404"} 1.0' in text
    assert "zerocf_serve_fallbacks_total 1.0" in text
    assert 'zerocf_serve_request_seconds_bucket{le="0.005",path="/recommend"}' in text
    assert "zerocf_serve_cache_refreshes " in text


def test_internal_error_is_500_json_without_trace(
    server: RecommendServer, store: FactorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    build(store)

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.recommender, "recommend", boom)
    code, _, body = get(server, "/recommend?user=u1")
    assert code == 500 and json.loads(body) == {"error": "internal error; see the server log"}


def test_serve_command_stops_on_sigterm(zerocf_env: dict[str, str], store: FactorStore) -> None:
    build(store)
    port = free_port()
    env = {**zerocf_env, "ZEROCF_SERVE_HOST": "127.0.0.1", "ZEROCF_SERVE_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        doc = None
        for _ in range(100):  # wait until it answers (bounded), not a timing assertion
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/recommend?user=u1&k=1", timeout=5) as r:
                    doc = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.1)
        assert doc is not None and doc["items"][0]["item"] == "a"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "finishing in-flight requests" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
