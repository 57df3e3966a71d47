"""Configuration: one frozen dataclass per process, built once from ``ZEROCF_*`` env vars and CLI flags.

Every config field declares its environment variable with :func:`setting`. :func:`load` reads a dataclass
from a mapping (normally ``os.environ``, read only by the entry point) plus explicit overrides (CLI flags),
and converts each value to the field's type. :func:`check_unknown_env` names every ``ZEROCF_*`` variable no
config declares, with the closest known name, so a typo never goes unnoticed.

>>> cfg = load(StreamConfig, {"ZEROCF_TOPIC_PREFIX": "shop", "ZEROCF_EVENTS_PARTITIONS": "3"})
>>> cfg.topics.events, cfg.events_partitions
('shop.events', 3)
>>> check_unknown_env({"ZEROCF_TOPIK_PREFIX": "x"}, known_env_vars(StreamConfig))
Traceback (most recent call last):
...
stream.errors.ConfigError: unknown environment variable ZEROCF_TOPIK_PREFIX (did you mean ZEROCF_TOPIC_PREFIX?); unset it or fix the name
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from stream.errors import ConfigError

T = TypeVar("T")
ENV_PREFIX = "ZEROCF_"


def setting(default: Any, env: str, help: str, *, secret: bool = False) -> Any:
    """Declare a config field bound to the environment variable ``ZEROCF_<env>``."""
    return field(default=default, metadata={"env": ENV_PREFIX + env, "help": help, "secret": secret},
                 repr=not secret)


def _convert(name: str, raw: Any, typ: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(typ)
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        if raw == "":
            return None
        typ = args[0]
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if typ in (int, float):
            return typ(raw)
        if typ is tuple or typing.get_origin(typ) is tuple:
            return tuple(s.strip() for s in raw.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {getattr(typ, '__name__', typ)}; "
                          f"fix the value") from None
    return raw


def load(cls: type[T], env: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> T:
    """Build config ``cls`` from ``env`` and ``overrides`` (CLI flags win; ``None`` means not given).

    Nested dataclass fields (e.g. :class:`KafkaSettings`) are loaded recursively from the same sources.
    """
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = load(typ, env, overrides)  # type: ignore[arg-type]
            continue
        name = f.metadata.get("env")
        if overrides.get(f.name) is not None:
            kwargs[f.name] = _convert(f"--{f.name.replace('_', '-')}", overrides[f.name], typ)
        elif name and name in env:
            kwargs[f.name] = _convert(name, env[name], typ)
    return cls(**kwargs)


def known_env_vars(*classes: type) -> set[str]:
    """Every environment variable declared by ``classes`` (recursively)."""
    names: set[str] = set()
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                names |= known_env_vars(hints[f.name])
            elif "env" in f.metadata:
                names.add(f.metadata["env"])
    return names


def env_reference(*classes: type) -> list[tuple[str, str, str]]:
    """(variable, default, help) rows for the README's configuration reference."""
    rows: dict[str, tuple[str, str, str]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                for row in env_reference(hints[f.name]):
                    rows[row[0]] = row
            elif "env" in f.metadata:
                rows[f.metadata["env"]] = (f.metadata["env"], repr(f.default), f.metadata["help"])
    return sorted(rows.values())


def check_unknown_env(env: Mapping[str, str], known: Iterable[str]) -> None:
    """Raise :class:`ConfigError` naming each ``ZEROCF_*`` variable that no config declares."""
    known = set(known)
    bad = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
    if bad:
        parts = []
        for name in bad:
            close = difflib.get_close_matches(name, known, n=1)
            parts.append(name + (f" (did you mean {close[0]}?)" if close else ""))
        raise ConfigError(f"unknown environment variable{'s' if len(bad) > 1 else ''} "
                          f"{', '.join(parts)}; unset it or fix the name")


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe to log).

    >>> redact_url("rediss://app:s3cret@redis.internal:6380/0")
    'rediss://app:***@redis.internal:6380/0'
    >>> redact_url("redis://:s3cret@localhost/0?password=x")
    'redis://:***@localhost/0?password=***'
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        cred, host = netloc.rsplit("@", 1)
        user = cred.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in cred else netloc
    query = "&".join(f"{q.split('=', 1)[0]}=***" if q.lower().startswith("password=") else q
                     for q in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class KafkaSettings:
    """Connection settings passed through to every kafka-python client."""

    bootstrap: str = setting("127.0.0.1:9092", "KAFKA_BOOTSTRAP", "Kafka bootstrap servers, comma-separated")
    security_protocol: str = setting("PLAINTEXT", "KAFKA_SECURITY_PROTOCOL",
                                     "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    sasl_mechanism: str | None = setting(None, "KAFKA_SASL_MECHANISM", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    sasl_username: str | None = setting(None, "KAFKA_SASL_USERNAME", "SASL user name")
    sasl_password: str | None = setting(None, "KAFKA_SASL_PASSWORD", "SASL password (never logged)", secret=True)
    ssl_cafile: str | None = setting(None, "KAFKA_SSL_CAFILE", "CA bundle for SSL")
    ssl_certfile: str | None = setting(None, "KAFKA_SSL_CERTFILE", "client certificate for SSL")
    ssl_keyfile: str | None = setting(None, "KAFKA_SSL_KEYFILE", "client key for SSL")
    ssl_password: str | None = setting(None, "KAFKA_SSL_PASSWORD", "password of the SSL key", secret=True)
    idempotence: bool = setting(False, "KAFKA_IDEMPOTENCE",
                                "idempotent producer (off by default: the dev broker breaks it after a restart)")

    def __post_init__(self) -> None:
        protocols = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        if self.security_protocol not in protocols:
            raise ConfigError(f"ZEROCF_KAFKA_SECURITY_PROTOCOL={self.security_protocol!r}; use one of {protocols}")
        if self.security_protocol.startswith("SASL") and not (self.sasl_mechanism and self.sasl_username):
            raise ConfigError("SASL needs ZEROCF_KAFKA_SASL_MECHANISM and ZEROCF_KAFKA_SASL_USERNAME")
        if not self.bootstrap.strip():
            raise ConfigError("ZEROCF_KAFKA_BOOTSTRAP is empty; set host:port of a Kafka broker")

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments common to KafkaConsumer, KafkaProducer and KafkaAdminClient."""
        kw: dict[str, Any] = {"bootstrap_servers": self.bootstrap.split(","),
                              "security_protocol": self.security_protocol}
        optional = {"sasl_mechanism": self.sasl_mechanism, "sasl_plain_username": self.sasl_username,
                    "sasl_plain_password": self.sasl_password, "ssl_cafile": self.ssl_cafile,
                    "ssl_certfile": self.ssl_certfile, "ssl_keyfile": self.ssl_keyfile,
                    "ssl_password": self.ssl_password}
        kw.update({k: v for k, v in optional.items() if v is not None})
        return kw


@dataclass(frozen=True)
class RuntimeSettings:
    """Logging and the health/metrics endpoint, shared by every process."""

    metrics_port: int = setting(0, "METRICS_PORT", "port of /healthz and /metrics (0 = off)")
    log_level: str = setting("INFO", "LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR")
    log_json: bool = setting(False, "LOG_JSON", "log JSON lines instead of text")

    def __post_init__(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"ZEROCF_METRICS_PORT={self.metrics_port} must be in 0..65535")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"ZEROCF_LOG_LEVEL={self.log_level!r}; use DEBUG, INFO, WARNING or ERROR")


@dataclass(frozen=True)
class Topics:
    """Topic names derived from one prefix.

    >>> Topics("zerocf").dlq
    'zerocf.dlq'
    """

    prefix: str

    @property
    def impressions(self) -> str:
        return f"{self.prefix}.impressions"

    @property
    def clicks(self) -> str:
        return f"{self.prefix}.clicks"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"


def _check_prefix(prefix: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_\-]{1,100}", prefix):
        raise ConfigError(f"ZEROCF_TOPIC_PREFIX={prefix!r}: use 1-100 letters, digits, '_' or '-'")


@dataclass(frozen=True)
class StreamConfig:
    """Configuration of ``zerocf ingest`` (and the topic layout every process shares)."""

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topic_prefix: str = setting("zerocf", "TOPIC_PREFIX", "prefix of every topic and of the Redis namespace")
    events_partitions: int = setting(6, "EVENTS_PARTITIONS", "partitions of <p>.events (and the raw topics) when created")
    ingest_group: str = setting("", "INGEST_GROUP", "consumer group of ingest (default <prefix>-ingest)")
    ingest_batch: int = setting(5000, "INGEST_BATCH", "max records per ingest batch")
    poll_timeout_ms: int = setting(500, "POLL_TIMEOUT_MS", "consumer poll timeout")
    idle_seconds: float = setting(3.0, "IDLE_SECONDS", "--until-idle: exit after this long caught up with no data")
    runtime: RuntimeSettings = field(default_factory=lambda: RuntimeSettings())

    def __post_init__(self) -> None:
        _check_prefix(self.topic_prefix)
        for name in ("events_partitions", "ingest_batch", "poll_timeout_ms"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.idle_seconds <= 0:
            raise ConfigError(f"idle_seconds={self.idle_seconds} must be > 0")

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def group(self) -> str:
        return self.ingest_group or f"{self.topic_prefix}-ingest"
