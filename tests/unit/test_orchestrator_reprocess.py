"""Reprocessing tasks in one worker's scope loop (invariants 1, 2 and 5).

Same harness as test_orchestrator.py: real SQLite storage, real tooz file
locks and executors, a test-double collector whose values a test can
change to see that a period was collected again.
"""

from __future__ import annotations

import decimal
import threading

from cloudkitty_proc.leases import lease_name, start_coordinator
from cloudkitty_proc.storage.sql import SQLStorage
from tests.unit.test_orchestrator import (HOUR, T0, FakeCollector, LostLeaseCoordinator,
                                          conf, make_worker, storage)  # noqa: F401

D = decimal.Decimal


class VersionedCollector(FakeCollector):
    """Quantities are hour + 1 + 100 × version: a re-collected period shows."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.version = 0

    def retrieve(self, metric, scope_id, begin, end):
        points = super().retrieve(metric, scope_id, begin, end)
        return [p._replace(qty=p.qty + 100 * self.version) for p in points]


def qtys(storage, scope):
    out = {}
    for row in storage.iter_rated(scope):
        out.setdefault(int((row.begin - T0) / HOUR), set()).add(row.qty)
    return out


def processed(conf, storage, collector, scopes=("a",)):
    worker = make_worker(conf, storage, collector)
    for scope in scopes:
        while worker.process_scope(scope).more_due:
            pass
    return worker


def test_task_runs_under_the_lock_within_the_period_budget(conf, storage):
    conf.set_override("max_periods_per_lock", 4, group="orchestrator")
    collector = VersionedCollector()
    worker = processed(conf, storage, collector, scopes=("a", "b", "c"))
    state = storage.get_state("a")
    collector.version = 1
    [tid] = storage.create_reprocess_tasks(["a"], T0, T0 + 6 * HOUR, "r", 3600)
    res = worker.process_scope("a")
    assert (res.committed, res.more_due, res.error) == (4, True, False)
    task = storage.list_tasks(ids=[tid])[0]
    assert (task.state, task.done_periods, task.next_period) == ("running", 4, T0 + 4 * HOUR)
    res = worker.process_scope("a")
    assert (res.committed, res.more_due) == (2, False)
    assert storage.list_tasks(ids=[tid])[0].state == "done"
    assert qtys(storage, "a") == {h: {D(h + 101)} for h in range(6)}
    assert storage.get_state("a") == state  # reprocessing never moves the state

    # invariant 5: while another member holds the scope's lock, nothing runs
    [tid] = storage.create_reprocess_tasks(["a"], T0, T0 + HOUR, "again", 3600)
    other = start_coordinator(conf, "holder")
    lock = other.get_lock(lease_name(conf, "a"))
    assert lock.acquire(blocking=False)
    try:
        assert worker.process_scope("a") is None
        result = worker.run_pass()
        assert result.pending and result.committed == 0
        assert storage.list_tasks(ids=[tid])[0].done_periods == 0
    finally:
        lock.release()
        other.stop()
    # free again: the pass visits "a" for its task although nothing is due
    result = worker.run_pass()
    assert result.committed == 1 and not result.pending
    assert storage.list_tasks(ids=[tid])[0].state == "done"


def test_task_first_then_due_periods_share_the_budget(conf, storage):
    conf.set_override("max_periods_per_lock", 4, group="orchestrator")
    conf.set_override("end", (T0 + 3 * HOUR).isoformat(), group="collect")
    collector = VersionedCollector()
    worker = processed(conf, storage, collector)
    assert storage.get_state("a").last_processed == T0 + 2 * HOUR
    conf.set_override("end", (T0 + 6 * HOUR).isoformat(), group="collect")
    worker = make_worker(conf, storage, collector)
    collector.version = 1
    storage.create_reprocess_tasks(["a"], T0 + HOUR, T0 + 3 * HOUR, "r", 3600)
    res = worker.process_scope("a")
    # 2 re-rated periods, then 2 of the 3 due ones
    assert (res.committed, res.more_due) == (4, True)
    assert storage.get_state("a").last_processed == T0 + 4 * HOUR
    assert worker.process_scope("a").committed == 1
    assert qtys(storage, "a") == {0: {D(1)}, **{h: {D(h + 101)} for h in range(1, 6)}}


def test_collect_error_in_a_task_is_retried_and_recorded(conf, storage):
    collector = VersionedCollector()
    worker = processed(conf, storage, collector)
    broken = {"on": True}
    collector.fail = lambda s, b: broken["on"] and b == T0 + 2 * HOUR
    collector.version = 1
    [tid] = storage.create_reprocess_tasks(["a"], T0, T0 + 4 * HOUR, "r", 3600)
    res = worker.process_scope("a")
    assert (res.committed, res.error) == (2, True)
    task = storage.list_tasks(ids=[tid])[0]
    assert (task.state, task.done_periods) == ("running", 2)
    assert "HTTP 500" in task.last_error
    assert "HTTP 500" in storage.get_state("a").last_error
    assert qtys(storage, "a")[2] == {D(3)}  # the failed period keeps its old rows
    broken["on"] = False
    res = worker.process_scope("a")
    assert (res.committed, res.error) == (2, False)
    task = storage.list_tasks(ids=[tid])[0]
    assert (task.state, task.done_periods, task.last_error) == ("done", 4, None)
    assert qtys(storage, "a") == {**{h: {D(h + 101)} for h in range(4)},
                                  **{h: {D(h + 1)} for h in range(4, 6)}}


def test_two_workers_with_lapsed_leases_rate_each_period_once(conf, storage):
    """Invariant 2 for tasks: A collects the task's first period, B (its
    lease) runs the whole task meanwhile; A's commit is fenced by the task
    progress compare-and-set: nothing doubled, no error."""
    processed(conf, storage, VersionedCollector())
    [tid] = storage.create_reprocess_tasks(["a"], T0, T0 + 3 * HOUR, "r", 3600)
    sb = SQLStorage(conf)
    a_collecting = threading.Event()
    b_done = threading.Event()

    def a_before(scope, begin):
        a_collecting.set()
        assert b_done.wait(30)

    worker_a = make_worker(conf, storage, VersionedCollector(before=a_before),
                           coordinator=LostLeaseCoordinator(), name="A")
    collector_b = VersionedCollector()
    collector_b.version = 2
    worker_b = make_worker(conf, sb, collector_b, coordinator=LostLeaseCoordinator(), name="B")
    result = {}
    ta = threading.Thread(target=lambda: result.setdefault("a", worker_a.process_scope("a")))
    ta.start()
    assert a_collecting.wait(30)
    assert worker_b.process_scope("a").committed == 3
    b_done.set()
    ta.join(30)
    assert result["a"].committed == 0 and not result["a"].error
    assert storage.list_tasks(ids=[tid])[0].done_periods == 3
    assert qtys(storage, "a") == {**{h: {D(h + 201)} for h in range(3)},
                                  **{h: {D(h + 1)} for h in range(3, 6)}}
    periods = [p.begin for p in storage.iter_periods("a")]
    assert periods == [T0 + h * HOUR for h in range(6)]
    sb.close()
