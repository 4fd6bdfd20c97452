"""The ``sql`` storage against real SQLite, PostgreSQL and MariaDB databases.

Most tests run once per backend (``db_url`` fixture); the SQLite-specific
ones (locking, several processes on one file) use ``sqlite_url``.
"""

from __future__ import annotations

import datetime
import decimal
import multiprocessing
import threading
import time
import traceback

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.exceptions import SchemaError, StaleStateError
from cloudkitty_proc.storage import models
from cloudkitty_proc.storage import sql as sql_storage
from cloudkitty_proc.storage.base import RatedRow
from cloudkitty_proc.storage.sql import SQLStorage

D = decimal.Decimal
UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
H = datetime.timedelta(hours=1)


def at(n: int) -> datetime.datetime:
    return T0 + n * H


def make_frame(scope: str, n: int, points: int = 0, types=("instance",)) -> DataFrame:
    frame = DataFrame(scope, at(n), at(n + 1))
    for usage_type in types:
        frame.add_points(usage_type, [
            DataPoint(usage_type, D(i + 1), D("0.01") * (i + 1),
                      {"project_id": scope, "i": str(i)}, {"period": str(n)})
            for i in range(points)])
    return frame


def count(storage: SQLStorage, table: sa.Table, scope_id: str | None = None) -> int:
    stmt = sa.select(sa.func.count()).select_from(table)
    if scope_id is not None:
        stmt = stmt.where(table.c.scope_id == scope_id)
    with storage.reader_engine.connect() as connection:
        return connection.execute(stmt).scalar_one()


def snapshot(storage: SQLStorage, scope_id: str):
    """Everything a commit could change for one scope."""
    return (storage.get_state(scope_id), count(storage, models.rated_data, scope_id),
            count(storage, models.rated_period, scope_id))


@pytest.fixture
def storage(db_url):
    s = SQLStorage(url=db_url)
    s.upgrade()
    yield s
    s.close()


# -- commit and read back ----------------------------------------------------

def test_commit_and_read_back_exact(storage):
    big_qty = D("12345678901234567890.123456789012345678901234567891")
    tiny_price = D("0.000000000000000000000000000001")
    frame = DataFrame("p1", at(0), at(1))
    # added out of type order: rows come back ordered by type
    frame.add_points("volume", [
        DataPoint("GiB", big_qty, tiny_price, {"project_id": "p1", "id": "vol-é✓"},
                  {"z": "last", "a": "first", "quote": 'say "hi"'}),
    ])
    frame.add_points("instance", [
        DataPoint("instance", D("1"), D("0.010000"), {"project_id": "p1", "id": "vm-1"},
                  {"flavor_name": "m1.small"}),
        DataPoint("instance", D("1E+3"), D("98765432109876543210.98765432109876543210"),
                  {"project_id": "p1", "id": "vm-2"}, {}),
    ])

    assert storage.commit_period(frame, 0, worker="host-1") == 1

    rows = list(storage.iter_rated("p1"))
    assert rows == [
        RatedRow("p1", at(0), at(1), "instance", "instance", D("1"), D("0.010000"),
                 {"project_id": "p1", "id": "vm-1"}, {"flavor_name": "m1.small"}),
        RatedRow("p1", at(0), at(1), "instance", "instance", D("1000"),
                 D("98765432109876543210.98765432109876543210"),
                 {"project_id": "p1", "id": "vm-2"}, {}),
        RatedRow("p1", at(0), at(1), "volume", "GiB", big_qty, tiny_price,
                 {"project_id": "p1", "id": "vol-é✓"},
                 {"z": "last", "a": "first", "quote": 'say "hi"'}),
    ]
    # exact strings, trailing zeros and all, no exponent
    assert [format(r.price, "f") for r in rows] == [
        "0.010000", "98765432109876543210.98765432109876543210",
        "0.000000000000000000000000000001"]
    assert str(rows[2].qty) == "12345678901234567890.123456789012345678901234567891"
    for row in rows:
        assert row.begin.tzinfo is not None and row.begin.utcoffset() == datetime.timedelta(0)

    # JSON stored compact with sorted keys
    with storage.reader_engine.connect() as connection:
        stored = connection.execute(
            sa.select(models.rated_data.c["metadata"], models.rated_data.c.qty)
            .where(models.rated_data.c.type == "volume")).one()
    assert stored[0] == '{"a":"first","quote":"say \\"hi\\"","z":"last"}'
    assert stored[1] == "12345678901234567890.123456789012345678901234567891"

    state = storage.get_state("p1")
    assert state.last_processed == at(0) and state.last_processed.tzinfo is not None
    assert state.version == 1
    assert state.last_error is None
    assert abs(state.last_commit_at - datetime.datetime.now(UTC)) < datetime.timedelta(minutes=1)

    total = D("98765432109876543210.997654321098765432100000000001")  # no rounding
    [period] = storage.iter_periods("p1")
    assert (period.begin, period.end, period.points, period.worker) == (at(0), at(1), 3, "host-1")
    assert period.price == total and str(period.price) == str(total)

    summary = {(s.scope_id, s.type): s for s in storage.summary()}
    assert set(summary) == {("p1", "instance"), ("p1", "volume")}
    inst = summary["p1", "instance"]
    assert (inst.periods, inst.points, inst.qty) == (1, 2, D("1001"))
    assert inst.price == D("98765432109876543210.99765432109876543210")
    assert summary["p1", "volume"].qty == big_qty


