"""The OpenAPI 3.1 description of ``zerocf serve``, served at ``GET /openapi.json``: a hand-written dict
(no dependency), whose parameter bounds come from the constants :mod:`workers.serving.queries` validates
with, and ``max_k`` from the server's configuration.

``tests/integration/test_openapi.py`` keeps it honest: every route the server answers is described, and
requests built from the document (each bound, each enum value, a missing required parameter, an
undocumented one) get 200 or 400 exactly as it says; answers match the response schemas.

>>> doc = openapi_document(max_k=50)
>>> doc["openapi"], sorted(doc["paths"])
('3.1.0', ['/', '/api/dashboard', '/healthz', '/metrics', '/openapi.json', '/recommend', '/similar'])
>>> k = [p for p in doc["paths"]["/similar"]["get"]["parameters"] if p["name"] == "k"][0]["schema"]
>>> k["minimum"], k["maximum"], k["default"]
(1, 50, 10)
"""

from __future__ import annotations

import copy
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from workers.serving.lookup import EmptyModel, NoModel, StoreLost
from workers.serving.queries import DASHBOARD_MAX_TOP, DASHBOARD_TOP, MAX_CATEGORY_BYTES, MAX_ID_BYTES, default_k

__all__ = ["UNAVAILABLE_REASONS", "openapi_document"]

UNAVAILABLE_REASONS = (NoModel.reason, EmptyModel.reason, StoreLost.reason, "redis_timeout", "redis_unavailable")
_REF = "#/components/schemas/"
_NO_CONTROLS = "^[^\\x00-\\x1f\\x7f-\\x9f]+$"  # no character of Unicode category Cc
_NO_COMMA = "^[^\\x00-\\x1f\\x7f-\\x9f,]+$"  # ... and no comma (a category name)


def _package_version() -> str:
    try:
        return version("zerocf")
    except PackageNotFoundError:
        return "0+unknown"


def _id_param(name: str, what: str, example: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": True,
        "description": f"{what} id: 1..{MAX_ID_BYTES} bytes of UTF-8 (maxLength counts characters, so it holds "
        "for ASCII ids; longer UTF-8 encodings reach the byte limit sooner), no control characters",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_BYTES, "pattern": _NO_CONTROLS},
        "example": example,
    }


def _category_param() -> dict[str, Any]:
    return {
        "name": "category",
        "in": "query",
        "required": False,
        "description": "only items whose catalogue state (<prefix>.items) lists this category: "
        f"1..{MAX_CATEGORY_BYTES} "
        "bytes of UTF-8, no control characters, no comma. A category no item has gives an empty `items` list "
        "(200), not an error; so does any category while the catalogue is off (see /healthz `catalog`)",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_CATEGORY_BYTES, "pattern": _NO_COMMA},
        "example": "books",
    }


def _k_param(max_k: int) -> dict[str, Any]:
    return {
        "name": "k",
        "in": "query",
        "required": False,
        "description": "how many items to return (fewer when the model has fewer candidates)",
        "schema": {"type": "integer", "minimum": 1, "maximum": max_k, "default": default_k(max_k)},
        "example": min(5, max_k),
    }


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": _REF + schema}}}}


def _lookup_responses(schema: str) -> dict[str, Any]:
    return {
        "200": _json(schema, "the answer; with `stale` true it came from the item cache alone (`reason` says why)"),
        "400": _json("Error", "a parameter is invalid; `error` names it and what is accepted"),
        "503": _json("Unavailable", "no answer can come from Redis: no, an empty or a lost model, or Redis away"),
        "500": _json("Error", "an internal error (the trace is in the server log)"),
    }


