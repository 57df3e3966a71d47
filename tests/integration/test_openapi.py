"""``GET /openapi.json`` against the real server and Redis: every route the server answers is described,
the documented parameters are exactly what the handlers validate (requests are built from the document:
each bound, each enum value, a missing required parameter, an undocumented one), and the answers match the
documented response schemas (checked by a small validator of the JSON Schema subset the document uses)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
import redis

from tests.helpers import http_get, http_head, serving_in_thread, tiny_model
from workers.serving.lookup import EmptyModel, NoModel, Recommender, StoreLost
from workers.serving.openapi import UNAVAILABLE_REASONS, openapi_document
from workers.serving.server import RecommendServer, make_server, unavailable_reason
from workers.store import FactorStore

MAX_K = 50


@pytest.fixture()
def store(redis_url: str, topic_prefix: str) -> FactorStore:
    return FactorStore.from_url(redis_url, topic_prefix)


@pytest.fixture()
def server(store: FactorStore) -> Iterator[RecommendServer]:
    with serving_in_thread(make_server(Recommender(store, refresh_s=0.0), "127.0.0.1", 0, max_k=MAX_K)) as srv:
        yield srv


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), ref
        node: Any = doc
        for part in ref[2:].split("/"):
            node = node[part]
        schema = node
    return schema


def conforms(doc: dict[str, Any], schema: dict[str, Any], value: Any, where: str = "$") -> None:
    """Assert that ``value`` matches ``schema`` (type, enum, bounds, required, properties, items)."""
    schema = resolve(doc, schema)
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(isinstance(value, _TYPES[t]) and not (t != "boolean" and isinstance(value, bool)) for t in names)
        assert ok, f"{where}: {value!r} is not {names}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "minimum" in schema:
        assert value >= schema["minimum"], where
    if isinstance(value, dict):
        props = schema.get("properties", {})
        missing = set(schema.get("required", ())) - set(value)
        assert not missing, f"{where}: missing {missing}"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{where}: undocumented {set(value) - set(props)}"
        for key in set(value) & set(props):
            conforms(doc, props[key], value[key], f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for n, v in enumerate(value):
            conforms(doc, schema["items"], v, f"{where}[{n}]")


def call(srv: RecommendServer, doc: dict[str, Any], path: str, params: dict[str, str]) -> tuple[int, Any]:
    """GET ``path`` with ``params``; assert the answer matches the schema documented for its status."""
    code, headers, body = http_get(srv, path + ("?" + urlencode(params) if params else ""))
    responses = doc["paths"][path]["get"]["responses"]
    assert str(code) in responses, f"{path} {params}: status {code} is not documented"
    content = responses[str(code)]["content"]
    assert headers["Content-Type"].split(";")[0] in content, f"{path}: {headers['Content-Type']}"
    if headers["Content-Type"] != "application/json":
        return code, body
    value = json.loads(body)
    conforms(doc, content["application/json"]["schema"], value, f"{path} {code}")
    return code, value


def probes(param: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(accepted, rejected)`` values of one documented parameter, from its schema alone."""
    s = param["schema"]
    good, bad = [str(param["example"])], []
    if "default" in s:
        good.append(str(s["default"]))
    if s.get("type") == "integer":
        good += [str(s["minimum"]), str(s["maximum"])]
        bad += [str(s["minimum"] - 1), str(s["maximum"] + 1), "1.5", "ten", ""]
    if "enum" in s:
        good += [str(v) for v in s["enum"]]
        bad += ["2", "true", ""]
    if s.get("type") == "string" and "maxLength" in s:
        good += ["x" * s["minLength"], "x" * s["maxLength"], "é" * (s["maxLength"] // 2)]
        bad += ["x" * (s["minLength"] - 1), "x" * (s["maxLength"] + 1), "a\x01b", "a\x85b"]
    return good, bad


def test_every_route_the_server_answers_is_documented(server: RecommendServer, store: FactorStore) -> None:
    tiny_model(store)
    code, doc = call(server, server.openapi, "/openapi.json", {})
    assert code == 200 and doc == openapi_document(MAX_K) == server.openapi
    assert doc["openapi"].startswith("3.1.") and doc["info"]["title"] and doc["info"]["version"]
    assert set(doc["paths"]) == set(server.routes)
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)) == 2 * len(server.routes)
    for path, item in doc["paths"].items():
        assert set(item) == {"get", "head"}, path  # the handler answers exactly GET and HEAD
        params = {p["name"]: str(p["example"]) for p in item["get"].get("parameters", []) if p["required"]}
        query = path + ("?" + urlencode(params) if params else "")
        code, _ = call(server, doc, path, params)
        assert code == 200, path
        hcode, _, rest = http_head(server, query)
        assert hcode == code and str(hcode) in item["head"]["responses"] and rest == b"", path
        assert item["head"]["parameters"] == item["get"].get("parameters", [])
    assert http_get(server, "/undocumented")[0] == 404


@pytest.mark.parametrize("path", ["/recommend", "/similar", "/api/dashboard"])
def test_documented_parameters_are_what_the_handler_validates(
    server: RecommendServer, store: FactorStore, path: str
) -> None:
    tiny_model(store)
    doc = server.openapi
    params = doc["paths"][path]["get"]["parameters"]
    assert all(p["in"] == "query" for p in params)
    base = {p["name"]: str(p["example"]) for p in params if p["required"]}
    assert call(server, doc, path, base)[0] == 200
    for p in params:
        good, bad = probes(p)
        assert bad, p["name"]  # every parameter has a documented constraint to probe
        for value in good:
            code, body = call(server, doc, path, {**base, p["name"]: value})
            assert code == 200, (path, p["name"], value, body)
        for value in bad:
            code, body = call(server, doc, path, {**base, p["name"]: value})
            assert code == 400 and p["name"] in body["error"], (path, p["name"], value, body)
        if p["required"]:
            code, body = call(server, doc, path, {n: v for n, v in base.items() if n != p["name"]})
            assert code == 400 and f"missing parameter {p['name']}" in body["error"]
        else:
            assert call(server, doc, path, base)[0] == 200  # optional: its absence is fine
    code, body = call(server, doc, path, {**base, "undocumented": "1"})
    assert code == 400 and "unknown parameter 'undocumented'" in body["error"]


def test_unavailable_answers_match_the_document(server: RecommendServer, store: FactorStore) -> None:
    doc = server.openapi
    for path, params in (("/recommend", {"user": "u1"}), ("/similar", {"item": "a"})):
        code, body = call(server, doc, path, params)
        assert (code, body["reason"]) == (503, "no_model")
    code, _, body = http_get(server, "/healthz")
    assert code == 503
    conforms(doc, doc["paths"]["/healthz"]["get"]["responses"]["503"]["content"]["application/json"]["schema"],
             json.loads(body))  # fmt: skip
    errors = [NoModel("x"), EmptyModel("x"), StoreLost("x"), redis.TimeoutError("x"), redis.ConnectionError("x")]
    assert sorted(unavailable_reason(e, 0.25)[0] for e in errors) == sorted(UNAVAILABLE_REASONS)
