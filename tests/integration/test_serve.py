"""`zerocf serve` over HTTP against the real Redis: contract, validation, health, metrics, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from stream.devstack import free_port
from tests.helpers import TINY_BIAS, TS, http_get, http_head, serving_in_thread, tiny_model, wait_until
from workers.serving.lookup import Recommender
from workers.serving.server import RecommendServer, make_server
from workers.store import FactorStore

MAX_K = 50
B = TINY_BIAS  # the global bias


@pytest.fixture()
def store(redis_url: str, topic_prefix: str) -> FactorStore:
    return FactorStore.from_url(redis_url, topic_prefix)


@pytest.fixture()
def server(store: FactorStore) -> Iterator[RecommendServer]:
    with serving_in_thread(make_server(Recommender(store, refresh_s=0.0), "127.0.0.1", 0, max_k=MAX_K)) as srv:
        yield srv


def sig(x: list[float]) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def items_of(body: bytes) -> list[str]:
    return [e["item"] for e in json.loads(body)["items"]]


def test_recommend_contract(server: RecommendServer, store: FactorStore) -> None:
    tiny_model(store)
    code, headers, body = http_get(server, "/recommend?user=u1&k=2")
    assert code == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert set(doc) == {"user", "items", "fallback", "generation", "stale"}
    assert (doc["user"], doc["fallback"], doc["generation"], doc["stale"]) == ("u1", False, 1, False)
    assert [e["item"] for e in doc["items"]] == ["b", "a"]
    np.testing.assert_allclose([e["score"] for e in doc["items"]], sig([B + 0.1 + 2.5, B + 0.1 + 2]), rtol=1e-6)
    store.add_seen([("u1", "b", TS)])
    assert items_of(http_get(server, "/recommend?user=u1&k=2")[2]) == ["a", "c"]
    assert items_of(http_get(server, "/recommend?user=u1&k=1&exclude_seen=0")[2]) == ["b"]
    doc = json.loads(http_get(server, "/recommend?user=%C3%A9l%C3%A8ve")[2])
    assert (doc["user"], doc["fallback"], [e["item"] for e in doc["items"]]) == ("élève", True, ["b", "c"])
    np.testing.assert_allclose([e["score"] for e in doc["items"]], sig([B + 1.5, B]), rtol=1e-6)  # sigmoid(b + b_i)
    store.add_seen([("élève", "b", TS)])
    assert items_of(http_get(server, "/recommend?user=%C3%A9l%C3%A8ve")[2]) == ["c"]


def test_head_is_get_without_body(server: RecommendServer, store: FactorStore) -> None:
    tiny_model(store)
    for path in ("/recommend?user=u1&k=2", "/healthz", "/metrics", "/recommend?user=u1&k=0", "/nope"):
        code, headers, body = http_get(server, path)
        hcode, hheaders, rest = http_head(server, path)
        assert (hcode, rest) == (code, b""), path
        assert hheaders["Content-Type"] == headers["Content-Type"], path
        if path != "/metrics":  # the metrics body changes with every request
            assert int(hheaders["Content-Length"]) == len(body) > 0, path
    text = http_get(server, "/metrics")[2].decode()
    assert 'zerocf_serve_requests_total{path="/recommend",status="200"} 2.0' in text  # HEADs are counted too


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
    tiny_model(store)
    code, headers, body = http_get(server, "/recommend?" + query)
    assert code == 400 and headers["Content-Type"] == "application/json"
    assert fragment in json.loads(body)["error"]


def test_paths_methods_and_health(server: RecommendServer, store: FactorStore) -> None:
    code, _, body = http_get(server, "/healthz")
    assert code == 503 and json.loads(body)["ok"] is False and "no model" in json.loads(body)["error"]
    code, _, body = http_get(server, "/recommend?user=u1")
    assert code == 503 and "zerocf als --once" in json.loads(body)["error"]
    tiny_model(store)
    code, _, body = http_get(server, "/healthz")
    assert code == 200 and json.loads(body)["ok"] is True and json.loads(body)["live_generation"] == 1
    code, _, body = http_get(server, "/nope")
    assert code == 404 and "use /recommend" in json.loads(body)["error"]
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        code, headers, body = http_get(server, "/recommend?user=u1", method=method)
        assert code == 405 and headers["Allow"] == "GET, HEAD", method
        assert f"method {method} not allowed; use GET" in json.loads(body)["error"]
    assert http_get(server, "/recommend?user=ghost")[0] == 200
    code, headers, body = http_get(server, "/metrics")
    text = body.decode()
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'zerocf_serve_requests_total{path="/recommend",status="200"} 1.0' in text
    assert 'zerocf_serve_requests_total{path="/recommend",status="503"} 1.0' in text
    assert 'zerocf_serve_requests_total{path="other",status="404"} 1.0' in text
    assert 'zerocf_serve_requests_total{path="/recommend",status="405"} 5.0' in text
    assert "zerocf_serve_fallbacks_total 1.0" in text
    assert 'zerocf_serve_request_seconds_bucket{le="0.005",path="/recommend"}' in text
    assert "zerocf_serve_cache_refreshes " in text


def test_internal_error_is_500_json_without_trace(
    server: RecommendServer, store: FactorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_model(store)

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.recommender, "recommend", boom)
    code, _, body = http_get(server, "/recommend?user=u1")
    assert code == 500 and json.loads(body) == {"error": "internal error; see the server log"}


def test_serve_command_refreshes_and_stops_on_sigterm(zerocf_env: dict[str, str], store: FactorStore) -> None:
    tiny_model(store)
    port = free_port()
    env = {**zerocf_env, "ZEROCF_SERVE_HOST": "127.0.0.1", "ZEROCF_SERVE_PORT": str(port)}
    env["ZEROCF_SERVE_ITEM_REFRESH_S"] = "0.2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def answer() -> dict[str, Any] | None:
        try:
            code, _, body = http_get(port, "/recommend?user=u1&k=2")
        except OSError:
            return None
        return json.loads(body) if code == 200 else None

    try:
        wait_until("serve answers", lambda: answer() is not None, 60, proc)
        doc = answer()
        assert doc is not None and (doc["generation"], [e["item"] for e in doc["items"]]) == (1, ["b", "a"])
        code, _, body = http_get(port, "/similar?item=a&k=2")  # the command serves /similar and its API document
        assert code == 200 and items_of(body) == ["b", "c"] and json.loads(body)["fallback"] is False
        code, _, body = http_get(port, "/openapi.json")
        assert code == 200 and "/similar" in json.loads(body)["paths"]
        g = store.begin_generation("als")
        store.write_vectors(g, "user", ["u1"], np.array([[1, 1, 0]], dtype=np.float32))
        store.write_vectors(g, "item", ["n0", "n1"], np.array([[1, 0, 0], [0, 1, 0.5]], dtype=np.float32))
        store.publish_generation(g, {}, {}, bias=0.25, n_users=1, n_items=2)
        # the main loop (not the request path) reloads the item matrix of the new generation
        wait_until("serve picks up the new generation", lambda: (answer() or {}).get("generation") == g, 30, proc)
        doc = answer()
        assert doc is not None and [e["item"] for e in doc["items"]] == ["n1", "n0"]
        assert items_of(http_get(port, "/similar?item=n0")[2]) == ["n1"]  # the new generation's unit matrix
        np.testing.assert_allclose([e["score"] for e in doc["items"]], sig([0.25 + 1.5, 0.25 + 1]), rtol=1e-6)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "finishing in-flight requests" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
