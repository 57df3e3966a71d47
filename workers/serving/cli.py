"""``zerocf recommend``: top-k recommendations for users, from the command line.

``zerocf recommend USER... [-k 10] [--users-file FILE] [--json] [--include-seen]``

With ``--json`` stdout is exactly one JSON object, a contract other tools rely on::

    {"<user_id>": [{"item": "<item_id>", "score": <P(click)>}, ...], ...}

one key per requested user in request order (duplicates collapse). Without ``--json`` a readable table,
fallback (popularity) users marked. Exit 2 with an instructive message when Redis holds no model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import redis

from stream.config import KAFKA_FIELDS, TOP_LEVEL, add_flags, flag_overrides, load, redact_url
from stream.errors import ConfigError, ServiceUnavailable
from workers.config import ServeConfig
from workers.serving.lookup import NoModel, Recommendation, Recommender
from workers.store import FactorStore

log = logging.getLogger(__name__)

__all__ = ["format_json", "format_table", "read_users", "register", "run"]


def read_users(users: Iterable[str], users_file: str | None, stdin: TextIO | None = None) -> list[str]:
    """Users from the arguments then from ``users_file`` (one per line, blank lines skipped, ``-`` = stdin).

    >>> read_users(["u1", "u2", "u1"], None)
    ['u1', 'u2']
    """
    out = [str(u) for u in users]
    if users_file:
        try:
            fh = (stdin or sys.stdin) if users_file == "-" else Path(users_file).open(encoding="utf-8")
            with fh:
                out += [line.strip() for line in fh if line.strip()]
        except OSError as exc:
            raise ConfigError(
                f"--users-file {users_file}: {exc.strerror}; pass a readable file of user ids, one per line"
            ) from None
    if not out:
        raise ConfigError("no users given; pass user ids as arguments or --users-file FILE")
    return list(dict.fromkeys(out))


def format_json(recs: Mapping[str, Recommendation]) -> str:
    """The ``--json`` contract: ``{user: [{"item": id, "score": s}, ...]}``.

    >>> format_json({"u1": Recommendation("u1", ["i7"], [0.5], False, 1)})
    '{"u1": [{"item": "i7", "score": 0.5}]}'
    """
    return json.dumps(
        {u: [{"item": i, "score": s} for i, s in zip(r.items, r.scores)] for u, r in recs.items()}, ensure_ascii=False
    )


def format_table(recs: Mapping[str, Recommendation]) -> str:
    """A readable table: one block per user, fallback users marked.

    >>> print(format_table({"u1": Recommendation("u1", ["i7"], [0.5], True, 3)}))
    user u1  (fallback: most clicked items, generation 3)
       1  i7                                0.5000
    """
    lines = []
    for u, r in recs.items():
        how = "fallback: most clicked items" if r.fallback else "model"
        lines.append(f"user {u}  ({how}, generation {r.generation})")
        lines += [f"  {n:2d}  {i:<32s}  {s:.4f}" for n, (i, s) in enumerate(zip(r.items, r.scores), 1)]
        if not r.items:
            lines.append("      (no items)")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    """Add ``zerocf recommend``."""
    p = subparsers.add_parser("recommend", help="top-k recommendations for users (table or --json)")
    p.add_argument("users", nargs="*", metavar="USER", help="user ids")
    p.add_argument("-k", type=int, default=10, help="items per user (default 10, at most ZEROCF_SERVE_MAX_K)")
    p.add_argument("--users-file", default=None, help="file of user ids, one per line ('-' = stdin)")
    p.add_argument("--json", action="store_true", help='print one JSON object {user: [{"item", "score"}]}')
    p.add_argument("--include-seen", action="store_true", help="do not exclude the users' recent clicks")
    add_flags(p, ServeConfig, skip=TOP_LEVEL + KAFKA_FIELDS + ("host", "port", "metrics_port", "metrics_host"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print recommendations; 0 on success, 2 (via :class:`NoModel`/:class:`ConfigError`) otherwise."""
    cfg = load(ServeConfig, args.env, flag_overrides(args, ServeConfig))
    if not 1 <= args.k <= cfg.max_k:
        raise ConfigError(f"-k {args.k} must be in 1..{cfg.max_k} (ZEROCF_SERVE_MAX_K)")
    users = read_users(args.users, args.users_file)
    store = FactorStore.connect(cfg.redis_url, cfg.topic_prefix)
    where = f"namespace {cfg.topic_prefix} at {redact_url(cfg.redis_url)}"
    try:
        recs = Recommender(store, cfg.item_refresh_s).recommend_many(users, args.k, not args.include_seen)
    except NoModel as exc:
        if type(exc) is not NoModel:  # an empty or lost model: its own message says what to do
            raise type(exc)(f"{exc} ({where})") from None
        raise NoModel(f"no model in Redis {where}; run `zerocf lmf` or `zerocf als --once` first") from None
    except redis.RedisError as exc:
        raise ServiceUnavailable(
            f"Redis {where} did not answer ({type(exc).__name__}); start it (`zerocf stack up`) or fix ZEROCF_REDIS_URL"
        ) from None
    n_fb = sum(r.fallback for r in recs.values())
    log.info("recommended for %d users (%d fallback) %s", len(recs), n_fb, where)
    sys.stdout.write((format_json(recs) if args.json else format_table(recs)) + "\n")
    return 0