def _schemas() -> dict[str, Any]:
    scored = {
        "type": "object",
        "required": ["item", "score"],
        "additionalProperties": False,
        "properties": {"item": {"type": "string"}, "score": {"type": "number"}},
    }

    def answer(key: str, score: str) -> dict[str, Any]:
        return {
            "type": "object",
            "required": [key, "items", "fallback", "generation", "stale"],
            "additionalProperties": False,
            "properties": {
                key: {"type": "string", "description": f"the requested {key} id"},
                "items": {"type": "array", "items": {"$ref": _REF + "ScoredItem"}, "description": score},
                "fallback": {
                    "type": "boolean",
                    "description": f"true when the {key} has no vector: the generation's most popular items, "
                    "scored sigmoid(b + b_i)",
                },
                "generation": {"type": "integer", "minimum": 1, "description": "the generation that answered"},
                "stale": {"type": "boolean", "description": "true when answered from the item cache alone"},
                "reason": {"enum": list(UNAVAILABLE_REASONS), "description": "why a stale answer is stale"},
            },
        }

    def error(**extra: Any) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["error", *extra],
            "additionalProperties": False,
            "properties": {"error": {"type": "string"}, **extra},
        }

    health = {
        "type": "object",
        "required": ["ok"],
        "properties": {
            "ok": {"type": "boolean"},
            "live_generation": {"type": "integer"},
            "cached_generation": {"type": ["integer", "null"]},
            "cached_items": {"type": "integer"},
            "reason": {"enum": list(UNAVAILABLE_REASONS)},
            "error": {"type": "string"},
            "catalog": {
                "type": "object",
                "required": ["state"],
                "description": "the catalogue follower (never makes /healthz fail): state off, starting, "
                "unavailable (no broker: nothing hidden), waiting_for_topic, loading, following or stopped; "
                "its items with state, items hidden now, categories, records applied, bad records skipped",
                "properties": {
                    "state": {
                        "enum": [
                            "off",
                            "starting",
                            "unavailable",
                            "waiting_for_topic",
                            "loading",
                            "following",
                            "stopped",
                        ]
                    },
                    "topic": {"type": "string"},
                    "loaded": {"type": "boolean"},
                    "items": {"type": "integer"},
                    "hidden_now": {"type": "integer"},
                    "categories": {"type": "integer"},
                    "records": {"type": "integer"},
                    "bad_records": {"type": "integer"},
                    "last_bad_record": {"type": "string"},
                    "error": {"type": "string"},
                },
            },
        },
    }
    return {
        "ScoredItem": scored,
        "Dashboard": _dashboard_schema(),
        "Recommendation": answer("user", "best first; score = P(click)"),
        "SimilarItems": answer("item", "best first, the item itself excluded; score = cosine in [-1, 1]"),
        "Error": error(),
        "Unavailable": error(reason={"enum": list(UNAVAILABLE_REASONS)}),
        "Health": health,
    }


def _obj(props: dict[str, Any], description: str = "") -> dict[str, Any]:
    """An object with exactly these properties, all required."""
    out = {"type": "object", "required": list(props), "additionalProperties": False, "properties": props}
    return {**out, "description": description} if description else out


def _dashboard_schema() -> dict[str, Any]:
    num, integer, text = {"type": "number"}, {"type": "integer"}, {"type": "string"}
    maybe_num, flag = {"type": ["number", "null"]}, {"type": "boolean"}
    scored = {"type": "array", "items": {"$ref": _REF + "ScoredItem"}}
    generation = _obj(
        {
            "generation": integer,
            "state": {"enum": ["building", "complete", "retired"]},
            "source": text,
            "live": flag,
            "created_at": num,
            "published_at": maybe_num,
            "retired_at": maybe_num,
            "n_users": integer,
            "n_items": integer,
            "scale": num,
            "bias": num,
        },
        "times in epoch seconds; scale and bias: the calibration the generation was published with",
    )
    applied = _obj(
        {
            "generation": integer,
            "partitions": {"type": "array", "items": _obj({"partition": integer, "offset": integer})},
            "total": {"type": "integer", "description": "sum over partitions of (last applied offset + 1)"},
            "rate_per_s": {
                "type": ["number", "null"],
                "description": "applied-offsets rate: change of `total` per second between the last two samples "
                "(taken when the dashboard is read, at least 1 s apart; null before two)",
            },
            "history": {"type": "array", "items": _obj({"t": num, "total": integer})},
            "note": text,
        },
        "the live generation's offset fence of <p>.events, as the LMF workers applied it (no Kafka lag: serve "
        "has no Kafka connection)",
    )
    request = _obj(
        {"path": text, "requests": integer, "errors": integer, "mean_ms": maybe_num, "p95_ms_at_most": maybe_num}
    )
    hr = {"type": ["number", "null"], "description": "HR@k (expected, random tie-break); null without clicks"}
    quality = _obj(
        {
            "k": integer,
            "window_s": num,
            "span_s": {"type": "number", "description": "the rolling figures cover the last span_s seconds"},
            "clicks": {"type": "integer", "description": "clicks ranked within span_s, every worker"},
            "model_hr": {
                **hr,
                "description": "HR@k of what is served: the model, or the decayed-popularity "
                "fallback for a user without a vector; null without clicks",
            },
            "popularity_hr": {**hr, "description": "HR@k of all-time click counts; null without clicks"},
            "decayed_hr": {**hr, "description": "HR@k of the decayed popularity; null without clicks"},
            "cold": {"type": ["number", "null"], "description": "share of those clicks whose user had no vector"},
            "windows": {
                "type": "array",
                "items": _obj({"t": num, "clicks": integer, "model_hr": hr, "popularity_hr": hr, "decayed_hr": hr}),
                "description": "per time window of window_s seconds (t: its start, epoch s), oldest first",
            },
            "workers": {
                "type": "array",
                "items": _obj(
                    {
                        "worker": text,
                        "generation": integer,
                        "every": integer,
                        "published_at": num,
                        "ranked": integer,
                        "clicks": integer,
                        "events_per_s": {
                            "type": ["number", "null"],
                            "description": "events applied per second between its last two publishes",
                        },
                        "lag": {
                            "type": ["integer", "null"],
                            "description": "records behind on its partitions at its last batch",
                        },
                        "loss": {
                            "type": ["number", "null"],
                            "description": "its training loss (EWMA of the batches' mean log-loss per click)",
                        },
                    }
                ),
                "description": "LMF workers whose figures have not expired (every: it ranks every n-th click)",
            },
            "note": text,
        },
        "live prequential quality of the LMF workers (ZEROCF_LMF_QUALITY_EVERY): each ranked click is scored right "
        "before it is learned; no worker listed = quality off",
    )
    return _obj(
        {
            "namespace": text,
            "now": num,
            "model": _obj({"k": integer, "live_generation": integer, "model_id": text, "updated_at": num}),
            "serving": _obj(
                {
                    "cached_generation": {"type": ["integer", "null"]},
                    "cached_items": integer,
                    "cache_refreshes": integer,
                    "max_k": integer,
                }
            ),
            "generations": {"type": "array", "items": generation},
            "applied": applied,
            "requests": {"type": "array", "items": request, "description": "serve's own requests by path"},
            "top_clicked": {**scored, "description": "most clicked items of the live generation (all-time counts)"},
            "trending": {**scored, "description": "highest decayed popularity, relative to popularity.ref_ms"},
            "popularity": _obj({"ref_ms": integer, "half_life_ms": integer}),
            "quality": quality,
        },
        "what serve knows: generations Redis still holds, the applied offsets, its own requests, top items",
    )