def test_label_json_is_the_standard_encoders_json():
    """groupby/metadata text: compact, keys sorted, the same JSON as the
    standard encoder gives (non-ASCII written as is), for the values a
    rating script may leave there too (numbers, None, booleans, Decimal,
    an integer beyond 64 bits, non-string keys)."""
    import json

    cases = [
        {"project_id": "p1", "id": "vm-1", "flavor_name": "m1.small"},
        {"z": "last", "a": "first", "quote": 'say "hi"', "nl": "a\nb", "u": "vol-é✓"},
        {"n": None, "t": True, "f": 1.5, "i": 7, "d": D("1.50"), "big": 2 ** 70},
        {1: "one", 2: "two"},
        {},
    ]
    for labels in cases:
        text = sql_storage._label_json(labels)
        assert json.loads(text) == json.loads(sql_storage._dumps(labels))
        assert ", " not in text and ": " not in text
        keys = list(json.loads(text))
        assert keys == sorted(keys)
    assert sql_storage._label_json({"u": "é"}) == '{"u":"é"}'


def test_decimal_text_is_format_f():
    """Stored quantities and prices are ``format(d, "f")``; the storage
    takes ``str(d)`` where that is the same text."""
    import random

    rnd = random.Random(6)
    values = [D(x) for x in ("0", "-0", "0.00", "0E-10", "0E+3", "1E+3", "-1E+3", "1.50",
                             "0.000001", "0.0000001", "-0.00000012", "123456789012345678901234",
                             "1.000000000000000000000000000001", "98765E-30", "NaN",
                             "Infinity", "-Infinity")]
    values += [D(rnd.randint(-10**12, 10**12)).scaleb(rnd.randint(-40, 12))
               for _ in range(5000)]
    for value in values:
        assert sql_storage._decimal_text(value) == format(value, "f"), value
    with decimal.localcontext() as ctx:
        ctx.capitals = 0  # str() writes a lower-case exponent then
        assert sql_storage._decimal_text(D("1E+3")) == "1000"
        assert sql_storage._decimal_text(D("1E-7")) == "0.0000001"
    # not a Decimal (a plugin's int): what format gives, as before
    assert sql_storage._decimal_text(3) == format(3, "f")


def test_summary_is_exact_and_counts_periods(storage):
    v = 0
    for n in range(3):
        frame = DataFrame("p1", at(n), at(n + 1))
        frame.add_points("instance", [
            DataPoint("instance", D("0.1"), D("10000000000000000000000000000"),
                      {}, {}),
            DataPoint("instance", D("0.2"), D("0.0000000001"), {}, {}),
        ])
        v = storage.commit_period(frame, v)
    storage.commit_period(make_frame("p2", 0, points=1, types=("volume",)), 0)
    [inst] = storage.summary("p1")
    assert (inst.scope_id, inst.type, inst.periods, inst.points) == ("p1", "instance", 3, 6)
    assert inst.qty == D("0.9")
    # 29 integer digits + 10 decimals: beyond the default 28-digit context
    assert inst.price == D("30000000000000000000000000000.0000000003")
    assert [(s.scope_id, s.type) for s in storage.summary()] == [
        ("p1", "instance"), ("p2", "volume")]


