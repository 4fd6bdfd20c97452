"""The ``sql`` storage: SQLite, PostgreSQL and MySQL/MariaDB (SQLAlchemy Core).

How the invariants of ``storage/base.py`` are kept:

1. Exactly once: ``commit_period`` runs the state compare-and-set, the
   ``rated_period`` row and every ``rated_data`` row (one executemany) in one
   transaction; ``UNIQUE(scope_id, begin)`` on ``rated_period`` is a second,
   database-side guard against rating a period twice.
2. Fenced: ``UPDATE scope_state SET version = version + 1 ... WHERE
   scope_id = :s AND version = :expected``; 0 rows matched → rollback and
   StaleStateError. A scope without a row has version 0: the first commit
   INSERTs the row, and a duplicate key there means another worker won.
4. Durable reprocessing: a task row carries its progress cursor
   (``next_period``); ``commit_reprocessed_period`` deletes and re-inserts
   the period's rows and moves the cursor with ``UPDATE ... WHERE id = :t
   AND next_period = :expected`` in one transaction.

Lock order, so that concurrent writers of one scope never deadlock on
PostgreSQL/MySQL: every write transaction touching a scope locks its
``scope_state`` row first (UPDATE or SELECT ... FOR UPDATE), then task
rows, then rated rows. On SQLite ``BEGIN IMMEDIATE`` serialises writers.

Engines are created lazily, on first use, in the process that uses them: a
storage object may be built before the daemon forks its workers. If an
object built (and used) in a parent is used again after a fork, the
inherited pools are dropped without touching the parent's connections and
new engines are created.

SQLite (one host, several worker processes on one file): WAL journal (readers
never block the writer nor each other), a 60 s busy timeout, synchronous
NORMAL, and two engines: the writer starts every transaction with ``BEGIN
IMMEDIATE`` so it takes the write lock up front (a deferred transaction that
reads then writes can fail with "database is locked" whatever the busy
timeout: the read lock cannot be upgraded while another writer waits), the
reader uses plain deferred ``BEGIN`` and never takes the write lock.
PostgreSQL, MySQL/MariaDB: one engine, READ COMMITTED, ``pool_pre_ping``.

Threading: one storage object per process, used from the worker's main
thread (``base.py``); an ``iter_rated`` generator holds one connection of the
reader pool until it is exhausted or closed.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import itertools
import json
import os
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from oslo_config import cfg
from sqlalchemy import event, exc as sa_exc

from cloudkitty_proc import faults, utils
from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.exceptions import (InvalidRequestError, SchemaError,
                                        StaleStateError, TaskCancelledError)
from cloudkitty_proc.storage import models
from cloudkitty_proc.storage.base import (ACTIVE_TASK_STATES, MAX_REQUEST_ID_LENGTH, REPROCESSING,
                                          TASK_DONE, TASK_FAILED, TASK_PENDING,
                                          TASK_RUNNING, BaseStorage, RatedRow,
                                          ReprocessTask, ScopeState, TypeSummary,
                                          request_key)

database_opts = [
    cfg.StrOpt(
        "connection",
        default="sqlite:///$state_path/cloudkitty-proc.sqlite",
        secret=True,
        help="SQLAlchemy URL of the database holding states and rated "
        "data (sqlite, postgresql+psycopg2, mysql+pymysql).",
    ),
]

OPTS = [("database", database_opts)]


LOG = logging.getLogger(__name__)

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
UPGRADE_HINT = "run `cloudkitty-proc-manage db upgrade`"

#: SQLite busy timeout: how long a writer waits for the write lock
SQLITE_BUSY_TIMEOUT = 60.0
#: rows fetched per round trip by the streaming readers
STREAM_CHUNK = 5000
#: scope ids per ``IN (...)`` in get_states
_IN_CHUNK = 500
#: longest error message kept in scope_state.last_error
MAX_ERROR_LENGTH = 4000

#: Exact addition of decimals (summary totals never round)
_EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX,
                         Emin=decimal.MIN_EMIN, traps=[decimal.InvalidOperation])

_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode
_loads = json.loads

#: groupby / metadata JSON: sorted keys, compact (what _dumps writes too)
_LABEL_JSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def _label_json(labels: dict) -> str:
    """The JSON text of a groupby or metadata dict, by ``orjson`` (0.46 µs
    for three labels; the standard encoder took 3.7 µs, a third of the
    commit's CPU). Non-ASCII characters are written as such, not as
    ``\\u`` escapes: the same JSON. What orjson refuses (an integer wider
    than 64 bits) goes through the standard encoder."""
    try:
        return orjson.dumps(labels, option=_LABEL_JSON_OPTIONS, default=str).decode()
    except orjson.JSONEncodeError:
        return _dumps(labels)

_state_t = models.scope_state
_period_t = models.rated_period
_data_t = models.rated_data
_task_t = models.reprocess_task

# commit_period's statements, built once: building and caching an UPDATE
# per call cost more than executing it
_COMMIT_STATE = (
    _state_t.update()
    .where(_state_t.c.scope_id == sa.bindparam("b_scope_id"),
           _state_t.c.version == sa.bindparam("b_version"))
    .values(version=_state_t.c.version + 1,
            last_processed=sa.bindparam("b_last_processed"),
            last_commit_at=sa.bindparam("b_now"), updated_at=sa.bindparam("b_now"),
            last_error=None, last_error_kind=None, last_error_at=None))
_INSERT_PERIOD = _period_t.insert()

#: at most this many problems are listed in one refusal
_MAX_PROBLEMS = 10


@dataclasses.dataclass(frozen=True)
class RatedPeriod:
    """One committed (scope, period), empty periods included."""

    scope_id: str
    begin: datetime.datetime
    end: datetime.datetime
    points: int
    price: decimal.Decimal
    committed_at: datetime.datetime
    worker: str


def alembic_config(url: str | sa.URL | None = None) -> AlembicConfig:
    """An Alembic config for the storage migrations, built without an ini
    file. ``url`` is only used when no connection is passed in
    ``config.attributes["connection"]`` (the alembic command line)."""
    config = AlembicConfig()
    config.set_main_option("script_location", MIGRATIONS_DIR)
    if url is not None:
        if isinstance(url, sa.URL):
            url = url.render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


_head_revision: str | None = None


def head_revision() -> str:
    """The revision the code expects (the newest migration)."""
    global _head_revision
    if _head_revision is None:
        _head_revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    return _head_revision


_SQLITE_INSERT_DATA_HEAD = (
    'INSERT INTO rated_data (scope_id, "begin", "end", type, unit, qty, price, groupby, '
    'metadata) VALUES ')
#: rows per multi-row INSERT on SQLite; the rest of a period goes in
#: statements of 32, 16, ... 1 rows (7 statement texts in all, so they stay
#: in sqlite3's statement cache). 64 x 9 parameters stay under SQLite's
#: oldest limit of 999.
SQLITE_INSERT_BATCH = 64
_SQLITE_INSERT_DATA = {
    n: _SQLITE_INSERT_DATA_HEAD + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * n)
    for n in (1 << k for k in range(SQLITE_INSERT_BATCH.bit_length()))
}
_chain = itertools.chain.from_iterable


def _sqlite_insert_batches(rows: list) -> Iterator[tuple[str, list]]:
    """(statement, parameters) of multi-row INSERTs storing ``rows`` (the
    tuples of _frame_rows), in order. One statement execution per row, as
    executemany does it (bind, step from the start of the program, which
    opens the table's and the index's cursors, reset), cost 7-9 us a row
    here, as much as the rest of the commit; 64 rows a statement: 5 us
    (W2's rows, table and index)."""
    n = len(rows)
    i = 0
    size = SQLITE_INSERT_BATCH
    while i < n:
        while n - i < size:
            size >>= 1
        yield _SQLITE_INSERT_DATA[size], list(_chain(rows[i:i + size]))
        i += size


# commit_period on SQLite: plain sqlite3 calls on one writer connection
_SQLITE_COMMIT_STATE = (
    "UPDATE scope_state SET version = version + 1, last_processed = ?, last_commit_at = ?, "
    "updated_at = ?, last_error = NULL, last_error_kind = NULL, last_error_at = NULL "
    "WHERE scope_id = ? AND version = ?")
_SQLITE_INSERT_STATE = (
    "INSERT INTO scope_state (scope_id, last_processed, version, active, last_error, "
    "last_error_kind, last_error_at, last_commit_at, created_at, updated_at) "
    "VALUES (?, ?, 1, 1, NULL, NULL, NULL, ?, ?, ?)")
_SQLITE_INSERT_PERIOD = (
    'INSERT INTO rated_period (scope_id, "begin", "end", points, price, committed_at, '
    "worker) VALUES (?, ?, ?, ?, ?, ?, ?)")


def _sqlite_datetime(dt: datetime.datetime) -> str:
    """The text SQLAlchemy's SQLite DATETIME type stores (naive UTC)."""
    return (f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d} {dt.hour:02d}:{dt.minute:02d}:"
            f"{dt.second:02d}.{dt.microsecond:06d}")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _naive(dt: datetime.datetime | None) -> datetime.datetime | None:
    return None if dt is None else utils.to_naive_utc(dt)


def _decimal_text(value: decimal.Decimal) -> str:
    """``format(value, "f")`` (plain digits, trailing zeros kept), by
    ``str`` where that gives the same text: a Decimal with an exponent <= 0
    and not too small. 0.14 us instead of 0.57, twice per stored row."""
    if type(value) is decimal.Decimal:
        text = str(value)
        if "E" not in text and "e" not in text:
            return text
    return format(value, "f")


def _sqlite_is_memory(url: sa.URL) -> bool:
    database = url.database or ""
    return (database in ("", ":memory:") or url.query.get("mode") == "memory"
            or "mode=memory" in database)


#: first and longest pause between two tries of a busy BEGIN IMMEDIATE
_BUSY_FIRST_PAUSE = 0.0002
_BUSY_MAX_PAUSE = 0.005


def _begin_immediate(dbapi_connection: Any, sleep: Callable[[float], None]) -> None:
    """BEGIN IMMEDIATE on a connection whose busy timeout is 0, retried
    until SQLITE_BUSY_TIMEOUT with pauses of ``sleep``: SQLite's own busy
    handler sleeps in C (1, 2, 5, 10 ms ...), which froze the worker's
    GreenPool whenever another worker held the write lock."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
    pause = _BUSY_FIRST_PAUSE
    while True:
        try:
            dbapi_connection.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
            if not (busy or "locked" in str(exc)) or time.monotonic() >= deadline:
                raise
        sleep(pause)
        pause = min(pause * 2, _BUSY_MAX_PAUSE)


#: seconds between two WAL checkpoints of the checkpointer thread
WAL_CHECKPOINT_INTERVAL = 0.5


class _WalCheckpointer:
    """Checkpoints a SQLite WAL from a thread of its own.

    The connection commit_period uses has ``wal_autocheckpoint = 0``: with
    SQLite's automatic checkpoint, every ~1000 pages one commit copied the
    WAL into the database and fsynced it, 5-20 ms during which a worker's
    run thread (and with it every green thread of its GreenPool) stood
    still. Here a PASSIVE checkpoint (it never blocks writers or readers)
    runs every WAL_CHECKPOINT_INTERVAL on this thread's own connection;
    sqlite3 releases the GIL while it works. The other connections keep
    the automatic checkpoint, a backstop should this thread fall behind.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckp-wal-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        con = None
        while not self._stop.wait(WAL_CHECKPOINT_INTERVAL):
            try:
                if con is None:
                    con = sqlite3.connect(self.path, timeout=0, isolation_level=None,
                                          check_same_thread=False)
                    # it copies WAL frames: no use for a page cache
                    con.execute("PRAGMA cache_size = -64")
                con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:  # busy (another checkpoint), or gone
                LOG.debug("WAL checkpoint of %s skipped: %s", self.path, exc)
                if con is not None and not isinstance(exc, sqlite3.OperationalError):
                    con.close()
                    con = None
        if con is not None:
            con.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5)


