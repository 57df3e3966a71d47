"""Configuration: one frozen dataclass per process, built once from ``ZEROCF_*`` env vars and CLI flags.

Every config field is declared with :func:`setting`: its environment variable, help text, unit and CLI
flag. From that one declaration

- :func:`load` builds the dataclass from a mapping (normally ``os.environ``, read only by the entry point)
  plus overrides (CLI flags win), converting each value to the field's type (``Literal`` fields accept only
  their values);
- :func:`add_flags` adds the matching argparse flags to a command, with the default and unit in ``--help``,
  and :func:`flag_overrides` reads them back for :func:`load`;
- :func:`check_unknown_env` names every ``ZEROCF_*`` variable no config declares, with the closest known
  name, so a typo never goes unnoticed; :func:`env_reference` lists them all for the README.

Settings that several processes share are declared once: :class:`ProcessSettings` (Kafka, topic prefix,
logging/metrics) and :class:`ConsumerSettings` (poll timeout, idle exit). Range errors are worded one way,
by :func:`check_ranges`.

>>> cfg = load(StreamConfig, {"ZEROCF_TOPIC_PREFIX": "shop", "ZEROCF_EVENTS_PARTITIONS": "3"})
>>> cfg.topics.events, cfg.events_partitions
('shop.events', 3)
>>> check_unknown_env({"ZEROCF_TOPIK_PREFIX": "x"}, known_env_vars(StreamConfig))
Traceback (most recent call last):
...
stream.errors.ConfigError: unknown environment variable ZEROCF_TOPIK_PREFIX (did you mean ZEROCF_TOPIC_PREFIX?)...
>>> load(StreamConfig, {"ZEROCF_INGEST_BATCH": "0"})
Traceback (most recent call last):
...
stream.errors.ConfigError: ZEROCF_INGEST_BATCH=0 must be in [1, 1e+06]
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import re
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from stream.errors import ConfigError
from stream.events import parse_feedback_weights

T = TypeVar("T")
ENV_PREFIX = "ZEROCF_"


def setting(
    default: Any,
    env: str,
    help: str,
    *,
    unit: str = "",
    flag: str | None = None,
    cli: bool = True,
    secret: bool = False,
) -> Any:
    """Declare a config field bound to ``ZEROCF_<env>``.

    ``flag`` names its CLI flag (default ``--<field-name>``); ``cli=False`` (implied by ``secret``) gives
    it none: secrets belong in the environment, not in ``ps`` output. ``unit`` is shown after the default.
    """
    meta = {
        "env": ENV_PREFIX + env,
        "help": help,
        "unit": unit,
        "flag": flag,
        "cli": cli and not secret,
        "secret": secret,
    }
    return field(default=default, metadata=meta, repr=not secret)


# ---------------------------------------------------------------------------------------------- fields
@dataclass(frozen=True)
class _Field:
    """One declared setting of a config class (nested dataclasses flattened)."""

    name: str
    typ: Any
    default: Any
    meta: Mapping[str, Any]

    @property
    def env(self) -> str:
        return str(self.meta["env"])

    @property
    def flag(self) -> str:
        return str(self.meta.get("flag") or "--" + self.name.replace("_", "-"))

    @property
    def choices(self) -> tuple[Any, ...] | None:
        return _literal_values(self.typ)


def _literal_values(typ: Any) -> tuple[Any, ...] | None:
    return tuple(typing.get_args(typ)) if typing.get_origin(typ) is typing.Literal else None


def _unwrap_optional(typ: Any) -> tuple[Any, bool]:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return typ, False


def _fields(cls: type) -> Iterator[tuple[_Field | None, type | None, dataclasses.Field[Any]]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if isinstance(typ, type) and dataclasses.is_dataclass(typ):
            yield None, typ, f
        elif "env" in f.metadata:
            yield _Field(f.name, typ, f.default, f.metadata), None, f  # settings always have a plain default


def settings_of(*classes: type) -> list[_Field]:
    """Every declared setting of ``classes``, nested ones included, each once (first declaration wins)."""
    out: dict[str, _Field] = {}
    for cls in classes:
        for fld, nested, _ in _fields(cls):
            for s in settings_of(nested) if nested is not None else [fld]:
                assert s is not None
                out.setdefault(s.env, s)
    return list(out.values())


# ---------------------------------------------------------------------------------------------- loading
def _convert(name: str, raw: Any, typ: Any) -> Any:
    inner, optional = _unwrap_optional(typ)
    if isinstance(raw, str):
        if optional and raw == "":
            return None
        try:
            if inner is bool:
                low = raw.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    raw = True
                elif low in ("0", "false", "no", "off", ""):
                    raw = False
                else:
                    raise ValueError(raw)
            elif inner in (int, float):
                raw = inner(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a valid {inner.__name__}; fix the value") from None
    choices = _literal_values(inner)
    if choices is not None and raw not in choices and not (optional and raw is None):
        raise ConfigError(f"{name}={raw!r}; use one of {', '.join(map(str, choices))}")
    return raw


def load(cls: type[T], env: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> T:
    """Build config ``cls`` from ``env`` and ``overrides`` (field name -> value; ``None`` means not given).

    Nested dataclass fields (e.g. :class:`KafkaSettings`) are loaded recursively from the same sources.
    """
    overrides = dict(overrides or {})
    kwargs: dict[str, Any] = {}
    for fld, nested, f in _fields(cls):
        if nested is not None:
            kwargs[f.name] = load(nested, env, overrides)
            continue
        assert fld is not None
        if overrides.get(fld.name) is not None:
            kwargs[fld.name] = _convert(fld.env, overrides[fld.name], fld.typ)
        elif fld.env in env:
            kwargs[fld.name] = _convert(fld.env, env[fld.env], fld.typ)
    return cls(**kwargs)


def check_ranges(obj: Any, spec: Mapping[str, tuple[float, float]]) -> None:
    """Raise :class:`ConfigError` ``"<ENV>=<value> must be in [lo, hi]"`` for the first field out of range."""
    envs = {f.name: f.metadata.get("env", f.name) for f in dataclasses.fields(obj)}
    for name, (lo, hi) in spec.items():
        value = getattr(obj, name)
        if not lo <= value <= hi:  # also False for NaN
            raise ConfigError(f"{envs[name]}={value} must be in [{lo:g}, {hi:g}]")


# ---------------------------------------------------------------------------------------------- CLI flags
def _shown_default(fld: _Field) -> str:
    d = fld.default
    if d is None or d == "" or d == ():
        return ""
    text = ("on" if d else "off") if isinstance(d, bool) else f"{d:g}" if isinstance(d, float) else str(d)
    return f"default {text}{' ' + fld.meta['unit'] if fld.meta.get('unit') else ''}; "


def add_flags(parser: argparse.ArgumentParser | Any, *classes: type, skip: Iterable[str] = ()) -> None:
    """Add one flag per CLI setting of ``classes`` to ``parser`` (help: text, default + unit, env var).

    Flags default to ``None`` (not given) so the environment applies unless the flag is passed; booleans
    get ``--x/--no-x``, ``Literal`` fields their choices. Read them back with :func:`flag_overrides`.
    """
    skip = set(skip)
    for fld in settings_of(*classes):
        if not fld.meta.get("cli", True) or fld.name in skip:
            continue
        inner, _ = _unwrap_optional(fld.typ)
        help_text = f"{fld.meta['help']} ({_shown_default(fld)}env {fld.env})"
        kw: dict[str, Any] = {"dest": fld.name, "default": None, "help": help_text}
        if inner is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif fld.choices is not None:
            kw["choices"] = fld.choices
        else:
            kw["type"] = inner if inner in (int, float) else str
            kw["metavar"] = fld.meta.get("unit", "").upper() or fld.name.split("_")[-1].upper()
        parser.add_argument(fld.flag, **kw)


def _no_default(d: Any) -> bool:
    return d is None or d is False or d is argparse.SUPPRESS


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows every option's default: settings flags carry it in their help (:func:`add_flags`);
    for the other options (``-k``, ``--seed``, ...) it is appended here as ``(default X)``."""

    def _format_action(self, action: argparse.Action) -> str:
        d = action.default
        if not action.help and not _no_default(d) and action.nargs != 0:
            action.help = f"(default {d})"  # an option without help still shows its default
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = (action.help or "").strip()
        d = action.default
        if "default" in text or _no_default(d) or action.nargs == 0:
            return text
        return f"{text} (default {d})".strip()