def test_empty_frame_commits_and_advances_state(storage):
    assert storage.commit_period(make_frame("p1", 0), 0) == 1
    assert storage.commit_period(make_frame("p1", 1), 1) == 2
    state = storage.get_state("p1")
    assert (state.last_processed, state.version) == (at(1), 2)
    assert list(storage.iter_rated("p1")) == []
    periods = list(storage.iter_periods("p1"))
    assert [(p.begin, p.points, p.price) for p in periods] == [(at(0), 0, 0), (at(1), 0, 0)]
    assert storage.summary("p1") == []


def test_iter_rated_order_and_half_open_window(storage, monkeypatch):
    # small chunks: ordering must hold across fetch boundaries
    monkeypatch.setattr(sql_storage, "STREAM_CHUNK", 3)
    scopes = ["b", "a", "B"]  # bytewise order: "B" < "a" < "b" on every backend
    for scope in scopes:
        v = 0
        for n in (0, 1, 2, 3):
            v = storage.commit_period(
                make_frame(scope, n, points=2, types=("zeta", "alpha")), v)

    rows = list(storage.iter_rated())
    keys = [(r.scope_id, r.begin, r.type, r.groupby["i"]) for r in rows]
    assert keys == [(s, at(n), t, i) for s in ("B", "a", "b") for n in range(4)
                    for t in ("alpha", "zeta") for i in ("0", "1")]

    window = list(storage.iter_rated(begin=at(1), end=at(3)))
    assert {r.begin for r in window} == {at(1), at(2)}
    assert len(window) == 3 * 2 * 2 * 2

    only_a = list(storage.iter_rated("a", begin=at(3)))
    assert {(r.scope_id, r.begin) for r in only_a} == {("a", at(3))}
    assert len(only_a) == 4
    assert list(storage.iter_rated("a", begin=at(2), end=at(2))) == []
    assert list(storage.iter_rated("nobody")) == []

    periods = list(storage.iter_periods(begin=at(1), end=at(2)))
    assert [(p.scope_id, p.begin) for p in periods] == [("B", at(1)), ("a", at(1)), ("b", at(1))]


def test_iter_rated_releases_its_connection_when_closed(storage, monkeypatch):
    monkeypatch.setattr(sql_storage, "STREAM_CHUNK", 2)
    storage.commit_period(make_frame("p1", 0, points=10), 0)
    pool = storage.reader_engine.pool
    gen = storage.iter_rated()
    next(gen)
    assert pool.checkedout() == 1
    gen.close()
    assert pool.checkedout() == 0


# -- compare-and-set ----------------------------------------------------------

def test_stale_version_raises_and_writes_nothing(storage):
    assert storage.commit_period(make_frame("p1", 0, points=3), 0) == 1
    before = snapshot(storage, "p1")
    # row exists: expected 0 takes the INSERT path and hits the key
    with pytest.raises(StaleStateError, match="p1"):
        storage.commit_period(make_frame("p1", 1, points=3), 0)
    with pytest.raises(StaleStateError):
        storage.commit_period(make_frame("p1", 1, points=3), 7)
    assert snapshot(storage, "p1") == before
    assert storage.commit_period(make_frame("p1", 1, points=3), 1) == 2


def test_two_commits_from_one_read_exactly_one_wins(db_url):
    s1, s2 = SQLStorage(url=db_url), SQLStorage(url=db_url)
    s1.upgrade()
    try:
        # no row yet: both read version 0
        v1, v2 = s1.get_state("p1").version, s2.get_state("p1").version
        assert v1 == v2 == 0
        assert s1.commit_period(make_frame("p1", 0, points=2), v1, worker="w1") == 1
        with pytest.raises(StaleStateError):
            s2.commit_period(make_frame("p1", 0, points=5), v2, worker="w2")
        # row present: both read version 1, the second writer wins this time
        v1, v2 = s1.get_state("p1").version, s2.get_state("p1").version
        assert s2.commit_period(make_frame("p1", 1, points=5), v2, worker="w2") == 2
        with pytest.raises(StaleStateError):
            s1.commit_period(make_frame("p1", 1, points=2), v1, worker="w1")
        assert [(p.begin, p.worker, p.points) for p in s1.iter_periods("p1")] == [
            (at(0), "w1", 2), (at(1), "w2", 5)]
        assert count(s1, models.rated_data, "p1") == 7
    finally:
        s1.close()
        s2.close()


