"""Plain-Kafka helpers shared by the stages: client construction, topic creation, "caught up" detection.

Nothing here is specific to the dev broker; where the dev broker (Tansu) has a defect we avoid the affected
API in a way that is also correct on Apache Kafka (see ``caught_up``).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Any

from stream.config import KafkaSettings
from stream.errors import ConfigError, ServiceUnavailable

log = logging.getLogger(__name__)


def _unreachable() -> tuple[type[BaseException], ...]:
    """Errors kafka-python raises when no broker answers (the name changed across versions)."""
    from kafka import errors

    return tuple(getattr(errors, n) for n in ("NoBrokersAvailable", "KafkaTimeoutError") if hasattr(errors, n))


# Group timings that make joins and rebalances take seconds instead of ~20 s (see INFRA notes); all are
# ordinary Kafka consumer settings. max_poll_interval bounds the time between polls: batches stay far below.
GROUP_TIMINGS: dict[str, int] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 30000,
}


#: Apache Kafka's default broker ``message.max.bytes`` (and topic ``max.message.bytes``): the largest record
#: batch a broker left at its defaults accepts. Records zerocf writes itself (events, dead letters) stay below it.
KAFKA_DEFAULT_MESSAGE_MAX_BYTES = 1_048_588


def producer_defaults() -> dict[str, Any]:
    """The one set of KafkaProducer defaults (ingest, ``zerocf produce`` and the SDK's ``EventProducer``).

    Per-partition order is kept (one request in flight, retries), the leader's ack is awaited (``acks=1``;
    ``acks=0`` loses records on the dev broker), idempotence is off (the dev broker breaks it after a restart;
    ``ZEROCF_KAFKA_IDEMPOTENCE`` turns it on), batches linger 20 ms up to 512 KiB and are lz4-compressed when
    the ``lz4`` package is importable.

    >>> d = producer_defaults()
    >>> d["acks"], d["max_in_flight_requests_per_connection"], d["linger_ms"]
    (1, 1, 20)
    """
    from kafka.codec import has_lz4

    return {
        "acks": 1,
        "enable_idempotence": False,
        "retries": 5,
        "max_in_flight_requests_per_connection": 1,
        "linger_ms": 20,
        "batch_size": 512 * 1024,
        "max_request_size": 4 << 20,
        "compression_type": "lz4" if has_lz4() else None,
    }


def _connect(factory: Any, settings: KafkaSettings, kw: dict[str, Any]) -> Any:
    preflight(settings)
    seen = _ClientErrors()
    logging.getLogger("kafka").addHandler(seen)
    try:
        return factory(**kw)
    except _unreachable():
        if seen.reasons and settings.security_protocol != "PLAINTEXT":
            raise ConfigError(
                f"the Kafka broker at {settings.bootstrap} refused the {settings.security_protocol} connection "
                f"({seen.reasons[-1]}); fix ZEROCF_KAFKA_SASL_USERNAME / ZEROCF_KAFKA_SASL_PASSWORD / "
                "ZEROCF_KAFKA_SASL_MECHANISM or ZEROCF_KAFKA_SECURITY_PROTOCOL"
            ) from None
        raise ServiceUnavailable(
            f"no Kafka broker answers at {settings.bootstrap}; start one "
            "(`zerocf stack up`) or fix ZEROCF_KAFKA_BOOTSTRAP"
        ) from None
    finally:
        logging.getLogger("kafka").removeHandler(seen)


class _ClientErrors(logging.Handler):
    """Collects kafka-python's authentication/TLS complaints while a client connects (it retries them silently)."""

    _WORDS = ("Sasl", "SASL", "Authentication", "SSL", "Handshake")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if any(w in text for w in self._WORDS) and len(self.reasons) < 20:
            self.reasons.append(text[-300:])


# -- pre-flight: say which security setting is wrong, in seconds -------------------------------------------
PREFLIGHT_TIMEOUT_S = 3.0
_checked: set[KafkaSettings] = set()


