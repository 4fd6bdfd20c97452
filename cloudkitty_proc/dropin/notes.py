"""Task notes: what CloudKitty's reprocessing schedule has no column for.

A note is a row of our ``reprocess_task`` table (``storage/models.py``,
created by our own migrations) whose ``id`` is the id of a row of
CloudKitty's ``storage_scope_reprocessing_schedule``. It holds the task's
idempotency key (``request_key``), last error, ``created_at`` /
``updated_at`` and whether a reset cancelled it (``state`` "failed";
otherwise "cloudkitty", a value the ``sql`` backend never gives a task, so
its queries never take a note for one of its tasks). ``tasks.py`` says how
they are used.

A note is valid for a schedule row only if its ``scope_id`` and ``begin``
are the row's identifier and start: a note left by a row deleted since (by
hand, or an id reused by the database) is ignored, and replaced when a note
is written for the new row. The columns the schedule row already holds are
not kept up to date in a note (``end`` = CloudKitty's inclusive end,
``next_period`` = its current or start, period counts 0 when written).
"""

from __future__ import annotations

import datetime
from typing import Any

import sqlalchemy as sa

from cloudkitty_proc.storage import models
from cloudkitty_proc.storage.sql_read import IN_CHUNK
from cloudkitty_proc.storage.sql_rows import clip_error

__all__ = ["NOTE_FAILED", "NOTE_LIVE", "Notes", "note_key"]

_n = models.reprocess_task

#: the ``state`` of a note whose task is CloudKitty's row as it stands
NOTE_LIVE = "cloudkitty"
#: the ``state`` of a note whose task a reset cancelled (its row finished)
NOTE_FAILED = "failed"
_KEEP: Any = object()


def note_key(row: sa.Row, note: sa.Row | None) -> str:
    """The idempotency key of a schedule row: its note's, or
    ``cloudkitty:<id>`` (a row made by cloudkitty-api)."""
    return note.request_key if note is not None else f"cloudkitty:{row.id}"


def _matches(note: sa.Row, row: sa.Row) -> bool:
    return note.scope_id == row.identifier and note.begin == row.start_reprocess_time


class Notes:
    """The notes, on a connection (inside the caller's transaction for
    writes)."""

    def __init__(self, connection: sa.Connection) -> None:
        self.connection = connection

    def valid(self, rows: list[sa.Row]) -> dict[int, sa.Row]:
        """id -> the valid note of each schedule row that has one."""
        by_id = {r.id: r for r in rows}
        ids = list(by_id)
        found: dict[int, sa.Row] = {}
        for i in range(0, len(ids), IN_CHUNK):
            for note in self.connection.execute(
                    sa.select(_n).where(_n.c.id.in_(ids[i:i + IN_CHUNK]))):
                if _matches(note, by_id[note.id]):
                    found[note.id] = note
        return found

    def ids_with_keys(self, scopes: list[str], keys: list[str]) -> list[int]:
        """Ids of the notes of ``scopes`` holding one of ``keys``."""
        return [r[0] for r in self.connection.execute(
            sa.select(_n.c.id).where(_n.c.scope_id.in_(scopes), _n.c.request_key.in_(keys)))]

    def create(self, task_id: int, scope_id: str, begin: datetime.datetime, reason: str,
               key: str, now: datetime.datetime, *, replace_key: bool = False,
               state: str = NOTE_LIVE, last_error: str | None = None,
               end: datetime.datetime | None = None,
               following: datetime.datetime | None = None) -> None:
        """A new note for ``task_id`` (a stale one with this id, and with
        ``replace_key`` one of the scope with this key, replaced)."""
        stale = _n.c.id == task_id
        if replace_key:
            stale = sa.or_(stale, sa.and_(_n.c.scope_id == scope_id, _n.c.request_key == key))
        self.connection.execute(_n.delete().where(stale))
        self.connection.execute(_n.insert().values(
            id=task_id, scope_id=scope_id, begin=begin, end=end or begin,
            next_period=following or begin, total_periods=0, done_periods=0,
            reason=reason, state=state, request_key=key, created_at=now, updated_at=now,
            last_error=None if last_error is None else clip_error(last_error)))

    def update(self, task_id: int, *, updated_at: datetime.datetime,
               state: str | None = _KEEP, last_error: str | None = _KEEP) -> None:
        """Change an existing note (``state`` None: live)."""
        values: dict[str, Any] = {"updated_at": updated_at}
        if state is not _KEEP:
            values["state"] = state or NOTE_LIVE
        if last_error is not _KEEP:
            values["last_error"] = None if last_error is None else clip_error(last_error)
        self.connection.execute(_n.update().where(_n.c.id == task_id).values(**values))

    def write(self, row: sa.Row, *, now: datetime.datetime, state: str | None = _KEEP,
              last_error: str | None = _KEEP) -> None:
        """Set ``state`` / ``last_error`` in the note of schedule row
        ``row`` (a new note, key ``cloudkitty:<id>``, if it has none)."""
        note = self.valid([row]).get(row.id)
        if note is not None:
            self.update(row.id, updated_at=now, state=state, last_error=last_error)
            return
        self.create(row.id, row.identifier, row.start_reprocess_time, row.reason,
                    note_key(row, None), now,
                    state=NOTE_LIVE if state is _KEEP or state is None else state,
                    last_error=None if last_error is _KEEP else last_error,
                    end=row.end_reprocess_time,
                    following=row.current_reprocess_time or row.start_reprocess_time)
