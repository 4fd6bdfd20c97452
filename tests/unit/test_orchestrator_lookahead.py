"""Look-ahead across scopes (``[orchestrator] lookahead_scopes``).

While a scope's last periods are rated and committed, the worker locks the
next due scope of the pass and queues its first periods, so the queries in
flight do not drop at every scope change. Each scope still commits in time
order under its own lock. Same harness as test_orchestrator.py.
"""

from __future__ import annotations

import pytest

from cloudkitty_proc.leases import lock_name, start_coordinator
from tests.unit.test_orchestrator import (HOUR, T0, FakeCollector, conf,  # noqa: F401
                                          make_worker, rows_by_period, storage)

LAST = T0 + 5 * HOUR


@pytest.fixture(autouse=True)
def per_scope(conf):  # noqa: F811 - the imported fixture
    """The look-ahead across scopes belongs to the per-scope path: one
    lease and one query per scope (batched passes have no use for it)."""
    conf.set_override("lease_partitions", 0, group="orchestrator")
    conf.set_override("max_scopes_per_query", 1, group="collect")


def lock_is_free(conf, scope):
    coord = start_coordinator(conf, f"probe-{scope}")
    try:
        lock = coord.get_lock(lock_name(scope))
        if lock.acquire(blocking=False):
            lock.release()
            return True
        return False
    finally:
        coord.stop()


class CommitSpy:
    """Wraps storage.commit_period: records (scope, begin) in commit order
    and, at chosen commits, what the collector had been asked so far."""

    def __init__(self, storage, collector, conf, on=None):
        self.order = []
        self.seen = {}
        self.locks = {}
        self.real = storage.commit_period
        self.collector = collector
        self.conf = conf
        self.on = on or {}
        storage.commit_period = self

    def __call__(self, frame, expected_version, **kw):
        key = (frame.scope_id, frame.begin)
        if key in self.on:
            with self.collector.lock:
                self.seen[key] = {(s, b) for s, b, _m in self.collector.calls}
            self.locks[key] = {s: lock_is_free(self.conf, s) for s in ("a", "b", "c")}
            action = self.on[key]
            if action is not None:
                action()
        version = self.real(frame, expected_version, **kw)
        self.order.append(key)
        return version


@pytest.mark.parametrize("executor", ["threads", "greenpool"])
def test_next_scope_is_collected_while_the_current_one_finishes(conf, storage, executor):
    collector = FakeCollector()
    worker = make_worker(conf, storage, collector, executor=executor)
    spy = CommitSpy(storage, collector, conf, on={("a", LAST): None, ("b", LAST): None})
    result = worker.run_pass()
    assert (result.committed, result.errors) == (18, 0)
    # before a's last period was committed, b's first period was asked for
    # and b's lock was held by this worker, c's not yet
    assert ("b", T0) in spy.seen[("a", LAST)]
    assert not any(s == "c" for s, _b in spy.seen[("a", LAST)])
    assert spy.locks[("a", LAST)] == {"a": False, "b": False, "c": True}
    # ... and so on to the next scope
    assert ("c", T0) in spy.seen[("b", LAST)]
    # each scope committed in time order, every period once
    for scope in "abc":
        begins = [b for s, b in spy.order if s == scope]
        assert begins == [T0 + i * HOUR for i in range(6)]
        assert sorted(rows_by_period(storage, scope)) == begins
        assert storage.get_state(scope).last_processed == LAST
    assert all(lock_is_free(conf, s) for s in "abc")


def test_without_lookahead_scopes_the_next_scope_waits(conf, storage):
    conf.set_override("lookahead_scopes", False, group="orchestrator")
    collector = FakeCollector()
    worker = make_worker(conf, storage, collector)
    spy = CommitSpy(storage, collector, conf, on={("a", LAST): None})
    assert worker.run_pass().committed == 18
    assert not any(s == "b" for s, _b in spy.seen[("a", LAST)])
    assert spy.locks[("a", LAST)]["b"] is True


def test_scope_taken_ahead_is_given_back_unrated_on_stop(conf, storage):
    collector = FakeCollector()
    worker = make_worker(conf, storage, collector)
    spy = CommitSpy(storage, collector, conf, on={("a", LAST): worker.stop_event.set})
    result = worker.run_pass()
    assert result.pending and result.committed == 6
    assert ("b", T0) in spy.seen[("a", LAST)]  # b was collected ahead...
    assert storage.get_state("b").last_processed is None  # ...never committed
    assert rows_by_period(storage, "b") == {}
    assert all(lock_is_free(conf, s) for s in "abc")
    worker.stop_event.clear()
    assert worker.run_pass().committed == 12  # b and c, each period once
    assert len(rows_by_period(storage, "b")) == 6


def test_reload_pending_stops_the_look_ahead(conf, storage):
    collector = FakeCollector()
    worker = make_worker(conf, storage, collector)
    worker.reload_pending = lambda: True
    spy = CommitSpy(storage, collector, conf, on={("a", LAST): None})
    assert worker.run_pass().committed == 18
    assert not any(s == "b" for s, _b in spy.seen[("a", LAST)])


def test_scope_with_reprocessing_is_not_taken_ahead(conf, storage):
    """Its reprocessing must run first, under its lock: the usual path."""
    collector = FakeCollector()
    conf.set_override("end", (T0 + 3 * HOUR).isoformat(), group="collect")
    worker = make_worker(conf, storage, collector)
    assert worker.run_pass().committed == 9
    conf.set_override("end", (T0 + 6 * HOUR).isoformat(), group="collect")
    worker.end = T0 + 6 * HOUR
    [tid] = storage.create_reprocess_tasks(["b"], T0, T0 + 3 * HOUR, "r", 3600)
    with collector.lock:
        collector.calls.clear()
    spy = CommitSpy(storage, collector, conf, on={("a", LAST): None})
    assert worker.run_pass().committed == 12  # 3 x 3 due periods + 3 re-rated
    assert not any(s == "b" for s, _b in spy.seen[("a", LAST)])
    assert storage.list_tasks(ids=[tid])[0].state == "done"
    assert storage.get_state("b").last_processed == LAST
