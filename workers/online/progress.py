"""How far every partition of the events topic is from its end, whoever owns it (``lmf --until-idle``).

A member of the LMF group sees only its own partitions; "done" means every partition's applied offset (the
fence in Redis) reached the end of the partition. The end is the high watermark a fetch returns to a
group-less probe consumer (never ``end_offsets()``, which the dev broker gets wrong for batched records).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from kafka.structs import TopicPartition

from stream import kafka_util
from stream.config import KafkaSettings

__all__ = ["TopicEnds"]

WAIT_S = 5.0  # how long one probe waits for every partition's high watermark


class TopicEnds:
    """A group-less consumer that reads the high watermark of every partition of ``topic``."""

    def __init__(self, settings: KafkaSettings, topic: str) -> None:
        self.topic = topic
        self.consumer = kafka_util.consumer(settings, group_id=None, client_id="zerocf-lmf-probe",
                                            max_poll_records=500, fetch_max_wait_ms=100,
                                            max_partition_fetch_bytes=1 << 16)  # fmt: skip

    def behind(self, applied: Mapping[int, int | None]) -> dict[int, int]:
        """Records past ``applied[p]`` (the last applied offset; None: nothing yet) per partition ``p`` of
        ``applied``, for the partitions that are behind. A partition whose end is not known within
        :data:`WAIT_S` counts as behind (not proven done)."""
        probe = self.consumer
        tps = [TopicPartition(self.topic, p) for p in sorted(applied)]
        if not tps:
            return {}
        probe.assign(tps)
        first = probe.beginning_offsets([tp for tp in tps if applied[tp.partition] is None])
        start: dict[int, int] = {}
        for tp in tps:
            off = applied[tp.partition]
            start[tp.partition] = first.get(tp, 0) if off is None else off + 1
            probe.seek(tp, start[tp.partition])
        deadline = time.monotonic() + WAIT_S
        while any(probe.highwater(tp) is None for tp in tps) and time.monotonic() < deadline:
            probe.poll(timeout_ms=200, max_records=500)
        out = {}
        for tp in tps:
            hw = probe.highwater(tp)
            n = 1 if hw is None else hw - start[tp.partition]
            if n > 0:
                out[tp.partition] = n
        return out

    def close(self) -> None:
        self.consumer.close()