def preflight(settings: KafkaSettings, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Check once per process that the first reachable bootstrap server speaks ``settings.security_protocol``.

    kafka-python reports a TLS, SASL or protocol mismatch as "no broker answers" after its 30 s bootstrap
    timeout (and hangs on TLS to a plaintext port), so this talks to the broker directly first: the TLS
    handshake (for ``SSL``/``SASL_SSL``), an ``ApiVersions`` request, then the SASL handshake (and, for
    ``PLAIN``, the authentication) or, without SASL, a ``Metadata`` request a SASL listener refuses. A
    definite mismatch raises :class:`~stream.errors.ConfigError` naming the setting to fix; an unreachable or
    slow broker is left to the client (and its usual "no broker answers" error).
    """
    if settings in _checked:
        return
    for server in settings.bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            sock = socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout)
        except (OSError, ValueError):
            continue
        try:
            _probe(settings, sock, host or "127.0.0.1", server.strip(), timeout)
        except (TimeoutError, _Unanswered) as exc:  # not definite: the client retries and reports it
            log.info("kafka pre-flight to %s inconclusive (%s); leaving it to the client", server, exc)
        finally:
            sock.close()
        _checked.add(settings)
        return


class _Unanswered(Exception):
    """The broker did not answer a pre-flight request in time."""


def _probe(settings: KafkaSettings, sock: socket.socket, host: str, server: str, timeout: float) -> None:
    proto = settings.security_protocol
    sock.settimeout(timeout)
    if proto in ("SSL", "SASL_SSL"):
        sock = _tls(settings, sock, host, server)
    tls_hint = (
        "the listener probably expects TLS: set ZEROCF_KAFKA_SECURITY_PROTOCOL=SSL (or SASL_SSL) and "
        "ZEROCF_KAFKA_SSL_CAFILE, or point ZEROCF_KAFKA_BOOTSTRAP at its plaintext listener"
    )
    answer = _request(sock, 18, 0, b"", server, tls_hint)  # ApiVersions v0: every broker answers it
    if answer is None:
        raise _Unanswered("no ApiVersions answer")
    versions = _api_versions(answer)
    if proto.startswith("SASL"):
        _sasl(settings, sock, server, versions)
        return
    sasl_hint = (
        "the listener expects SASL: set ZEROCF_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT (or SASL_SSL) and "
        "ZEROCF_KAFKA_SASL_MECHANISM / _USERNAME / _PASSWORD"
    )
    if _supports(versions, 3, 4):  # Metadata v4 of no topic, no auto-creation (a SASL listener drops it)
        _request(sock, 3, 4, struct.pack(">i?", 0, False), server, sasl_hint)


def _api_versions(body: bytes) -> dict[int, tuple[int, int]]:
    """``{api_key: (min, max)}`` from an ApiVersions v0 response body (after the correlation id)."""
    try:
        (count,) = struct.unpack(">i", body[2:6])
        rows = (struct.unpack(">hhh", body[6 + 6 * n : 12 + 6 * n]) for n in range(max(0, min(count, 1000))))
        return {key: (lo, hi) for key, lo, hi in rows}
    except struct.error:
        return {}


def _supports(versions: dict[int, tuple[int, int]], api: int, version: int) -> bool:
    lo, hi = versions.get(api, (1, 0))
    return lo <= version <= hi


def _tls(settings: KafkaSettings, sock: socket.socket, host: str, server: str) -> socket.socket:
    try:
        ctx = ssl.create_default_context(cafile=settings.ssl_cafile)
        if settings.ssl_certfile:
            ctx.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile, settings.ssl_password)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS files ({exc}); fix ZEROCF_KAFKA_SSL_CAFILE / ZEROCF_KAFKA_SSL_CERTFILE / "
            "ZEROCF_KAFKA_SSL_KEYFILE / ZEROCF_KAFKA_SSL_PASSWORD"
        ) from None
    try:
        return ctx.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        raise ConfigError(
            f"the TLS certificate of {server} is not trusted ({exc.verify_message}); set ZEROCF_KAFKA_SSL_CAFILE "
            "to the CA bundle that signed it"
        ) from None
    except (OSError, ssl.SSLError) as exc:  # includes the timeout of a plaintext port waiting for more bytes
        raise ConfigError(
            f"{server} did not complete a TLS handshake ({type(exc).__name__}: {exc or 'timed out'}): it looks like "
            "a plaintext listener; set ZEROCF_KAFKA_SECURITY_PROTOCOL=PLAINTEXT (or SASL_PLAINTEXT), or point "
            "ZEROCF_KAFKA_BOOTSTRAP at the broker's SSL listener"
        ) from None


def _request(sock: socket.socket, api: int, version: int, body: bytes, server: str, hint: str) -> bytes | None:
    """One Kafka request (header v1); the response body after the correlation id, ``None`` on a timeout.

    A closed connection or a TLS record instead of a response raises :class:`ConfigError` with ``hint``.
    """
    client = b"zerocf-preflight"
    header = struct.pack(">hhih", api, version, 7, len(client)) + client
    frame = header + body
    try:
        sock.sendall(struct.pack(">i", len(frame)) + frame)
        size = _read(sock, 4)
        if size[:1] in (b"\x15", b"\x16") and size[1:2] == b"\x03":  # a TLS alert/handshake record
            raise ConfigError(f"{server} answered a plaintext Kafka request with TLS; {hint}")
        (n,) = struct.unpack(">i", size)
        if not 4 <= n <= 1 << 24:
            raise ConfigError(f"{server} sent a {n}-byte frame, not a Kafka response; {hint}")
        return _read(sock, n)[4:]
    except TimeoutError:
        return None
    except (ConnectionError, EOFError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{server} closed the connection on a Kafka request ({exc or type(exc).__name__}); {hint}"
        ) from None


def _read(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError("connection closed")
        out += chunk
    return out


def _kafka_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack(">h", len(raw)) + raw


def _sasl(settings: KafkaSettings, sock: socket.socket, server: str, versions: dict[int, tuple[int, int]]) -> None:
    mech = settings.sasl_mechanism or ""
    hint = "the listener does not expect SASL: set ZEROCF_KAFKA_SECURITY_PROTOCOL=PLAINTEXT (or SSL)"
    if not _supports(versions, 17, 1):
        return  # a broker without SaslHandshake v1 (before Kafka 1.0): leave it to the client
    body = _request(sock, 17, 1, _kafka_str(mech), server, hint)  # SaslHandshake
    if body is None:
        raise _Unanswered("no SaslHandshake answer")
    (error,) = struct.unpack(">h", body[:2])
    if error == 33:  # UNSUPPORTED_SASL_MECHANISM: the answer lists the enabled ones
        offered = _strings(body[2:])
        if not offered or mech in offered:  # the dev broker without --authentication answers so for any
            raise ConfigError(f"{server} has no SASL mechanism enabled on this listener; {hint}")
        raise ConfigError(
            f"{server} does not offer SASL mechanism {mech} (it offers {', '.join(offered)}); "
            "set ZEROCF_KAFKA_SASL_MECHANISM to one of them"
        )
    if error:
        raise ConfigError(f"{server} refused the SASL handshake (Kafka error {error}, 34 = no SASL here); {hint}")
    auth = next((v for v in (1, 0) if _supports(versions, 36, v)), None)  # v0 and v1 requests are the same
    if mech != "PLAIN" or auth is None:
        return  # SCRAM needs its challenge rounds: kafka-python reports a failure (see _connect)
    token = b"\0" + (settings.sasl_username or "").encode() + b"\0" + (settings.sasl_password or "").encode()
    body = _request(sock, 36, auth, struct.pack(">i", len(token)) + token, server, hint)  # SaslAuthenticate
    if body is not None and struct.unpack(">h", body[:2])[0] != 0:
        raise ConfigError(
            f"SASL PLAIN authentication of user {settings.sasl_username!r} failed at {server}; fix "
            "ZEROCF_KAFKA_SASL_USERNAME / ZEROCF_KAFKA_SASL_PASSWORD"
        )


def _strings(data: bytes) -> list[str]:
    """A Kafka ``array[string]`` (int32 count, then int16-length strings)."""
    try:
        (count,) = struct.unpack(">i", data[:4])
        out, pos = [], 4
        for _ in range(max(0, min(count, 100))):
            (n,) = struct.unpack(">h", data[pos : pos + 2])
            out.append(data[pos + 2 : pos + 2 + n].decode("utf-8", "replace"))
            pos += 2 + n
        return out
    except struct.error:
        return []


def consumer(settings: KafkaSettings, *, group_id: str | None, client_id: str, **extra: Any) -> Any:
    """A KafkaConsumer with manual commits, reading from the earliest offset when a group has none.

    It never creates a topic: a subscription to (or lookup of) a missing topic finds nothing, instead of
    creating it with the broker's default partitions (topics are created by :func:`ensure_topics`). A caller
    that owns its topics may pass ``allow_auto_create_topics=True`` (ingest, for its raw topics).
    """
    from kafka import KafkaConsumer

    kw: dict[str, Any] = {
        **settings.client_kwargs(),
        "group_id": group_id,
        "client_id": client_id,
        "enable_auto_commit": False,
        "allow_auto_create_topics": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 4 << 20,
        "fetch_max_bytes": 32 << 20,
    }
    if group_id is not None:
        kw.update(GROUP_TIMINGS)
    kw.update(extra)
    made = _connect(KafkaConsumer, settings, kw)
    if not kw["allow_auto_create_topics"]:
        _no_auto_create(made)
    return made


def _no_auto_create(consumer_: Any) -> None:
    """kafka-python 3.0.12 drops the consumer's ``allow_auto_create_topics`` on the way to its cluster metadata
    (whose metadata requests then ask the broker to create topics): set it there too."""
    cluster = getattr(getattr(consumer_, "_client", None), "cluster", None)
    config = getattr(cluster, "config", None)
    if isinstance(config, dict) and "allow_auto_create_topics" in config:
        config["allow_auto_create_topics"] = False
    else:  # a kafka-python whose internals moved: the documented option is all there is
        log.debug("kafka_util: cannot reach the consumer's metadata config; relying on allow_auto_create_topics")


def producer(settings: KafkaSettings, *, client_id: str, **extra: Any) -> Any:
    """A KafkaProducer with :func:`producer_defaults` (``extra`` overrides them)."""
    from kafka import KafkaProducer

    kw = {
        **producer_defaults(),
        **settings.client_kwargs(),
        "client_id": client_id,
        "enable_idempotence": settings.idempotence,
    }
    return _connect(KafkaProducer, settings, {**kw, **extra})


def ensure_topics(
    settings: KafkaSettings, partitions: Mapping[str, int], configs: Mapping[str, Mapping[str, str]] | None = None
) -> None:
    """Create each missing topic with its partition count and topic configs, e.g. ``{"<p>.items":
    {"cleanup.policy": "compact"}}`` (replication 1 here; production sets its own).

    Existing topics are left alone; a partition count that differs is logged, not changed.
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    preflight(settings)
    try:
        admin = KafkaAdminClient(**settings.client_kwargs(), client_id="zerocf-admin")
    except _unreachable():
        raise ServiceUnavailable(f"no Kafka broker answers at {settings.bootstrap}") from None
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(name, n, 1, topic_configs=dict((configs or {}).get(name, {})))
                   for name, n in partitions.items() if name not in existing]  # fmt: skip
        if missing:
            try:
                admin.create_topics(missing)
                log.info("created topics %s", ", ".join(f"{t.name}({t.num_partitions})" for t in missing))
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def caught_up(consumer_: Any, partitions: Iterable[Any] | None = None, *, unknown_is_done: bool = False) -> bool:
    """True when every partition (default: the assignment, which must not be empty) reached its high watermark.

    Uses the high watermark the broker returned with the last fetch (``consumer.highwater``), not
    ``end_offsets()``: the dev broker reports the latter wrongly for batched records. A partition with no
    fetch answered yet has no known watermark: it counts as not caught up, unless ``unknown_is_done`` (for a
    caller that has already seen empty polls for a while, so that an empty topic ends too).
    """
    tps = list(consumer_.assignment() if partitions is None else partitions)
    if not tps:
        return False
    for tp in tps:
        hw = consumer_.highwater(tp)
        if hw is None:
            if not unknown_is_done:
                return False
        elif consumer_.position(tp) < hw:
            return False
    return True


