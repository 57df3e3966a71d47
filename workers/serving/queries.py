"""Validation of the HTTP query strings of ``zerocf serve`` (pure): one place for the rules that
:mod:`workers.serving.openapi` documents, so the document and the checks read the same constants.

Rules: every parameter at most once, none but the documented ones; ids (``user``, ``item``) are 1..256 bytes
of UTF-8 without control characters; ``k`` is a decimal integer in ``1..max_k``, default ``min(10, max_k)``;
flags are ``0`` or ``1``; ``category`` (optional) is 1..64 bytes of UTF-8 without control characters or
commas (the catalogue's rule, :func:`stream.catalog.check_category`); a category no item has is valid and
gives an empty list. A violation raises :class:`BadRequest`, whose message names the parameter, the
value and what is accepted (the server sends it as a 400).
"""

from __future__ import annotations

import unicodedata
from urllib.parse import parse_qsl

from stream.catalog import MAX_CATEGORY_BYTES

__all__ = [
    "DEFAULT_K",
    "MAX_CATEGORY_BYTES",
    "MAX_ID_BYTES",
    "BadRequest",
    "default_k",
    "parse_dashboard_query",
    "parse_recommend_query",
    "parse_similar_query",
]

MAX_ID_BYTES = 256
DEFAULT_K = 10
RECOMMEND_PARAMS = ("user", "k", "exclude_seen", "category")
SIMILAR_PARAMS = ("item", "k", "category")
FILTER_PARAMS = ("category",)  # named apart in the "unknown parameter" message
DASHBOARD_PARAMS = ("top",)
DASHBOARD_TOP, DASHBOARD_MAX_TOP = 10, 100  # items in each list of /api/dashboard: default, most


class BadRequest(ValueError):
    """A request parameter is invalid; the message says which and what is accepted (sent as a 400)."""


def default_k(max_k: int) -> int:
    """The ``k`` of a request that gives none."""
    return min(DEFAULT_K, max_k)


def parse_recommend_query(query: str, max_k: int) -> tuple[str, int, bool, str | None]:
    """Validate the query string of ``/recommend``; return ``(user, k, exclude_seen, category)``.

    >>> parse_recommend_query("user=u%C3%A9&k=5&exclude_seen=0", 100)
    ('ué', 5, False, None)
    >>> parse_recommend_query("user=u1&category=books", 100)
    ('u1', 10, True, 'books')
    >>> parse_recommend_query("user=u1&k=0", 100)
    Traceback (most recent call last):
    ...
    workers.serving.queries.BadRequest: k='0' must be an integer in 1..100
    """
    params = _params(query, RECOMMEND_PARAMS)
    user = _id(params, "user", "/recommend?user=<id>&k=10")
    raw_ex = params.get("exclude_seen", "1")
    k = _k(params, max_k)
    if raw_ex not in ("0", "1"):
        raise BadRequest(f"exclude_seen={raw_ex[:20]!r} must be 0 or 1")
    return user, k, raw_ex == "1", _category(params)


def parse_similar_query(query: str, max_k: int) -> tuple[str, int, str | None]:
    """Validate the query string of ``/similar``; return ``(item, k, category)``.

    >>> parse_similar_query("item=i%C3%A9&k=3", 100)
    ('ié', 3, None)
    >>> parse_similar_query("k=3", 100)
    Traceback (most recent call last):
    ...
    workers.serving.queries.BadRequest: missing parameter item; call /similar?item=<id>&k=10
    """
    params = _params(query, SIMILAR_PARAMS)
    item = _id(params, "item", "/similar?item=<id>&k=10")
    return item, _k(params, max_k), _category(params)


def parse_dashboard_query(query: str) -> int:
    """Validate the query string of ``/api/dashboard``; return ``top`` (items in each list).

    >>> parse_dashboard_query(""), parse_dashboard_query("top=3")
    (10, 3)
    >>> parse_dashboard_query("top=101")
    Traceback (most recent call last):
    ...
    workers.serving.queries.BadRequest: top='101' must be an integer in 1..100
    """
    params = _params(query, DASHBOARD_PARAMS)
    raw = params.get("top", str(DASHBOARD_TOP))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9 and 1 <= int(raw) <= DASHBOARD_MAX_TOP):
        raise BadRequest(f"top={raw[:20]!r} must be an integer in 1..{DASHBOARD_MAX_TOP}")
    return int(raw)


def _params(query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("the query string is not valid percent-encoded UTF-8") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            main = [a for a in allowed if a not in FILTER_PARAMS]
            use = f"{', '.join(main[:-1])} and {main[-1]}" if len(main) > 1 else main[0]
            filters = [a for a in allowed if a in FILTER_PARAMS]
            more = f" (filter: {', '.join(filters)})" if filters else ""
            raise BadRequest(f"unknown parameter {name[:40]!r}; use {use}{more}")
        if name in params:
            raise BadRequest(f"parameter {name!r} given twice; give it once")
        params[name] = value
    return params


def _id(params: dict[str, str], name: str, example: str) -> str:
    value = params.get(name)
    if value is None:
        raise BadRequest(f"missing parameter {name}; call {example}")
    size = len(value.encode("utf-8"))
    if not 1 <= size <= MAX_ID_BYTES:
        raise BadRequest(f"{name} must be 1..{MAX_ID_BYTES} bytes of UTF-8, got {size}")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise BadRequest(f"{name} contains control characters; send the id as printable UTF-8")
    return value


def _k(params: dict[str, str], max_k: int) -> int:
    raw = params.get("k", str(default_k(max_k)))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9 and 1 <= int(raw) <= max_k):
        raise BadRequest(f"k={raw[:20]!r} must be an integer in 1..{max_k}")
    return int(raw)


def _category(params: dict[str, str]) -> str | None:
    value = params.get("category")
    if value is None:
        return None
    size = len(value.encode("utf-8"))
    if not 1 <= size <= MAX_CATEGORY_BYTES:
        raise BadRequest(f"category must be 1..{MAX_CATEGORY_BYTES} bytes of UTF-8, got {size}")
    if any(unicodedata.category(c) == "Cc" for c in value) or "," in value:
        raise BadRequest("category contains control characters or a comma; give one category name")
    return value
