"""The drop-in storage on CloudKitty 25.0.0's tables: what CloudKitty's API and
processor see of our writes and what we see of theirs (SQLite, PostgreSQL,
MariaDB). The BaseStorage contract itself is test_storage_contract_dropin.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
from unittest.mock import ANY

import pytest
import sqlalchemy as sa

from cloudkitty_proc.dropin import tables
from cloudkitty_proc.dropin.scope_rows import ScopeIdentity
from cloudkitty_proc.exceptions import (InvalidRequestError, SchemaError, StaleStateError,
                                        StorageError, TaskCancelledError)
from tests import cloudkitty_db
from tests.cloudkitty_db import DropinDB, naive
from tests.storage_contract import PERIOD, at, priced_frame, rate

D = decimal.Decimal


@pytest.fixture
def ck(db_url):
    cloudkitty_db.create_cloudkitty_schema(db_url)
    db = DropinDB(db_url)
    yield db
    db.close()


def prices(storage, scope):
    return sorted((r.begin, r.price) for r in storage.iter_rated(scope))


def point_keys(ck, scope, begin):
    return [k for k in ck.data.points if k[0] == scope and k[1] == begin]


# -- scope states ---------------------------------------------------------------

def test_first_commit_writes_a_complete_cloudkitty_row(ck):
    storage = ck.make()
    assert storage.commit_period(priced_frame("p1", 0), 0) == 1
    [row] = ck.state_rows("p1")
    assert (row.identifier, row.scope_key, row.fetcher, row.collector) == (
        "p1", "project_id", "source", "prometheus")
    assert row.last_processed_timestamp == naive(at(0))
    assert row.active is True or row.active == 1
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    assert abs(row.scope_activation_toggle_date - now) < datetime.timedelta(minutes=5)
    assert storage.commit_period(priced_frame("p1", 1), 1) == 2
    [again] = ck.state_rows("p1")
    assert (again.id, again.last_processed_timestamp) == (row.id, naive(at(1)))


def test_an_inactive_scope_is_reported_inactive(ck):
    storage = ck.make()
    ck.insert_state("p1", at(3), active=False)
    state = storage.get_state("p1")
    assert (state.last_processed, state.active, state.version) == (at(3), False, 0)
    assert storage.get_states()["p1"].active is False
    ck.set_state("p1", at(3), active=True)  # PATCH /v2/scope {"active": true}
    assert storage.get_state("p1").active is True


def test_a_cloudkitty_processor_moving_the_row_makes_our_commit_stale(ck):
    storage = ck.make()
    rate(storage, "p1", 2)
    state = storage.get_state("p1")
    assert (state.last_processed, state.version) == (at(1), 2)
    ck.set_state("p1", at(2))  # a cloudkitty-processor rated period 2 meanwhile
    with pytest.raises(StaleStateError, match="CloudKitty's state row is at "
                                              r"2026-01-01T02:00:00\+00:00"):
        storage.commit_period(priced_frame("p1", 2, "9"), state.version)
    assert [p.begin for p in storage.iter_periods("p1")] == [at(0), at(1)]
    assert point_keys(ck, "p1", at(2)) == []
    assert storage.get_state("p1").version == 2
    assert ck.state_rows("p1")[0].last_processed_timestamp == naive(at(2))
    # read again: the next period is CloudKitty's next one
    state = storage.get_state("p1")
    assert storage.commit_period(priced_frame("p1", 3), state.version) == 3

    # a new scope: we read "no row", then CloudKitty inserts one
    assert storage.get_state("p2").last_processed is None
    ck.insert_state("p2", at(0))
    with pytest.raises(StaleStateError):
        storage.commit_period(priced_frame("p2", 0), 0)
    assert list(storage.iter_periods("p2")) == [] and point_keys(ck, "p2", at(0)) == []
    assert len(ck.state_rows("p2")) == 1


def test_a_batch_commits_around_rows_cloudkitty_moved(ck):
    """commit_periods: one transaction, each scope in a savepoint. A scope
    whose CloudKitty row a cloudkitty-processor moved, and a new scope whose
    row it inserted, are refused alone: their savepoints roll our version
    back too, and none of their points is written. The others commit, their
    points in ONE write of the point store."""
    storage = ck.make()
    for scope in ("p1", "p2"):
        rate(storage, scope, 2)
    writes = []
    write_many = storage.points.write_many

    def recording(frames):
        writes.append(sorted(frame.scope_id for frame in frames))
        return write_many(frames)

    storage.points.write_many = recording
    ck.set_state("p2", at(2))  # a cloudkitty-processor rated period 2 meanwhile
    ck.insert_state("p4", at(0))  # and rated a new scope's first period
    results = storage.commit_periods([(priced_frame("p1", 2), 2), (priced_frame("p2", 2), 2),
                                      (priced_frame("p3", 0), 0), (priced_frame("p4", 0), 0)])
    assert results[0] == 3 and results[2] == 1, results
    assert isinstance(results[1], StaleStateError), results
    assert "CloudKitty's state row is at 2026-01-01T02:00:00+00:00" in str(results[1])
    assert isinstance(results[3], StaleStateError), results
    assert writes == [["p1", "p3"]]
    assert {s: storage.get_state(s).version for s in ("p1", "p2", "p3", "p4")} == {
        "p1": 3, "p2": 2, "p3": 1, "p4": 0}
    assert point_keys(ck, "p2", at(2)) == [] and point_keys(ck, "p4", at(0)) == []
    assert point_keys(ck, "p1", at(2)) and point_keys(ck, "p3", at(0))
    assert [p.begin for p in storage.iter_periods("p2")] == [at(0), at(1)]
    assert list(storage.iter_periods("p4")) == []
    assert ck.state_rows("p1")[0].last_processed_timestamp == naive(at(2))
    assert ck.state_rows("p3")[0].last_processed_timestamp == naive(at(0))
    assert len(ck.state_rows("p4")) == 1


def test_a_legacy_row_is_adopted_and_other_configurations_ignored(ck):
    storage = ck.make()
    legacy = ck.insert_state("p1", at(4), identity=None)  # CloudKitty's create_scope
    state = storage.get_state("p1")
    assert (state.last_processed, state.version) == (at(4), 0)
    storage.commit_period(priced_frame("p1", 5), 0)
    [row] = ck.state_rows("p1")
    assert (row.id, row.last_processed_timestamp) == (legacy, naive(at(5)))
    assert (row.scope_key, row.fetcher, row.collector) == ("project_id", "source",
                                                           "prometheus")

    # a complete row wins over a legacy one; the legacy one stays as it is
    ck.insert_state("p2", at(1), identity=None)
    complete = ck.insert_state("p2", at(4))
    assert storage.get_state("p2").last_processed == at(4)
    storage.commit_period(priced_frame("p2", 5), 0)
    by_id = {r.id: r for r in ck.state_rows("p2")}
    assert by_id[complete].last_processed_timestamp == naive(at(5))
    assert [r.last_processed_timestamp for r in by_id.values() if r.id != complete] == [
        naive(at(1))]

    # another fetcher/collector: another deployment's row, not ours
    ck.insert_state("p3", at(7), identity=ScopeIdentity("project_id", "keystone", "gnocchi"))
    assert storage.get_state("p3").last_processed is None
    assert "p3" not in storage.get_states()
    storage.commit_period(priced_frame("p3", 0), 0)
    assert sorted((r.fetcher, r.last_processed_timestamp) for r in ck.state_rows("p3")) == [
        ("keystone", naive(at(7))), ("source", naive(at(0)))]


def test_scopes_differing_only_by_case(ck):
    """MariaDB's collation of CloudKitty's tables ignores case: the second
    scope is refused with both names instead of sharing the first's row."""
    storage = ck.make()
    storage.commit_period(priced_frame("B", 0), 0)
    if ck.engine.dialect.name == "mysql":
        with pytest.raises(StorageError, match="scope 'b': .* row for 'B'"):
            storage.commit_period(priced_frame("b", 0), 0)
        assert storage.get_state("b").last_processed is None
        assert list(storage.iter_periods("b")) == []
    else:
        storage.commit_period(priced_frame("b", 0), 0)
        assert storage.get_state("b").last_processed == at(0)
    assert storage.get_state("B").last_processed == at(0)


