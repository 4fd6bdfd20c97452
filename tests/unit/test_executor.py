"""The collect executors (executor.py)."""

from __future__ import annotations

import pytest

from cloudkitty_proc.executor import make_executor


def test_greenpool_submit_never_blocks_and_refills_slots_in_order():
    """Calls beyond the pool size queue (submit returns at once); a call
    starts as soon as a slot frees, oldest first, whatever the caller waits
    for; at most ``size`` run at once; results and errors come back."""
    import eventlet
    from eventlet import event

    ex = make_executor("greenpool", 2)
    started, running, peak = [], [0], [0]
    gates = {i: event.Event() for i in range(6)}

    def call(i):
        started.append(i)
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        try:
            gates[i].wait()
            if i == 4:
                raise ValueError("call 4 failed")
            return i * 10
        finally:
            running[0] -= 1

    with eventlet.Timeout(5):  # a submit that blocks while the pool is full fails here
        handles = [ex.submit(call, i) for i in range(6)]  # returns: nothing ran yet
    assert started == []
    eventlet.sleep(0)
    assert started == [0, 1]
    # call 1 finishes while the caller would be waiting for call 0: its slot
    # goes to the oldest queued call (2) at once
    gates[1].send()
    eventlet.sleep(0)
    assert started == [0, 1, 2]
    for i in (0, 2, 3, 4, 5):
        gates[i].send()
    assert [h.result() for h in handles[:4]] == [0, 10, 20, 30]
    with pytest.raises(ValueError, match="call 4 failed"):
        handles[4].result()
    assert handles[5].result() == 50
    assert started == [0, 1, 2, 3, 4, 5] and peak[0] == 2
    ex.close()


@pytest.mark.parametrize("kind", ["greenpool", "threads"])
def test_executor_sleep_lets_calls_run(kind):
    """``sleep`` (used by the storage while it waits for a lock) lets the
    calls in flight progress: with the GreenPool it must be a green sleep."""
    ex = make_executor(kind, 4)
    done = []
    handles = [ex.submit(done.append, i) for i in range(3)]
    ex.sleep(0.05)
    assert sorted(done) == [0, 1, 2]
    for h in handles:
        h.result()
    ex.close()
