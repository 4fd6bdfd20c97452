"""Invariants 1-4 at the level of one worker's scope loop.

Real SQL storage (SQLite file), real tooz file locks, real executors; the
collector is a test double (this module's subject is the orchestrator).
"""

from __future__ import annotations

import datetime
import decimal
import threading
import time

import pytest
from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc.dataframe import DataPoint
from cloudkitty_proc.exceptions import CollectError
from cloudkitty_proc.executor import make_executor
from cloudkitty_proc.fetchers.source import SourceFetcher
from cloudkitty_proc.metrics_conf import parse_metrics
from cloudkitty_proc.leases import lease_name, start_coordinator
from cloudkitty_proc.rating.noop import NoopProcessor
from cloudkitty_proc.schedule import is_due
from cloudkitty_proc.storage.sql import SQLStorage
from cloudkitty_proc.worker import Worker

UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
HOUR = datetime.timedelta(hours=1)

METRICS = parse_metrics({"metrics": {
    "m1": {"unit": "u1", "groupby": ["id"]},
    "m2": {"unit": "u2", "alt_name": "two", "groupby": ["id"]},
}})


class FakeCollector:
    """retrieve() → one point per metric; hooks let a test interfere."""

    def __init__(self, delay=None, fail=None, before=None, empty=None):
        self.metrics = METRICS
        self.delay = delay or (lambda scope, begin: 0)
        self.fail = fail or (lambda scope, begin: False)
        self.before = before
        self.empty = empty or (lambda scope, begin: False)
        self.calls = []
        self.lock = threading.Lock()

    def retrieve(self, metric, scope_id, begin, end):
        with self.lock:
            self.calls.append((scope_id, begin, metric.name))
        if self.before:
            self.before(scope_id, begin)
        d = self.delay(scope_id, begin)
        if d:
            time.sleep(d)
        if self.fail(scope_id, begin):
            raise CollectError("HTTP 500 from backend", metric=metric.name, scope_id=scope_id,
                               kind="http")
        if self.empty(scope_id, begin):
            return []
        hours = int((begin - T0).total_seconds() // 3600)
        return [DataPoint(metric.unit, decimal.Decimal(hours + 1), decimal.Decimal(0),
                          {"id": "r1", "project_id": scope_id}, {})]

    def close(self):
        pass


class AlwaysLock:
    """A lock whose lease 'lapsed': every worker gets it (fencing test)."""

    def acquire(self, blocking=True):
        return True

    def release(self):
        return True


class LostLeaseCoordinator:
    def get_lock(self, name):
        return AlwaysLock()


@pytest.fixture
def conf(tmp_path):
    c = cfg.ConfigOpts()
    ckp_conf.register_opts(c)
    c([], project="cloudkitty-proc-test")
    c.set_override("state_path", str(tmp_path))
    c.set_override("begin", T0.isoformat(), group="collect")
    c.set_override("end", (T0 + 6 * HOUR).isoformat(), group="collect")
    c.set_override("sources", ["a", "b", "c"], group="fetcher_source")
    c.set_override("connection", f"sqlite:///{tmp_path}/db.sqlite", group="database")
    c.set_override("coordination_url", f"file://{tmp_path}/locks", group="orchestrator")
    c.set_override("lookahead_periods", 4, group="orchestrator")
    return c


@pytest.fixture
def storage(conf):
    s = SQLStorage(conf)
    s.upgrade()
    yield s
    s.close()


def make_worker(conf, storage, collector, *, coordinator=None, executor="threads", name="w0"):
    coord = coordinator or start_coordinator(conf, f"{name}-test")
    return Worker(conf, name, storage=storage, collector=collector,
                  fetcher=SourceFetcher(conf), rating_chain=[NoopProcessor(conf)],
                  coordinator=coord, executor=make_executor(executor, 16), oneshot=True)


def rows_by_period(storage, scope):
    out = {}
    for row in storage.iter_rated(scope):
        out.setdefault(row.begin, []).append((row.type, row.qty))
    return out


@pytest.mark.parametrize("executor", ["threads", "greenpool"])
def test_periods_commit_in_order_although_later_ones_collect_first(conf, storage, executor):
    """Invariant 3: with look-ahead, period 0 is the slowest to collect; the
    commits still happen in time order and the state ends at the last one."""
    order = []
    real_commit = storage.commit_period

    def spy(frame, expected_version, **kw):
        order.append(frame.begin)
        return real_commit(frame, expected_version, **kw)

    storage.commit_period = spy
    if executor == "greenpool":
        import eventlet

        def sleeper(scope, begin):
            eventlet.sleep(0.05 * (6 - int((begin - T0) / HOUR)))
            return 0
        collector = FakeCollector(before=sleeper)
    else:
        collector = FakeCollector(delay=lambda s, b: 0.05 * (6 - int((b - T0) / HOUR)))
    worker = make_worker(conf, storage, collector, executor=executor)
    res = worker.process_scope("a")
    assert res.committed == 6
    assert order == [T0 + i * HOUR for i in range(6)]
    assert storage.get_state("a").last_processed == T0 + 5 * HOUR
    # look-ahead really overlapped: period 1 was requested before period 0 committed
    assert collector.calls.index(("a", T0 + HOUR, "m1")) < 2 * 6


def test_stale_worker_cannot_commit_over_another(conf, tmp_path):
    """Invariant 2: A reads the state, then its lease lapses and B processes
    the scope; A's commit is refused (stale state), nothing is doubled."""
    sa_ = SQLStorage(conf)
    sa_.upgrade()
    sb = SQLStorage(conf)
    a_collecting = threading.Event()
    b_done = threading.Event()

    def a_before(scope, begin):
        a_collecting.set()
        assert b_done.wait(30)

    worker_a = make_worker(conf, sa_, FakeCollector(before=a_before),
                           coordinator=LostLeaseCoordinator(), name="A")
    worker_b = make_worker(conf, sb, FakeCollector(), coordinator=LostLeaseCoordinator(),
                           name="B")
    result = {}
    ta = threading.Thread(target=lambda: result.setdefault("a", worker_a.process_scope("a")))
    ta.start()
    assert a_collecting.wait(30)
    res_b = worker_b.process_scope("a")
    b_done.set()
    ta.join(30)
    assert res_b.committed == 6
    res_a = result["a"]
    assert res_a.committed == 0
    assert not res_a.error, "A must be fenced by the compare-and-set, not fail on storage"
    state = sa_.get_state("a")
    assert state.last_processed == T0 + 5 * HOUR and state.last_error is None
    periods = rows_by_period(sa_, "a")
    assert sorted(periods) == [T0 + i * HOUR for i in range(6)]
    assert all(len(v) == 2 for v in periods.values())
    sa_.close()
    sb.close()


def test_collect_error_leaves_state_and_other_scopes_go_on(conf, storage):
    """Invariant 4: scope b fails at its 3rd period (HTTP 500); its state
    stays at the 2nd, a and c complete, b's error is recorded; once the
    backend heals the next pass finishes b."""
    broken = {"on": True}
    collector = FakeCollector(fail=lambda s, b: broken["on"] and s == "b" and b == T0 + 2 * HOUR)
    worker = make_worker(conf, storage, collector)
    worker.oneshot = False
    result = worker.run_pass()
    assert result.errors == 1
    states = storage.get_states(["a", "b", "c"])
    assert states["a"].last_processed == T0 + 5 * HOUR
    assert states["c"].last_processed == T0 + 5 * HOUR
    assert states["b"].last_processed == T0 + 1 * HOUR
    assert "HTTP 500" in states["b"].last_error
    assert sorted(rows_by_period(storage, "b")) == [T0, T0 + HOUR]
    broken["on"] = False
    worker.run_pass()
    assert storage.get_state("b").last_processed == T0 + 5 * HOUR
    assert len(rows_by_period(storage, "b")) == 6


def test_empty_period_is_committed_not_skipped(conf, storage):
    collector = FakeCollector(empty=lambda s, b: b == T0 + 3 * HOUR)
    worker = make_worker(conf, storage, collector)
    assert worker.process_scope("a").committed == 6
    periods = rows_by_period(storage, "a")
    assert T0 + 3 * HOUR not in periods and len(periods) == 5
    assert storage.get_state("a").last_processed == T0 + 5 * HOUR


def test_locked_scope_is_left_to_its_holder(conf, storage):
    coord = start_coordinator(conf, "holder")
    lock = coord.get_lock(lease_name(conf, "a"))
    assert lock.acquire(blocking=False)
    try:
        worker = make_worker(conf, storage, FakeCollector())
        assert worker.process_scope("a") is None
        result = worker.run_pass()
        assert result.pending  # oneshot must not finish while a is held
        assert storage.get_state("a").last_processed is None
        # the scopes under the same lease (a's partition) wait with it, the
        # others are rated
        held = lease_name(conf, "a")
        for scope in "bc":
            expected = None if lease_name(conf, scope) == held else T0 + 5 * HOUR
            assert storage.get_state(scope).last_processed == expected
        assert {lease_name(conf, s) == held for s in "bc"} == {True, False}
    finally:
        lock.release()
        coord.stop()


def test_fairness_bounded_periods_per_lock(conf, storage):
    conf.set_override("max_periods_per_lock", 2, group="orchestrator")
    worker = make_worker(conf, storage, FakeCollector())
    res = worker.process_scope("a")
    assert res.committed == 2 and res.more_due


def test_due_rule():
    now = datetime.datetime(2026, 1, 1, 5, 30, tzinfo=UTC)
    # wait_periods=2: the period starting at 03:00 is due once 05:00 passed
    assert is_due(T0 + 3 * HOUR, now, 3600, 2, None)
    assert not is_due(T0 + 4 * HOUR, now, 3600, 2, None)
    # wait_periods=0 never collects a period that has not ended
    assert not is_due(T0 + 5 * HOUR, now, 3600, 0, None)
    assert is_due(T0 + 4 * HOUR, now, 3600, 0, None)
    # [collect] end bounds the work
    assert not is_due(T0 + 3 * HOUR, now, 3600, 2, T0 + 3 * HOUR)


def test_host_query_cap_is_shared_by_workers(conf):
    from cloudkitty_proc.orchestrator import pool_size

    conf.set_override("max_threads", 16, group="orchestrator")
    conf.set_override("max_workers", 4, group="orchestrator")
    assert pool_size(conf) == 16
    conf.set_override("max_host_queries", 20, group="orchestrator")
    assert pool_size(conf) == 5
    conf.set_override("max_host_queries", 2, group="orchestrator")
    assert pool_size(conf) == 1


@pytest.mark.parametrize("executor", ["greenpool", "threads"])
def test_the_collector_in_use_is_wired_to_the_executor_hooks(conf, storage, executor):
    """The worker gives its collector the executor's io_begin/io_done (the
    GreenPool hands a query's slot on once its reply is read), and again
    to the collector a reload puts in its place."""
    from cloudkitty_proc.collectors.base import BaseCollector

    class Collector(BaseCollector):
        def fetch(self, metric, scope_id, begin, end):
            return []

    first, second = Collector(conf, METRICS), Collector(conf, METRICS)
    worker = make_worker(conf, storage, first, executor=executor)
    assert first.io_begin == worker.executor.io_begin
    assert first.io_done == worker.executor.io_done
    worker.collector = second                     # what a reload does
    assert worker.collector is second
    assert second.io_begin == worker.executor.io_begin
    assert second.io_done == worker.executor.io_done
    # a collector without the hooks (a plugin of its own) is used as is
    worker.collector = FakeCollector()
    assert isinstance(worker.collector, FakeCollector)


def test_settle_gc_freezes_the_setup_and_spaces_young_collections():
    """What a worker does once set up: the objects alive then are out of
    the collector's reach (a full collection no longer scans them), and the
    young generation is collected every GC_THRESHOLD0 allocations."""
    import gc

    from cloudkitty_proc import orchestrator

    before = gc.get_threshold()
    setup = [object()]                      # "alive once the worker is set up"
    try:
        orchestrator._settle_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (orchestrator.GC_THRESHOLD0, *before[1:])
        assert not any(o is setup for o in gc.get_objects(generation=2))
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
