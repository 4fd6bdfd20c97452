"""Reprocessing tasks of the drop-in mode: CloudKitty's ``storage_scope_reprocessing_schedule``.

A task is a row of CloudKitty's schedule (what ``POST /v2/task/reprocesses``
inserts; the API sends no message, workers find the rows at each pass), with
CloudKitty's semantics: the row re-rates the periods starting from
``start_reprocess_time`` to ``end_reprocess_time`` INCLUSIVE;
``current_reprocess_time`` is the start of the last period re-rated (NULL:
none yet); the row is unfinished while current IS NULL OR current < end, and
its next period is start when current is NULL, else current + period. As a
``ReprocessTask``: ``id`` = the row's id, ``begin`` = start, ``end`` = end +
period (exclusive), ``next_period``, ``total_periods`` and ``done_periods``
computed from the row, state pending (current NULL), running, done, or
failed (see the notes below).

``commit_reprocessed_period`` moves the row with ``UPDATE ... SET
current_reprocess_time = :begin WHERE id = :id AND (current IS NULL AND start
= :begin OR current = :begin - period)`` in the transaction that replaces
the period's points and record (0 rows: StaleStateError, nothing written).
When the period is no longer below the scope's processed frontier (a reset
moved CloudKitty's ``last_processed_timestamp`` below it), the row is
finished instead (current = end) and TaskCancelledError raised.

What CloudKitty's table has no column for is kept in a *note*: a row of our
``reprocess_task`` table with the same id (``state`` "cloudkitty", or
"failed"; ``scope_id`` and ``begin`` = the schedule row's identifier and
start, a note not matching them is stale and ignored):

* the idempotency key (``request_key``): the client's request id, or the
  hash of (scope, window, reason) of a request made through
  cloudkitty_proc (CLI or RPC); a row inserted by cloudkitty-api has the key
  ``cloudkitty:<id>`` (nothing to match: the API has no idempotency);
* the task's last error (``record_task_error``; CloudKitty only logs it)
  and the reason a reset cancelled or cut it;
* "failed": a task cancelled by a reset (its row finished: current = end);
  the same request again restarts it (current back to NULL);
* ``created_at`` / ``updated_at``: when cloudkitty_proc created the task or
  first wrote a note for it; for a row cloudkitty_proc never touched, both
  are the time of the read (CloudKitty records neither).

``create_reprocess_tasks`` (cloudkitty_proc's CLI and RPC) validates as the
``sql`` backend does (storage/sql_tasks.py, which calls ``_create_tasks``
here) and as CloudKitty's API does: the scope must have an ACTIVE state row
and ``end`` must not pass its processed frontier; unlike the ``sql`` backend
there is no "begin before the first rated period" check (the periods
CloudKitty rated before the switch have no record of ours, and the API has
no such check).

``CloudKittyTasks`` is a part of the drop-in storage (``storage.py``); it
uses the storage's ``engine``, ``reader_engine``, ``ck_identity``,
``ck_period``, ``_frame_rows``, ``_insert_data`` and ``_refuse``. Lock
order as in states.py.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence

import sqlalchemy as sa

from cloudkitty_proc import faults, utils
from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.dropin import scope_rows
from cloudkitty_proc.dropin.notes import NOTE_FAILED, Notes, note_key
from cloudkitty_proc.dropin.scope_rows import ScopeIdentity
from cloudkitty_proc.dropin.tables import reprocessing_schedule
from cloudkitty_proc.exceptions import StaleStateError, TaskCancelledError
from cloudkitty_proc.storage import models
from cloudkitty_proc.storage.base import (ACTIVE_TASK_STATES, TASK_DONE, TASK_FAILED,
                                          TASK_PENDING, TASK_RUNNING, ReprocessTask)
from cloudkitty_proc.storage.sql_read import IN_CHUNK
from cloudkitty_proc.storage.sql_rows import db_now, naive
from cloudkitty_proc.storage.sql_tasks import decide_request

__all__ = ["CloudKittyTasks", "task_from_rows"]

_s = reprocessing_schedule
_state_t = models.scope_state
_period_t = models.rated_period
_data_t = models.rated_data

#: CloudKitty's "unfinished": current IS NULL OR current < end
UNFINISHED = sa.or_(_s.c.current_reprocess_time.is_(None),
                    _s.c.current_reprocess_time < _s.c.end_reprocess_time)


def _iso(dt: datetime.datetime) -> str:
    return utils.isoformat(utils.from_db(dt))


def task_from_rows(row: sa.Row, note: sa.Row | None, step: datetime.timedelta,
                   now: datetime.datetime) -> ReprocessTask:
    """A schedule row (and its valid note, or None) as a ReprocessTask
    (naive ``now``: the times of a task without a note)."""
    start, last, current = (row.start_reprocess_time, row.end_reprocess_time,
                            row.current_reprocess_time)
    end = last + step
    total = max(0, (last - start) // step + 1)
    unfinished = current is None or current < last
    if unfinished:
        state = TASK_PENDING if current is None else TASK_RUNNING
        following = start if current is None else current + step
    else:
        state = TASK_FAILED if note is not None and note.state == NOTE_FAILED else TASK_DONE
        following = end
    done = 0 if current is None else min(total, max(0, (current - start) // step + 1))
    return ReprocessTask(
        id=row.id, scope_id=row.identifier, begin=utils.from_db(start),
        end=utils.from_db(end), next_period=utils.from_db(following),
        total_periods=total, done_periods=done, reason=row.reason, state=state,
        request_key=note_key(row, note),
        created_at=utils.from_db(now if note is None else note.created_at),
        updated_at=utils.from_db(now if note is None else note.updated_at),
        last_error=None if note is None else note.last_error)


class CloudKittyTasks:
    """Reprocessing-task methods of the drop-in storage (see BaseStorage
    for their contract, the module docstring for the mapping)."""

    engine: sa.Engine
    reader_engine: sa.Engine
    ck_identity: ScopeIdentity
    ck_period: int

    @property
    def _step(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.ck_period)

    def _tasks(self, connection: sa.Connection, rows: list[sa.Row],
               step: datetime.timedelta | None = None) -> list[ReprocessTask]:
        notes = Notes(connection).valid(rows)
        now = db_now()
        return [task_from_rows(r, notes.get(r.id), step or self._step, now) for r in rows]

    # -- reading -----------------------------------------------------------------
    def list_tasks(self, states: Sequence[str] | None = None,
                   scope_id: str | None = None,
                   ids: Sequence[int] | None = None) -> list[ReprocessTask]:
        stmt = sa.select(_s)
        if scope_id is not None:
            stmt = stmt.where(_s.c.identifier == scope_id)
        if states is not None and set(states) <= set(ACTIVE_TASK_STATES):
            stmt = stmt.where(UNFINISHED)
        with self.reader_engine.connect() as connection:
            if ids is None:
                rows = connection.execute(stmt.order_by(_s.c.id)).all()
            else:
                wanted = list(dict.fromkeys(ids))
                rows = sorted((r for i in range(0, len(wanted), IN_CHUNK)
                               for r in connection.execute(
                                   stmt.where(_s.c.id.in_(wanted[i:i + IN_CHUNK])))),
                              key=lambda r: r.id)
            if scope_id is not None:  # exactly (the collation may ignore case)
                rows = [r for r in rows if r.identifier == scope_id]
            tasks = self._tasks(connection, rows)
        return [t for t in tasks if states is None or t.state in states]

    def next_pending_task(self, scope_id: str) -> ReprocessTask | None:
        stmt = sa.select(_s).where(_s.c.identifier == scope_id, UNFINISHED).order_by(_s.c.id)
        with self.reader_engine.connect() as connection:
            rows = [r for r in connection.execute(stmt) if r.identifier == scope_id][:1]
            tasks = self._tasks(connection, rows)
        return tasks[0] if tasks else None

    # -- creating ----------------------------------------------------------------
    def _create_tasks(self, connection: sa.Connection, scopes: list[str],
                      keys: dict[str, str], b: datetime.datetime, e: datetime.datetime,
                      step: datetime.timedelta, total: int, reason: str,
                      skip_uncovered: bool) -> list[int]:
        """create_reprocess_tasks' transaction (called by SQLReprocessTasks
        once the request is valid; naive UTC ``b``, ``e``)."""
        states: dict[str, sa.Row] = {}
        rows: list[sa.Row] = []
        notes = Notes(connection)
        for i in range(0, len(scopes), IN_CHUNK):
            chunk = scopes[i:i + IN_CHUNK]
            # lock order: CloudKitty's state rows, then the schedule rows
            states.update(scope_rows.read_rows(connection, self.ck_identity, chunk,
                                               lock=True))
            same_ids = notes.ids_with_keys(chunk, [keys[s] for s in chunk])
            cond = UNFINISHED if not same_ids else sa.or_(UNFINISHED, _s.c.id.in_(same_ids))
            wanted = set(chunk)
            rows.extend(r for r in connection.execute(
                sa.select(_s).where(_s.c.identifier.in_(chunk), cond)
                .order_by(_s.c.id).with_for_update()) if r.identifier in wanted)
        tasks: dict[str, list[ReprocessTask]] = {s: [] for s in scopes}
        for task in self._tasks(connection, rows, step):
            tasks[task.scope_id].append(task)
        begin, end = utils.from_db(b), utils.from_db(e)
        problems: list[str] = []
        ids: dict[str, int] = {}
        restart: list[ReprocessTask] = []
        new: list[str] = []
        skipped = 0
        for scope in scopes:
            uncovered = self._uncovered(scope, states.get(scope), e, step)
            if uncovered and skip_uncovered:
                skipped += 1
                continue
            problems.extend(uncovered)
            action, value = decide_request(scope, tasks[scope], keys[scope], begin, end)
            if action == "refused":
                problems.extend(value)
            elif action == "existing":
                ids[scope] = value
            elif action == "restart":
                restart.append(value)
                ids[scope] = value.id
            else:
                new.append(scope)
        if skip_uncovered and skipped == len(scopes):
            problems.append(f"no scope has rated periods covering [{_iso(b)}, {_iso(e)})")
        if problems:
            raise self._refuse(problems)
        now = db_now()
        for task in restart:
            connection.execute(_s.update().where(_s.c.id == task.id).values(
                current_reprocess_time=None, end_reprocess_time=e - step))
            notes.update(task.id, state=None, last_error=None, updated_at=now)
        for scope in new:
            result = connection.execute(_s.insert().values(
                identifier=scope, start_reprocess_time=b, end_reprocess_time=e - step,
                current_reprocess_time=None, reason=reason))
            ids[scope] = task_id = result.inserted_primary_key[0]
            notes.create(task_id, scope, b, reason, keys[scope], now, replace_key=True,
                         end=e - step)
        return [ids[s] for s in scopes if s in ids]

    @staticmethod
    def _uncovered(scope: str, state: sa.Row | None, e: datetime.datetime,
                   step: datetime.timedelta) -> list[str]:
        """Why the scope cannot be reprocessed up to ``e`` (CloudKitty's API
        checks: an active state row, ``e`` within the processed frontier)."""
        if state is None:
            return [f"scope {scope}: nothing rated yet, nothing to reprocess"]
        if not state.active:
            return [f"scope {scope}: inactive in CloudKitty's cloudkitty_storage_states "
                    "(an inactive scope is not reprocessed: activate it with PATCH "
                    "/v2/scope first)"]
        processed = state.last_processed_timestamp
        if e > processed + step:
            return [f"scope {scope}: end {_iso(e)} is beyond what was processed (the last "
                    f"rated period starts at {_iso(processed)}: end must be at most "
                    f"{_iso(processed + step)})"]
        return []

    # -- progress -------------------------------------------------------------------
    def _ck_commit_reprocessed(self, task_id: int, frame: DataFrame,
                               expected_next_period: datetime.datetime, worker: str,
                               store: Callable[[], None]) -> ReprocessTask:
        """commit_reprocessed_period's transaction; ``store()`` replaces the
        period's points once the row moved."""
        scope_id = frame.scope_id
        begin, end = naive(frame.begin), naive(frame.end)
        step = end - begin
        expected = naive(expected_next_period)
        if begin != expected:
            raise ValueError(f"task {task_id}: frame starts at {frame.begin}, the task "
                             f"expects {expected_next_period}")
        now = db_now()
        rows, period_row = self._frame_rows(frame, now, worker)
        stale = StaleStateError(
            f"task {task_id}: no longer active at period {_iso(begin)} (another worker "
            "re-rated it, or the task was finished or cancelled); period not committed")
        cancelled = None
        with self.engine.begin() as connection:  # SQLite: BEGIN IMMEDIATE
            connection.execute(sa.select(_state_t.c.scope_id).where(
                _state_t.c.scope_id == scope_id).with_for_update())
            state = scope_rows.find_row(connection, self.ck_identity, scope_id, lock=True)
            row = connection.execute(
                sa.select(_s).where(_s.c.id == task_id).with_for_update()).first()
            if row is None or row.identifier != scope_id:
                raise stale
            task = self._tasks(connection, [row], step)[0]
            if not task.active or task.next_period != utils.from_db(begin):
                raise stale
            notes = Notes(connection)
            if state is None or state.last_processed_timestamp < begin:
                cancelled = (
                    f"cancelled at period {_iso(begin)}: it is no longer below the scope's "
                    "processed frontier (a reset-state moved it); normal processing rates "
                    "it again")
                connection.execute(_s.update().where(_s.c.id == task_id).values(
                    current_reprocess_time=_s.c.end_reprocess_time))
                notes.write(row, state=NOTE_FAILED, last_error=cancelled, now=now)
            else:
                result = connection.execute(
                    _s.update().where(
                        _s.c.id == task_id, _s.c.end_reprocess_time >= begin,
                        sa.or_(sa.and_(_s.c.current_reprocess_time.is_(None),
                                       _s.c.start_reprocess_time == begin),
                               _s.c.current_reprocess_time == begin - step))
                    .values(current_reprocess_time=begin))
                if result.rowcount != 1:
                    raise stale
                store()
                for table in (_data_t, _period_t):
                    connection.execute(table.delete().where(
                        table.c.scope_id == scope_id, table.c.begin == begin))
                connection.execute(_period_t.insert(), period_row)
                self._insert_data(connection, rows)
                notes.write(row, state=None, last_error=None, now=now)
                faults.point("during_reprocess_commit")  # crash tests
        if cancelled is not None:
            raise TaskCancelledError(f"task {task_id}: {cancelled}")
        return self.list_tasks(ids=[task_id])[0]

    def record_task_error(self, task_id: int, message: str) -> None:
        """The error goes to the task's note (CloudKitty's table has no
        column for it); a finished task is left alone."""
        with self.engine.begin() as connection:
            row = connection.execute(sa.select(_s).where(_s.c.id == task_id, UNFINISHED)
                                     .with_for_update()).first()
            if row is not None:
                Notes(connection).write(row, last_error=message, now=db_now())

    def _ck_cut_tasks(self, connection: sa.Connection, scope_id: str,
                      to: datetime.datetime | None, period: int,
                      now: datetime.datetime) -> None:
        """reset_state's part: the scope's unfinished tasks lose their
        periods from ``to`` on (naive ``to``; None: everything). A task with
        nothing left before ``to`` is finished (current = end) and noted
        failed; another one gets end = to - period."""
        step = datetime.timedelta(seconds=period)
        rows = [r for r in connection.execute(sa.select(_s).where(
            _s.c.identifier == scope_id, UNFINISHED).order_by(_s.c.id)
            .with_for_update()) if r.identifier == scope_id]
        where = "everything" if to is None else f"from {_iso(to)} on"
        notes = Notes(connection)
        for row, task in zip(rows, self._tasks(connection, rows, step)):
            if to is not None and task.end <= utils.from_db(to):
                continue
            if to is None or utils.from_db(to) <= task.next_period:
                connection.execute(_s.update().where(_s.c.id == row.id).values(
                    current_reprocess_time=_s.c.end_reprocess_time))
                notes.write(row, state=NOTE_FAILED, now=now,
                            last_error=f"cancelled by reset-state: the scope is rated again "
                            f"{where}")
            else:
                connection.execute(_s.update().where(_s.c.id == row.id).values(
                    end_reprocess_time=to - step))
                notes.write(row, state=None, now=now,
                            last_error=f"window cut at {_iso(to)} by reset-state (those "
                            "periods are rated again by normal processing)")
