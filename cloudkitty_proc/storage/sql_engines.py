"""SQLAlchemy engines of the ``sql`` storage, one recipe per dialect.

SQLite (one host, several worker processes on one file): WAL journal (readers
never block the writer nor each other), a 60 s busy timeout, synchronous
NORMAL, and two engines: the writer starts every transaction with ``BEGIN
IMMEDIATE`` so it takes the write lock up front (a deferred transaction that
reads then writes can fail with "database is locked" whatever the busy
timeout: the read lock cannot be upgraded while another writer waits), the
reader uses plain deferred ``BEGIN`` and never takes the write lock. The
writer waits for a busy write lock with the storage's own ``sleep``
(``begin_immediate``), not SQLite's busy handler.

PostgreSQL, MySQL/MariaDB: one engine, READ COMMITTED, ``pool_pre_ping``
(and ``pool_recycle`` on MySQL), and bounds on waits for row locks: a
connection lost between a state UPDATE and its COMMIT leaves the server an
orphaned transaction holding the row lock, and workers used to wait on it
forever. Every session gets ``lock_timeout`` (PostgreSQL) /
``innodb_lock_wait_timeout`` (MariaDB) of ``LOCK_TIMEOUT`` seconds, so a
worker gives the scope up and retries it on a later pass, and the server
ends an orphaned session: ``idle_in_transaction_session_timeout`` and TCP
keepalives on PostgreSQL, ``wait_timeout`` on MariaDB (``IDLE_TIMEOUT``).

A SQLite file and its directory are created 0600 / 0700 whatever the umask.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.log import mask_url

#: how long a PostgreSQL/MariaDB session waits for a row lock (seconds)
LOCK_TIMEOUT = 30
#: how long the server keeps a session idle in a transaction (PostgreSQL) or
#: idle at all (MariaDB) before ending it (seconds)
IDLE_TIMEOUT = 300

#: SQLite busy timeout: how long a writer waits for the write lock
SQLITE_BUSY_TIMEOUT = 60.0

#: first and longest pause between two tries of a busy BEGIN IMMEDIATE
_BUSY_FIRST_PAUSE = 0.0002
_BUSY_MAX_PAUSE = 0.005


def sqlite_is_memory(url: sa.URL) -> bool:
    """Whether a SQLite URL names an in-memory database."""
    database = url.database or ""
    return (database in ("", ":memory:") or url.query.get("mode") == "memory"
            or "mode=memory" in database)


def begin_immediate(dbapi_connection: Any, sleep: Callable[[float], None]) -> None:
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


def sqlite_engine(url: sa.URL, *, begin_sql: str,
                  sleep: Callable[[float], None] | None = None) -> sa.Engine:
    """A SQLite engine whose transactions start with ``begin_sql``. With
    ``sleep`` (writers, WAL journal): busy BEGIN IMMEDIATEs are retried
    with ``sleep`` instead of SQLite's busy handler (``begin_immediate``);
    such connections carry ``info["ckp_own_busy_wait"]``."""
    kwargs: dict[str, Any] = {}
    connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT}
    if sqlite_is_memory(url):
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
            begin_immediate(connection.connection.driver_connection, sleep)
        else:
            connection.exec_driver_sql(begin_sql)

    return engine


def create_engines(url: sa.URL,
                   sleep: Callable[[float], None]) -> tuple[sa.Engine, sa.Engine]:
    """(writer, reader) engines for ``url``: the same engine twice except on
    a SQLite file. A SQLite file's directory is created if missing.
    ``sleep``: how the SQLite writer waits for a busy write lock."""
    if url.get_backend_name() == "sqlite":
        memory = sqlite_is_memory(url)
        if not memory and not url.query.get("uri"):
            path = os.path.abspath(url.database)
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            # created 0600 before SQLite opens it (its -wal and -shm files
            # take the database file's mode)
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        writer = sqlite_engine(url, begin_sql="BEGIN IMMEDIATE", sleep=sleep)
        reader = writer if memory else sqlite_engine(url, begin_sql="BEGIN")
        return writer, reader
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "isolation_level": "READ COMMITTED"}
    backend = url.get_backend_name()
    if backend in ("mysql", "mariadb"):
        kwargs["pool_recycle"] = min(3600, IDLE_TIMEOUT // 2)
        kwargs["connect_args"] = {"init_command": (
            f"SET SESSION innodb_lock_wait_timeout = {int(LOCK_TIMEOUT)}, "
            f"SESSION wait_timeout = {int(IDLE_TIMEOUT)}")}
    elif backend == "postgresql":
        kwargs["connect_args"] = {
            "options": (f"-c lock_timeout={int(LOCK_TIMEOUT * 1000)} "
                        f"-c idle_in_transaction_session_timeout={int(IDLE_TIMEOUT * 1000)}"),
            "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
            "keepalives_count": 3}
    engine = _create_engine(url, **kwargs)
    return engine, engine


#: what to install for a database driver (SQLAlchemy's driver name)
DRIVER_PACKAGES = {
    "psycopg": "pip install 'cloudkitty-proc[postgresql]' (psycopg 3)",
    "psycopg2": "pip install psycopg2-binary",
    "pymysql": "pip install 'cloudkitty-proc[mysql]' (PyMySQL)",
    "mysqldb": "use a mysql+pymysql:// URL and pip install 'cloudkitty-proc[mysql]'",
}


def _create_engine(url: sa.URL, **kwargs: Any) -> sa.Engine:
    """sa.create_engine, with a missing driver module as one line naming
    what to install (SQLAlchemy 2.1 maps postgresql:// to psycopg 3)."""
    try:
        return sa.create_engine(url, **kwargs)
    except ModuleNotFoundError as exc:
        try:
            driver = url.get_dialect().driver
        except Exception:  # noqa: BLE001 - the dialect itself needs the module
            driver = url.drivername.partition("+")[2] or exc.name or "?"
        hint = DRIVER_PACKAGES.get(driver, f"install the Python package of the {driver} "
                                           "driver")
        raise ConfigError(f"[database] connection {mask_url(url.render_as_string())}: "
                          f"the {driver} driver is not installed (no module "
                          f"{exc.name!r}): {hint}") from None