def _paths(max_k: int) -> dict[str, Any]:
    return {
        "/": {
            "get": {
                "operationId": "dashboard_page",
                "summary": "the dashboard page (HTML, no external resources); its data is /api/dashboard",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {}}}}},
            }
        },
        "/api/dashboard": {
            "get": {
                "operationId": "dashboard",
                "summary": "the dashboard's data: generations, applied offsets and their rate, requests, top items",
                "parameters": [
                    {
                        "name": "top",
                        "in": "query",
                        "required": False,
                        "description": "how many items in the most-clicked and trending lists",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": DASHBOARD_MAX_TOP,
                            "default": DASHBOARD_TOP,
                        },
                        "example": 5,
                    }
                ],
                "responses": {
                    "200": _json("Dashboard", "the data"),
                    "400": _json("Error", "`top` is invalid"),
                    "503": _json("Unavailable", "no model in Redis, or Redis away"),
                    "500": _json("Error", "an internal error (the trace is in the server log)"),
                },
            }
        },
        "/recommend": {
            "get": {
                "operationId": "recommend",
                "summary": "top-k items for a user by P(click), seen, hidden and expired items excluded",
                "parameters": [
                    _id_param("user", "user", "u1"),
                    _k_param(max_k),
                    {
                        "name": "exclude_seen",
                        "in": "query",
                        "required": False,
                        "description": "1: leave out every item the user clicked (within the seen-set retention)",
                        "schema": {"type": "string", "enum": ["0", "1"], "default": "1"},
                        "example": "0",
                    },
                    _category_param(),
                ],
                "responses": _lookup_responses("Recommendation"),
            }
        },
        "/similar": {
            "get": {
                "operationId": "similar",
                "summary": "the items most similar to an item (cosine of latent vectors), the item, hidden and "
                "expired items excluded",
                "parameters": [_id_param("item", "item", "i1"), _k_param(max_k), _category_param()],
                "responses": _lookup_responses("SimilarItems"),
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "ready when Redis answers and holds the model being served",
                "responses": {"200": _json("Health", "ready"), "503": _json("Health", "not ready; `reason` says why")},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics: requests, latency, cache refreshes, fallbacks, stale answers",
                "responses": {
                    "200": {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {}}}}
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "this document",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {}}}}},
            }
        },
    }


def openapi_document(max_k: int) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a server whose ``k`` goes up to ``max_k``.

    Every path answers HEAD like GET without a body (described as a ``head`` operation of its own);
    unknown paths are 404 and other methods 405, with a JSON ``error``.
    """
    paths = _paths(int(max_k))
    for item in paths.values():
        get = item["get"]
        item["head"] = {
            "operationId": get["operationId"] + "_head",
            "summary": "as GET, headers only",
            "parameters": copy.deepcopy(get.get("parameters", [])),
            "responses": {code: {"description": r["description"]} for code, r in get["responses"].items()},
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "zerocf serving API",
            "version": _package_version(),
            "description": "Top-k recommendations and similar items from the live generation of a zerocf "
            "model (`zerocf serve`). Every error is JSON with an `error` that says what to do; a missing, "
            "empty or lost model is a 503 with a `reason`, never an empty list.",
        },
        "paths": paths,
        "components": {"schemas": _schemas()},
    }