def group_lag(
    settings: KafkaSettings, group_id: str, topics: Iterable[str], timeout: float = 5.0
) -> dict[Any, int | None]:
    """Records of every partition of ``topics`` beyond group ``group_id``'s committed offset.

    Covers all partitions, not only the ones assigned to one member: a partition held by another member (or
    by a dead one the broker has not evicted yet) counts too. A partition without a committed offset counts
    from its beginning (the group resets to earliest). The end is the high watermark a fetch returns (never
    ``end_offsets()``, which the dev broker gets wrong); ``None`` when no fetch answered for the partition
    within ``timeout`` seconds. The probe is a consumer of the group that never joins it (manual assignment,
    no commits), so it changes nothing for the members.
    """
    from kafka.structs import TopicPartition

    probe = consumer(
        settings,
        group_id=group_id,
        client_id="zerocf-lag-probe",
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=1 << 16,
    )
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(probe.partitions_for_topic(t) or ())]
        if not tps:
            return {}
        probe.assign(tps)
        start: dict[Any, int] = {}
        for tp in tps:
            off = probe.committed(tp)
            if off is None:
                probe.seek_to_beginning(tp)
                start[tp] = probe.position(tp)
            else:
                probe.seek(tp, off)
                start[tp] = off
        deadline = time.monotonic() + timeout
        while any(probe.highwater(tp) is None for tp in tps) and time.monotonic() < deadline:
            probe.poll(timeout_ms=100)
        out: dict[Any, int | None] = {}
        for tp in tps:
            hw = probe.highwater(tp)
            out[tp] = None if hw is None else max(0, hw - start[tp])
        return out
    finally:
        probe.close(autocommit=False)