def _sqlite_engine(url: sa.URL, *, begin_sql: str,
                   sleep: Callable[[float], None] | None = None) -> sa.Engine:
    """A SQLite engine whose transactions start with ``begin_sql``. With
    ``sleep`` (writers, WAL journal): busy BEGIN IMMEDIATEs are retried
    with ``sleep`` instead of SQLite's busy handler (``_begin_immediate``)."""
    kwargs: dict[str, Any] = {}
    connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT}
    if _sqlite_is_memory(url):
        # one shared connection, or every connection sees its own database
        kwargs["poolclass"] = sa.pool.StaticPool
        connect_args["check_same_thread"] = False
    engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
    busy_ms = int(SQLITE_BUSY_TIMEOUT * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, record):
        # pysqlite's own transaction handling would BEGIN (deferred) lazily
        # before DML only: take control of BEGIN, emitted below
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
            mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()
            cursor.execute("PRAGMA synchronous = NORMAL")
            # In WAL mode only BEGIN IMMEDIATE waits for another writer (a
            # write transaction that holds the lock is never busy): that
            # wait is ours. Other journal modes keep SQLite's busy handler.
            if sleep is not None and mode and str(mode[0]).lower() == "wal":
                cursor.execute("PRAGMA busy_timeout = 0")
                record.info["ckp_own_busy_wait"] = True
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        if sleep is not None and connection.connection.info.get("ckp_own_busy_wait"):
            _begin_immediate(connection.connection.driver_connection, sleep)
        else:
            connection.exec_driver_sql(begin_sql)

    return engine


