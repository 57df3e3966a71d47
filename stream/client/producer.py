"""Client for event producers: validate, send to ``<p>.clicks`` / ``<p>.impressions``, batch, flush.

Every record is validated exactly as ``zerocf ingest`` will validate it: the raw JSON is built with
:func:`stream.events.encode_click` / :func:`~stream.events.encode_impression` and run through
:func:`~stream.events.parse_click` / :func:`~stream.events.parse_impression` (one source of truth), so an
invalid record raises :class:`~stream.errors.InvalidEvent` before anything is sent. The Kafka key is the
(normalised) user id, so one user's records stay in order on one partition.

Delivery is asynchronous: failures reported by the broker are collected, and :meth:`EventProducer.flush`
(also called by :meth:`~EventProducer.close` and on leaving a ``with`` block) raises
:class:`DeliveryFailed` if any send since the previous flush failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Protocol

from stream.errors import ConfigError, ServiceUnavailable, ZerocfError
from stream.events import encode_click, encode_impression, parse_click, parse_impression

log = logging.getLogger(__name__)

_MAX_ERRORS_KEPT = 20
_NOT_ALLOWED = {"key_serializer", "value_serializer"}


class DeliveryFailed(ServiceUnavailable):
    """Records were not acknowledged by the broker; ``errors`` holds the first few exceptions."""

    def __init__(self, failed: int, errors: list[BaseException]) -> None:
        first = f"{type(errors[0]).__name__}: {errors[0]}" if errors else "unknown"
        super().__init__(
            f"{failed} record(s) failed delivery since the last flush (first error: {first}); "
            "check that the broker is reachable and resend those records"
        )
        self.failed = failed
        self.errors = errors


class ProducerLike(Protocol):
    """The part of kafka-python's ``KafkaProducer`` this client uses."""

    def send(self, topic: str, value: bytes | None = ..., key: bytes | None = ...) -> Any: ...
    def flush(self, timeout: float | None = ...) -> None: ...
    def close(self, timeout: float | None = ...) -> None: ...


def _system_now_ms() -> int:
    return time.time_ns() // 1_000_000


def producer_config(acks: int | str = 1, enable_idempotence: bool = False, **client_kwargs: Any) -> dict[str, Any]:
    """KafkaProducer settings used by :class:`EventProducer`: :func:`stream.kafka_util.producer_defaults`
    (the same defaults ingest uses), then ``acks``, ``enable_idempotence`` and *client_kwargs*. Unknown
    settings are rejected by name.

    >>> cfg = producer_config(acks="all", linger_ms=50)
    >>> cfg["acks"], cfg["linger_ms"], cfg["batch_size"], cfg["enable_idempotence"]
    ('all', 50, 524288, False)
    >>> producer_config(lingr_ms=5)
    Traceback (most recent call last):
    ...
    stream.errors.ConfigError: unknown KafkaProducer setting(s) ['lingr_ms']; see kafka.KafkaProducer for valid names
    """
    from kafka import KafkaProducer

    from stream.kafka_util import producer_defaults

    unknown = sorted(k for k in client_kwargs if k not in KafkaProducer.DEFAULT_CONFIG or k in _NOT_ALLOWED)
    if unknown:
        raise ConfigError(
            f"unknown KafkaProducer setting(s) {unknown}; see kafka.KafkaProducer for valid names"
            + ("; keys and values are bytes already, drop the serializers" if _NOT_ALLOWED & set(unknown) else "")
        )
    if acks not in (0, 1, -1, "all"):
        raise ConfigError(f"acks {acks!r} is invalid; use 1 (default), 'all' or -1")
    return {**producer_defaults(), "acks": acks, "enable_idempotence": enable_idempotence, **client_kwargs}


