"""The SQLite commit path of the ``sql`` storage: plain ``sqlite3`` calls.

On SQLite, ``commit_period`` runs its transaction on one pooled writer
connection kept checked out (``CommitConnection``), with the statements
written out here, bound to rows already in their stored text
(``sql_rows.frame_rows``): a pool checkout, a Core Connection and its
events, and the per-row bind processing cost more than the period's
statements. The rated rows go in multi-row INSERTs (``insert_batches``).
That connection never checkpoints the WAL; a thread does
(``WalCheckpointer``). The same statements and the same stored text as the
Core path (tests/functional/test_storage_sql.py checks it).
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from cloudkitty_proc import faults
from cloudkitty_proc.storage.sql_engines import begin_immediate, sqlite_is_memory
from cloudkitty_proc.storage.sql_rows import sqlite_datetime

LOG = logging.getLogger(__name__)

_INSERT_DATA_HEAD = (
    'INSERT INTO rated_data (scope_id, "begin", "end", type, unit, qty, price, groupby, '
    'metadata) VALUES ')
#: rows per multi-row INSERT on SQLite; the rest of a period goes in
#: statements of 32, 16, ... 1 rows (7 statement texts in all, so they stay
#: in sqlite3's statement cache). 64 x 9 parameters stay under SQLite's
#: oldest limit of 999.
SQLITE_INSERT_BATCH = 64
_INSERT_DATA = {
    n: _INSERT_DATA_HEAD + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * n)
    for n in (1 << k for k in range(SQLITE_INSERT_BATCH.bit_length()))
}
_chain = itertools.chain.from_iterable


def insert_batches(rows: list) -> Iterator[tuple[str, list]]:
    """(statement, parameters) of multi-row INSERTs storing ``rows`` (the
    tuples of sql_rows.frame_rows), in order. One statement execution per
    row, as executemany does it (bind, step from the start of the program,
    which opens the table's and the index's cursors, reset), cost 7-9 us a
    row here, as much as the rest of the commit; 64 rows a statement: 5 us
    (W2's rows, table and index)."""
    n = len(rows)
    i = 0
    size = SQLITE_INSERT_BATCH
    while i < n:
        while n - i < size:
            size >>= 1
        yield _INSERT_DATA[size], list(_chain(rows[i:i + size]))
        i += size


_COMMIT_STATE = (
    "UPDATE scope_state SET version = version + 1, last_processed = ?, last_commit_at = ?, "
    "updated_at = ?, last_error = NULL, last_error_kind = NULL, last_error_at = NULL "
    "WHERE scope_id = ? AND version = ?")
_INSERT_STATE = (
    "INSERT INTO scope_state (scope_id, last_processed, version, active, last_error, "
    "last_error_kind, last_error_at, last_commit_at, created_at, updated_at) "
    "VALUES (?, ?, 1, 1, NULL, NULL, NULL, ?, ?, ?)")
_INSERT_PERIOD = (
    'INSERT INTO rated_period (scope_id, "begin", "end", points, price, committed_at, '
    "worker) VALUES (?, ?, ?, ?, ?, ?, ?)")


#: seconds between two WAL checkpoints of the checkpointer thread
WAL_CHECKPOINT_INTERVAL = 0.5


class WalCheckpointer:
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


class CommitConnection:
    """The writer connection commit_period keeps checked out on SQLite, and
    the WAL checkpointer that goes with it (one per storage object and
    process)."""

    def __init__(self) -> None:
        self.raw: Any = None
        self.checkpointer: WalCheckpointer | None = None
        # connections inherited through fork, never touched again
        self._inherited: list[Any] = []

    def get(self, engine: sa.Engine) -> Any:
        """The pooled connection (checked out of ``engine`` on first use)."""
        if self.raw is None:
            raw = engine.raw_connection()
            if raw.info.get("ckp_own_busy_wait") and not sqlite_is_memory(engine.url):
                # WAL journal: checkpoints leave this connection's commits
                raw.driver_connection.execute("PRAGMA wal_autocheckpoint = 0")
                if self.checkpointer is None:
                    self.checkpointer = WalCheckpointer(
                        raw.driver_connection.execute("PRAGMA database_list")
                        .fetchone()[2])
            self.raw = raw
        return self.raw

    def drop(self, *, close: bool) -> None:
        """Stop the checkpointer and give the connection up: closed, or
        (``close`` False: the parent's, after a fork) kept untouched."""
        checkpointer, self.checkpointer = self.checkpointer, None
        if checkpointer is not None and close:
            checkpointer.stop()  # (a parent's thread does not exist after fork)
        raw, self.raw = self.raw, None
        if raw is not None:
            if close:
                raw.close()
            else:
                self._inherited.append(raw)  # the parent's: not even garbage-collected

    def begin(self, raw: Any, sleep: Callable[[float], None]) -> None:
        """BEGIN IMMEDIATE on ``raw``: the write lock, waited for with
        ``sleep`` up to the busy timeout. sqlite3 errors are raised wrapped
        as SQLAlchemy's."""
        con = raw.driver_connection
        try:
            if raw.info.get("ckp_own_busy_wait"):
                begin_immediate(con, sleep)
            else:
                con.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            self._rollback(raw)
            if isinstance(exc, sqlite3.Error):
                raise sa_exc.DBAPIError.instance("BEGIN IMMEDIATE", None, exc,
                                                 sqlite3.Error) from exc
            raise

    @staticmethod
    def _advance_state(con: Any, scope_id: str, expected_version: int, begin: str,
                       now: str) -> bool:
        """The state compare-and-set, the write lock held: False when the
        scope is no longer at ``expected_version``. Version 0 inserts the
        row; a row already there fails only that statement (SQLite's ABORT
        keeps the transaction), and means another writer won."""
        if con.execute(_COMMIT_STATE, (begin, now, now, scope_id,
                                       expected_version)).rowcount == 1:
            return True
        if expected_version != 0:
            return False
        try:
            con.execute(_INSERT_STATE, (scope_id, begin, now, now, now))
        except sqlite3.IntegrityError:
            return False
        return True

    @staticmethod
    def _period_values(scope_id: str, period_row: dict) -> tuple:
        return (scope_id, sqlite_datetime(period_row["begin"]),
                sqlite_datetime(period_row["end"]), period_row["points"],
                period_row["price"], sqlite_datetime(period_row["committed_at"]),
                period_row["worker"])

    def commit_period(self, raw: Any, sleep: Callable[[float], None], scope_id: str,
                      expected_version: int, rows: list, period_row: dict,
                      stale: Callable[[], Exception],
                      after_state: Callable[[], None] | None = None) -> None:
        """commit_period's transaction on ``raw`` (from ``get``): the state
        compare-and-set (``stale()`` raised when it fails), ``after_state()``,
        the period row, the rated rows. sqlite3 errors are raised wrapped as
        SQLAlchemy's, as on the Core path."""
        con = raw.driver_connection
        begin = sqlite_datetime(period_row["begin"])
        now = sqlite_datetime(period_row["committed_at"])
        self.begin(raw, sleep)
        statement = _COMMIT_STATE
        try:
            if not self._advance_state(con, scope_id, expected_version, begin, now):
                raise stale()
            if after_state is not None:
                after_state()
            statement = _INSERT_PERIOD
            con.execute(statement, self._period_values(scope_id, period_row))
            for statement, parameters in insert_batches(rows):
                con.execute(statement, parameters)
            faults.point("during_commit")  # crash tests: rows in, not committed
            statement = "COMMIT"
            con.execute(statement)
        except BaseException as exc:
            self._rollback(raw)
            if isinstance(exc, sqlite3.Error):
                raise sa_exc.DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc
            raise

    def commit_periods(self, raw: Any, entries: list[tuple],
                       after_states: Callable[[list[bool]], None] | None = None) -> list[bool]:
        """commit_periods' transaction on ``raw``, opened by ``begin``:
        ``entries`` are (scope_id, expected_version, rows, period_row) of
        distinct scopes. For each, the state compare-and-set; then
        ``after_states(held)`` (whether each entry's held: the batch's point
        writes); then the period rows and the rated rows of every entry
        whose compare-and-set held (multi-row INSERTs over all of them), and
        COMMIT. Returns, per entry, whether
        its compare-and-set held (an entry refused writes nothing). Any
        error rolls the whole transaction back and is raised (sqlite3's
        wrapped as SQLAlchemy's)."""
        con = raw.driver_connection
        statement = _COMMIT_STATE
        try:
            held: list[bool] = []
            periods: list[tuple] = []
            data: list = []
            for scope_id, expected_version, rows, period_row in entries:
                statement = _COMMIT_STATE
                ok = self._advance_state(
                    con, scope_id, expected_version, sqlite_datetime(period_row["begin"]),
                    sqlite_datetime(period_row["committed_at"]))
                held.append(ok)
                if not ok:
                    continue
                periods.append(self._period_values(scope_id, period_row))
                data.extend(rows)
            if after_states is not None:
                after_states(held)
            statement = _INSERT_PERIOD
            con.executemany(statement, periods)
            for statement, parameters in insert_batches(data):
                con.execute(statement, parameters)
            faults.point("during_commit")  # crash tests: rows in, not committed
            statement = "COMMIT"
            con.execute(statement)
            return held
        except BaseException as exc:
            self._rollback(raw)
            if isinstance(exc, sqlite3.Error):
                raise sa_exc.DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc
            raise

    def _rollback(self, raw: Any) -> None:
        """Roll the commit connection back; one that cannot is dropped."""
        con = raw.driver_connection
        try:
            if con.in_transaction:
                con.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - a broken connection: forget it
            self.raw = None
            try:
                raw.invalidate()
            except Exception:  # noqa: S110
                pass
