"""The reprocessing task table of the ``sql`` storage (capability REPROCESSING).

A task row carries its progress cursor (``next_period``):
``commit_reprocessed_period`` deletes and re-inserts the period's rows and
moves the cursor with ``UPDATE ... WHERE id = :t AND next_period =
:expected`` in one transaction (invariant 4 of storage/base.py). Lock order
as everywhere in the ``sql`` storage: the scope_state row first, then task
rows, then rated rows.

``SQLReprocessTasks`` is a part of ``SQLStorage`` (sql.py); it uses the
storage's ``engine``, ``reader_engine``, ``_frame_rows``, ``_insert_data``
and ``_store_points``.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from cloudkitty_proc import faults, utils
from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.exceptions import (InvalidRequestError, StaleStateError,
                                        TaskCancelledError)
from cloudkitty_proc.storage import models
from cloudkitty_proc.storage.base import (ACTIVE_TASK_STATES, MAX_REQUEST_ID_LENGTH,
                                          TASK_DONE, TASK_FAILED, TASK_PENDING,
                                          TASK_RUNNING, ReprocessTask, request_key)
from cloudkitty_proc.storage.sql_read import IN_CHUNK
from cloudkitty_proc.storage.sql_rows import clip_error, db_now, naive, task_from_row

_state_t = models.scope_state
_period_t = models.rated_period
_data_t = models.rated_data
_task_t = models.reprocess_task

#: at most this many problems are listed in one refusal
_MAX_PROBLEMS = 10


class SQLReprocessTasks:
    """Reprocessing-task methods of SQLStorage (see BaseStorage for their
    contract) and reset-state's part on tasks (``_cut_tasks``)."""

    engine: sa.Engine
    reader_engine: sa.Engine

    @staticmethod
    def _refuse(problems: list[str]) -> InvalidRequestError:
        shown = problems[:_MAX_PROBLEMS]
        more = len(problems) - len(shown)
        return InvalidRequestError("; ".join(shown) + (f" (and {more} more)" if more else ""))

    def create_reprocess_tasks(self, scope_ids: Sequence[str], begin: datetime.datetime,
                               end: datetime.datetime, reason: str, period: int,
                               *, request_id: str | None = None,
                               skip_uncovered: bool = False) -> list[int]:
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
        b, e = naive(begin), naive(end)
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

    def _create_tasks(self, connection: sa.Connection, scopes: list[str],
                      keys: dict[str, str], b: datetime.datetime, e: datetime.datetime,
                      step: datetime.timedelta, total: int, reason: str,
                      skip_uncovered: bool) -> list[int]:
        """create_reprocess_tasks' transaction (naive UTC ``b``, ``e``)."""
        iso = lambda dt: utils.isoformat(utils.from_db(dt))  # noqa: E731
        last: dict[str, Any] = {}
        first: dict[str, Any] = {}
        tasks: dict[str, list[sa.Row]] = {s: [] for s in scopes}
        for i in range(0, len(scopes), IN_CHUNK):
            chunk = scopes[i:i + IN_CHUNK]
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
        now = db_now()
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
            action, value = decide_request(scope, tasks[scope], keys[scope], b, e)
            if action == "refused":
                problems.extend(value)
            elif action == "existing":
                ids[scope] = value
            elif action == "restart":
                restart.append(value.id)
                ids[scope] = value.id
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

    def list_tasks(self, states: Sequence[str] | None = None,
                   scope_id: str | None = None,
                   ids: Sequence[int] | None = None) -> list[ReprocessTask]:
        stmt = sa.select(_task_t)
        if states is not None:
            stmt = stmt.where(_task_t.c.state.in_(list(states)))
        if scope_id is not None:
            stmt = stmt.where(_task_t.c.scope_id == scope_id)
        if ids is not None:
            stmt = stmt.where(_task_t.c.id.in_(list(ids)))
        with self.reader_engine.connect() as connection:
            return [task_from_row(row) for row in
                    connection.execute(stmt.order_by(_task_t.c.id))]

    def next_pending_task(self, scope_id: str) -> ReprocessTask | None:
        stmt = (sa.select(_task_t)
                .where(_task_t.c.scope_id == scope_id,
                       _task_t.c.state.in_(ACTIVE_TASK_STATES))
                .order_by(_task_t.c.id).limit(1))
        with self.reader_engine.connect() as connection:
            row = connection.execute(stmt).first()
        return None if row is None else task_from_row(row)

    def commit_reprocessed_period(self, task_id: int, frame: DataFrame,
                                  expected_next_period: datetime.datetime,
                                  *, worker: str = "") -> ReprocessTask:
        """See BaseStorage."""
        scope_id = frame.scope_id
        begin, end = naive(frame.begin), naive(frame.end)
        expected = naive(expected_next_period)
        if begin != expected:
            raise ValueError(f"task {task_id}: frame starts at {frame.begin}, the task "
                             f"expects {expected_next_period}")
        now = db_now()
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
                self._store_points(frame, replace=True)
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
        message = clip_error(message)
        with self.engine.begin() as connection:
            connection.execute(
                _task_t.update()
                .where(_task_t.c.id == task_id, _task_t.c.state.in_(ACTIVE_TASK_STATES))
                .values(last_error=message, updated_at=db_now()))

    def _cut_tasks(self, connection: sa.Connection, scope_id: str,
                   to: datetime.datetime | None, period: int,
                   now: datetime.datetime) -> None:
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


def decide_request(scope: str, tasks: Sequence[Any], key: str, begin: datetime.datetime,
                   end: datetime.datetime) -> tuple[str, Any]:
    """How a reprocess request of ``scope`` for [begin, end) with request
    key ``key`` meets the scope's ``tasks`` (its active ones and the one
    with that key: objects with id, begin, end, state, request_key,
    done_periods, total_periods, reason; times as ``begin``/``end``). One of:
    ("existing", task id) the same request again, or exactly the window of
    an active task (merged); ("restart", task) the same request after its
    task failed; ("new", None); ("refused", [problems]) the key used for
    another window, or an overlap. Shared by the sql and drop-in backends."""
    iso = lambda dt: utils.isoformat(utils.from_db(dt))  # noqa: E731
    same = [t for t in tasks if t.request_key == key]
    failed = None
    if same:
        task = same[0]
        if (task.begin, task.end) != (begin, end):
            return "refused", [
                f"scope {scope}: request id {key!r} was already used by task {task.id} "
                f"for another window [{iso(task.begin)}, {iso(task.end)})"]
        if task.state != TASK_FAILED:
            return "existing", task.id  # the same request again: nothing new
        failed = task  # the same request after its task failed: restart it
    overlapping = [t for t in tasks
                   if t.state in ACTIVE_TASK_STATES and t.begin < end and begin < t.end]
    if len(overlapping) == 1 and (overlapping[0].begin, overlapping[0].end) == (begin, end):
        return "existing", overlapping[0].id  # the same window: merged
    if overlapping:
        return "refused", [
            f"scope {scope}: the window overlaps task {t.id} [{iso(t.begin)}, "
            f"{iso(t.end)}) ({t.state}, {t.done_periods}/{t.total_periods} periods, "
            f"reason {t.reason!r}): wait until it is done, or send exactly its "
            "window to join it" for t in overlapping]
    if failed is not None:
        return "restart", failed
    return "new", None
