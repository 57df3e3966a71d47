"""A first-come, first-served gate: at most ``slots`` threads inside at once, the rest wait in arrival order.

``zerocf serve`` runs one thread per connection; with 50 busy connections on 2 cores, 50 threads competing
for the GIL and the cores are served in no particular order, so a few requests wait many times the average
(a closed-loop p99 ~8x its p50). The numpy part of a lookup goes through this gate instead: one thread per
core computes, the others sleep on their own event (not on the GIL) and enter in the order they came, so a
queued request waits ~(its place in line) x (service time) / slots, and the tail follows the mean. Redis
reads stay outside the gate: a paused Redis must not hold a slot.

>>> gate = FifoGate(1)
>>> with gate:
...     gate.inside
1
>>> gate.inside
0
"""

from __future__ import annotations

import os
import threading
from collections import deque
from types import TracebackType

__all__ = ["FifoGate", "usable_cpus"]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


class FifoGate:
    """At most ``slots`` holders; waiters are admitted strictly in arrival order (a slot is handed over)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1")
        self.slots = int(slots)
        self.inside = 0
        self._lock = threading.Lock()
        self._waiters: deque[threading.Event] = deque()

    def __enter__(self) -> FifoGate:
        with self._lock:
            if self.inside < self.slots and not self._waiters:
                self.inside += 1
                return self
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # the releasing thread handed its slot to us (inside stays counted)
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self.inside -= 1