class EventProducer:
    """Validating, batching producer of raw clicks and impressions.

    Build it over an existing ``KafkaProducer``-compatible object, or let it create one from
    *bootstrap_servers* plus KafkaProducer settings (see :func:`producer_config`).

    Parameters
    ----------
    producer : ProducerLike, optional
        An object with kafka-python's ``send(topic, value=, key=)`` returning a future with
        ``add_callback``/``add_errback``, ``flush(timeout)`` and ``close(timeout)``.
    bootstrap_servers : str or list of str, optional
        Used to create a ``KafkaProducer`` when *producer* is not given (exactly one of the two).
    topic_prefix : str
        Records go to ``<topic_prefix>.clicks`` and ``<topic_prefix>.impressions``.
    acks, enable_idempotence, **client_kwargs
        KafkaProducer settings, only with *bootstrap_servers*.
    now_ms : callable, optional
        Clock for default timestamps and the validation window (tests pass a fixed one).

    Examples
    --------
    >>> class Acked:  # a future that is already acknowledged
    ...     def add_callback(self, f): f(None)
    ...     def add_errback(self, f): pass
    >>> class Fake:
    ...     sent = []
    ...     def send(self, topic, value=None, key=None): self.sent.append((topic, key)); return Acked()
    ...     def flush(self, timeout=None): pass
    ...     def close(self, timeout=None): pass
    >>> fake = Fake()
    >>> with EventProducer(fake, topic_prefix="demo", now_ms=lambda: 1700000000000) as p:
    ...     _ = p.send_impression("m1", 7, ["i1", "i2"])
    ...     _ = p.send_click(7, "i2", impression_id="m1")
    >>> fake.sent, p.sent, p.failed
    ([('demo.impressions', b'7'), ('demo.clicks', b'7')], 2, 0)
    """

    def __init__(
        self,
        producer: ProducerLike | None = None,
        *,
        bootstrap_servers: str | Sequence[str] | None = None,
        topic_prefix: str = "zerocf",
        acks: int | str | None = None,
        enable_idempotence: bool | None = None,
        now_ms: Callable[[], int] | None = None,
        **client_kwargs: Any,
    ) -> None:
        if (producer is None) == (bootstrap_servers is None):
            raise ConfigError("pass exactly one of producer= (a KafkaProducer-like object) or bootstrap_servers=")
        if producer is None:
            from kafka import KafkaProducer

            config = producer_config(1 if acks is None else acks, bool(enable_idempotence), **client_kwargs)
            producer = KafkaProducer(bootstrap_servers=bootstrap_servers, **config)
        elif acks is not None or enable_idempotence is not None or client_kwargs:
            raise ConfigError(
                "client settings (acks, enable_idempotence, ...) apply only with bootstrap_servers=; "
                "configure the producer object you passed instead"
            )
        if not topic_prefix:
            raise ConfigError("topic_prefix is empty; use e.g. 'zerocf'")
        self._producer = producer
        self.clicks_topic = f"{topic_prefix}.clicks"
        self.impressions_topic = f"{topic_prefix}.impressions"
        self._now_ms = now_ms or _system_now_ms
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._failed_since_flush = 0
        self._closed = False
        self.sent = 0  # acknowledged by the broker
        self.failed = 0  # failed delivery
        self.rejected = 0  # failed validation, never sent

    def send_click(
        self,
        user_id: str | int,
        item_id: str | int,
        ts: int | str | None = None,
        impression_id: str | int | None = None,
        count: int | None = None,
        feedback: str | None = None,
    ) -> Any:
        """Validate and send one click (``ts`` defaults to now) of feedback type ``feedback`` (``None``: a plain
        click; ingest maps the type to a weight by ``ZEROCF_FEEDBACK_WEIGHTS``); returns the producer's future."""
        now = self._now_ms()
        try:
            value = encode_click(user_id, item_id, now if ts is None else ts, impression_id, count, feedback)
            raw = parse_click(value, now)
        except ZerocfError:
            self.rejected += 1
            raise
        return self._send(self.clicks_topic, raw.user_id, value)

    def send_impression(
        self, impression_id: str | int, user_id: str | int, item_ids: Sequence[str | int], ts: int | str | None = None
    ) -> Any:
        """Validate and send one impression (*item_ids* in display order); returns the producer's future."""
        now = self._now_ms()
        try:
            value = encode_impression(impression_id, user_id, list(item_ids), now if ts is None else ts)
            raw = parse_impression(value, now)
        except ZerocfError:
            self.rejected += 1
            raise
        return self._send(self.impressions_topic, raw.user_id, value)

    def _send(self, topic: str, user_id: str, value: bytes) -> Any:
        if self._closed:
            raise ZerocfError("EventProducer is closed; create a new one to send more records")
        try:
            future = self._producer.send(topic, value=value, key=user_id.encode("utf-8"))
        except Exception as e:  # buffer full / metadata timeout: nothing was queued
            self._on_error(e)
            raise ServiceUnavailable(
                f"could not queue a record for {topic} ({type(e).__name__}: {e}); check the broker and retry"
            ) from e
        future.add_callback(self._on_success)
        future.add_errback(self._on_error)
        return future

    def _on_success(self, _metadata: Any) -> None:
        with self._lock:
            self.sent += 1

    def _on_error(self, exc: BaseException) -> None:
        with self._lock:
            self.failed += 1
            self._failed_since_flush += 1
            if len(self._errors) < _MAX_ERRORS_KEPT:
                self._errors.append(exc)
        log.warning("record delivery failed: %s: %s", type(exc).__name__, exc)

    def flush(self, timeout: float | None = None) -> None:
        """Send everything buffered and wait; raise :class:`DeliveryFailed` if any send failed since last time."""
        self._producer.flush(timeout)
        with self._lock:
            failed, errors = self._failed_since_flush, self._errors
            self._failed_since_flush, self._errors = 0, []
        if failed:
            raise DeliveryFailed(failed, errors)

    def close(self, timeout: float | None = None) -> None:
        """Flush, then close the underlying producer (also when the flush raises). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout)
        finally:
            self._producer.close(timeout)
            log.info("event producer closed: %d sent, %d failed, %d rejected", self.sent, self.failed, self.rejected)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:  # an error is already propagating: don't mask it with a delivery error
            self.close()
        except DeliveryFailed as failure:
            log.error("while handling %s: %s", type(exc).__name__, failure)
