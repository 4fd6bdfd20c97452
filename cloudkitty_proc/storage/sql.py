"""The ``sql`` storage: SQLite, PostgreSQL and MySQL/MariaDB (SQLAlchemy Core).

``SQLStorage`` (the ``sql`` entry point) and the ``[database]`` options. Its
parts, one module each: engines per dialect (sql_engines.py), how values
are stored in rows (sql_rows.py), the SQLite commit path (sqlite_fast.py),
the read queries (sql_read.py), the reprocessing task table (sql_tasks.py);
the tables are in models.py, their migrations in migrations/.

How the invariants of ``storage/base.py`` are kept:

1. Exactly once: ``commit_period`` runs the state compare-and-set, the
   ``rated_period`` row and every ``rated_data`` row in one transaction;
   ``UNIQUE(scope_id, begin)`` on ``rated_period`` is a second,
   database-side guard against rating a period twice. ``commit_periods``
   does the same for several scopes in one transaction (each item fenced
   on its own); should it fail, the items are committed one by one.
2. Fenced: ``UPDATE scope_state SET version = version + 1 ... WHERE
   scope_id = :s AND version = :expected``; 0 rows matched → rollback and
   StaleStateError. A scope without a row has version 0: the first commit
   INSERTs the row, and a duplicate key there means another worker won.
4. Durable reprocessing: see sql_tasks.py.

Lock order, so that concurrent writers of one scope never deadlock on
PostgreSQL/MySQL: every write transaction touching a scope locks its
``scope_state`` row first (UPDATE or SELECT ... FOR UPDATE), then task
rows, then rated rows. On SQLite ``BEGIN IMMEDIATE`` serialises writers.

Engines are created lazily, on first use, in the process that uses them: a
storage object may be built before the daemon forks its workers. If an
object built (and used) in a parent is used again after a fork, the
inherited pools are dropped without touching the parent's connections and
new engines are created.

Threading: one storage object per process, used from the worker's main
thread (``base.py``).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from oslo_config import cfg
from sqlalchemy import exc as sa_exc

from cloudkitty_proc import faults, utils
from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.exceptions import ConfigError, SchemaError, StaleStateError
from cloudkitty_proc.log import mask_url
from cloudkitty_proc.storage import models
from cloudkitty_proc.storage.base import (MAX_ERROR_LENGTH, REPROCESSING, BaseStorage,
                                          RatedPeriod)
from cloudkitty_proc.storage.sql_batch import SQLBatchCommit
from cloudkitty_proc.storage.sql_engines import create_engines
from cloudkitty_proc.storage.sql_read import SQLReads
from cloudkitty_proc.storage.sql_rows import clip_error, db_now, frame_rows, naive
from cloudkitty_proc.storage.sql_tasks import SQLReprocessTasks
from cloudkitty_proc.storage.sqlite_fast import CommitConnection, insert_batches

__all__ = ["OPTS", "MAX_ERROR_LENGTH", "RatedPeriod", "SQLStorage", "alembic_config",
           "head_revision"]

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

_state_t = models.scope_state
_period_t = models.rated_period
_data_t = models.rated_data
_setting_t = models.processor_setting

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


class SQLStorage(SQLBatchCommit, SQLReads, SQLReprocessTasks, BaseStorage):
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
        try:
            self.url: sa.URL = sa.make_url(url)
        except sa_exc.ArgumentError:
            raise ConfigError(f"[database] connection {mask_url(str(url))!r}: not a database "
                              "URL (e.g. postgresql+psycopg2://user@host/db, "
                              "mysql+pymysql://…, sqlite:////path/file.sqlite)") from None
        self._writer: sa.Engine | None = None
        self._reader: sa.Engine | None = None
        self._pid: int | None = None
        # SQLite: the writer connection commit_period keeps checked out
        self._commit = CommitConnection()

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
            self._writer, self._reader = create_engines(
                self.url, lambda seconds: self.sleep(seconds))
            self._pid = pid
        return self._writer, self._reader

    def _drop_engines(self, *, close: bool) -> None:
        self._commit.drop(close=close)
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

    # -- commit ------------------------------------------------------------
    def _stale(self, scope_id: str, expected_version: int,
               begin: datetime.datetime) -> StaleStateError:
        return StaleStateError(
            f"scope {scope_id}: state is no longer at version {expected_version} "
            f"(another worker or a reset moved it); period "
            f"{utils.isoformat(utils.from_db(begin))} not committed")

    def _frame_rows(self, frame: DataFrame, now: datetime.datetime,
                    worker: str) -> tuple[list, dict]:
        """sql_rows.frame_rows for this database."""
        return frame_rows(frame, now, worker, self.is_sqlite)

    def _store_points(self, frame: DataFrame, *, replace: bool = False) -> None:
        """Called inside the commit transactions once their checks passed
        (the scope's state row locked; on SQLite, the write lock), before
        the period row: by commit_period, and by commit_reprocessed_period
        (``replace``). Nothing here: the rows go in the transaction;
        storage/external.py writes the points to their store."""

    def _store_batch_points(self, frames: list[DataFrame]) -> None:
        """``_store_points`` of a batched commit (storage/sql_batch.py),
        called once with the frames whose compare-and-set held, in the
        batch's transaction: ``_store_points`` of each (nothing, here);
        storage/external.py writes them in one request."""
        for frame in frames:
            self._store_points(frame)

    def _insert_data(self, connection: sa.Connection, rows: list) -> None:
        """Insert ``_frame_rows``' data rows on a Core connection."""
        if not rows:
            return
        if self.is_sqlite:
            for statement, parameters in insert_batches(rows):
                connection.exec_driver_sql(statement, tuple(parameters))
        else:
            connection.execute(_data_t.insert(), rows)

    def _advance_state(self, connection: sa.Connection, scope_id: str,
                       expected_version: int, begin: datetime.datetime,
                       now: datetime.datetime, *, savepoint: bool = False) -> bool:
        """The state compare-and-set on a Core connection (it locks the
        scope's row): False when the scope is no longer at
        ``expected_version``. Version 0 inserts the row, and a duplicate key
        means another writer won; ``savepoint``: that INSERT runs in a
        SAVEPOINT, so its failure leaves the transaction usable (a batch)."""
        result = connection.execute(_COMMIT_STATE, {
            "b_scope_id": scope_id, "b_version": expected_version,
            "b_last_processed": begin, "b_now": now})
        if result.rowcount == 1:
            return True
        if expected_version != 0:
            return False
        insert = _state_t.insert().values(
            scope_id=scope_id, version=1, active=True, created_at=now, last_processed=begin,
            last_commit_at=now, updated_at=now, last_error=None, last_error_kind=None,
            last_error_at=None)
        try:
            if savepoint:
                with connection.begin_nested():
                    connection.execute(insert)
            else:
                connection.execute(insert)
        except sa_exc.IntegrityError:
            return False
        return True

    def commit_period(self, frame: DataFrame, expected_version: int,
                      *, worker: str = "") -> int:
        """See BaseStorage. A period already stored for the scope (possible
        only if a caller commits out of order) raises sqlalchemy's
        IntegrityError; nothing is written then either."""
        scope_id = frame.scope_id
        begin = naive(frame.begin)
        now = db_now()
        # everything computed before the transaction: keep the lock short
        rows, period_row = self._frame_rows(frame, now, worker)
        if self.is_sqlite:
            self._commit.commit_period(
                self._sqlite_writer(), self.sleep, scope_id, expected_version, rows,
                period_row, lambda: self._stale(scope_id, expected_version, begin),
                lambda: self._store_points(frame))
            return expected_version + 1
        with self.engine.begin() as connection:
            if not self._advance_state(connection, scope_id, expected_version, begin, now):
                raise self._stale(scope_id, expected_version, begin)
            self._store_points(frame)
            connection.execute(_INSERT_PERIOD, period_row)
            self._insert_data(connection, rows)
            faults.point("during_commit")  # crash tests: rows in, not committed
        return expected_version + 1

    def _sqlite_writer(self) -> Any:
        """The pooled writer connection commit_period keeps checked out on
        SQLite (sqlite_fast.CommitConnection)."""
        self._engines()  # a new process gets its own engines first
        return self._commit.get(self.engine)

    # -- state writes ------------------------------------------------------
    def _upsert_state(self, scope_id: str, update_values: dict,
                      insert_values: dict,
                      before: Callable[[sa.Connection], None] | None = None) -> None:
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

    # -- the period of the stored data ---------------------------------------
    def rating_period(self) -> int | None:
        with self.reader_engine.connect() as connection:
            value = connection.execute(sa.select(_setting_t.c.value).where(
                _setting_t.c.name == "period")).scalar()
        return None if value is None else int(value)

    def set_rating_period(self, period: int, *, expected: int | None) -> None:
        try:
            self._set_rating_period(period, expected)
        except sa_exc.IntegrityError:  # another process inserted it first
            raise StaleStateError("the period was recorded meanwhile") from None

    def _set_rating_period(self, period: int, expected: int | None) -> None:
        row = _setting_t.c.name == "period"
        with self.engine.begin() as connection:  # SQLite: BEGIN IMMEDIATE
            current = connection.execute(
                sa.select(_setting_t.c.value).where(row).with_for_update()).scalar()
            current = None if current is None else int(current)
            if current != expected:
                raise StaleStateError(f"the recorded period is {current} s, not {expected}")
            now = db_now()
            values = {"value": str(int(period)), "updated_at": now}
            if current is None:
                connection.execute(_setting_t.insert().values(name="period", **values))
                return
            connection.execute(_setting_t.update().where(row).values(**values))
            self._shift_states(connection, datetime.timedelta(seconds=current - period), now)

    def _shift_states(self, connection: sa.Connection, shift: datetime.timedelta,
                      now: datetime.datetime) -> None:
        """In ``set_rating_period``'s transaction: every scope's
        last_processed moved by ``shift`` (its next period starts where it
        did, with the new length), its version bumped."""
        states = connection.execute(
            sa.select(_state_t.c.scope_id, _state_t.c.last_processed)
            .where(_state_t.c.last_processed.is_not(None)).with_for_update()).all()
        for scope_id, last in states:
            connection.execute(
                _state_t.update().where(_state_t.c.scope_id == scope_id)
                .values(last_processed=last + shift,
                        version=_state_t.c.version + 1, updated_at=now))

    def record_error(self, scope_id: str, message: str, kind: str = "error") -> None:
        now = db_now()
        message = clip_error(message)
        values = {"last_error": message, "last_error_kind": (kind or "error")[:32],
                  "last_error_at": now, "updated_at": now}
        # a new row has version 0 and no last_processed: exactly what a
        # scope without a row means, so expected_version 0 stays valid
        self._upsert_state(scope_id, values, {
            "last_processed": None, "version": 0, "active": True,
            "created_at": now, **values})

    def reset_state(self, scope_id: str, to: datetime.datetime | None,
                    period: int) -> None:
        now = db_now()
        to_naive = naive(to)
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
