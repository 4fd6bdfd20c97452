"""Batched passes (batched_pass.py, batch.py): scopes leased by partition,
collected with one query per metric and period, committed together.

Real SQL storage (SQLite file), real tooz file locks, real executors; the
collector is a test double answering batched calls (its subject is the
worker's side: fallbacks, isolation of a bad scope, fencing per scope).
"""

from __future__ import annotations

import decimal

import pytest

from cloudkitty_proc.dataframe import DataPoint
from cloudkitty_proc.exceptions import CollectError
from cloudkitty_proc.leases import lease_name
from tests.unit.test_orchestrator import (HOUR, T0, FakeCollector, conf,  # noqa: F401
                                          make_worker, rows_by_period, storage)

SCOPES = ["a", "b", "c", "d", "e"]
LAST = T0 + 5 * HOUR


@pytest.fixture(autouse=True)
def five_scopes(conf):  # noqa: F811 - the imported fixture
    conf.set_override("sources", SCOPES, group="fetcher_source")
    conf.set_override("lease_partitions", 1, group="orchestrator")


class BatchCollector(FakeCollector):
    """FakeCollector with retrieve_batch: ``batch_calls`` records (scopes,
    begin, metric); ``bad(scope, begin)`` makes a scope's part of a batched
    reply unusable (None: the worker asks it alone); ``batch_error(begin)``
    makes the batched query fail as a whole."""

    def __init__(self, bad=None, batch_error=None, **kw):
        super().__init__(**kw)
        self.bad = bad or (lambda scope, begin: False)
        self.batch_error = batch_error or (lambda begin: None)
        self.batch_calls = []

    def retrieve_batch(self, metric, scope_ids, begin, end):
        with self.lock:
            self.batch_calls.append((tuple(scope_ids), begin, metric.name))
        exc = self.batch_error(begin)
        if exc is not None:
            raise exc
        out = {}
        for scope in scope_ids:
            if self.bad(scope, begin):
                out[scope] = None
                continue
            hours = int((begin - T0).total_seconds() // 3600)
            out[scope] = [DataPoint(metric.unit, decimal.Decimal(hours + 1), decimal.Decimal(0),
                                    {"id": "r1", "project_id": scope}, {})]
        return out


def single_calls(collector):
    return {(s, b) for s, b, _m in collector.calls}


@pytest.mark.parametrize("executor", ["threads", "greenpool"])
def test_one_query_per_metric_and_period_for_the_whole_batch(conf, storage, executor):
    collector = BatchCollector()
    worker = make_worker(conf, storage, collector, executor=executor)
    result = worker.run_pass()
    assert result.committed == 5 * 6 and not result.errors
    # 6 periods x 2 metrics, each one query for the five scopes
    assert len(collector.batch_calls) == 12
    assert {c[0] for c in collector.batch_calls} == {tuple(sorted(SCOPES))} or \
        {frozenset(c[0]) for c in collector.batch_calls} == {frozenset(SCOPES)}
    assert collector.calls == []
    for scope in SCOPES:
        assert storage.get_state(scope).last_processed == LAST
        periods = rows_by_period(storage, scope)
        assert sorted(periods) == [T0 + h * HOUR for h in range(6)]
        assert periods[T0 + 2 * HOUR] == [("m1", 3), ("two", 3)]


def test_a_scope_malformed_in_the_batch_fails_alone(conf, storage):
    """Scope c's values are malformed from period 2 on: the batch answers
    None for it, the worker asks c alone (where the collector fails), c's
    error is recorded and its state stays at period 1; every other scope
    commits all six periods."""
    bad = lambda scope, begin: scope == "c" and begin >= T0 + 2 * HOUR  # noqa: E731
    collector = BatchCollector(bad=bad, fail=bad)
    worker = make_worker(conf, storage, collector)
    result = worker.run_pass()
    assert result.errors == 1 and result.committed == 4 * 6 + 2
    state = storage.get_state("c")
    assert state.last_processed == T0 + HOUR
    assert state.last_error_kind == "http" and "period 2026-01-01T02:00:00+00:00" in \
        state.last_error
    assert sorted(rows_by_period(storage, "c")) == [T0, T0 + HOUR]
    for scope in "abde":
        assert storage.get_state(scope).last_processed == LAST
        assert len(rows_by_period(storage, scope)) == 6
    # c alone only for the period where its part was malformed (both
    # metrics); it left the batch then: its later periods were not asked
    assert single_calls(collector) == {("c", T0 + 2 * HOUR)}


def test_a_failed_batched_query_is_asked_scope_by_scope(conf, storage):
    collector = BatchCollector(batch_error=lambda begin: CollectError(
        "HTTP 422: too many samples", metric="m1", kind="http") if begin == T0 + 3 * HOUR
        else None)
    worker = make_worker(conf, storage, collector)
    result = worker.run_pass()
    assert result.committed == 5 * 6 and not result.errors
    assert single_calls(collector) == {(s, T0 + 3 * HOUR) for s in SCOPES}
    for scope in SCOPES:
        assert storage.get_state(scope).last_processed == LAST


def test_a_connection_failure_is_not_asked_scope_by_scope(conf, storage):
    """The metrics server down: each scope of the batch fails with the
    error (state unmoved), without one query per scope."""
    collector = BatchCollector(batch_error=lambda begin: CollectError(
        "connection refused", metric="m1", kind="connection") if begin == T0 + 3 * HOUR
        else None)
    worker = make_worker(conf, storage, collector)
    result = worker.run_pass()
    assert result.errors == 5 and result.committed == 5 * 3
    assert collector.calls == []
    for scope in SCOPES:
        state = storage.get_state(scope)
        assert state.last_processed == T0 + 2 * HOUR
        assert state.last_error_kind == "connection"


def test_a_refused_fence_drops_only_that_scope(conf, storage):
    """Another worker moved scope b on while the batch was being rated: the
    batch's commit drops b's period (its fence refused), the others commit."""
    collector = BatchCollector()
    worker = make_worker(conf, storage, collector)
    moved = []

    def before(scope, begin):
        if scope == "b" and begin == T0 + 4 * HOUR and not moved:
            moved.append(True)
            storage.reset_state("b", T0, 3600)  # bumps b's version

    collector.before = None
    orig_batch = collector.retrieve_batch

    def retrieve_batch(metric, scope_ids, begin, end):
        if "b" in scope_ids:
            before("b", begin)
        return orig_batch(metric, scope_ids, begin, end)

    collector.retrieve_batch = retrieve_batch
    result = worker.run_pass()
    assert moved
    assert not result.errors
    for scope in "acde":
        assert storage.get_state(scope).last_processed == LAST
    # b's commits stopped at the reset (those before it were deleted by it,
    # each after it was refused): nothing of b past the fence
    state = storage.get_state("b")
    assert state.last_processed == T0 - HOUR and state.last_error is None
    assert rows_by_period(storage, "b") == {}


def test_a_rating_error_fails_that_scope_alone(conf, storage):
    collector = BatchCollector()
    worker = make_worker(conf, storage, collector)

    class Picky:
        def process(self, frame):
            if frame.scope_id == "d" and frame.begin == T0 + HOUR:
                raise ValueError("no rule for d")
            return frame

    worker.pipeline.rating_chain.append(Picky())
    result = worker.run_pass()
    assert result.errors == 1
    state = storage.get_state("d")
    assert state.last_processed == T0 and state.last_error_kind == "rating"
    for scope in "abce":
        assert storage.get_state(scope).last_processed == LAST


def test_a_held_partition_leaves_its_scopes_to_the_holder(conf, storage):
    from cloudkitty_proc.leases import start_coordinator
    conf.set_override("lease_partitions", 4, group="orchestrator")
    held = lease_name(conf, "a")
    coord = start_coordinator(conf, "holder")
    lock = coord.get_lock(held)
    assert lock.acquire(blocking=False)
    try:
        worker = make_worker(conf, storage, BatchCollector())
        result = worker.run_pass()
        assert result.pending
        for scope in SCOPES:
            expected = None if lease_name(conf, scope) == held else LAST
            assert storage.get_state(scope).last_processed == expected
        assert len({lease_name(conf, s) for s in SCOPES}) > 1
    finally:
        lock.release()
        coord.stop()
    assert make_worker(conf, storage, BatchCollector(), name="w1").run_pass().committed > 0
    for scope in SCOPES:
        assert storage.get_state(scope).last_processed == LAST


class RangeCollector(BatchCollector):
    """BatchCollector with range queries: ``range_calls`` records (scopes,
    first begin, periods, metric); ``range_error(periods)`` fails one."""

    def __init__(self, range_error=None, **kw):
        super().__init__(**kw)
        self.range_error = range_error or (lambda periods: None)
        self.range_calls = []

    def retrieve_batch_periods(self, metric, scope_ids, periods):
        with self.lock:
            self.range_calls.append((tuple(scope_ids), periods[0][0], len(periods),
                                     metric.name))
        exc = self.range_error(periods)
        if exc is not None:
            raise exc
        out = []
        for begin, end in periods:
            with self.lock:  # answered here, not as batch calls
                n = len(self.batch_calls)
            out.append(super().retrieve_batch(metric, scope_ids, begin, end))
            with self.lock:
                del self.batch_calls[n:]
        return out


def test_range_queries_cover_chunks_of_periods(conf, storage):  # noqa: F811
    conf.set_override("max_periods_per_query", 4, group="collect")
    collector = RangeCollector()
    result = make_worker(conf, storage, collector).run_pass()
    assert result.committed == 5 * 6 and not result.errors
    # 6 periods in chunks of 4 and 2, two metrics: 4 range queries, nothing else
    assert sorted((b, n) for _s, b, n, _m in collector.range_calls) == [
        (T0, 4), (T0, 4), (T0 + 4 * HOUR, 2), (T0 + 4 * HOUR, 2)]
    assert collector.batch_calls == [] and collector.calls == []
    for scope in SCOPES:
        periods = rows_by_period(storage, scope)
        assert sorted(periods) == [T0 + h * HOUR for h in range(6)]
        assert periods[T0 + 5 * HOUR] == [("m1", 6), ("two", 6)]


def test_a_failed_range_query_is_asked_period_by_period_first(conf, storage):  # noqa: F811
    """The range query of the first chunk fails (HTTP 422): each of its
    periods is asked with one batched instant query, not scope by scope."""
    conf.set_override("max_periods_per_query", 3, group="collect")
    collector = RangeCollector(range_error=lambda periods: CollectError(
        "HTTP 422: too many samples", metric="m1", kind="http") if periods[0][0] == T0
        else None)
    result = make_worker(conf, storage, collector).run_pass()
    assert result.committed == 5 * 6 and not result.errors
    assert {(b, m) for _s, b, m in collector.batch_calls} == {
        (T0 + h * HOUR, m) for h in range(3) for m in ("m1", "m2")}
    assert collector.calls == []
    for scope in SCOPES:
        assert storage.get_state(scope).last_processed == LAST


def test_a_batch_timeout_is_asked_scope_by_scope(conf, storage):  # noqa: F811
    """A timeout may come from one heavy scope: each scope is asked alone,
    and only the slow one fails."""
    collector = BatchCollector(
        batch_error=lambda begin: CollectError("timed out", metric="m1", kind="timeout")
        if begin == T0 + HOUR else None,
        fail=lambda scope, begin: scope == "e" and begin == T0 + HOUR)
    result = make_worker(conf, storage, collector).run_pass()
    assert result.errors == 1
    assert single_calls(collector) == {(s, T0 + HOUR) for s in SCOPES}
    assert storage.get_state("e").last_processed == T0
    for scope in "abcd":
        assert storage.get_state(scope).last_processed == LAST