def test_reset_state_moves_cloudkitty_row_cuts_and_cancels_its_tasks(ck):
    storage = ck.make()
    rate(storage, "p1", 10)
    tid = ck.insert_schedule("p1", at(2), at(7))  # periods 2..7, end inclusive
    storage.commit_reprocessed_period(tid, priced_frame("p1", 2, "2"), at(2))

    storage.reset_state("p1", at(5), PERIOD)
    assert ck.state_rows("p1")[0].last_processed_timestamp == naive(at(4))
    [row] = ck.schedule_rows()
    assert (row.current_reprocess_time, row.end_reprocess_time) == (naive(at(2)), naive(at(4)))
    [task] = storage.list_tasks(ids=[tid])
    assert (task.state, task.end, task.total_periods) == ("running", at(5), 3)
    assert "window cut" in task.last_error
    assert {k[1] for k in ck.data.points if k[0] == "p1"} == {at(n) for n in range(5)}

    storage.reset_state("p1", at(1), PERIOD)  # nothing of the task left before it
    [row] = ck.schedule_rows()
    assert row.current_reprocess_time == row.end_reprocess_time == naive(at(4))
    assert storage.list_tasks(ids=[tid])[0].state == "failed"

    storage.reset_state("p1", None, PERIOD)  # CloudKitty's column cannot hold "nothing"
    assert ck.state_rows("p1") == []
    assert storage.get_state("p1").last_processed is None


