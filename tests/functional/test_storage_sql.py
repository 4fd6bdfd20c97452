"""The ``sql`` storage against real SQLite, PostgreSQL and MariaDB databases:
what is specific to it (stored text, atomicity under injected failures,
schema and migrations, multi-row INSERTs, SQLite's locking and fast path).
What every backend must do is in the contract suite
(tests/storage_contract.py, run by test_storage_contract_sql.py).

Most tests run once per backend (``db_url`` fixture); the SQLite-specific
ones (locking, several processes on one file) use ``sqlite_url``.
"""

from __future__ import annotations

import datetime
import decimal
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time
import traceback

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.exceptions import SchemaError, StaleStateError
from cloudkitty_proc.storage import models, sql_engines, sql_read, sql_rows, sqlite_fast
from cloudkitty_proc.storage.base import RatedRow
from cloudkitty_proc.storage.sql import SQLStorage, alembic_config
from tests.storage_contract import H, T0, D, at, make_frame


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

def test_labels_and_decimals_stored_as_compact_text(storage):
    """What the contract's read-back case (tests/storage_contract.py) reads,
    as stored: label JSON compact with sorted keys, quantities as plain
    decimal text."""
    big_qty = D("12345678901234567890.123456789012345678901234567891")
    frame = DataFrame("p1", at(0), at(1))
    frame.add_points("volume", [
        DataPoint("GiB", big_qty, D("0.000000000000000000000000000001"),
                  {"project_id": "p1", "id": "vol-é✓"},
                  {"z": "last", "a": "first", "quote": 'say "hi"'}),
    ])
    assert storage.commit_period(frame, 0, worker="host-1") == 1
    # JSON stored compact with sorted keys
    with storage.reader_engine.connect() as connection:
        stored = connection.execute(
            sa.select(models.rated_data.c["metadata"], models.rated_data.c.qty)
            .where(models.rated_data.c.type == "volume")).one()
    assert stored[0] == '{"a":"first","quote":"say \\"hi\\"","z":"last"}'
    assert stored[1] == "12345678901234567890.123456789012345678901234567891"


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
        text = sql_rows.label_json(labels)
        assert json.loads(text) == json.loads(sql_rows.std_dumps(labels))
        assert ", " not in text and ": " not in text
        keys = list(json.loads(text))
        assert keys == sorted(keys)
    assert sql_rows.label_json({"u": "é"}) == '{"u":"é"}'


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
        assert sql_rows.decimal_text(value) == format(value, "f"), value
    with decimal.localcontext() as ctx:
        ctx.capitals = 0  # str() writes a lower-case exponent then
        assert sql_rows.decimal_text(D("1E+3")) == "1000"
        assert sql_rows.decimal_text(D("1E-7")) == "0.0000001"
    # not a Decimal (a plugin's int): what format gives, as before
    assert sql_rows.decimal_text(3) == format(3, "f")


def test_iter_rated_releases_its_connection_when_closed(storage, monkeypatch):
    monkeypatch.setattr(sql_read, "STREAM_CHUNK", 2)
    storage.commit_period(make_frame("p1", 0, points=10), 0)
    pool = storage.reader_engine.pool
    gen = storage.iter_rated()
    next(gen)
    assert pool.checkedout() == 1
    gen.close()
    assert pool.checkedout() == 0


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


# -- schema -------------------------------------------------------------------

def test_check_schema_and_upgrade(db_url):
    storage = SQLStorage(url=db_url)
    try:
        assert storage.current_revision() is None
        with pytest.raises(SchemaError, match="run `cloudkitty-proc-manage db upgrade`"):
            storage.check_schema()
        storage.upgrade()
        assert storage.current_revision() == storage.head_revision() == "0003"
        storage.check_schema()
        storage.upgrade()  # idempotent
        storage.check_schema()
        with storage.engine.begin() as connection:
            connection.execute(sa.text("UPDATE alembic_version SET version_num = '0000'"))
        with pytest.raises(SchemaError, match="revision 0000, expected 0003: run "
                           "`cloudkitty-proc-manage db upgrade`"):
            storage.check_schema()
    finally:
        storage.close()


def test_models_match_migrations(storage):
    with storage.engine.connect() as connection:
        ctx = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(ctx, models.metadata) == []


def test_migration_0002_keeps_existing_data(db_url):
    """An 0001 database with rated data upgrades to 0002 (and on to the
    head) in place."""
    storage = SQLStorage(url=db_url)
    try:
        config = alembic_config(storage.url)
        with storage.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0001")
        assert storage.current_revision() == "0001"
        storage.commit_period(make_frame("p1", 0, points=2), 0)
        storage.upgrade()
        assert storage.current_revision() == "0003"
        assert len(list(storage.iter_rated("p1"))) == 2
        assert storage.list_tasks() == []
        assert storage.rating_period() is None  # 0003: no period recorded yet
        with storage.engine.connect() as connection:
            assert sa.inspect(connection).has_table("reprocess_task")
            assert sa.inspect(connection).has_table("processor_setting")
    finally:
        storage.close()


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
    if storage.is_sqlite:  # plain sqlite3 calls there (see storage/sqlite_fast.py)
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


