"""Scope states of the drop-in mode: CloudKitty's row and ours, in one transaction.

A scope's state is kept in two rows of the same database:

* CloudKitty's ``cloudkitty_storage_states`` row (``scope_rows.py``): the
  start of the last rated period (``last_processed_timestamp``, naive UTC)
  and ``active``, what cloudkitty-api shows and changes (``GET/PATCH
  /v2/scope``);
* our ``scope_state`` row (``storage/models.py``): the compare-and-set
  ``version``, the last error, the last commit time (CloudKitty has no
  column for them).

``get_state`` takes ``last_processed`` and ``active`` from CloudKitty's row
(a scope without one: nothing rated, active) and the rest from ours
(version 0 when none). A commit is fenced on BOTH: our version (as the
``sql`` backend) and CloudKitty's timestamp (``UPDATE ... WHERE id = :id
AND last_processed_timestamp = :begin - period``, or the INSERT of a
complete row for a scope without one): 0 rows matched or a duplicate key
means another processor (a worker whose lease lapsed, or a
cloudkitty-processor during a rolling switch) moved the scope, and
StaleStateError is raised with nothing written.

``CloudKittyStates`` is a part of the drop-in storage (``storage.py``); it
uses the storage's ``engine``, ``reader_engine``, ``ck_identity``,
``_frame_rows``, ``_insert_data``, ``_stale`` and, from ``tasks.py``,
``_ck_cut_tasks``. Lock order in every write transaction: our
``scope_state`` row, CloudKitty's state row, CloudKitty's schedule rows and
their notes, then ``rated_period`` rows.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from cloudkitty_proc import faults, utils
from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.dropin import scope_rows
from cloudkitty_proc.dropin.scope_rows import ScopeIdentity
from cloudkitty_proc.exceptions import StaleStateError
from cloudkitty_proc.storage import models
from cloudkitty_proc.storage.base import ScopeState
from cloudkitty_proc.storage.sql_batch import BatchItem
from cloudkitty_proc.storage.sql_read import IN_CHUNK
from cloudkitty_proc.storage.sql_rows import db_now, naive

__all__ = ["CloudKittyStates"]

_state_t = models.scope_state
_period_t = models.rated_period
_data_t = models.rated_data
_setting_t = models.processor_setting

def _merge(scope_id: str, own: sa.Row | None, theirs: sa.Row | None) -> ScopeState:
    """A ScopeState from our row and CloudKitty's (either may be None)."""
    return ScopeState(
        scope_id=scope_id,
        last_processed=None if theirs is None else utils.from_db(
            theirs.last_processed_timestamp),
        version=0 if own is None else own.version,
        active=True if theirs is None else bool(theirs.active),
        last_error=None if own is None else own.last_error,
        last_error_at=None if own is None else utils.from_db(own.last_error_at),
        last_error_kind=None if own is None else own.last_error_kind,
        last_commit_at=None if own is None else utils.from_db(own.last_commit_at),
    )


