"""Reprocessing tasks in the ``sql`` storage, on SQLite, PostgreSQL and MariaDB.

The orchestrator and RPC tests (test_reprocess.py) run the daemon; these
check the storage contract itself: validation, idempotency, the fenced
replace-and-advance commit and reset-state's effect on tasks.
"""

from __future__ import annotations

import datetime
import decimal

import pytest
import sqlalchemy as sa
from alembic import command

from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.exceptions import (InvalidRequestError, StaleStateError,
                                        TaskCancelledError)
from cloudkitty_proc.storage import models
from cloudkitty_proc.storage.base import request_key
from cloudkitty_proc.storage.sql import SQLStorage, alembic_config

D = decimal.Decimal
UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
H = 3600


def at(n: int) -> datetime.datetime:
    return T0 + datetime.timedelta(hours=n)


def frame(scope: str, n: int, price: str = "1", points: int = 2) -> DataFrame:
    f = DataFrame(scope, at(n), at(n + 1))
    f.add_points("instance", [DataPoint("instance", D(1), D(price), {"id": f"r{i}"}, {})
                              for i in range(points)])
    return f


@pytest.fixture
def storage(db_url):
    s = SQLStorage(url=db_url)
    s.upgrade()
    yield s
    s.close()


def rate(storage, scope: str, hours: int, price: str = "1") -> None:
    version = storage.get_state(scope).version
    for n in range(hours):
        version = storage.commit_period(frame(scope, n, price), version)


def rows(storage, scope):
    return [(r.begin, r.price) for r in storage.iter_rated(scope)]


def test_validation_names_each_problem_and_writes_nothing(storage):
    rate(storage, "p1", 6)
    rate(storage, "p2", 3)
    cases = [
        (dict(begin=at(1) + datetime.timedelta(minutes=5)), "begin .* is not aligned"),
        (dict(begin=at(4), end=at(2)), "must be before end"),
        (dict(begin=at(2), end=at(2)), "must be before end"),
        (dict(reason="  "), "reason: a non-empty reason is required"),
        (dict(scopes=[]), "no scope given"),
        (dict(scopes=["never"]), "scope never: nothing rated yet"),
        (dict(end=at(7)), r"end 2026-01-01T07:00:00\+00:00 is beyond what was processed "
                          r".*end must be at most 2026-01-01T06:00:00\+00:00"),
        (dict(begin=at(-1)), "begin .* is before the first rated period"),
        # one scope at fault: the whole request is refused, naming it
        (dict(scopes=["p1", "p2"], end=at(5)), "scope p2: end .* is beyond"),
    ]
    for overrides, message in cases:
        args = dict(scopes=["p1"], begin=at(1), end=at(3), reason="fix")
        args.update(overrides)
        with pytest.raises(InvalidRequestError, match=message):
            storage.create_reprocess_tasks(args["scopes"], args["begin"], args["end"],
                                           args["reason"], H)
    assert storage.list_tasks() == []
    # the frontier itself is allowed: end == last_processed + period
    [tid] = storage.create_reprocess_tasks(["p1"], at(0), at(6), "whole", H)
    task = storage.list_tasks(ids=[tid])[0]
    assert (task.state, task.total_periods, task.done_periods, task.next_period) == \
        ("pending", 6, 0, at(0))


def test_same_request_is_idempotent_overlap_refused_identical_window_merged(storage):
    rate(storage, "p1", 10)
    rate(storage, "p2", 10)
    ids = storage.create_reprocess_tasks(["p1", "p2"], at(2), at(6), "price fix", H)
    assert len(set(ids)) == 2
    assert storage.create_reprocess_tasks(["p1", "p2"], at(2), at(6), "price fix", H) == ids
    # another reason, the exact same window: merged into the pending task
    assert storage.create_reprocess_tasks(["p2"], at(2), at(6), "other", H) == [ids[1]]
    # an overlapping different window: refused, naming the task and its reason
    with pytest.raises(InvalidRequestError,
                       match=rf"scope p1: the window overlaps task {ids[0]} .*'price fix'"):
        storage.create_reprocess_tasks(["p1"], at(5), at(8), "more", H)
    # a disjoint window is another task
    [other] = storage.create_reprocess_tasks(["p1"], at(6), at(8), "more", H)
    assert other not in ids
    assert len(storage.list_tasks()) == 3
    # a client request id: reused for the same request → the same tasks
    a = storage.create_reprocess_tasks(["p2"], at(8), at(10), "x", H, request_id="req-1")
    assert storage.create_reprocess_tasks(["p2"], at(8), at(10), "y", H,
                                          request_id="req-1") == a
    with pytest.raises(InvalidRequestError, match="request id 'req-1' was already used"):
        storage.create_reprocess_tasks(["p2"], at(0), at(1), "x", H, request_id="req-1")
    assert storage.list_tasks(ids=a)[0].request_key == "req-1"
    assert storage.list_tasks(ids=[ids[0]])[0].request_key == \
        request_key("p1", at(2), at(6), "price fix")