# -- reprocessing ---------------------------------------------------------------

def test_rows_inserted_by_the_api_are_rerated_and_complete(ck):
    storage = ck.make()
    rate(storage, "p1", 6)
    rate(storage, "p2", 6)
    tid = ck.insert_schedule("p1", at(1), at(3), reason="new prices")
    [task] = storage.list_tasks()
    assert (task.id, task.scope_id, task.begin, task.end, task.next_period) == (
        tid, "p1", at(1), at(4), at(1))
    assert (task.state, task.total_periods, task.done_periods, task.reason,
            task.request_key) == ("pending", 3, 0, "new prices", f"cloudkitty:{tid}")
    # CloudKitty records no times: a row we never wrote a note for shows the read's
    assert storage.next_pending_task("p1") == dataclasses.replace(
        task, created_at=ANY, updated_at=ANY)
    assert task.created_at.tzinfo is not None
    assert storage.next_pending_task("p2") is None
    for n in (1, 2, 3):
        task = storage.next_pending_task("p1")
        assert task.next_period == at(n)
        task = storage.commit_reprocessed_period(tid, priced_frame("p1", n, "2", points=3),
                                                 at(n))
        [row] = ck.schedule_rows()
        assert row.current_reprocess_time == naive(at(n))  # as CloudKitty writes it
        assert task.done_periods == n
    assert task.state == "done" and row.current_reprocess_time == row.end_reprocess_time
    assert storage.next_pending_task("p1") is None
    assert storage.list_tasks(states=["pending", "running"]) == []
    assert prices(storage, "p1") == sorted(
        [(at(n), D(1)) for n in (0, 4, 5) for _ in range(2)]
        + [(at(n), D(2)) for n in (1, 2, 3) for _ in range(3)])
    assert [p.points for p in storage.iter_periods("p1")] == [2, 3, 3, 3, 2, 2]
    assert prices(storage, "p2") == [(at(n), D(1)) for n in range(6) for _ in range(2)]


def test_a_reset_racing_a_reprocessed_period_finishes_the_row(ck):
    storage = ck.make()
    rate(storage, "p1", 6)
    tid = ck.insert_schedule("p1", at(2), at(4))
    storage.commit_reprocessed_period(tid, priced_frame("p1", 2, "2"), at(2))
    ck.set_state("p1", at(2))  # the frontier moved below period 3
    with pytest.raises(TaskCancelledError, match="no longer below"):
        storage.commit_reprocessed_period(tid, priced_frame("p1", 3, "9"), at(3))
    [row] = ck.schedule_rows()
    assert row.current_reprocess_time == row.end_reprocess_time == naive(at(4))
    assert storage.list_tasks(ids=[tid])[0].state == "failed"
    assert [r.price for r in storage.iter_rated("p1", at(3), at(4))] == [D(1)] * 2


def test_our_requests_write_cloudkitty_rows(ck):
    storage = ck.make()
    rate(storage, "p1", 6)
    rate(storage, "p2", 6)
    [tid] = storage.create_reprocess_tasks(["p1"], at(1), at(4), "fix", PERIOD)
    [row] = ck.schedule_rows()
    assert (row.id, row.identifier, row.start_reprocess_time, row.end_reprocess_time,
            row.current_reprocess_time, row.reason) == (
        tid, "p1", naive(at(1)), naive(at(3)), None, "fix")
    # the same request from another process: the same task
    assert ck.make().create_reprocess_tasks(["p1"], at(1), at(4), "fix", PERIOD) == [tid]
    # an API row of the same window is joined, an overlapping one refused
    api = ck.insert_schedule("p2", at(0), at(2))
    assert storage.create_reprocess_tasks(["p2"], at(0), at(3), "x", PERIOD) == [api]
    with pytest.raises(InvalidRequestError, match=f"overlaps task {api}"):
        storage.create_reprocess_tasks(["p2"], at(2), at(4), "x", PERIOD)
    # CloudKitty's API checks: an inactive scope is not reprocessed
    ck.set_state("p2", at(5), active=False)
    with pytest.raises(InvalidRequestError, match="scope p2: inactive"):
        storage.create_reprocess_tasks(["p2"], at(4), at(5), "x", PERIOD)
    assert storage.create_reprocess_tasks(["p1", "p2"], at(4), at(5), "x", PERIOD,
                                          skip_uncovered=True) != []
    assert {r.identifier for r in ck.schedule_rows()} == {"p1", "p2"}
    assert len(ck.schedule_rows()) == 3


