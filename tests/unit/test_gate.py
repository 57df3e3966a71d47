"""The first-come-first-served gate of the serving lookups: a bound on holders, admission in arrival order."""

from __future__ import annotations

import threading
import time

import pytest

from workers.serving.gate import FifoGate, usable_cpus


@pytest.mark.parametrize("slots", [1, 2])
def test_waiters_enter_in_arrival_order_and_never_more_than_the_slots(slots: int) -> None:
    gate, order, peak = FifoGate(slots), [], [0]
    lock = threading.Lock()

    def work(n: int) -> None:
        with gate:
            with lock:
                order.append(n)
                peak[0] = max(peak[0], gate.inside)
            time.sleep(0.01)

    held = [gate.__enter__() for _ in range(slots)]  # every slot taken: everyone below queues
    try:
        threads = []
        for n in range(8):
            t = threading.Thread(target=work, args=(n,))
            t.start()
            threads.append(t)
            deadline = time.monotonic() + 5
            while len(gate._waiters) < n + 1 and time.monotonic() < deadline:  # queued before the next one
                time.sleep(0.001)
        assert order == []
    finally:
        for g in held:
            g.__exit__(None, None, None)
    for t in threads:
        t.join(5)
    assert peak[0] <= slots and gate.inside == 0
    if slots == 1:
        assert order == list(range(8))  # with one slot, entry order is admission order
    else:  # admitted in order; two admitted together may record in either order
        assert all(abs(n - order.index(n)) < slots for n in range(8)), order


def test_a_failing_holder_hands_its_slot_on() -> None:
    gate = FifoGate(1)
    with pytest.raises(RuntimeError), gate:
        raise RuntimeError("boom")
    assert gate.inside == 0
    with gate:
        assert gate.inside == 1
    with pytest.raises(ValueError, match="slots=0 must be >= 1"):
        FifoGate(0)
    assert usable_cpus() >= 1