def lag(consumer_: Any) -> dict[Any, int]:
    """Records between each assigned partition's position and its high watermark (known ones only)."""
    out = {}
    for tp in consumer_.assignment():
        hw = consumer_.highwater(tp)
        if hw is not None:
            out[tp] = max(0, hw - consumer_.position(tp))
    return out


def read_topic(settings: KafkaSettings, topic: str, timeout: float = 30.0) -> list[Any]:
    """Every record of ``topic`` (partition by partition, in offset order), read without a group.

    Assigns all partitions, seeks to the beginning and stops when each position reached the high
    watermark of the last fetch (not ``end_offsets``, which the dev broker gets wrong). Raises
    :class:`~stream.errors.ServiceUnavailable` if the topic is missing or not read within ``timeout``.
    """
    from kafka.structs import TopicPartition

    consumer_ = consumer(settings, group_id=None, client_id="zerocf-read-topic", max_poll_records=20000)
    deadline = time.monotonic() + timeout
    try:
        parts = consumer_.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = consumer_.partitions_for_topic(topic)
        if not parts:
            raise ServiceUnavailable(
                f"topic {topic} does not exist at {settings.bootstrap}; check the topic prefix (ZEROCF_TOPIC_PREFIX)"
            )
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer_.assign(tps)
        consumer_.seek_to_beginning()
        by_tp: dict[Any, list[Any]] = {tp: [] for tp in tps}
        while True:
            polled = consumer_.poll(timeout_ms=200)
            for tp, records in polled.items():
                by_tp[tp].extend(records)
            if not polled and caught_up(consumer_, tps):
                break
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"read_topic({topic!r}) not caught up after {timeout:.0f}s "
                    f"({sum(map(len, by_tp.values()))} records read); raise the timeout"
                )
        return [r for tp in tps for r in by_tp[tp]]
    finally:
        consumer_.close()
