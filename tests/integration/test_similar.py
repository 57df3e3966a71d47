"""Similar items on the real Redis: ``Recommender.similar`` through a real publish, ``GET /similar`` (contract,
fallback, validation, 503 reasons, stale answers, HEAD, metrics) and ``zerocf similar`` (the JSON contract
of ``zerocf recommend --json``, the table, exit 2 without a model)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import http_get, http_head, serving_in_thread
from workers.serving.lookup import Recommender
from workers.serving.server import RecommendServer, make_server
from workers.serving.settings import ServeSettings
from workers.store import GLOBAL_ROW, FactorStore

MAX_K = 20
B = 0.3
TS = 1_700_000_000_000
# latent (2) then bias; from "a" the cosines are: b .7071, c 0, d -1 (flat has no direction: 0)
ROWS = {"a": [1, 0, 0.5], "b": [1, 1, -0.5], "c": [0, 1, 2.0], "d": [-1, 0, 0], "flat": [0, 0, 1.0]}
R2 = float(np.sqrt(0.5))


def build(store: FactorStore) -> None:
    store.ensure_model(2)
    store.write_vectors(1, "item", list(ROWS), np.array(list(ROWS.values()), dtype=np.float32))
    store.write_vectors(1, "item", [GLOBAL_ROW], np.array([[0, 0, B]], dtype=np.float32))
    store.write_vectors(1, "user", ["u1"], np.array([[1, 0, 0]], dtype=np.float32))
    store.write_popularity(1, {"c": 3.0, "a": 2.0, "d": 1.0}, ref_ms=TS)


def sig(x: list[float]) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


@pytest.fixture()
def store(redis_url: str, topic_prefix: str) -> FactorStore:
    return FactorStore.from_url(redis_url, topic_prefix)


@contextmanager
def serving(store: FactorStore, settings: ServeSettings | None = None) -> Iterator[RecommendServer]:
    with serving_in_thread(
        make_server(Recommender(store, refresh_s=0.0), "127.0.0.1", 0, max_k=MAX_K, settings=settings)
    ) as srv:
        yield srv


@pytest.fixture()
def server(store: FactorStore) -> Iterator[RecommendServer]:
    with serving(store) as srv:
        yield srv


def doc_of(srv: RecommendServer, path: str) -> tuple[int, dict]:
    code, headers, body = http_get(srv, path)
    assert headers["Content-Type"] == "application/json", path
    return code, json.loads(body)


def test_similar_through_a_real_publish(store: FactorStore) -> None:
    build(store)
    rec = Recommender(store, refresh_s=0.0)
    r = rec.similar("a", k=3)
    assert (r.items, r.fallback, r.generation) == (["b", "c", "flat"], False, 1)
    np.testing.assert_allclose(r.scores, [R2, 0.0, 0.0], atol=1e-6)
    g = store.begin_generation("als")  # the next generation turns b around: the unit matrix is rebuilt
    store.write_vectors(g, "item", ["a", "b", "c"], np.array([[1, 0, 0], [-1, -1, 0], [1, 0.1, 0]], np.float32))
    store.publish_generation(g, {}, {}, bias=0.0, n_users=0, n_items=3)
    r = rec.similar("a", k=3)
    assert (r.items, r.generation) == (["c", "b"], g)
    np.testing.assert_allclose(r.scores, [1 / np.sqrt(1.01), -R2], rtol=1e-5)


def test_similar_contract_and_fallback(server: RecommendServer, store: FactorStore) -> None:
    build(store)
    code, doc = doc_of(server, "/similar?item=a&k=2")
    assert code == 200 and list(doc) == ["item", "items", "fallback", "generation", "stale"]
    assert (doc["item"], doc["fallback"], doc["generation"], doc["stale"]) == ("a", False, 1, False)
    assert [e["item"] for e in doc["items"]] == ["b", "c"] and all(set(e) == {"item", "score"} for e in doc["items"])
    np.testing.assert_allclose([e["score"] for e in doc["items"]], [R2, 0.0], atol=1e-6)
    code, every = doc_of(server, f"/similar?item=d&k={MAX_K}")
    assert code == 200 and "d" not in [e["item"] for e in every["items"]] and len(every["items"]) == 4
    for item, name in (("%C3%A9t%C3%A9", "été"), ("flat", "flat")):  # unknown; a vector without direction
        code, fb = doc_of(server, f"/similar?item={item}&k=2")
        assert code == 200 and (fb["item"], fb["fallback"]) == (name, True)
        assert [e["item"] for e in fb["items"]] == ["c", "a"]
        np.testing.assert_allclose([e["score"] for e in fb["items"]], sig([B + 2.0, B + 0.5]), rtol=1e-6)
    code, own = doc_of(server, "/similar?item=c&k=1")  # c is the most popular item and has a vector
    assert [e["item"] for e in own["items"]] == ["b"] and own["fallback"] is False
    code, ghost = doc_of(server, "/recommend?user=ghost&k=2")  # the same cold start as recommend's
    assert ghost["items"] == fb["items"] and ghost["fallback"] is True


@pytest.mark.parametrize(
    "query, fragment",
    [
        ("item=a&k=0", f"k='0' must be an integer in 1..{MAX_K}"),
        (f"item=a&k={MAX_K + 1}", f"k='{MAX_K + 1}' must be an integer in 1..{MAX_K}"),
        ("item=a&k=2.5", "must be an integer"),
        ("k=5", "missing parameter item; call /similar?item=<id>&k=10"),
        ("item=", "item must be 1..256 bytes"),
        ("item=" + "x" * 257, "got 257"),
        ("item=a%0Ab", "control characters"),
        ("item=%FF", "not valid percent-encoded UTF-8"),
        ("item=a&item=b", "given twice"),
        ("item=a&user=u1", "unknown parameter 'user'; use item and k"),
        ("item=a&exclude_seen=1", "unknown parameter 'exclude_seen'"),
    ],
)
def test_similar_validation(server: RecommendServer, store: FactorStore, query: str, fragment: str) -> None:
    build(store)
    code, doc = doc_of(server, "/similar?" + query)
    assert code == 400 and set(doc) == {"error"} and fragment in doc["error"]


def test_missing_empty_and_lost_models_are_503_with_a_reason(server: RecommendServer, store: FactorStore) -> None:
    code, doc = doc_of(server, "/similar?item=a")
    assert (code, doc["reason"]) == (503, "no_model") and "zerocf als --once" in doc["error"]
    store.ensure_model(2)
    store.write_vectors(1, "item", [GLOBAL_ROW], np.array([[0, 0, B]], dtype=np.float32))
    code, doc = doc_of(server, "/similar?item=a")
    assert (code, doc["reason"]) == (503, "empty_model") and "has no items yet" in doc["error"]
    build(store)
    assert doc_of(server, "/similar?item=a")[0] == 200
    store.r.flushdb()  # an empty restart: the cache still holds generation 1, yet it is not served
    for item in ("a", "ghost"):
        code, doc = doc_of(server, f"/similar?item={item}")
        assert (code, doc["reason"]) == (503, "store_lost") and set(doc) == {"error", "reason"}


def test_stale_similar_within_stale_s(store: FactorStore) -> None:
    build(store)
    with serving(store, ServeSettings(stale_s=3600.0)) as srv:
        fresh = doc_of(srv, "/similar?item=a&k=2")[1]
        store.r.flushdb()
        code, doc = doc_of(srv, "/similar?item=a&k=2")
        assert code == 200 and (doc["stale"], doc["fallback"], doc["reason"]) == (True, False, "store_lost")
        assert doc["items"] == fresh["items"]
        code, doc = doc_of(srv, "/similar?item=ghost&k=2")
        assert code == 200 and (doc["stale"], doc["fallback"]) == (True, True)
        assert [e["item"] for e in doc["items"]] == ["c", "a"]
        text = http_get(srv, "/metrics")[2].decode()
        assert "zerocf_serve_stale_total 2.0" in text


def test_head_and_metrics(server: RecommendServer, store: FactorStore) -> None:
    build(store)
    for path in ("/similar?item=a&k=2", "/similar?item=ghost", "/similar?k=0", "/openapi.json"):
        code, headers, body = http_get(server, path)
        hcode, hheaders, rest = http_head(server, path)
        assert (hcode, rest) == (code, b""), path
        assert hheaders["Content-Type"] == headers["Content-Type"], path
        assert int(hheaders["Content-Length"]) == len(body) > 0, path
    for method in ("POST", "DELETE"):
        code, headers, _ = http_get(server, "/similar?item=a", method=method)
        assert code == 405 and headers["Allow"] == "GET, HEAD"
    text = http_get(server, "/metrics")[2].decode()
    assert 'zerocf_serve_requests_total{path="/similar",status="200"} 4.0' in text  # 2 GETs + 2 HEADs
    assert 'zerocf_serve_requests_total{path="/similar",status="400"} 2.0' in text
    assert 'zerocf_serve_requests_total{path="/similar",status="405"} 2.0' in text
    assert "zerocf_serve_similar_fallbacks_total 2.0" in text
    assert "zerocf_serve_fallbacks_total 0.0" in text  # recommend's fallbacks are counted apart
    assert 'zerocf_serve_request_seconds_count{path="/similar"} 8.0' in text


def _cli(env: dict[str, str], command: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", command, *argv], env=env, capture_output=True, text=True, timeout=60
    )


def shape(doc: dict) -> list[tuple[str, ...]]:
    """The structure of a ``--json`` answer, ids and numbers left out."""
    assert isinstance(doc, dict)
    return [tuple(sorted(e)) + tuple(type(v).__name__ for _, v in sorted(e.items())) for v in doc.values() for e in v]


def test_cli_json_is_recommends_contract(store: FactorStore, zerocf_env: dict[str, str], tmp_path: Path) -> None:
    build(store)
    items = tmp_path / "items.txt"
    items.write_text("ghost\n\nb\na\n")
    out = _cli(zerocf_env, "similar", "a", "-k", "2", "--items-file", str(items), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert list(doc) == ["a", "ghost", "b"]  # request order, duplicates collapse
    assert [e["item"] for e in doc["a"]] == ["b", "c"] and [e["item"] for e in doc["ghost"]] == ["c", "a"]
    assert [e["item"] for e in doc["b"]] == ["a", "c"]
    np.testing.assert_allclose([e["score"] for e in doc["b"]], [R2, R2], rtol=1e-6)
    assert "items without a vector, answered with popular items: ghost" in out.stderr
    rec = _cli(zerocf_env, "recommend", "u1", "ghost", "-k", "2", "--json")
    assert rec.returncode == 0, rec.stderr
    assert set(shape(json.loads(rec.stdout))) == set(shape(doc)) == {("item", "score", "str", "float")}
    table = _cli(zerocf_env, "similar", "a", "ghost", "-k", "1")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "item a  (model, generation 1)" and lines[1].split()[:2] == ["1", "b"]
    assert lines[2] == "item ghost  (fallback: most clicked items, generation 1)"


def test_cli_errors_exit_2(zerocf_env: dict[str, str], topic_prefix: str, store: FactorStore) -> None:
    out = _cli(zerocf_env, "similar", "a", "--json")
    assert out.returncode == 2 and out.stdout == ""
    assert f"no model in Redis namespace {topic_prefix} at redis://" in out.stderr
    build(store)
    out = _cli(zerocf_env, "similar", "--json")
    assert out.returncode == 2 and "no items given; pass item ids as arguments or --items-file FILE" in out.stderr
    out = _cli(zerocf_env, "similar", "a", "-k", "0")
    assert out.returncode == 2 and "-k 0 must be in 1.." in out.stderr
