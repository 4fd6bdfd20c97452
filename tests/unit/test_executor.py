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


def test_greenpool_io_done_hands_the_slot_to_the_next_call():
    """A call that says its exchange is over (io_done) gives its slot to
    the next queued call, which starts before the first one goes on (its
    request leaves before the reply is parsed); at most ``size`` calls are
    ever between io_begin and io_done."""
    import eventlet
    from eventlet import event

    ex = make_executor("greenpool", 1)
    log, in_io, peak = [], [0], [0]
    parse_gate = event.Event()

    def call(i, gate=None):
        ex.io_begin()
        in_io[0] += 1
        peak[0] = max(peak[0], in_io[0])
        log.append(f"send {i}")
        eventlet.sleep(0)          # the exchange
        in_io[0] -= 1
        ex.io_done()
        log.append(f"parse {i}")
        if gate is not None:
            gate.wait()            # a long parse holds no slot
        return i

    with eventlet.Timeout(5):
        a = ex.submit(call, "a", parse_gate)
        b = ex.submit(call, "b")
        c = ex.submit(call, "c")
        eventlet.sleep(0.01)
        # b and c ran their exchanges while a was still parsing
        assert log[:3] == ["send a", "send b", "parse a"]
        assert "send c" in log and a.done.ready() is False
        parse_gate.send()
        assert [a.result(), b.result(), c.result()] == ["a", "b", "c"]
    assert peak[0] == 1
    ex.close()


def test_greenpool_io_begin_gets_a_slot_back_before_queued_calls():
    """A call that gave its slot away and needs the network again (a
    retry) waits for a slot, and gets the next free one ahead of the calls
    still queued: the cap on queries in flight holds."""
    import eventlet
    from eventlet import event

    ex = make_executor("greenpool", 1)
    log, in_io, peak = [], [0], [0]
    b_gate = event.Event()

    def exchange(name, gate=None):
        in_io[0] += 1
        peak[0] = max(peak[0], in_io[0])
        log.append(name)
        if gate is not None:
            gate.wait()
        else:
            eventlet.sleep(0)
        in_io[0] -= 1

    def retrying():
        ex.io_begin()
        exchange("a try 1")
        ex.io_done()               # b starts and holds the only slot
        ex.io_begin()              # waits for it
        exchange("a try 2")
        ex.io_done()
        return "a"

    def plain(name, gate=None):
        ex.io_begin()
        exchange(name, gate)
        ex.io_done()
        return name

    with eventlet.Timeout(5):
        handles = [ex.submit(retrying), ex.submit(plain, "b", b_gate), ex.submit(plain, "c")]
        eventlet.sleep(0.01)
        assert log == ["a try 1", "b"]      # a waits for b's slot; c is queued
        b_gate.send()
        assert [h.result() for h in handles] == ["a", "b", "c"]
    assert log == ["a try 1", "b", "a try 2", "c"]
    assert peak[0] == 1
    ex.close()


@pytest.mark.parametrize("kind", ["greenpool", "threads"])
def test_io_hooks_outside_a_call_do_nothing(kind):
    """The collector's hooks also run outside the executor (the startup
    check, the fetcher): there they neither block nor start anything."""
    ex = make_executor(kind, 1)
    ex.io_begin()
    ex.io_done()
    handle = ex.submit(lambda: 42)
    assert handle.result() == 42
    ex.close()
