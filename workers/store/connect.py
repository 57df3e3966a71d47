"""Redis connections of the factor store: one Redis server or a Redis Cluster, chosen by ``ZEROCF_REDIS_URL``.

URL forms
---------
``redis://[[user]:password@]host:port[/0]`` and ``rediss://...`` (TLS)
    One Redis server (or a proxy that looks like one): :class:`redis.Redis`.
``redis+cluster://[[user]:password@]host:port[,host:port...][/0][?option=value...]`` and ``rediss+cluster://``
    A Redis Cluster: :class:`redis.cluster.RedisCluster`, started from any of the listed nodes (one is enough;
    the client reads the slot map from it and follows MOVED/ASK). The database can only be 0; query options
    go to the client as for ``redis://`` (e.g. ``?socket_timeout=5``).

redis-py's own ``RedisCluster.from_url`` takes a plain ``redis://`` URL, which cannot tell a cluster from a
server and names one node; the ``+cluster`` scheme says both in the one setting the workers read.

Every key of one model carries the hash tag ``{<ns>}`` (:mod:`workers.store.keys`), so a model lives in one
slot, on one primary: every Lua script, WATCH/MULTI transaction and pipeline of the store stays within that
slot and works unchanged on a cluster client. What differs: a cluster client has no single connection pool
(:func:`connection_kwargs`, :func:`where`) and connects (reads the slot map) when it is created, and a cluster
pipeline refuses EVALSHA, so the store runs the one script it pipelines on a plain Redis (the seen sets read by
``read_batch_state``) as its own call there, and ``add_seen(pipeline=...)`` takes no cluster pipeline.

>>> is_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7000"), is_cluster_url("redis://localhost:6379/0")
(True, False)
>>> cluster_startup("rediss+cluster://app:pw@a:7000,b:7001/0?socket_timeout=5")
('rediss://app:pw@a:7000/0?socket_timeout=5', [('b', 7001)])
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.cluster

from stream.config import redact_url
from stream.errors import ConfigError

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
Client = redis.Redis | redis.cluster.RedisCluster

__all__ = [
    "CLUSTER_SCHEMES",
    "Client",
    "client_from_url",
    "cluster_startup",
    "connection_kwargs",
    "is_cluster",
    "is_cluster_url",
    "where",
]


def is_cluster_url(url: str) -> bool:
    """True for a ``redis+cluster://`` / ``rediss+cluster://`` URL."""
    return urlsplit(url).scheme.lower() in CLUSTER_SCHEMES


def cluster_startup(url: str) -> tuple[str, list[tuple[str, int]]]:
    """Split a cluster URL into a plain URL of its first node (credentials, db and options kept) and the other
    startup nodes; :class:`ConfigError` when a node is not ``host:port`` or the database is not 0."""
    parts = urlsplit(url)
    cred, _, hosts = parts.netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for node in hosts.split(","):
        host, sep, port = node.strip().rpartition(":")
        if not (sep and host and port.isdigit()):
            raise ConfigError(
                f"Redis Cluster URL {redact_url(url)}: node {node!r} is not host:port; write "
                "redis+cluster://host:port[,host:port...]"
            )
        nodes.append((host.strip("[]"), int(port)))
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigError(f"Redis Cluster URL {redact_url(url)}: a cluster has only database 0, not {parts.path!r}")
    first = f"{cred}@{nodes[0][0]}:{nodes[0][1]}" if cred else f"{nodes[0][0]}:{nodes[0][1]}"
    plain = urlunsplit((CLUSTER_SCHEMES[parts.scheme.lower()], first, parts.path, parts.query, ""))
    return plain, nodes[1:]


def client_from_url(url: str, **kw: Any) -> Client:
    """A bytes-returning client for ``url``: :class:`redis.cluster.RedisCluster` for a cluster URL, else
    :class:`redis.Redis`. ``kw`` goes to the client (``socket_timeout``, ``ssl_ca_certs``, ...)."""
    kw["decode_responses"] = False
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, **kw)
    first, others = cluster_startup(url)
    kw.pop("db", None)
    try:
        return redis.cluster.RedisCluster(
            url=first, startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in others], **kw
        )
    except redis.cluster.RedisClusterException as exc:
        # raised when no startup node answers with a slot map: wrong credentials, or nodes that are down
        if isinstance(exc.__cause__, redis.AuthenticationError):
            raise redis.AuthenticationError(f"{exc.__cause__} (Redis Cluster {redact_url(url)})") from exc
        raise redis.ConnectionError(f"no Redis Cluster node of {redact_url(url)} answered: {exc}") from exc


def is_cluster(client: Any) -> bool:
    """True for a cluster client (or one of its pipelines)."""
    return isinstance(client, redis.cluster.RedisCluster)


def connection_kwargs(client: Any) -> dict[str, Any]:
    """The connection settings of ``client`` (a cluster client has no single pool; its nodes share these)."""
    if is_cluster(client):
        return dict(client.get_connection_kwargs())
    return dict(getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {})


def where(client: Any) -> str:
    """Where a client connects, for messages (never with a password)."""
    if is_cluster(client):
        nodes = [f"{n.host}:{n.port}" for n in client.get_nodes()] or ["?"]
        return "redis+cluster://" + ",".join(nodes)
    kw = connection_kwargs(client)
    if "path" in kw:
        return f"unix://{kw['path']}"
    return f"redis://{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"