class SQLStorage(BaseStorage):
    """Scope states and rated data in one SQL database.

    ``SQLStorage(conf)`` uses ``[database] connection``; ``url=`` overrides
    it (tests, tools). Nothing connects before the first call.
    """

    capabilities = frozenset({REPROCESSING})

    def __init__(self, conf: cfg.ConfigOpts | None = None, *,
                 url: str | sa.URL | None = None) -> None:
        super().__init__(conf)
        if url is None:
            if conf is None:
                raise ValueError("SQLStorage needs a conf or a url")
            url = conf.database.connection
        self.url: sa.URL = sa.make_url(url)
        self._writer: sa.Engine | None = None
        self._reader: sa.Engine | None = None
        self._pid: int | None = None
        # SQLite: a writer connection kept checked out for commit_period
        self._commit_raw: Any = None
        # ... and the ones inherited through fork, never touched again
        self._inherited: list[Any] = []
        self._checkpointer: _WalCheckpointer | None = None

    def __repr__(self) -> str:
        return f"SQLStorage({self.url.render_as_string(hide_password=True)!r})"

    # -- engines ---------------------------------------------------------
    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    def _engines(self) -> tuple[sa.Engine, sa.Engine]:
        pid = os.getpid()
        if self._writer is not None and self._pid != pid:
            # inherited through fork: forget the parent's pooled connections
            # without closing them (they are the parent's, still in use)
            self._drop_engines(close=False)
        if self._writer is None:
            self._create_engines()
            self._pid = pid
        return self._writer, self._reader

    def _create_engines(self) -> None:
        if self.is_sqlite:
            if not _sqlite_is_memory(self.url) and not self.url.query.get("uri"):
                directory = os.path.dirname(os.path.abspath(self.url.database))
                os.makedirs(directory, exist_ok=True)
            writer = _sqlite_engine(self.url, begin_sql="BEGIN IMMEDIATE",
                                    sleep=lambda seconds: self.sleep(seconds))
            if _sqlite_is_memory(self.url):
                reader = writer
            else:
                reader = _sqlite_engine(self.url, begin_sql="BEGIN")
        else:
            kwargs: dict[str, Any] = {"pool_pre_ping": True,
                                      "isolation_level": "READ COMMITTED"}
            if self.url.get_backend_name() in ("mysql", "mariadb"):
                kwargs["pool_recycle"] = 3600
            writer = reader = sa.create_engine(self.url, **kwargs)
        self._writer, self._reader = writer, reader

    def _drop_engines(self, *, close: bool) -> None:
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None and close:
            checkpointer.stop()  # (a parent's thread does not exist after fork)
        raw, self._commit_raw = self._commit_raw, None
        if raw is not None:
            if close:
                raw.close()
            else:
                self._inherited.append(raw)  # the parent's: not even garbage-collected
        engines = {id(e): e for e in (self._writer, self._reader) if e is not None}
        self._writer = self._reader = None
        for engine in engines.values():
            engine.dispose(close=close)

    @property
    def engine(self) -> sa.Engine:
        """The engine of write transactions (created on first use)."""
        return self._engines()[0]

    @property
    def reader_engine(self) -> sa.Engine:
        """The engine of read-only queries (the writer's except on SQLite)."""
        return self._engines()[1]

    def dispose(self) -> None:
        """Close every pooled connection; the next call reconnects."""
        if self._writer is not None:
            self._drop_engines(close=self._pid == os.getpid())

    def close(self) -> None:
        self.dispose()

    # -- schema ---------------------------------------------------------
    def upgrade(self) -> None:
        """``alembic upgrade head`` in one transaction (idempotent)."""
        config = alembic_config(self.url)
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def current_revision(self) -> str | None:
        """The schema revision of the database; None when not created."""
        with self.reader_engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @staticmethod
    def head_revision() -> str:
        return head_revision()

    def check_schema(self) -> None:
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            raise SchemaError(
                f"database schema is at revision {current or 'none (empty database)'}, "
                f"expected {head}: {UPGRADE_HINT}")

    # -- states ---------------------------------------------------------
    @staticmethod
    def _state(row: sa.Row) -> ScopeState:
        return ScopeState(
            scope_id=row.scope_id,
            last_processed=utils.from_db(row.last_processed),
            version=row.version,
            active=bool(row.active),
            last_error=row.last_error,
            last_error_at=utils.from_db(row.last_error_at),
            last_error_kind=row.last_error_kind,
            last_commit_at=utils.from_db(row.last_commit_at),
        )

    def get_state(self, scope_id: str) -> ScopeState:
        return self.get_states([scope_id])[scope_id]

    def get_states(self, scope_ids: list[str] | None = None) -> dict[str, ScopeState]:
        found: dict[str, ScopeState] = {}
        with self.reader_engine.connect() as connection:
            if scope_ids is None:
                stmt = sa.select(_state_t).order_by(_state_t.c.scope_id)
                for row in connection.execute(stmt):
                    found[row.scope_id] = self._state(row)
                return found
            wanted = list(dict.fromkeys(scope_ids))
            for i in range(0, len(wanted), _IN_CHUNK):
                stmt = sa.select(_state_t).where(
                    _state_t.c.scope_id.in_(wanted[i:i + _IN_CHUNK]))
                for row in connection.execute(stmt):
                    found[row.scope_id] = self._state(row)
        return {s: found.get(s) or ScopeState(scope_id=s, last_processed=None, version=0)
                for s in wanted}

    def _stale(self, scope_id: str, expected_version: int,
               begin: datetime.datetime) -> StaleStateError:
        return StaleStateError(
            f"scope {scope_id}: state is no longer at version {expected_version} "
            f"(another worker or a reset moved it); period "
            f"{utils.isoformat(utils.from_db(begin))} not committed")

    def _frame_rows(self, frame: DataFrame, now: datetime.datetime,
                    worker: str) -> tuple[list, dict]:
        """The rated_data rows and the rated_period row of ``frame``, built
        before the transaction. For SQLite the data rows are tuples in the
        exact text SQLAlchemy would store (see _insert_data): the per-row
        bind processing was half of the commit cost."""
        scope_id = frame.scope_id
        begin, end = _naive(frame.begin), _naive(frame.end)
        dumps = _label_json
        text = _decimal_text
        add = _EXACT.add
        total = decimal.Decimal(0)
        rows: list = []
        append = rows.append
        if self.is_sqlite:
            b, e = _sqlite_datetime(begin), _sqlite_datetime(end)
            for usage_type, points in frame.items():
                for unit, qty, price, groupby, metadata in points:
                    append((scope_id, b, e, usage_type, unit, text(qty), text(price),
                            dumps(groupby), dumps(metadata)))
                    total = add(total, price)
        else:
            for usage_type, points in frame.items():
                for unit, qty, price, groupby, metadata in points:
                    append({"scope_id": scope_id, "begin": begin, "end": end,
                            "type": usage_type, "unit": unit, "qty": text(qty),
                            "price": text(price), "groupby": dumps(groupby),
                            "metadata": dumps(metadata)})
                    total = add(total, price)
        period_row = {
            "scope_id": scope_id, "begin": begin, "end": end, "points": len(rows),
            "price": utils.decimal_str(total), "committed_at": now, "worker": worker or "",
        }
        return rows, period_row

    def _insert_data(self, connection: sa.Connection, rows: list) -> None:
        if not rows:
            return
        if self.is_sqlite:
            for statement, parameters in _sqlite_insert_batches(rows):
                connection.exec_driver_sql(statement, tuple(parameters))
        else:
            connection.execute(_data_t.insert(), rows)

    def commit_period(self, frame: DataFrame, expected_version: int,
                      *, worker: str = "") -> int:
        """See BaseStorage. A period already stored for the scope (possible
        only if a caller commits out of order) raises sqlalchemy's
        IntegrityError; nothing is written then either."""
        scope_id = frame.scope_id
        begin = _naive(frame.begin)
        now = _now()
        # everything computed before the transaction: keep the lock short
        rows, period_row = self._frame_rows(frame, now, worker)
        if self.is_sqlite:
            self._commit_period_sqlite(frame.scope_id, expected_version, rows, period_row)
            return expected_version + 1
        state_values = {
            "last_processed": begin, "last_commit_at": now, "updated_at": now,
            "last_error": None, "last_error_kind": None, "last_error_at": None,
        }
        with self.engine.begin() as connection:
            result = connection.execute(_COMMIT_STATE, {
                "b_scope_id": scope_id, "b_version": expected_version,
                "b_last_processed": begin, "b_now": now})
            if result.rowcount != 1:
                if expected_version != 0:
                    raise self._stale(scope_id, expected_version, begin)
                try:
                    connection.execute(_state_t.insert().values(
                        scope_id=scope_id, version=1, active=True, created_at=now,
                        **state_values))
                except sa_exc.IntegrityError as e:
                    raise self._stale(scope_id, expected_version, begin) from e
            connection.execute(_INSERT_PERIOD, period_row)
            self._insert_data(connection, rows)
            faults.point("during_commit")  # crash tests: rows in, not committed
        return expected_version + 1

    def _sqlite_writer(self) -> Any:
        """The pooled writer connection commit_period keeps checked out (a
        pool checkout, a Connection and its events cost more than the
        period's statements)."""
        self._engines()  # a new process gets its own engines first
        if self._commit_raw is None:
            raw = self.engine.raw_connection()
            if raw.info.get("ckp_own_busy_wait") and not _sqlite_is_memory(self.url):
                # WAL journal: checkpoints leave this connection's commits
                raw.driver_connection.execute("PRAGMA wal_autocheckpoint = 0")
                if self._checkpointer is None:
                    self._checkpointer = _WalCheckpointer(
                        raw.driver_connection.execute("PRAGMA database_list")
                        .fetchone()[2])
            self._commit_raw = raw
        return self._commit_raw

    def _commit_period_sqlite(self, scope_id: str, expected_version: int, rows: list,
                              period_row: dict) -> None:
        """commit_period's transaction in plain sqlite3 calls: the same
        statements, and the same stored text, as the Core path. sqlite3
        errors are raised wrapped as SQLAlchemy's, as there."""
        raw = self._sqlite_writer()
        con = raw.driver_connection
        begin = _sqlite_datetime(period_row["begin"])
        now = _sqlite_datetime(period_row["committed_at"])
        statement = "BEGIN IMMEDIATE"
        try:
            if raw.info.get("ckp_own_busy_wait"):
                _begin_immediate(con, self.sleep)
            else:
                con.execute(statement)
            statement = _SQLITE_COMMIT_STATE
            if con.execute(statement, (begin, now, now, scope_id,
                                       expected_version)).rowcount != 1:
                if expected_version != 0:
                    raise self._stale(scope_id, expected_version, period_row["begin"])
                statement = _SQLITE_INSERT_STATE
                try:
                    con.execute(statement, (scope_id, begin, now, now, now))
                except sqlite3.IntegrityError as e:
                    raise self._stale(scope_id, expected_version, period_row["begin"]) from e
            statement = _SQLITE_INSERT_PERIOD
            con.execute(statement, (
                scope_id, begin, _sqlite_datetime(period_row["end"]), period_row["points"],
                period_row["price"], now, period_row["worker"]))
            for statement, parameters in _sqlite_insert_batches(rows):
                con.execute(statement, parameters)
            faults.point("during_commit")  # crash tests: rows in, not committed
            statement = "COMMIT"
            con.execute(statement)
        except BaseException as exc:
            self._sqlite_rollback(raw)
            if isinstance(exc, sqlite3.Error):
                raise sa_exc.DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc
            raise

    def _sqlite_rollback(self, raw: Any) -> None:
        """Roll the commit connection back; one that cannot is dropped."""
        con = raw.driver_connection
        try:
            if con.in_transaction:
                con.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - a broken connection: forget it
            self._commit_raw = None
            try:
                raw.invalidate()
            except Exception:  # noqa: S110
                pass

    def _upsert_state(self, scope_id: str, update_values: dict,
                      insert_values: dict, before=None) -> None:
        """UPDATE the scope's row, or INSERT it if absent, in one write
        transaction (``before(connection)`` runs first in it). A row
        inserted concurrently makes the INSERT fail: retried once as an
        UPDATE."""
        for attempt in (1, 2):
            try:
                with self.engine.begin() as connection:
                    if before is not None:
                        before(connection)
                    result = connection.execute(
                        _state_t.update().where(_state_t.c.scope_id == scope_id)
                        .values(**update_values))
                    if result.rowcount == 0:
                        connection.execute(_state_t.insert().values(
                            scope_id=scope_id, **insert_values))
                return
            except sa_exc.IntegrityError:
                if attempt == 2:
                    raise

    def record_error(self, scope_id: str, message: str, kind: str = "error") -> None:
        now = _now()
        message = str(message)
        if len(message) > MAX_ERROR_LENGTH:
            message = message[:MAX_ERROR_LENGTH - 1] + "…"
        values = {"last_error": message, "last_error_kind": (kind or "error")[:32],
                  "last_error_at": now, "updated_at": now}
        # a new row has version 0 and no last_processed: exactly what a
        # scope without a row means, so expected_version 0 stays valid
        self._upsert_state(scope_id, values, {
            "last_processed": None, "version": 0, "active": True,
            "created_at": now, **values})

    def reset_state(self, scope_id: str, to: datetime.datetime | None,
                    period: int) -> None:
        now = _now()
        to_naive = _naive(to)
        if to_naive is None:
            last = None
        else:
            if isinstance(period, datetime.timedelta):
                period = int(period.total_seconds())
            last = to_naive - datetime.timedelta(seconds=period)

        def delete_rows(connection: sa.Connection) -> None:
            # lock order: scope_state, tasks, rated rows (module docstring)
            connection.execute(sa.select(_state_t.c.scope_id)
                               .where(_state_t.c.scope_id == scope_id).with_for_update())
            self._cut_tasks(connection, scope_id, to_naive, period, now)
            for table in (_data_t, _period_t):
                stmt = table.delete().where(table.c.scope_id == scope_id)
                if to_naive is not None:
                    stmt = stmt.where(table.c.begin >= to_naive)
                connection.execute(stmt)

        self._upsert_state(
            scope_id,
            {"last_processed": last, "version": _state_t.c.version + 1,
             "updated_at": now},
            # version 1, not 0: a worker that read "no row" must be fenced
            {"last_processed": last, "version": 1, "active": True,
             "created_at": now, "updated_at": now},
            before=delete_rows)

    # -- reprocessing tasks ------------------------------------------------
    @staticmethod
    def _task(row: sa.Row) -> ReprocessTask:
        return ReprocessTask(
            id=row.id, scope_id=row.scope_id, begin=utils.from_db(row.begin),
            end=utils.from_db(row.end), next_period=utils.from_db(row.next_period),
            total_periods=row.total_periods, done_periods=row.done_periods,
            reason=row.reason, state=row.state, request_key=row.request_key,
            created_at=utils.from_db(row.created_at),
            updated_at=utils.from_db(row.updated_at), last_error=row.last_error)

    @staticmethod
    def _refuse(problems: list[str]) -> InvalidRequestError:
        shown = problems[:_MAX_PROBLEMS]
        more = len(problems) - len(shown)
        return InvalidRequestError("; ".join(shown) + (f" (and {more} more)" if more else ""))

    def create_reprocess_tasks(self, scope_ids, begin, end, reason, period,
                               *, request_id=None, skip_uncovered=False) -> list[int]:
        """See BaseStorage."""
        if isinstance(period, datetime.timedelta):
            period = int(period.total_seconds())
        scopes = list(dict.fromkeys(scope_ids))
        problems = []
        if not scopes:
            problems.append("no scope given")
        if not isinstance(reason, str) or not reason.strip():
            problems.append("reason: a non-empty reason is required")
        if request_id is not None and (not isinstance(request_id, str) or not request_id
                                       or len(request_id) > MAX_REQUEST_ID_LENGTH):
            problems.append(f"request_id: a string of 1 to {MAX_REQUEST_ID_LENGTH} "
                            "characters")
        for name, value in (("begin", begin), ("end", end)):
            if not utils.is_aligned(value, period):
                problems.append(f"{name} {utils.isoformat(value)} is not aligned to the "
                                f"period ({period} s)")
        if begin >= end:
            problems.append(f"begin {utils.isoformat(begin)} must be before end "
                            f"{utils.isoformat(end)}")
        if problems:
            raise self._refuse(problems)
        reason = reason.strip()
        b, e = _naive(begin), _naive(end)
        step = datetime.timedelta(seconds=period)
        total = int((e - b) / step)
        keys = {s: request_key(s, begin, end, reason, request_id) for s in scopes}
        for attempt in (1, 2):
            try:
                with self.engine.begin() as connection:
                    return self._create_tasks(connection, scopes, keys, b, e, step,
                                              total, reason, skip_uncovered)
            except sa_exc.IntegrityError:
                # the same request committed concurrently: the retry finds it
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _create_tasks(self, connection, scopes, keys, b, e, step, total, reason,
                      skip_uncovered):
        iso = lambda dt: utils.isoformat(utils.from_db(dt))  # noqa: E731
        last: dict[str, Any] = {}
        first: dict[str, Any] = {}
        tasks: dict[str, list[sa.Row]] = {s: [] for s in scopes}
        for i in range(0, len(scopes), _IN_CHUNK):
            chunk = scopes[i:i + _IN_CHUNK]
            # lock order: scope_state rows first (see the module docstring)
            for row in connection.execute(
                    sa.select(_state_t.c.scope_id, _state_t.c.last_processed)
                    .where(_state_t.c.scope_id.in_(chunk)).with_for_update()):
                last[row.scope_id] = row.last_processed
            for row in connection.execute(
                    sa.select(_period_t.c.scope_id, sa.func.min(_period_t.c.begin))
                    .where(_period_t.c.scope_id.in_(chunk))
                    .group_by(_period_t.c.scope_id)):
                first[row[0]] = row[1]
            for row in connection.execute(
                    sa.select(_task_t).where(
                        _task_t.c.scope_id.in_(chunk),
                        sa.or_(_task_t.c.state.in_(ACTIVE_TASK_STATES),
                               _task_t.c.request_key.in_([keys[s] for s in chunk])))
                    .order_by(_task_t.c.id).with_for_update()):
                tasks[row.scope_id].append(row)
        problems = []
        ids: dict[str, int] = {}
        new_rows: list[str] = []
        restart: list[int] = []
        now = _now()
        skipped = []
        for scope in scopes:
            processed = last.get(scope)
            uncovered = []
            if processed is None:
                uncovered.append(f"scope {scope}: nothing rated yet, nothing to reprocess")
            elif e > processed + step:
                uncovered.append(
                    f"scope {scope}: end {iso(e)} is beyond what was processed (the last "
                    f"rated period starts at {iso(processed)}: end must be at most "
                    f"{iso(processed + step)})")
            if processed is not None and (first.get(scope) is None or b < first[scope]):
                since = iso(first[scope]) if first.get(scope) is not None else "none"
                uncovered.append(f"scope {scope}: begin {iso(b)} is before the first "
                                 f"rated period ({since})")
            if uncovered and skip_uncovered:
                skipped.append(scope)
                continue
            problems.extend(uncovered)
            same = [t for t in tasks[scope] if t.request_key == keys[scope]]
            failed = None
            if same:
                task = same[0]
                if (task.begin, task.end) != (b, e):
                    problems.append(
                        f"scope {scope}: request id {keys[scope]!r} was already used by "
                        f"task {task.id} for another window [{iso(task.begin)}, "
                        f"{iso(task.end)})")
                    continue
                if task.state != TASK_FAILED:
                    ids[scope] = task.id  # the same request again: nothing new
                    continue
                failed = task  # the same request after its task failed: restart it
            overlapping = [t for t in tasks[scope]
                           if t.state in ACTIVE_TASK_STATES and t.begin < e and b < t.end]
            if len(overlapping) == 1 and (overlapping[0].begin, overlapping[0].end) == (b, e):
                ids[scope] = overlapping[0].id  # the same window: merged
                continue
            for t in overlapping:
                problems.append(
                    f"scope {scope}: the window overlaps task {t.id} [{iso(t.begin)}, "
                    f"{iso(t.end)}) ({t.state}, {t.done_periods}/{t.total_periods} periods, "
                    f"reason {t.reason!r}): wait until it is done, or send exactly its "
                    "window to join it")
            if overlapping:
                continue
            if failed is not None:
                restart.append(failed.id)
                ids[scope] = failed.id
            else:
                new_rows.append(scope)
        if skip_uncovered and len(skipped) == len(scopes):
            problems.append(f"no scope has rated periods covering [{iso(b)}, {iso(e)})")
        if problems:
            raise self._refuse(problems)
        for task_id in restart:
            connection.execute(_task_t.update().where(_task_t.c.id == task_id).values(
                state=TASK_PENDING, next_period=b, done_periods=0, total_periods=total,
                last_error=None, updated_at=now))
        for scope in new_rows:
            result = connection.execute(_task_t.insert().values(
                scope_id=scope, begin=b, end=e, next_period=b, total_periods=total,
                done_periods=0, reason=reason, state=TASK_PENDING,
                request_key=keys[scope], created_at=now, updated_at=now))
            ids[scope] = result.inserted_primary_key[0]
        return [ids[s] for s in scopes if s in ids]

    def list_tasks(self, states=None, scope_id=None, ids=None) -> list[ReprocessTask]:
        stmt = sa.select(_task_t)
        if states is not None:
            stmt = stmt.where(_task_t.c.state.in_(list(states)))
        if scope_id is not None:
            stmt = stmt.where(_task_t.c.scope_id == scope_id)
        if ids is not None:
            stmt = stmt.where(_task_t.c.id.in_(list(ids)))
        with self.reader_engine.connect() as connection:
            return [self._task(row) for row in
                    connection.execute(stmt.order_by(_task_t.c.id))]

    def next_pending_task(self, scope_id: str) -> ReprocessTask | None:
        stmt = (sa.select(_task_t)
                .where(_task_t.c.scope_id == scope_id,
                       _task_t.c.state.in_(ACTIVE_TASK_STATES))
                .order_by(_task_t.c.id).limit(1))
        with self.reader_engine.connect() as connection:
            row = connection.execute(stmt).first()
        return None if row is None else self._task(row)

    def commit_reprocessed_period(self, task_id: int, frame: DataFrame,
                                  expected_next_period: datetime.datetime,
                                  *, worker: str = "") -> ReprocessTask:
        """See BaseStorage."""
        scope_id = frame.scope_id
        begin, end = _naive(frame.begin), _naive(frame.end)
        expected = _naive(expected_next_period)
        if begin != expected:
            raise ValueError(f"task {task_id}: frame starts at {frame.begin}, the task "
                             f"expects {expected_next_period}")
        now = _now()
        rows, period_row = self._frame_rows(frame, now, worker)
        stale = StaleStateError(
            f"task {task_id}: no longer active at period "
            f"{utils.isoformat(utils.from_db(begin))} (another worker re-rated it, or "
            "the task was cancelled); period not committed")
        cancelled = None
        with self.engine.begin() as connection:
            # lock order: scope_state, then the task, then rated rows
            processed = connection.execute(
                sa.select(_state_t.c.last_processed)
                .where(_state_t.c.scope_id == scope_id).with_for_update()).scalar()
            task = connection.execute(
                sa.select(_task_t).where(_task_t.c.id == task_id).with_for_update()).first()
            if (task is None or task.scope_id != scope_id
                    or task.state not in ACTIVE_TASK_STATES or task.next_period != expected):
                raise stale
            if processed is None or processed < begin:
                cancelled = (
                    f"cancelled at period {utils.isoformat(utils.from_db(begin))}: it is no "
                    "longer below the scope's processed frontier (a reset-state moved it); "
                    "normal processing rates it again")
                connection.execute(_task_t.update().where(_task_t.c.id == task_id).values(
                    state=TASK_FAILED, last_error=cancelled, updated_at=now))
            else:
                result = connection.execute(
                    _task_t.update()
                    .where(_task_t.c.id == task_id, _task_t.c.next_period == expected,
                           _task_t.c.state.in_(ACTIVE_TASK_STATES))
                    .values(next_period=end, done_periods=_task_t.c.done_periods + 1,
                            state=sa.case((_task_t.c.end <= end, TASK_DONE),
                                          else_=TASK_RUNNING),
                            last_error=None, updated_at=now))
                if result.rowcount != 1:
                    raise stale
                for table in (_data_t, _period_t):
                    connection.execute(table.delete().where(
                        table.c.scope_id == scope_id, table.c.begin == begin))
                connection.execute(_period_t.insert(), period_row)
                self._insert_data(connection, rows)
                faults.point("during_reprocess_commit")  # crash tests
        if cancelled is not None:
            raise TaskCancelledError(f"task {task_id}: {cancelled}")
        return self.list_tasks(ids=[task_id])[0]

    def record_task_error(self, task_id: int, message: str) -> None:
        message = str(message)
        if len(message) > MAX_ERROR_LENGTH:
            message = message[:MAX_ERROR_LENGTH - 1] + "…"
        with self.engine.begin() as connection:
            connection.execute(
                _task_t.update()
                .where(_task_t.c.id == task_id, _task_t.c.state.in_(ACTIVE_TASK_STATES))
                .values(last_error=message, updated_at=_now()))

    def _cut_tasks(self, connection: sa.Connection, scope_id: str,
                   to: datetime.datetime | None, period: int, now) -> None:
        """reset_state's part: active tasks of the scope lose their periods
        from ``to`` on (naive ``to``; None: everything)."""
        stmt = sa.select(_task_t).where(_task_t.c.scope_id == scope_id,
                                        _task_t.c.state.in_(ACTIVE_TASK_STATES))
        if to is not None:
            stmt = stmt.where(_task_t.c.end > to)
        where = "everything" if to is None else f"from {utils.isoformat(utils.from_db(to))} on"
        for task in connection.execute(stmt.with_for_update()).all():
            if to is None or task.next_period >= to:
                connection.execute(_task_t.update().where(_task_t.c.id == task.id).values(
                    state=TASK_FAILED, updated_at=now,
                    last_error=f"cancelled by reset-state: the scope is rated again {where}"))
            else:
                left = int((to - task.next_period) / datetime.timedelta(seconds=period))
                connection.execute(_task_t.update().where(_task_t.c.id == task.id).values(
                    end=to, total_periods=task.done_periods + left, updated_at=now,
                    last_error=f"window cut at {utils.isoformat(utils.from_db(to))} by "
                    "reset-state (those periods are rated again by normal processing)"))

    # -- reading ---------------------------------------------------------
    def _stream(self, stmt: sa.Select) -> Iterator[sa.Row]:
        """Rows of ``stmt`` fetched STREAM_CHUNK at a time (server-side
        cursor on PostgreSQL and MySQL; SQLite steps its cursor anyway)."""
        with self.reader_engine.connect() as connection:
            result = connection.execution_options(
                stream_results=True, yield_per=STREAM_CHUNK).execute(stmt)
            try:
                for partition in result.partitions():
                    yield from partition
            finally:
                # a generator closed early: release the server-side cursor
                # before the connection goes back to the pool
                result.close()

    @staticmethod
    def _window(stmt: sa.Select, table: sa.Table, scope_id: str | None,
                begin: datetime.datetime | None,
                end: datetime.datetime | None) -> sa.Select:
        if scope_id is not None:
            stmt = stmt.where(table.c.scope_id == scope_id)
        if begin is not None:
            stmt = stmt.where(table.c.begin >= _naive(begin))
        if end is not None:
            stmt = stmt.where(table.c.begin < _naive(end))
        return stmt

    def iter_rated(self, scope_id: str | None = None,
                   begin: datetime.datetime | None = None,
                   end: datetime.datetime | None = None) -> Iterator[RatedRow]:
        c = _data_t.c
        stmt = sa.select(c.scope_id, c.begin, c.end, c.type, c.unit, c.qty,
                         c.price, c.groupby, c["metadata"])
        stmt = self._window(stmt, _data_t, scope_id, begin, end)
        stmt = stmt.order_by(c.scope_id, c.begin, c.type, c.id)
        Dec, loads, from_db = decimal.Decimal, _loads, utils.from_db
        last_naive = last_aware = None
        for row in self._stream(stmt):
            (scope, row_begin, row_end, usage_type, unit, qty, price, groupby,
             metadata) = row
            # consecutive rows share their period: convert it once
            if row_begin != last_naive:
                last_naive = row_begin
                last_aware = (from_db(row_begin), from_db(row_end))
            yield RatedRow(scope, last_aware[0], last_aware[1], usage_type, unit,
                           Dec(qty), Dec(price), loads(groupby), loads(metadata))

    def iter_periods(self, scope_id: str | None = None,
                     begin: datetime.datetime | None = None,
                     end: datetime.datetime | None = None) -> Iterator[RatedPeriod]:
        """Committed periods (empty ones included) with
        begin <= period.begin < end, ordered by scope and begin."""
        c = _period_t.c
        stmt = sa.select(c.scope_id, c.begin, c.end, c.points, c.price,
                         c.committed_at, c.worker)
        stmt = self._window(stmt, _period_t, scope_id, begin, end)
        for row in self._stream(stmt.order_by(c.scope_id, c.begin)):
            yield RatedPeriod(row.scope_id, utils.from_db(row.begin),
                              utils.from_db(row.end), row.points,
                              decimal.Decimal(row.price),
                              utils.from_db(row.committed_at), row.worker)

    def summary(self, scope_id: str | None = None) -> list[TypeSummary]:
        c = _data_t.c
        stmt = sa.select(c.scope_id, c.type, c.begin, c.qty, c.price)
        if scope_id is not None:
            stmt = stmt.where(c.scope_id == scope_id)
        stmt = stmt.order_by(c.scope_id, c.type, c.begin)
        out: list[TypeSummary] = []
        key = None
        periods = points = 0
        qty = price = decimal.Decimal(0)
        last_begin = None
        add, Dec = _EXACT.add, decimal.Decimal

        def flush():
            if key is not None:
                out.append(TypeSummary(key[0], key[1], periods, points, qty, price))

        for row_scope, row_type, row_begin, row_qty, row_price in self._stream(stmt):
            if (row_scope, row_type) != key:
                flush()
                key = (row_scope, row_type)
                periods = points = 0
                qty = price = Dec(0)
                last_begin = None
            if row_begin != last_begin:
                periods += 1
                last_begin = row_begin
            points += 1
            qty = add(qty, Dec(row_qty))
            price = add(price, Dec(row_price))
        flush()
        return out