def test_a_task_error_is_kept_beside_cloudkittys_row(ck):
    storage = ck.make()
    rate(storage, "p1", 4)
    tid = ck.insert_schedule("p1", at(0), at(1))
    before = ck.schedule_rows()
    storage.record_task_error(tid, "collector down")
    [task] = storage.list_tasks()
    assert (task.state, task.last_error, task.request_key) == (
        "pending", "collector down", f"cloudkitty:{tid}")
    assert ck.schedule_rows() == before
    storage.commit_reprocessed_period(tid, priced_frame("p1", 0), at(0))
    assert storage.list_tasks()[0].last_error is None


# -- schema -------------------------------------------------------------------------

def _drop(url: str, name: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"DROP TABLE {name}")
    engine.dispose()


@pytest.mark.parametrize("case, message", [
    ("old-head", r"CloudKitty's storage_states_alembic is at 4d69395f, expected head "
                 r"9feccd32 \(CloudKitty 25\.0\.0\): run .*`cloudkitty-storage-init`"),
    ("no-table", r"table storage_scope_reprocessing_schedule is missing although "
                 r"storage_states_alembic is at head 9feccd32"),
    ("no-version-table", r"version table hashmap_alembic is missing \(expected head "
                         r"8a591f85865f\)"),
])
def test_cloudkittys_heads_are_checked_never_migrated(db_url, case, message):
    heads = dict(tables.HEADS)
    if case == "old-head":
        heads["storage_states_alembic"] = "4d69395f"
    cloudkitty_db.create_cloudkitty_schema(db_url, heads)
    if case == "no-table":
        _drop(db_url, "storage_scope_reprocessing_schedule")
    if case == "no-version-table":
        _drop(db_url, "hashmap_alembic")
    db = DropinDB(db_url)
    try:
        storage = db.make(upgrade=False)
        for call in (storage.check_schema, storage.upgrade):
            with pytest.raises(SchemaError, match=message) as info:
                call()
            assert "\n" not in str(info.value)
        names = set(sa.inspect(db.engine).get_table_names())
        assert not names & {"scope_state", "rated_period", "alembic_version"}
    finally:
        db.close()


def _snapshot(connection: sa.Connection, names: list[str]) -> dict:
    """DDL and rows of ``names`` as the database reports them."""
    out = {}
    dialect = connection.dialect.name
    for name in names:
        if dialect == "mysql":
            ddl = connection.exec_driver_sql(f"SHOW CREATE TABLE {name}").one()[1]
        elif dialect == "sqlite":
            ddl = connection.exec_driver_sql(
                "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = ? ORDER BY name",
                (name,)).all()
        else:
            ddl = (connection.exec_driver_sql(
                "SELECT * FROM information_schema.columns WHERE table_name = %(t)s "
                "ORDER BY ordinal_position", {"t": name}).all(),
                connection.exec_driver_sql(
                    "SELECT conname, pg_get_constraintdef(c.oid) FROM pg_constraint c "
                    "JOIN pg_class t ON t.oid = c.conrelid WHERE t.relname = %(t)s "
                    "ORDER BY conname", {"t": name}).all(),
                connection.exec_driver_sql(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %(t)s "
                    "ORDER BY indexname", {"t": name}).all())
        rows = connection.exec_driver_sql(f"SELECT * FROM {name} ORDER BY 1").all()
        out[name] = (ddl, rows)
    return out


def test_upgrade_leaves_cloudkittys_tables_byte_identical(ck):
    ck.insert_state("p1", at(3))
    ck.insert_state("p2", at(1), identity=None, active=False)
    ck.insert_schedule("p1", at(0), at(2))
    names = [t.name for t in tables.metadata.sorted_tables] + list(tables.HEADS)
    with ck.engine.connect() as connection:
        before = _snapshot(connection, names)
    storage = ck.make(upgrade=False)
    storage.upgrade()
    storage.upgrade()
    storage.check_schema()
    with ck.engine.connect() as connection:
        assert _snapshot(connection, names) == before
        ours = set(sa.inspect(connection).get_table_names())
    assert {"scope_state", "rated_period", "reprocess_task", "alembic_version"} <= ours