def test_concurrent_commits_race_exactly_one_wins(db_url):
    """Eight connections commit the same period at once from the same read,
    first with no state row (INSERT race), then from an existing row."""
    workers = 8
    stores = [SQLStorage(url=db_url) for _ in range(workers)]
    stores[0].upgrade()
    try:
        for n in range(3):
            expected = stores[0].get_state("p1").version
            barrier = threading.Barrier(workers)
            outcome: list = [None] * workers

            def run(i, n=n, expected=expected, barrier=barrier, outcome=outcome):
                frame = make_frame("p1", n, points=i + 1)
                barrier.wait()
                try:
                    outcome[i] = stores[i].commit_period(frame, expected, worker=f"w{i}")
                except StaleStateError:
                    outcome[i] = "stale"
                except Exception as e:  # noqa: BLE001 - reported below
                    outcome[i] = repr(e)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            wins = [i for i, o in enumerate(outcome) if o == expected + 1]
            assert len(wins) == 1, outcome
            assert outcome.count("stale") == workers - 1, outcome
            [period] = stores[0].iter_periods("p1", begin=at(n), end=at(n + 1))
            assert period.worker == f"w{wins[0]}"
            assert count(stores[0], models.rated_data, "p1") == sum(
                p.points for p in stores[0].iter_periods("p1"))
        assert stores[0].get_state("p1").version == 3
    finally:
        for s in stores:
            s.close()


# -- atomicity ----------------------------------------------------------------