class CloudKittyStates:
    """State methods of the drop-in storage (see BaseStorage for their
    contract and the module docstring for where each field lives)."""

    engine: sa.Engine
    reader_engine: sa.Engine
    ck_identity: ScopeIdentity
    _advance_state: Any  # SQLStorage's
    _commit_batch_core: Any  # SQLStorage's (sql_batch.py)

    # -- reading ------------------------------------------------------------
    def get_state(self, scope_id: str) -> ScopeState:
        return self.get_states([scope_id])[scope_id]

    def get_states(self, scope_ids: list[str] | None = None) -> dict[str, ScopeState]:
        """Every scope with a row of ours or of CloudKitty's (for the
        configured scope_key, fetcher and collector) when ``scope_ids`` is
        None, ordered by scope id. Our rows are read first: a commit between
        the two reads then fails one of the two compare-and-sets."""
        own: dict[str, sa.Row] = {}
        with self.reader_engine.connect() as connection:
            if scope_ids is None:
                for row in connection.execute(sa.select(_state_t)):
                    own[row.scope_id] = row
                theirs = scope_rows.read_rows(connection, self.ck_identity)
                wanted = sorted(set(own) | set(theirs))
            else:
                wanted = list(dict.fromkeys(scope_ids))
                for i in range(0, len(wanted), IN_CHUNK):
                    for row in connection.execute(sa.select(_state_t).where(
                            _state_t.c.scope_id.in_(wanted[i:i + IN_CHUNK]))):
                        own[row.scope_id] = row
                theirs = scope_rows.read_rows(connection, self.ck_identity, wanted)
        return {s: _merge(s, own.get(s), theirs.get(s)) for s in wanted}

    # -- commit ---------------------------------------------------------------
    def _ck_stale_row(self, scope_id: str, begin: datetime.datetime,
                      found: datetime.datetime) -> StaleStateError:
        return StaleStateError(
            f"scope {scope_id}: CloudKitty's state row is at "
            f"{utils.isoformat(utils.from_db(found))}, not at the period before "
            f"{utils.isoformat(utils.from_db(begin))} (another processor, e.g. a "
            "cloudkitty-processor, or a reset moved it); period not committed")

    def _own_cas(self, connection: sa.Connection, scope_id: str, expected_version: int,
                 begin: datetime.datetime, now: datetime.datetime) -> bool:
        """Our scope_state compare-and-set on the version: the ``sql``
        backend's (``SQLStorage._advance_state``, this mixin's base); False
        when it moved."""
        return self._advance_state(connection, scope_id, expected_version, begin, now)

    def _ck_advance(self, connection: sa.Connection, frame: DataFrame,
                    expected_version: int, now: datetime.datetime) -> StaleStateError | None:
        """Both compare-and-sets of a commit of ``frame``: None when both
        held, else the StaleStateError to raise (what moved; the caller
        rolls back what the first one wrote)."""
        scope_id = frame.scope_id
        begin, end = naive(frame.begin), naive(frame.end)
        if not self._own_cas(connection, scope_id, expected_version, begin, now):
            return self._stale(scope_id, expected_version, begin)
        try:
            found = scope_rows.advance(connection, self.ck_identity, scope_id, begin,
                                       begin - (end - begin), now)
        except sa_exc.IntegrityError:  # a row was inserted meanwhile
            return self._stale(scope_id, expected_version, begin)
        if found is not None:
            return self._ck_stale_row(scope_id, begin, found)
        return None

    def _ck_commit(self, frame: DataFrame, expected_version: int, worker: str,
                   store: Callable[[], None]) -> int:
        """commit_period's transaction: both compare-and-sets, then
        ``store()`` (the points), the period record and its rows."""
        now = db_now()
        rows, period_row = self._frame_rows(frame, now, worker)
        with self.engine.begin() as connection:  # SQLite: BEGIN IMMEDIATE
            error = self._ck_advance(connection, frame, expected_version, now)
            if error is not None:
                raise error
            store()
            connection.execute(_period_t.insert(), period_row)
            self._insert_data(connection, rows)
            faults.point("during_commit")  # crash tests: rows in, not committed
        return expected_version + 1

    def _commit_batch(self, batch: list[BatchItem],
                      now: datetime.datetime) -> list[bool | Exception]:
        """The batch transaction of commit_periods: storage/sql_batch.py's
        on SQLAlchemy Core, on every database (not the SQLite fast path,
        which knows only our state row), fenced by ``_batch_fence``."""
        return self._commit_batch_core(batch, now)

    def _batch_fence(self, connection: sa.Connection, item: BatchItem,
                     now: datetime.datetime) -> bool | Exception:
        """Both compare-and-sets of one item, in a SAVEPOINT: True when
        they held, else the StaleStateError, the savepoint rolled back (our
        version with it) so that the batch goes on."""
        savepoint = connection.begin_nested()
        error = self._ck_advance(connection, item.frame, item.expected_version, now)
        if error is not None:
            savepoint.rollback()
            return error
        savepoint.commit()
        return True

    # -- reset ------------------------------------------------------------------
    def _ck_reset(self, scope_id: str, to: datetime.datetime | None, period: int) -> None:
        """reset_state's transaction: our row (version + 1), CloudKitty's
        row set to ``to - period`` (a complete row created if none; its
        rows deleted when ``to`` is None: CloudKitty's column cannot say
        "nothing rated"), the scope's active tasks cut at ``to``, and our
        period records from ``to`` on deleted."""
        if isinstance(period, datetime.timedelta):
            period = int(period.total_seconds())
        now = db_now()
        to_naive = naive(to)
        last = None if to_naive is None else to_naive - datetime.timedelta(seconds=period)
        for attempt in (1, 2):
            try:
                with self.engine.begin() as connection:
                    self._ck_reset_in(connection, scope_id, to_naive, last, period, now)
                return
            except sa_exc.IntegrityError:  # a row inserted meanwhile: the retry updates it
                if attempt == 2:
                    raise

    def _ck_reset_in(self, connection: sa.Connection, scope_id: str,
                     to: datetime.datetime | None, last: datetime.datetime | None,
                     period: int, now: datetime.datetime) -> None:
        own = connection.execute(sa.select(_state_t.c.version).where(
            _state_t.c.scope_id == scope_id).with_for_update()).first()
        scope_rows.find_row(connection, self.ck_identity, scope_id, lock=True)
        self._ck_cut_tasks(connection, scope_id, to, period, now)
        for table in (_data_t, _period_t):
            stmt = table.delete().where(table.c.scope_id == scope_id)
            if to is not None:
                stmt = stmt.where(table.c.begin >= to)
            connection.execute(stmt)
        if own is None:
            # version 1, not 0: a worker that read "no row" must be fenced
            connection.execute(_state_t.insert().values(
                scope_id=scope_id, last_processed=last, version=1, active=True,
                created_at=now, updated_at=now))
        else:
            connection.execute(_state_t.update().where(_state_t.c.scope_id == scope_id)
                               .values(last_processed=last, updated_at=now,
                                       version=_state_t.c.version + 1))
        if last is None:
            scope_rows.forget(connection, self.ck_identity, scope_id)
        else:
            scope_rows.set_last(connection, self.ck_identity, scope_id, last, now)

    # -- the period of the stored data ---------------------------------------
    def _shift_states(self, connection: sa.Connection, shift: datetime.timedelta,
                      now: datetime.datetime) -> None:
        """SQLStorage.set_rating_period's shift, with CloudKitty's rows moved
        too (every scope's next period starts where it did)."""
        states = connection.execute(
            sa.select(_state_t.c.scope_id, _state_t.c.last_processed)
            .with_for_update()).all()
        for scope_id, last in states:  # every version: a worker of the old period is fenced
            connection.execute(
                _state_t.update().where(_state_t.c.scope_id == scope_id)
                .values(last_processed=None if last is None else last + shift,
                        version=_state_t.c.version + 1, updated_at=now))
        scope_rows.shift_all(connection, self.ck_identity, shift)