def flag_overrides(args: argparse.Namespace, *classes: type) -> dict[str, Any]:
    """The values of the flags :func:`add_flags` added, by field name, for :func:`load`."""
    return {f.name: getattr(args, f.name, None) for f in settings_of(*classes)}


# ---------------------------------------------------------------------------------------------- env checks
def known_env_vars(*classes: type) -> set[str]:
    """Every environment variable declared by ``classes`` (recursively)."""
    return {f.env for f in settings_of(*classes)}


def env_reference(*classes: type) -> list[tuple[str, str, str, str]]:
    """(variable, default, flag, help) rows for the README's configuration reference, sorted."""
    rows = []
    for f in settings_of(*classes):
        flag = f.flag if f.meta.get("cli", True) else ""
        unit = f" {f.meta['unit']}" if f.meta.get("unit") and f.default not in ("", None) else ""
        default = f.default if isinstance(f.default, str) else repr(f.default)
        rows.append((f.env, f"{default}{unit}", flag, str(f.meta["help"])))
    return sorted(rows)


def env_markdown(*classes: type) -> str:
    """The README's configuration table (``zerocf config --markdown`` prints it; a test keeps them equal)."""
    lines = ["| variable | default | flag | meaning |", "| --- | --- | --- | --- |"]
    for env, default, flag, help_ in env_reference(*classes):
        shown = "" if default in ("None", "") else f"`{default}`"
        lines.append(f"| `{env}` | {shown} | {f'`{flag}`' if flag else ''} | {help_.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def check_unknown_env(env: Mapping[str, str], known: Iterable[str]) -> None:
    """Raise :class:`ConfigError` naming each ``ZEROCF_*`` variable that no config declares."""
    known = set(known)
    bad = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
    if bad:
        parts = []
        for name in bad:
            close = difflib.get_close_matches(name, known, n=1)
            parts.append(name + (f" (did you mean {close[0]}?)" if close else ""))
        raise ConfigError(
            f"unknown environment variable{'s' if len(bad) > 1 else ''} {', '.join(parts)}; unset it or fix the name"
        )


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
    query = (
        "&".join(
            f"{q.split('=', 1)[0]}=***" if q.lower().startswith("password=") else q for q in parts.query.split("&")
        )
        if parts.query
        else ""
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# ---------------------------------------------------------------------------------------------- settings
SecurityProtocol = typing.Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
_HOST = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


def parse_bootstrap(servers: str) -> list[str]:
    """Split and check ``ZEROCF_KAFKA_BOOTSTRAP``: ``host[:port]`` or ``[ipv6][:port]``, comma-separated.

    >>> parse_bootstrap("kafka-0:9092, [::1]:9093,broker")
    ['kafka-0:9092', '[::1]:9093', 'broker']
    >>> parse_bootstrap("[::1:9092")
    Traceback (most recent call last):
    ...
    stream.errors.ConfigError: ZEROCF_KAFKA_BOOTSTRAP entry '[::1:9092': no closing ']'; use host:port or [ipv6]:port...
    """
    out = []
    for raw in servers.split(","):
        entry = raw.strip()

        def bad(why: str, entry: str = entry) -> ConfigError:
            return ConfigError(
                f"ZEROCF_KAFKA_BOOTSTRAP entry {entry!r}: {why}; use host:port or [ipv6]:port, comma-separated"
            )

        if entry.startswith("["):
            addr, sep, rest = entry[1:].partition("]")
            if not sep:
                raise bad("no closing ']'")
            try:
                ipaddress.IPv6Address(addr)
            except ValueError:
                raise bad(f"{addr!r} is not an IPv6 address") from None
            if rest and not rest.startswith(":"):
                raise bad("expected ':port' after ']'")
            port = rest[1:] if rest else None
        else:
            if entry.count(":") > 1:
                raise bad("more than one ':'")
            host, _, port_str = entry.partition(":")
            port = port_str if ":" in entry else None
            if not _HOST.match(host):
                raise bad(f"{host!r} is not a host name or IPv4 address" if host else "no host")
        if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise bad(f"port {port!r} is not a number in 1..65535")
        out.append(entry)
    return out


SaslMechanism = typing.Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
LogLevel = typing.Literal["DEBUG", "INFO", "WARNING", "ERROR"]


@dataclass(frozen=True)
class KafkaSettings:
    """Connection settings passed through to every kafka-python client."""

    bootstrap: str = setting(
        "127.0.0.1:9092", "KAFKA_BOOTSTRAP", "Kafka bootstrap servers, comma-separated", flag="--kafka-bootstrap"
    )
    security_protocol: SecurityProtocol = setting(
        "PLAINTEXT", "KAFKA_SECURITY_PROTOCOL", "Kafka security protocol", flag="--kafka-security-protocol"
    )
    sasl_mechanism: SaslMechanism | None = setting(None, "KAFKA_SASL_MECHANISM", "SASL mechanism", cli=False)
    sasl_username: str | None = setting(None, "KAFKA_SASL_USERNAME", "SASL user name", cli=False)
    sasl_password: str | None = setting(None, "KAFKA_SASL_PASSWORD", "SASL password (never logged)", secret=True)
    ssl_cafile: str | None = setting(None, "KAFKA_SSL_CAFILE", "CA bundle for SSL", cli=False)
    ssl_certfile: str | None = setting(None, "KAFKA_SSL_CERTFILE", "client certificate for SSL", cli=False)
    ssl_keyfile: str | None = setting(None, "KAFKA_SSL_KEYFILE", "client key for SSL", cli=False)
    ssl_password: str | None = setting(None, "KAFKA_SSL_PASSWORD", "password of the SSL key", secret=True)
    bootstrap_timeout_s: float = setting(
        30.0, "KAFKA_BOOTSTRAP_TIMEOUT_S", "how long a client tries to reach a bootstrap server before it reports "
        "the broker unavailable (a serve without a broker says so after this long)", cli=False, unit="s"
    )  # fmt: skip
    idempotence: bool = setting(
        False,
        "KAFKA_IDEMPOTENCE",
        "idempotent producer (off by default: the dev broker breaks it after a restart)",
        cli=False,
    )

    def __post_init__(self) -> None:
        if self.security_protocol.startswith("SASL") and not (self.sasl_mechanism and self.sasl_username):
            raise ConfigError("SASL needs ZEROCF_KAFKA_SASL_MECHANISM and ZEROCF_KAFKA_SASL_USERNAME")
        if not self.bootstrap.strip():
            raise ConfigError("ZEROCF_KAFKA_BOOTSTRAP is empty; set host:port of a Kafka broker")
        check_ranges(self, {"bootstrap_timeout_s": (0.1, 3600)})
        parse_bootstrap(self.bootstrap)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments common to KafkaConsumer, KafkaProducer and KafkaAdminClient."""
        kw: dict[str, Any] = {
            "bootstrap_servers": parse_bootstrap(self.bootstrap),
            "security_protocol": self.security_protocol,
            "bootstrap_timeout_ms": int(self.bootstrap_timeout_s * 1000),
        }
        optional = {
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_username,
            "sasl_plain_password": self.sasl_password,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
            "ssl_password": self.ssl_password,
        }
        kw.update({k: v for k, v in optional.items() if v is not None})
        return kw


#: Field names of the Kafka settings (commands that never talk to Kafka skip their flags).
KAFKA_FIELDS = tuple(f.name for f in dataclasses.fields(KafkaSettings))


@dataclass(frozen=True)
class RuntimeSettings:
    """Logging and the health/metrics endpoint, shared by every process."""

    metrics_port: int = setting(0, "METRICS_PORT", "port of /healthz and /metrics (0 = off)")
    metrics_host: str = setting(
        "127.0.0.1", "METRICS_HOST", "interface of /healthz and /metrics (0.0.0.0 = all; the container image's)"
    )
    log_level: LogLevel = setting("INFO", "LOG_LEVEL", "log level", flag="--log-level")
    log_json: bool = setting(False, "LOG_JSON", "log JSON lines instead of text", flag="--log-json")

    def __post_init__(self) -> None:
        check_ranges(self, {"metrics_port": (0, 65535)})


#: The settings every command already takes at the top level (``zerocf --log-level ... COMMAND``).
TOP_LEVEL = ("log_level", "log_json")


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

    @property
    def erasures(self) -> str:
        """Raw user-erasure requests (``zerocf forget-user``, :mod:`stream.erasure`), read by ingest."""
        return f"{self.prefix}.erasures"

    def all(self) -> tuple[str, ...]:
        """Every topic of the prefix: impressions, clicks, events, dlq, erasures."""
        return self.impressions, self.clicks, self.events, self.dlq, self.erasures


@dataclass(frozen=True)
class ProcessSettings:
    """What every zerocf process shares: the broker, the topic prefix (also the Redis namespace), runtime."""

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topic_prefix: str = setting("zerocf", "TOPIC_PREFIX", "prefix of every topic and of the Redis namespace")
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_\-]{1,100}", self.topic_prefix):
            raise ConfigError(f"ZEROCF_TOPIC_PREFIX={self.topic_prefix!r}: use 1-100 letters, digits, '_' or '-'")

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


@dataclass(frozen=True)
class ConsumerSettings(ProcessSettings):
    """The consumer loop of ingest and lmf: how long a poll waits, when ``--until-idle`` exits."""

    poll_timeout_ms: int = setting(500, "POLL_TIMEOUT_MS", "consumer poll timeout", unit="ms")
    idle_seconds: float = setting(3.0, "IDLE_SECONDS", "--until-idle: exit after this long caught up", unit="s")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, {"poll_timeout_ms": (1, 60_000), "idle_seconds": (0.01, 3600)})


@dataclass(frozen=True)
class StreamConfig(ConsumerSettings):
    """Configuration of ``zerocf ingest`` (and the topic layout every process shares)."""

    events_partitions: int = setting(
        6, "EVENTS_PARTITIONS", "partitions of <p>.events (and the raw topics) when created here"
    )
    ingest_group: str = setting(
        "", "INGEST_GROUP", "consumer group of ingest (default <prefix>-ingest)", flag="--group"
    )
    ingest_batch: int = setting(5000, "INGEST_BATCH", "max records per ingest batch", flag="--batch")
    events_pack: int = setting(
        64, "EVENTS_PACK", "events per record of <p>.events: a JSON array (1 = one event object per record, "
        "keyed by user, as before packs)", flag="--pack", unit="events"
    )  # fmt: skip
    feedback_weights: str = setting(
        "click:1", "FEEDBACK_WEIGHTS", "feedback types of raw clicks and their weights, type:weight comma-separated "
        "(e.g. click:1,like:2,purchase:5,dislike:-1); a negative weight makes an explicit negative; click is 1 "
        "unless named; other types are dead-lettered", flag="--feedback-weights"
    )  # fmt: skip
    message_max_bytes: int = setting(
        1_048_588,
        "MESSAGE_MAX_BYTES",
        "the brokers' message.max.bytes: dead letters and events stay below it",
        unit="B",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, {"events_partitions": (1, 10_000), "ingest_batch": (1, 1_000_000),
                            "events_pack": (1, 10_000), "message_max_bytes": (16_384, 1 << 30)})  # fmt: skip
        try:
            parse_feedback_weights(self.feedback_weights)
        except ValueError as e:
            raise ConfigError(f"ZEROCF_FEEDBACK_WEIGHTS={self.feedback_weights!r}: {e}") from None

    @property
    def feedback(self) -> dict[str, float]:
        """The feedback map of ``feedback_weights`` (:func:`stream.events.parse_feedback_weights`)."""
        return parse_feedback_weights(self.feedback_weights)

    @property
    def group(self) -> str:
        return self.ingest_group or f"{self.topic_prefix}-ingest"