def test_commit_reprocessed_period_replaces_rows_and_advances_fenced(storage):
    rate(storage, "p1", 5, price="1")
    rate(storage, "p2", 5, price="1")
    state_before = storage.get_state("p1")
    [tid] = storage.create_reprocess_tasks(["p1"], at(1), at(3), "fix", H)
    with pytest.raises(ValueError, match="expects"):
        storage.commit_reprocessed_period(tid, frame("p1", 2, "2"), at(1))
    task = storage.commit_reprocessed_period(tid, frame("p1", 1, "2", points=3), at(1),
                                             worker="w")
    assert (task.state, task.done_periods, task.next_period) == ("running", 1, at(2))
    # a second worker still at the old progress is fenced: nothing written
    with pytest.raises(StaleStateError, match=f"task {tid}"):
        storage.commit_reprocessed_period(tid, frame("p1", 1, "9"), at(1))
    task = storage.commit_reprocessed_period(tid, frame("p1", 2, "2", points=0), at(2))
    assert (task.state, task.done_periods, task.total_periods, task.next_period) == \
        ("done", 2, 2, at(3))
    with pytest.raises(StaleStateError):  # done: nothing more
        storage.commit_reprocessed_period(tid, frame("p1", 3, "2"), at(3))
    assert rows(storage, "p1") == [(at(0), D(1)), (at(0), D(1))] + [(at(1), D(2))] * 3 + \
        [(at(3), D(1))] * 2 + [(at(4), D(1))] * 2
    periods = [(p.begin, p.points) for p in storage.iter_periods("p1")]
    assert periods == [(at(0), 2), (at(1), 3), (at(2), 0), (at(3), 2), (at(4), 2)]
    assert rows(storage, "p2") == [(at(n), D(1)) for n in range(5) for _ in range(2)]
    # the scope state is not touched: normal processing goes on unfenced
    assert storage.get_state("p1") == state_before
    assert storage.next_pending_task("p1") is None
    # done: the same request again returns the done task, rates nothing
    assert storage.create_reprocess_tasks(["p1"], at(1), at(3), "fix", H) == [tid]
    assert storage.next_pending_task("p1") is None


def test_reset_state_cuts_or_cancels_tasks(storage):
    rate(storage, "p1", 10)
    [a] = storage.create_reprocess_tasks(["p1"], at(0), at(4), "a", H)
    [b] = storage.create_reprocess_tasks(["p1"], at(4), at(8), "b", H)
    storage.commit_reprocessed_period(a, frame("p1", 0, "2"), at(0))
    storage.reset_state("p1", at(2), H)
    ta, tb = storage.list_tasks(ids=[a, b])
    assert (ta.state, ta.end, ta.total_periods, ta.done_periods) == ("running", at(2), 2, 1)
    assert "window cut" in ta.last_error
    assert tb.state == "failed" and "cancelled by reset-state" in tb.last_error
    storage.commit_reprocessed_period(a, frame("p1", 1, "2"), at(1))
    assert storage.list_tasks(ids=[a])[0].state == "done"
    # normal processing rates 2.. again; the failed task's request again
    # restarts it
    v = storage.get_state("p1").version
    for n in range(2, 9):
        v = storage.commit_period(frame("p1", n), v)
    assert storage.create_reprocess_tasks(["p1"], at(4), at(8), "b", H) == [b]
    tb = storage.list_tasks(ids=[b])[0]
    assert (tb.state, tb.done_periods, tb.next_period, tb.last_error) == \
        ("pending", 0, at(4), None)
    storage.commit_reprocessed_period(b, frame("p1", 4, "3"), at(4))
    # the frontier moved below the task's next period (as a reset racing
    # with the commit would): the commit is refused, the task fails,
    # nothing is written
    with storage.engine.begin() as connection:
        connection.execute(models.scope_state.update().values(
            last_processed=at(4).replace(tzinfo=None)))
    with pytest.raises(TaskCancelledError, match="no longer below"):
        storage.commit_reprocessed_period(b, frame("p1", 5, "3"), at(5))
    assert storage.list_tasks(ids=[b])[0].state == "failed"
    assert [r for r in rows(storage, "p1") if r[0] == at(5)] == [(at(5), D(1))] * 2
    storage.reset_state("p1", None, H)
    assert all(not t.active for t in storage.list_tasks())


def test_migration_0002_keeps_existing_data(db_url):
    """An 0001 database with rated data upgrades to 0002 in place."""
    storage = SQLStorage(url=db_url)
    try:
        config = alembic_config(storage.url)
        with storage.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0001")
        assert storage.current_revision() == "0001"
        storage.commit_period(frame("p1", 0), 0)
        storage.upgrade()
        assert storage.current_revision() == "0002"
        assert len(rows(storage, "p1")) == 2
        assert storage.list_tasks() == []
        with storage.engine.connect() as connection:
            assert sa.inspect(connection).has_table("reprocess_task")
    finally:
        storage.close()
