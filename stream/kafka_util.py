"""Plain-Kafka helpers shared by the stages: client construction, topic creation, "caught up" detection.

Nothing here is specific to the dev broker; where the dev broker (Tansu) has a defect we avoid the affected
API in a way that is also correct on Apache Kafka (see ``caught_up``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from stream.config import KafkaSettings
from stream.errors import ServiceUnavailable

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
    try:
        return factory(**kw)
    except _unreachable():
        raise ServiceUnavailable(
            f"no Kafka broker answers at {settings.bootstrap}; start one "
            "(`zerocf stack up`) or fix ZEROCF_KAFKA_BOOTSTRAP"
        ) from None


def consumer(settings: KafkaSettings, *, group_id: str | None, client_id: str, **extra: Any) -> Any:
    """A KafkaConsumer with manual commits, reading from the earliest offset when a group has none."""
    from kafka import KafkaConsumer

    kw: dict[str, Any] = {
        **settings.client_kwargs(),
        "group_id": group_id,
        "client_id": client_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 4 << 20,
        "fetch_max_bytes": 32 << 20,
    }
    if group_id is not None:
        kw.update(GROUP_TIMINGS)
    return _connect(KafkaConsumer, settings, {**kw, **extra})


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


def ensure_topics(settings: KafkaSettings, partitions: Mapping[str, int]) -> None:
    """Create each missing topic with its partition count (replication 1 here; production sets its own).

    Existing topics are left alone; a partition count that differs is logged, not changed.
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    try:
        admin = KafkaAdminClient(**settings.client_kwargs(), client_id="zerocf-admin")
    except _unreachable():
        raise ServiceUnavailable(f"no Kafka broker answers at {settings.bootstrap}") from None
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(name, n, 1) for name, n in partitions.items() if name not in existing]
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
