"""``zerocf recommend`` and ``zerocf similar``: top-k lookups from the command line.

``zerocf recommend USER... [-k 10] [--users-file FILE] [--json] [--include-seen]``
``zerocf similar ITEM... [-k 10] [--items-file FILE] [--json]``

With ``--json`` stdout is exactly one JSON object, a contract other tools rely on, the same for both::

    {"<user_id or item_id>": [{"item": "<item_id>", "score": <score>}, ...], ...}

one key per requested id in request order (duplicates collapse). The score is P(click) for ``recommend``
and the cosine of the latent vectors (in [-1, 1]) for ``similar``; popularity fallbacks (a user or item
without a vector) score ``sigmoid(b + b_i)``. The JSON carries no flags (the contract predates them): the
table marks fallback ids, and so does the log line on stderr (``--json`` users who need the flag per id
use ``GET /recommend`` or ``GET /similar``, whose answers carry ``fallback``). Exit 2 with an instructive
message when Redis holds no model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TextIO

import redis

from stream.config import KAFKA_FIELDS, TOP_LEVEL, add_flags, flag_overrides, load, redact_url
from stream.errors import ConfigError, ServiceUnavailable
from workers.config import ServeConfig
from workers.serving.lookup import NoModel, Recommender
from workers.store import FactorStore

log = logging.getLogger(__name__)

__all__ = ["Ranked", "format_json", "format_table", "read_ids", "read_users", "register", "run", "run_similar"]


class Ranked(Protocol):
    """What the formatters read of a :class:`Recommendation` or a :class:`SimilarItems`."""

    @property
    def items(self) -> list[str]: ...
    @property
    def scores(self) -> list[float]: ...
    @property
    def fallback(self) -> bool: ...
    @property
    def generation(self) -> int: ...


def read_ids(ids: Iterable[str], ids_file: str | None, what: str = "user", stdin: TextIO | None = None) -> list[str]:
    """Ids from the arguments then from ``ids_file`` (one per line, blank lines skipped, ``-`` = stdin).

    ``what`` (``user`` or ``item``) names the ids and the ``--<what>s-file`` flag in errors.

    >>> read_ids(["i1", "i2", "i1"], None, "item")
    ['i1', 'i2']
    """
    out = [str(u) for u in ids]
    if ids_file:
        try:
            fh = (stdin or sys.stdin) if ids_file == "-" else Path(ids_file).open(encoding="utf-8")
            with fh:
                out += [line.strip() for line in fh if line.strip()]
        except OSError as exc:
            raise ConfigError(
                f"--{what}s-file {ids_file}: {exc.strerror}; pass a readable file of {what} ids, one per line"
            ) from None
    if not out:
        raise ConfigError(f"no {what}s given; pass {what} ids as arguments or --{what}s-file FILE")
    return list(dict.fromkeys(out))


def read_users(users: Iterable[str], users_file: str | None, stdin: TextIO | None = None) -> list[str]:
    """:func:`read_ids` of user ids.

    >>> read_users(["u1", "u2", "u1"], None)
    ['u1', 'u2']
    """
    return read_ids(users, users_file, "user", stdin)


def format_json(recs: Mapping[str, Ranked]) -> str:
    """The ``--json`` contract of both commands: ``{id: [{"item": id, "score": s}, ...]}``.

    >>> from workers.serving.lookup import Recommendation, SimilarItems
    >>> format_json({"u1": Recommendation("u1", ["i7"], [0.5], False, 1)})
    '{"u1": [{"item": "i7", "score": 0.5}]}'
    >>> format_json({"i7": SimilarItems("i7", ["i8"], [0.25], False, 1)})
    '{"i7": [{"item": "i8", "score": 0.25}]}'
    """
    return json.dumps(
        {u: [{"item": i, "score": s} for i, s in zip(r.items, r.scores)] for u, r in recs.items()}, ensure_ascii=False
    )


def format_table(recs: Mapping[str, Ranked], what: str = "user") -> str:
    """A readable table: one block per user (or item), fallback ones marked.

    >>> from workers.serving.lookup import Recommendation
    >>> print(format_table({"u1": Recommendation("u1", ["i7"], [0.5], True, 3)}))
    user u1  (fallback: most clicked items, generation 3)
       1  i7                                0.5000
    """
    lines = []
    for u, r in recs.items():
        how = "fallback: most clicked items" if r.fallback else "model"
        lines.append(f"{what} {u}  ({how}, generation {r.generation})")
        lines += [f"  {n:2d}  {i:<32s}  {s:.4f}" for n, (i, s) in enumerate(zip(r.items, r.scores), 1)]
        if not r.items:
            lines.append("      (no items)")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    """Add ``zerocf recommend`` and ``zerocf similar``."""
    p = subparsers.add_parser("recommend", help="top-k recommendations for users (table or --json)")
    p.add_argument("users", nargs="*", metavar="USER", help="user ids")
    p.add_argument("-k", type=int, default=10, help="items per user (default 10, at most ZEROCF_SERVE_MAX_K)")
    p.add_argument("--users-file", default=None, help="file of user ids, one per line ('-' = stdin)")
    p.add_argument("--json", action="store_true", help='print one JSON object {user: [{"item", "score"}]}')
    p.add_argument("--include-seen", action="store_true", help="do not exclude the users' recent clicks")
    _store_flags(p)
    p.set_defaults(func=run)
    s = subparsers.add_parser("similar", help="items most similar to given items (table or --json)")
    s.add_argument("items", nargs="*", metavar="ITEM", help="item ids")
    s.add_argument("-k", type=int, default=10, help="items per item (default 10, at most ZEROCF_SERVE_MAX_K)")
    s.add_argument("--items-file", default=None, help="file of item ids, one per line ('-' = stdin)")
    s.add_argument("--json", action="store_true", help='print one JSON object {item: [{"item", "score"}]}')
    _store_flags(s)
    s.set_defaults(func=run_similar)


def _store_flags(p: argparse.ArgumentParser) -> None:
    add_flags(p, ServeConfig, skip=TOP_LEVEL + KAFKA_FIELDS + ("host", "port", "metrics_port", "metrics_host"))


def run(args: argparse.Namespace) -> int:
    """Print recommendations; 0 on success, 2 (via :class:`NoModel`/:class:`ConfigError`) otherwise."""
    cfg = _config(args)
    users = read_ids(args.users, args.users_file, "user")
    recs = _lookup(cfg, lambda rec: rec.recommend_many(users, args.k, not args.include_seen))
    return _print(args.json, recs, "user", f"recommended for {len(recs)} users", cfg)


def run_similar(args: argparse.Namespace) -> int:
    """Print similar items; 0 on success, 2 (via :class:`NoModel`/:class:`ConfigError`) otherwise."""
    cfg = _config(args)
    items = read_ids(args.items, args.items_file, "item")
    found = _lookup(cfg, lambda rec: rec.similar_many(items, args.k))
    return _print(args.json, found, "item", f"similar items of {len(found)} items", cfg)


def _config(args: argparse.Namespace) -> ServeConfig:
    cfg = load(ServeConfig, args.env, flag_overrides(args, ServeConfig))
    if not 1 <= args.k <= cfg.max_k:
        raise ConfigError(f"-k {args.k} must be in 1..{cfg.max_k} (ZEROCF_SERVE_MAX_K)")
    return cfg


def _where(cfg: ServeConfig) -> str:
    return f"namespace {cfg.topic_prefix} at {redact_url(cfg.redis_url)}"


def _lookup(cfg: ServeConfig, query: Callable[[Recommender], Mapping[str, Ranked]]) -> Mapping[str, Ranked]:
    store = FactorStore.connect(cfg.redis_url, cfg.topic_prefix)
    with _store_errors(_where(cfg)):
        return query(Recommender(store, cfg.item_refresh_s))


@contextmanager
def _store_errors(where: str) -> Iterator[None]:
    """Turn a missing/empty/lost model and an unreachable Redis into errors that say what to do."""
    try:
        yield
    except NoModel as exc:
        if type(exc) is not NoModel:  # an empty or lost model: its own message says what to do
            raise type(exc)(f"{exc} ({where})") from None
        raise NoModel(f"no model in Redis {where}; run `zerocf lmf` or `zerocf als --once` first") from None
    except redis.RedisError as exc:
        raise ServiceUnavailable(
            f"Redis {where} did not answer ({type(exc).__name__}); start it (`zerocf stack up`) or fix ZEROCF_REDIS_URL"
        ) from None


def _print(as_json: bool, found: Mapping[str, Ranked], what: str, done: str, cfg: ServeConfig) -> int:
    fallback = [i for i, r in found.items() if r.fallback]
    log.info("%s (%d fallback) %s", done, len(fallback), _where(cfg))
    if fallback:
        log.info("%ss without a vector, answered with popular items: %s", what, ", ".join(fallback[:20]))
    sys.stdout.write((format_json(found) if as_json else format_table(found, what)) + "\n")
    return 0