# -- batched commits --------------------------------------------------------------

def test_commit_periods_is_one_transaction_with_one_bulk_insert(storage, monkeypatch, caplog):
    """Stale items included (the version-0 INSERT hitting the key runs in a
    SAVEPOINT on PostgreSQL/MariaDB): the batch needs no fallback."""
    storage.commit_period(make_frame("s0", 0, points=1), 0)  # warm up
    storage.commit_period(make_frame("x", 0, points=1), 0)
    storage.commit_period(make_frame("y", 0, points=1), 0)
    items = [(make_frame(f"s{i}", 1 if i == 0 else 0, points=10), 1 if i == 0 else 0)
             for i in range(5)]
    items[2:2] = [(make_frame("x", 1, points=4), 0), (make_frame("y", 1, points=4), 7)]
    calls: list = []
    begins: list = []
    inserts: list = []

    def watch(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO RATED_DATA"):
            inserts.append(statement)

    def begin(conn):
        begins.append(conn)

    if storage.is_sqlite:
        spy = _CallSpy(storage._sqlite_writer(), calls)
        monkeypatch.setattr(storage, "_sqlite_writer", lambda: spy)
    sa.event.listen(storage.engine, "begin", begin)
    sa.event.listen(storage.engine, "before_cursor_execute", watch)
    try:
        results = storage.commit_periods(items)
    finally:
        sa.event.remove(storage.engine, "begin", begin)
        sa.event.remove(storage.engine, "before_cursor_execute", watch)
    if storage.is_sqlite:
        statements = [statement.split(" (")[0] for _kind, statement in calls]
        assert statements.count("BEGIN IMMEDIATE") == 1 and statements.count("COMMIT") == 1
        # the 50 rows of the five scopes: multi-row INSERTs of 32, 16 and 2 rows
        assert [statement.count("(?, ?, ?, ?, ?, ?, ?, ?, ?)") for _kind, statement in calls
                if statement.upper().startswith("INSERT INTO RATED_DATA")] == [32, 16, 2]
    else:
        assert len(begins) == 1
        assert len(inserts) == 1
    assert results[:2] + results[4:] == [2, 1, 1, 1, 1]
    assert all(isinstance(r, StaleStateError) for r in results[2:4]), results
    assert "one by one" not in caplog.text
    assert [count(storage, models.rated_data, f"s{i}") for i in range(5)] == [11] + [10] * 4
    assert snapshot(storage, "x")[1:] == snapshot(storage, "y")[1:] == (1, 1)


def test_commit_periods_a_database_error_on_one_item_fails_it_alone(storage, caplog):
    """A period already stored (a caller committing out of order) fails the
    batch's transaction on its key: the batch is rolled back, then
    committed item by item, so that item alone fails."""
    for scope in ("a", "b"):
        storage.commit_period(make_frame(scope, 0, points=1), 0)
        storage.commit_period(make_frame(scope, 1, points=1), 1)
    before = snapshot(storage, "b")
    results = storage.commit_periods([(make_frame("a", 2, points=3), 2),
                                      (make_frame("b", 0, points=3), 2),  # period 0 again
                                      (make_frame("c", 0, points=3), 0)])
    assert results[0] == 3 and results[2] == 1
    assert isinstance(results[1], sa_exc.IntegrityError), results
    assert snapshot(storage, "b") == before
    assert (storage.get_state("a").version, count(storage, models.rated_data, "a")) == (3, 5)
    assert count(storage, models.rated_period, "c") == 1
    assert "batched commit of 3 scopes failed" in caplog.text
    assert "committing them one by one" in caplog.text


def test_commit_periods_without_the_write_lock_fails_every_item_once(sqlite_url, monkeypatch):
    """SQLite: the write lock not obtained within the busy timeout fails
    every item with that error, after one wait (not one per item)."""
    import sqlite3

    storage = SQLStorage(url=sqlite_url)
    storage.upgrade()
    storage.commit_period(make_frame("a", 0, points=1), 0)
    other = sqlite3.connect(sa.make_url(sqlite_url).database, timeout=0,
                            isolation_level=None)
    monkeypatch.setattr(sql_engines, "SQLITE_BUSY_TIMEOUT", 0.2)
    pauses: list = []
    storage.sleep = lambda seconds: (pauses.append(seconds), time.sleep(seconds))
    try:
        other.execute("BEGIN IMMEDIATE")
        results = storage.commit_periods([(make_frame("a", 1, points=1), 1),
                                          (make_frame("b", 0, points=1), 0)])
        assert sum(pauses) < 0.2 + 0.05  # one wait for both items
        other.execute("COMMIT")
        assert all(isinstance(r, sa.exc.OperationalError) and "locked" in str(r)
                   for r in results), results
        assert results[0] is results[1]
        assert storage.get_state("a").version == 1 and storage.get_state("b").version == 0
        assert storage.commit_periods([(make_frame("a", 1, points=1), 1),
                                       (make_frame("b", 0, points=1), 0)]) == [2, 1]
    finally:
        other.close()
        storage.close()


_BATCH_CRASH = """
import sys
from cloudkitty_proc.storage.sql import SQLStorage
from tests.storage_contract import make_frame
storage = SQLStorage(url=sys.argv[1])
print(storage.commit_periods([(make_frame("a", 1, points=3), 1),
                              (make_frame("b", 0, points=3), 0),
                              (make_frame("c", 0, points=70), 0)]))
"""


def test_commit_periods_killed_during_commit_leaves_nothing(storage, db_url):
    """A process killed at ``during_commit`` (every row of the batch
    inserted, not committed) leaves nothing of any item."""
    storage.commit_period(make_frame("a", 0, points=2), 0)
    before = {s: snapshot(storage, s) for s in "abc"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, CKP_FAULTS="during_commit:1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _BATCH_CRASH, db_url], env=env, cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert {s: snapshot(storage, s) for s in "abc"} == before
    assert storage.commit_periods([(make_frame("a", 1, points=3), 1),
                                   (make_frame("b", 0, points=3), 0)]) == [2, 1]


# -- SQLite specifics -----------------------------------------------------------

def test_sqlite_writer_waits_for_the_write_lock_with_its_own_sleep(sqlite_url, monkeypatch):
    """While another process holds SQLite's write lock, a commit waits
    through ``storage.sleep`` (eventlet.sleep in a GreenPool worker, so
    collector replies are handled meanwhile) instead of SQLite's busy
    handler, which sleeps in C; then commits. Past the busy timeout it
    fails with 'database is locked' and nothing is written."""
    import sqlite3

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

        monkeypatch.setattr(sql_engines, "SQLITE_BUSY_TIMEOUT", 0.05)
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

    monkeypatch.setattr(sqlite_fast, "WAL_CHECKPOINT_INTERVAL", 0.05)
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


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_held_row_lock_fails_the_commit_instead_of_hanging(request, backend, monkeypatch):
    """A connection lost between the state UPDATE and its COMMIT leaves an
    orphaned transaction holding the row lock; workers waited on it forever
    (48 of 5,664 periods committed). The wait is bounded now: the commit
    fails, nothing is written, the scope is retried later (issue 15 item 8)."""
    from cloudkitty_proc.storage import sql_engines

    url = request.getfixturevalue("pg_url" if backend == "postgresql" else "mysql_url")
    monkeypatch.setattr(sql_engines, "LOCK_TIMEOUT", 2)
    storage = SQLStorage(url=url)
    storage.upgrade()
    storage.commit_period(make_frame("p1", 0, points=1), 0)
    orphan = sa.create_engine(url).connect()
    try:
        transaction = orphan.begin()
        orphan.execute(sa.text("UPDATE scope_state SET version = version WHERE "
                               "scope_id = 'p1'"))  # holds the row lock, never commits
        with pytest.raises(sa_exc.OperationalError, match="(?i)lock"):
            storage.commit_period(make_frame("p1", 1, points=1), 1)
        transaction.rollback()
        assert storage.get_state("p1").version == 1  # nothing of the failed commit
        assert storage.commit_period(make_frame("p1", 1, points=1), 1) == 2
    finally:
        orphan.close()
        storage.close()


def test_sqlite_files_are_private_whatever_the_umask(tmp_path):
    """With umask 022 the database was 0644 and its directory 0755 (item 14)."""
    old = os.umask(0o022)
    try:
        storage = SQLStorage(url=f"sqlite:///{tmp_path}/state/sub/ckp.sqlite")
        storage.upgrade()
        storage.commit_period(make_frame("p1", 0, points=1), 0)
        storage.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "sub").st_mode) == 0o700
    for name in ("ckp.sqlite", "ckp.sqlite-wal", "ckp.sqlite-shm"):
        path = tmp_path / "state" / "sub" / name
        if path.exists():
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, name


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_period_recorded_meanwhile_is_stale_not_a_key_error(request, backend):
    """Two daemons starting at once on a new database: the other one inserts
    the period between our check and our insert. That was a unique-key
    error, and the second daemon did not start; it is StaleStateError now,
    which data_period.ensure() answers by reading the recorded period."""
    from sqlalchemy import event

    from cloudkitty_proc import data_period

    url = request.getfixturevalue("pg_url" if backend == "postgresql" else "mysql_url")
    storage, other = SQLStorage(url=url), SQLStorage(url=url)
    storage.upgrade()
    fired = []

    @event.listens_for(storage.engine, "before_cursor_execute")
    def meanwhile(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO PROCESSOR_SETTING") and not fired:
            fired.append(True)
            other.set_rating_period(3600, expected=None)  # commits before ours
    try:
        with pytest.raises(StaleStateError):
            storage.set_rating_period(3600, expected=None)
        assert fired and storage.rating_period() == 3600
        fired.clear()
        data_period.ensure(storage, 3600)  # the second daemon starts
        event.remove(storage.engine, "before_cursor_execute", meanwhile)
        with pytest.raises(Exception, match="stored data is rated in 3600 s periods"):
            data_period.ensure(storage, 1800)
    finally:
        storage.close()
        other.close()
