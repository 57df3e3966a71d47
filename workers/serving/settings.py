"""Settings of ``zerocf serve`` alone: how long a request may wait for Redis and what a client may hold.

They sit beside the server, not in :class:`workers.config.ServeConfig` (shared with ``zerocf recommend``),
and are loaded with the same :func:`stream.config.load`; their flags are on ``zerocf serve``. The
environment variables are accepted once ``workers.cli.CONFIG_CLASSES`` lists
``workers.serving.settings:ServeSettings``.

>>> from stream.config import load
>>> s = load(ServeSettings, {"ZEROCF_SERVE_REDIS_TIMEOUT_S": "0.5"})
>>> s.redis_timeout_s, s.max_connections, s.request_timeout_s, s.ann_min_items
(0.5, 256, 10.0, 200000)
>>> load(ServeSettings, {"ZEROCF_SERVE_REDIS_TIMEOUT_S": "0"})
Traceback (most recent call last):
...
stream.errors.ConfigError: ZEROCF_SERVE_REDIS_TIMEOUT_S=0.0 must be in [0.001, 60]
"""

from __future__ import annotations

from dataclasses import dataclass

from stream.config import check_ranges, setting

__all__ = ["ServeSettings"]


@dataclass(frozen=True)
class ServeSettings:
    """Bounds of ``zerocf serve`` (see :mod:`workers.serving.server`)."""

    redis_timeout_s: float = setting(
        0.25,
        "SERVE_REDIS_TIMEOUT_S",
        "longest a request waits for one Redis reply (connect included, no retries); then it answers 503",
        unit="s",
    )
    max_connections: int = setting(
        256, "SERVE_MAX_CONNECTIONS", "connections served at once (a thread each); one more gets 503 and is closed"
    )
    request_timeout_s: float = setting(
        10.0,
        "SERVE_REQUEST_TIMEOUT_S",
        "time a client has to send a whole request line and headers, from connecting or its previous "
        "response (also the keep-alive idle limit)",
        unit="s",
    )
    compute_slots: int = setting(
        0,
        "SERVE_COMPUTE_SLOTS",
        "lookups computed at once, the others queue first come first served (0 = one per usable CPU)",
    )
    stale_s: float = setting(
        0.0,
        "SERVE_STALE_S",
        "when Redis does not answer or lost the model, answer from the last good item cache for up to this "
        'long: popular items, seen items not excluded, flagged "stale" (0 = answer 503)',
        unit="s",
    )

    catalog: bool = setting(
        True,
        "SERVE_CATALOG",
        "follow the catalogue topic <prefix>.items (hidden/expired items, categories; Kafka settings from "
        "ZEROCF_KAFKA_*); without a reachable broker serve still serves, hiding nothing",
    )

    ann_min_items: int = setting(
        200_000,
        "SERVE_ANN_MIN_ITEMS",
        "catalogue size from which /recommend re-scores the candidates of an approximate index (faiss "
        "IVF-Flat, built per generation, new items added as they load) instead of scanning every item; "
        "0 = always exact",
    )

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "ann_min_items": (0, 10**12),
                "redis_timeout_s": (0.001, 60),
                "max_connections": (1, 100_000),
                "request_timeout_s": (0.1, 3600),
                "compute_slots": (0, 1024),
                "stale_s": (0, 86400 * 7),
            },
        )