@pytest.mark.parametrize("first_commit", [True, False], ids=["new-scope", "existing"])
@pytest.mark.parametrize("failing_table", ["rated_period", "rated_data"])
def test_commit_failing_midway_leaves_nothing(storage, failing_table, first_commit):
    if not first_commit:
        storage.commit_period(make_frame("p1", 0, points=2), 0)
    before = snapshot(storage, "p1")
    states_before = storage.get_states()
    seen = []

    def fail_insert(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement.split("(")[0].strip())
        if statement.lstrip().upper().startswith(f"INSERT INTO {failing_table.upper()}"):
            raise RuntimeError("injected failure")

    n = 0 if first_commit else 1
    expected = before[0].version
    if storage.is_sqlite:
        # commit_period uses plain sqlite3 calls there: a trigger fails the
        # insert inside the database, the connection's trace sees the rest
        con = storage._sqlite_writer().driver_connection
        with storage.engine.begin() as c:
            c.exec_driver_sql(
                f"CREATE TRIGGER fail_insert BEFORE INSERT ON {failing_table} "
                "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
        con.set_trace_callback(lambda statement: seen.append(statement.split("(")[0]))
        try:
            with pytest.raises(sa.exc.IntegrityError, match="injected failure"):
                storage.commit_period(make_frame("p1", n, points=3), expected)
        finally:
            con.set_trace_callback(None)
            with storage.engine.begin() as c:
                c.exec_driver_sql("DROP TRIGGER fail_insert")
    else:
        sa.event.listen(storage.engine, "before_cursor_execute", fail_insert)
        try:
            with pytest.raises(Exception, match="injected failure"):
                storage.commit_period(make_frame("p1", n, points=3), expected)
        finally:
            sa.event.remove(storage.engine, "before_cursor_execute", fail_insert)
    # the state statement ran before the failure...
    assert any("scope_state" in s for s in seen)
    # ...and was rolled back with everything else
    assert snapshot(storage, "p1") == before
    assert storage.get_states() == states_before
    assert storage.commit_period(make_frame("p1", n, points=3), expected) == expected + 1
    assert count(storage, models.rated_data, "p1") == before[1] + 3


# -- errors and resets --------------------------------------------------------

def test_record_error_keeps_state_and_version(storage):
    storage.record_error("p1", "collector down", kind="collect")
    state = storage.get_state("p1")
    assert (state.last_processed, state.version) == (None, 0)
    assert (state.last_error, state.last_error_kind) == ("collector down", "collect")
    assert state.last_error_at is not None and state.last_error_at.tzinfo is not None
    assert "p1" in storage.get_states()

    # a row with version 0 means the same as no row: the first commit works
    assert storage.commit_period(make_frame("p1", 0, points=1), 0) == 1
    state = storage.get_state("p1")
    assert (state.last_processed, state.version, state.last_error) == (at(0), 1, None)

    storage.record_error("p1", "x" * 10_000)
    state = storage.get_state("p1")
    assert (state.last_processed, state.version) == (at(0), 1)
    assert state.last_error.startswith("xxx")
    assert len(state.last_error) <= sql_storage.MAX_ERROR_LENGTH
    assert state.last_error_kind == "error"
    assert storage.commit_period(make_frame("p1", 1), 1) == 2


def test_reset_state_deletes_from_to_and_fences_old_version(storage):
    v = 0
    for n in range(4):
        v = storage.commit_period(make_frame("p1", n, points=2), v)
    storage.commit_period(make_frame("other", 3, points=2), 0)
    assert v == 4

    storage.reset_state("p1", at(2), 3600)
    state = storage.get_state("p1")
    assert (state.last_processed, state.version) == (at(1), 5)
    assert {r.begin for r in storage.iter_rated("p1")} == {at(0), at(1)}
    assert [p.begin for p in storage.iter_periods("p1")] == [at(0), at(1)]
    assert count(storage, models.rated_data, "other") == 2  # other scopes untouched

    with pytest.raises(StaleStateError):
        storage.commit_period(make_frame("p1", 2, points=1), 4)
    assert storage.commit_period(make_frame("p1", 2, points=1), 5) == 6

    storage.reset_state("p1", None, 3600)
    state = storage.get_state("p1")
    assert (state.last_processed, state.version) == (None, 7)
    assert list(storage.iter_rated("p1")) == [] and list(storage.iter_periods("p1")) == []

    # a scope never seen: a worker that read "no row" (version 0) is fenced
    storage.reset_state("new", at(5), 3600)
    assert storage.get_state("new").last_processed == at(4)
    with pytest.raises(StaleStateError):
        storage.commit_period(make_frame("new", 5), 0)
    assert storage.commit_period(make_frame("new", 5), storage.get_state("new").version)


def test_get_states(storage):
    storage.commit_period(make_frame("p1", 0), 0)
    storage.record_error("p2", "boom")
    assert set(storage.get_states()) == {"p1", "p2"}
    states = storage.get_states(["p3", "p1"])
    assert list(states) == ["p3", "p1"]
    assert (states["p3"].last_processed, states["p3"].version) == (None, 0)
    assert states["p1"].version == 1
    many = [f"s{i}" for i in range(1200)] + ["p1"]  # more than one IN chunk
    assert storage.get_states(many)["p1"].version == 1
    assert len(storage.get_states(many)) == 1201


# -- schema -------------------------------------------------------------------

def test_check_schema_and_upgrade(db_url):
    storage = SQLStorage(url=db_url)
    try:
        assert storage.current_revision() is None
        with pytest.raises(SchemaError, match="run `cloudkitty-proc-manage db upgrade`"):
            storage.check_schema()
        storage.upgrade()
        assert storage.current_revision() == storage.head_revision() == "0002"
        storage.check_schema()
        storage.upgrade()  # idempotent
        storage.check_schema()
        with storage.engine.begin() as connection:
            connection.execute(sa.text("UPDATE alembic_version SET version_num = '0000'"))
        with pytest.raises(SchemaError, match="revision 0000, expected 0002: run "
                           "`cloudkitty-proc-manage db upgrade`"):
            storage.check_schema()
    finally:
        storage.close()


def test_models_match_migrations(storage):
    with storage.engine.connect() as connection:
        ctx = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(ctx, models.metadata) == []


# -- bulk insert ------------------------------------------------------------

class _CallSpy:
    """Records the sqlite3 calls of commit_period's connection."""

    def __init__(self, raw, calls):
        self._raw, self._calls = raw, calls
        self.info = raw.info

    @property
    def driver_connection(self):
        return self

    def execute(self, statement, *args):
        self._calls.append(("execute", statement))
        return self._raw.driver_connection.execute(statement, *args)

    def executemany(self, statement, rows):
        self._calls.append(("executemany", statement))
        return self._raw.driver_connection.executemany(statement, rows)

    def __getattr__(self, name):
        return getattr(self._raw.driver_connection, name)


def test_rated_rows_are_one_bulk_insert(storage, monkeypatch):
    inserts = []

    def watch(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO RATED_DATA"):
            inserts.append(executemany)

    storage.commit_period(make_frame("p1", 0, points=1), 0)  # warm up
    calls: list = []
    if storage.is_sqlite:  # plain sqlite3 calls there (see _commit_period_sqlite)
        spy = _CallSpy(storage._sqlite_writer(), calls)
        monkeypatch.setattr(storage, "_sqlite_writer", lambda: spy)
    sa.event.listen(storage.engine, "before_cursor_execute", watch)
    try:
        storage.commit_period(make_frame("p1", 1, points=1000), 1)
    finally:
        sa.event.remove(storage.engine, "before_cursor_execute", watch)
    if storage.is_sqlite:
        # multi-row INSERTs of 64 rows, then 32 and 8 for the rest (1000 =
        # 15 x 64 + 32 + 8): one statement a row costs twice as much there
        inserts = [(kind, statement.count("(?, ?, ?, ?, ?, ?, ?, ?, ?)"))
                   for kind, statement in calls
                   if statement.upper().startswith("INSERT INTO RATED_DATA")]
        assert inserts == [("execute", 64)] * 15 + [("execute", 32), ("execute", 8)]
    else:
        # one statement for 1000 rows (executemany, or one multi-row VALUES)
        assert len(inserts) == 1
    assert count(storage, models.rated_data, "p1") == 1001


@pytest.mark.parametrize("points", [1, 2, 63, 64, 65, 127, 128, 200])
def test_rows_stored_whole_and_in_order_at_every_batch_boundary(storage, points):
    """Every row of a period is stored once, as given, in the frame's
    order (SQLite splits a period into INSERTs of 64, 32, ... 1 rows)."""
    frame = make_frame("p1", 0, points=points, types=("instance", "volume"))
    storage.commit_period(frame, 0)
    frame2 = make_frame("p1", 1, points=points + 1)
    storage.commit_period(frame2, 1)
    expected = [
        RatedRow("p1", f.begin, f.end, usage_type, p.unit, p.qty, p.price,
                 p.groupby, p.metadata)
        for f in (frame, frame2) for usage_type, points_ in sorted(f.items())
        for p in points_]
    assert list(storage.iter_rated("p1")) == expected
    assert [p.points for p in storage.iter_periods("p1")] == [2 * points, points + 1]
    with storage.reader_engine.connect() as connection:
        ids = connection.execute(sa.select(models.rated_data.c.id)
                                 .order_by(models.rated_data.c.id)).scalars().all()
    assert len(ids) == len(set(ids)) == 3 * points + 1


# -- SQLite specifics -----------------------------------------------------------

def test_sqlite_writer_waits_for_the_write_lock_with_its_own_sleep(sqlite_url, monkeypatch):
    """While another process holds SQLite's write lock, a commit waits
    through ``storage.sleep`` (eventlet.sleep in a GreenPool worker, so
    collector replies are handled meanwhile) instead of SQLite's busy
    handler, which sleeps in C; then commits. Past the busy timeout it
    fails with 'database is locked' and nothing is written."""
    import sqlite3

    from cloudkitty_proc.storage import sql as sql_mod

    storage = SQLStorage(url=sqlite_url)
    storage.upgrade()
    other = sqlite3.connect(sa.make_url(sqlite_url).database, timeout=0,
                            isolation_level=None)
    pauses = []

    def sleep(seconds):
        pauses.append(seconds)
        if len(pauses) == 5:
            other.execute("COMMIT")  # the other writer is done

    storage.sleep = sleep
    try:
        other.execute("BEGIN IMMEDIATE")
        assert storage.commit_period(make_frame("p1", 0, points=2), 0) == 1
        assert len(pauses) == 5 and pauses == sorted(pauses) and pauses[0] < 0.001
        assert storage.get_state("p1").version == 1

        monkeypatch.setattr(sql_mod, "SQLITE_BUSY_TIMEOUT", 0.05)
        storage.sleep = time.sleep
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(sa.exc.OperationalError, match="locked"):
            storage.commit_period(make_frame("p1", 1, points=2), 1)
        other.execute("COMMIT")
        assert storage.get_state("p1").version == 1
        assert count(storage, models.rated_data, "p1") == 2
        assert storage.commit_period(make_frame("p1", 1, points=2), 1) == 2
    finally:
        other.close()
        storage.close()


def test_sqlite_wal_is_checkpointed_by_a_thread_not_by_commits(sqlite_url, monkeypatch):
    """The commit connection never checkpoints (wal_autocheckpoint = 0: a
    checkpoint's fsync stalled the worker's green threads); a thread of the
    storage copies the WAL into the database file, and stops with it."""
    import os
    import threading

    from cloudkitty_proc.storage import sql as sql_mod

    monkeypatch.setattr(sql_mod, "WAL_CHECKPOINT_INTERVAL", 0.05)
    storage = SQLStorage(url=sqlite_url)
    storage.upgrade()
    path = sa.make_url(sqlite_url).database

    def checkpointers():
        return [t for t in threading.enumerate() if t.name == "ckp-wal-checkpoint"]

    try:
        before = len(checkpointers())
        storage.commit_period(make_frame("p1", 0, points=1), 0)
        con = storage._sqlite_writer().driver_connection
        assert con.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        assert len(checkpointers()) == before + 1
        size = os.path.getsize(path)
        for n in range(1, 11):
            storage.commit_period(make_frame("p1", n, points=200), n)
        deadline = time.monotonic() + 10
        while os.path.getsize(path) <= size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.getsize(path) > size, "the WAL was never checkpointed"
    finally:
        storage.close()
    assert len(checkpointers()) == before


def test_sqlite_wal_busy_timeout_and_immediate_writes(sqlite_url):
    import sqlite3

    storage = SQLStorage(url=sqlite_url)
    storage.upgrade()
    path = sa.make_url(sqlite_url).database
    try:
        with storage.reader_engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 30_000
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            # a write transaction holds the write lock from its BEGIN on...
            with storage.engine.begin():
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
                # ...while readers still read
                assert storage.get_state("p1").version == 0
            # a read transaction never takes it
            with storage.reader_engine.connect() as connection:
                connection.execute(sa.select(models.scope_state)).all()
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
        finally:
            other.close()
    finally:
        storage.close()


def test_sqlite_state_path_created_lazily(tmp_path):
    conf = cfg.ConfigOpts()
    ckp_conf.register_opts(conf)
    state_path = tmp_path / "var" / "lib" / "ckp"
    conf.set_override("state_path", str(state_path))
    storage = SQLStorage(conf)
    try:
        assert not state_path.exists()  # nothing happens before first use
        storage.upgrade()
        assert (state_path / "cloudkitty-proc.sqlite").is_file()
        storage.check_schema()
    finally:
        storage.close()


OWN_PERIODS = 50
SHARED_PERIODS = 80
PROCESSES = 4


def _sqlite_worker(storage: SQLStorage, idx: int, queue) -> None:
    """Runs in a forked child, with the parent's (already used) storage."""
    try:
        own, v, wins, stale = f"own-{idx}", 0, 0, 0

        def try_shared() -> bool:
            nonlocal wins, stale
            state = storage.get_state("shared")
            n = 0 if state.last_processed is None else (state.last_processed - T0) // H + 1
            if n >= SHARED_PERIODS:
                return False
            try:
                storage.commit_period(make_frame("shared", n, points=3), state.version,
                                      worker=f"w{idx}")
                wins += 1
            except StaleStateError:
                stale += 1
            return True

        for n in range(OWN_PERIODS):
            v = storage.commit_period(make_frame(own, n, points=5), v, worker=f"w{idx}")
            try_shared()
        while try_shared():
            pass
        queue.put((idx, wins, stale, None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((idx, 0, 0, traceback.format_exc()))


def test_sqlite_several_processes_one_file(sqlite_url):
    storage = SQLStorage(url=sqlite_url)
    storage.upgrade()  # engines exist in the parent before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sqlite_worker, args=(storage, i, queue))
             for i in range(PROCESSES)]
    try:
        for p in procs:
            p.start()
        results = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        errors = [r[3] for r in results if r[3]]
        assert not errors, "\n".join(errors)
        assert [p.exitcode for p in procs] == [0] * PROCESSES
        assert sum(r[1] for r in results) == SHARED_PERIODS

        # every period exactly once, rows included
        for i in range(PROCESSES):
            state = storage.get_state(f"own-{i}")
            assert (state.version, state.last_processed) == (OWN_PERIODS, at(OWN_PERIODS - 1))
            assert [p.begin for p in storage.iter_periods(f"own-{i}")] == [
                at(n) for n in range(OWN_PERIODS)]
            assert count(storage, models.rated_data, f"own-{i}") == OWN_PERIODS * 5
        shared = storage.get_state("shared")
        assert (shared.version, shared.last_processed) == (SHARED_PERIODS, at(SHARED_PERIODS - 1))
        assert [p.begin for p in storage.iter_periods("shared")] == [
            at(n) for n in range(SHARED_PERIODS)]
        [summary] = storage.summary("shared")
        assert (summary.periods, summary.points) == (SHARED_PERIODS, SHARED_PERIODS * 3)
        # the parent's pooled connections survived the children
        assert storage.get_state("own-0").version == OWN_PERIODS
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        storage.close()


def test_sqlite_fast_commit_stores_the_same_text_as_sqlalchemy(sqlite_url):
    """commit_period uses plain sqlite3 calls on SQLite; every value must be
    stored as the text SQLAlchemy's column types write (what Core reads
    back, compares and sorts on)."""
    import sqlite3

    from sqlalchemy.dialects import sqlite as sqlite_dialect

    from cloudkitty_proc.dataframe import DataFrame, DataPoint
    from cloudkitty_proc.storage.sql import SQLStorage

    storage = SQLStorage(url=sqlite_url)
    storage.upgrade()
    begin = datetime.datetime(2026, 3, 4, 5, 0, tzinfo=datetime.timezone.utc)
    frame = DataFrame("p1", begin, begin + datetime.timedelta(hours=1))
    frame.add_points("t", [DataPoint("u", decimal.Decimal("1.50"), decimal.Decimal("0.1"),
                                     {"id": "x"}, {"m": "y"})])
    storage.commit_period(frame, 0)
    period = next(storage.iter_periods("p1"))
    state = storage.get_state("p1")
    storage.close()

    dialect = sqlite_dialect.dialect()
    as_sa = models.rated_period.c.begin.type.dialect_impl(dialect).bind_processor(dialect)
    con = sqlite3.connect(sqlite_url[len("sqlite:///"):])
    data = con.execute('SELECT "begin", "end", qty, price, groupby, metadata '
                       "FROM rated_data").fetchall()
    stored = con.execute('SELECT "begin", "end", committed_at, points, price, worker '
                         "FROM rated_period").fetchone()
    st = con.execute("SELECT last_processed, last_commit_at, updated_at, created_at, "
                     "version, active FROM scope_state").fetchone()
    con.close()
    naive = {k: v.replace(tzinfo=None) for k, v in
             {"begin": begin, "end": frame.end, "committed": period.committed_at}.items()}
    assert data == [(as_sa(naive["begin"]), as_sa(naive["end"]), "1.50", "0.1",
                     '{"id":"x"}', '{"m":"y"}')]
    assert stored == (as_sa(naive["begin"]), as_sa(naive["end"]), as_sa(naive["committed"]),
                      1, "0.1", "")
    assert st[:4] == (as_sa(naive["begin"]),) + (as_sa(naive["committed"]),) * 3
    assert st[4:] == (1, 1)
    assert (state.last_processed, state.version, state.active) == (begin, 1, True)
