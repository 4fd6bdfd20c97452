"""Reading and writing CloudKitty's scope state rows (``cloudkitty_storage_states``).

A scope's row is the one of its identifier with the configuration's
``(scope_key, fetcher, collector)`` = (``[collect] scope_key``, ``[fetcher]
backend``, ``[collect] collector``: CloudKitty's plugin names, which
cloudkitty_proc's plugins share), as CloudKitty's
``StateManager._get_db_item`` looks it up. Without one, a "legacy" row of
the identifier whose three columns are all NULL (what CloudKitty's
``create_scope`` writes for a new scope) is the scope's row, and the next
write fills the three columns in (CloudKitty adopts such rows the same
way); of several legacy rows the lowest id is taken. A row written here is
always complete: identifier, the three columns, ``last_processed_timestamp``,
``scope_activation_toggle_date`` and ``active``, so ``GET /v2/scope``
never meets NULLs (CloudKitty's first row of a scope answers 500 there until
its second period).

Identifiers are matched exactly, here in Python: on MariaDB CloudKitty's
tables have a case-insensitive collation (``utf8mb4_general_ci``), where
``identifier = 'b'`` also finds ``B``. Two scopes that differ only so
cannot both have a row there (its unique key): a write for the second one
raises StorageError naming both, instead of sharing the first one's state
(which is what CloudKitty itself does).

Every function runs on a connection inside the caller's transaction;
``lock=True`` reads take the rows' locks (``SELECT ... FOR UPDATE``; on
SQLite the transaction already holds the write lock).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from cloudkitty_proc.dropin.tables import storage_states
from cloudkitty_proc.exceptions import StorageError

__all__ = ["ScopeIdentity", "advance", "find_row", "forget", "read_rows", "set_last",
           "shift_all"]

LOG = logging.getLogger(__name__)

_t = storage_states
#: scope ids per ``IN (...)``
IN_CHUNK = 500
#: the width of CloudKitty's scope_key, fetcher and collector columns
NAME_LENGTH = 40
#: the width of CloudKitty's identifier column
IDENTIFIER_LENGTH = 256


@dataclasses.dataclass(frozen=True)
class ScopeIdentity:
    """The configuration's key of a scope's row (besides its identifier)."""

    scope_key: str
    fetcher: str
    collector: str

    def __post_init__(self) -> None:
        for option, value in (("[collect] scope_key", self.scope_key),
                              ("[fetcher] backend", self.fetcher),
                              ("[collect] collector", self.collector)):
            if not value or len(value) > NAME_LENGTH:
                raise ValueError(f"{option} {value!r}: CloudKitty's cloudkitty_storage_states "
                                 f"holds names of 1 to {NAME_LENGTH} characters")

    @classmethod
    def from_conf(cls, conf: Any) -> ScopeIdentity:
        return cls(conf.collect.scope_key, conf.fetcher.backend, conf.collect.collector)

    def values(self) -> dict[str, str]:
        return {"scope_key": self.scope_key, "fetcher": self.fetcher,
                "collector": self.collector}


def _ours_or_legacy(identity: ScopeIdentity) -> sa.ColumnElement:
    return sa.or_(
        sa.and_(_t.c.scope_key == identity.scope_key, _t.c.fetcher == identity.fetcher,
                _t.c.collector == identity.collector),
        sa.and_(_t.c.scope_key.is_(None), _t.c.fetcher.is_(None), _t.c.collector.is_(None)))


def _pick(rows: Iterable[sa.Row], wanted: Iterable[str] | None = None) -> dict[str, sa.Row]:
    """identifier -> its row: the complete one, else the lowest-id legacy
    one (``rows`` ordered by id); only identifiers in ``wanted`` (exactly)
    when given."""
    keep = None if wanted is None else set(wanted)
    picked: dict[str, sa.Row] = {}
    for row in rows:
        if keep is not None and row.identifier not in keep:
            continue
        best = picked.get(row.identifier)
        if best is None or (best.scope_key is None and row.scope_key is not None):
            picked[row.identifier] = row
    return picked


def read_rows(connection: sa.Connection, identity: ScopeIdentity,
              scope_ids: list[str] | None = None, *, lock: bool = False) -> dict[str, sa.Row]:
    """identifier -> the scope's row, for ``scope_ids`` (every scope when
    None); scopes without a row are left out."""
    base = sa.select(_t).where(_ours_or_legacy(identity)).order_by(_t.c.id)
    if lock:
        base = base.with_for_update()
    if scope_ids is None:
        return _pick(connection.execute(base))
    found: dict[str, sa.Row] = {}
    wanted = list(dict.fromkeys(scope_ids))
    for i in range(0, len(wanted), IN_CHUNK):
        chunk = wanted[i:i + IN_CHUNK]
        found.update(_pick(connection.execute(base.where(_t.c.identifier.in_(chunk))),
                           chunk))
    return found


def find_row(connection: sa.Connection, identity: ScopeIdentity, scope_id: str, *,
             lock: bool = False) -> sa.Row | None:
    """The scope's row, or None. StorageError when the database's collation
    matches another scope's row (see the module docstring)."""
    stmt = (sa.select(_t).where(_t.c.identifier == scope_id, _ours_or_legacy(identity))
            .order_by(_t.c.id))
    if lock:
        stmt = stmt.with_for_update()
    rows = connection.execute(stmt).all()
    row = _pick(rows, [scope_id]).get(scope_id)
    others = sorted({r.identifier for r in rows if r.identifier != scope_id})
    if row is None and others:
        raise StorageError(
            f"scope {scope_id!r}: CloudKitty's cloudkitty_storage_states has a row for "
            f"{others[0]!r}, the same identifier for the database's collation (MariaDB's "
            "utf8mb4_general_ci ignores case): the two scopes cannot both be rated in "
            "the drop-in mode")
    return row


def _insert(connection: sa.Connection, identity: ScopeIdentity, scope_id: str,
            last: datetime.datetime, now: datetime.datetime) -> None:
    """A complete new row (IntegrityError if the scope's row appeared)."""
    if len(scope_id) > IDENTIFIER_LENGTH:
        raise ValueError(f"scope {scope_id[:40]}…: longer than the {IDENTIFIER_LENGTH} "
                         "characters of CloudKitty's cloudkitty_storage_states.identifier")
    connection.execute(_t.insert().values(
        identifier=scope_id, last_processed_timestamp=last,
        scope_activation_toggle_date=now, active=True, **identity.values()))


def _log_adoption(row: sa.Row, identity: ScopeIdentity) -> None:
    if row.scope_key is None:
        LOG.info("scope %s: CloudKitty state row %d had no scope_key, fetcher and "
                 "collector: set to %s, %s, %s", row.identifier, row.id,
                 identity.scope_key, identity.fetcher, identity.collector)


def advance(connection: sa.Connection, identity: ScopeIdentity, scope_id: str,
            begin: datetime.datetime, prev: datetime.datetime,
            now: datetime.datetime) -> datetime.datetime | None:
    """Move the scope's row from ``prev`` (the start of the period before
    ``begin``) to ``begin`` (naive UTC), compare-and-set on
    ``last_processed_timestamp``; a scope without a row gets a complete one
    at ``begin``. Returns None when done, else the timestamp found instead
    of ``prev`` (another processor moved the row: nothing written). An
    INSERT racing with another one raises IntegrityError."""
    row = find_row(connection, identity, scope_id, lock=True)
    if row is None:
        _insert(connection, identity, scope_id, begin, now)
        return None
    if row.last_processed_timestamp != prev:
        return row.last_processed_timestamp
    result = connection.execute(
        _t.update().where(_t.c.id == row.id, _t.c.last_processed_timestamp == prev)
        .values(last_processed_timestamp=begin, **identity.values()))
    if result.rowcount != 1:
        return row.last_processed_timestamp
    _log_adoption(row, identity)
    return None


def set_last(connection: sa.Connection, identity: ScopeIdentity, scope_id: str,
             last: datetime.datetime, now: datetime.datetime) -> None:
    """Set the scope's ``last_processed_timestamp`` to ``last`` (a reset),
    creating a complete row when there is none; ``active`` is kept."""
    row = find_row(connection, identity, scope_id, lock=True)
    if row is None:
        _insert(connection, identity, scope_id, last, now)
        return
    connection.execute(_t.update().where(_t.c.id == row.id).values(
        last_processed_timestamp=last, **identity.values()))
    _log_adoption(row, identity)


def forget(connection: sa.Connection, identity: ScopeIdentity, scope_id: str) -> int:
    """Delete the scope's rows (its own and legacy ones): nothing rated.
    Returns how many were deleted."""
    ids = [r.id for r in connection.execute(
        sa.select(_t.c.id, _t.c.identifier).where(
            _t.c.identifier == scope_id, _ours_or_legacy(identity)).with_for_update())
        if r.identifier == scope_id]
    if ids:
        connection.execute(_t.delete().where(_t.c.id.in_(ids)))
    return len(ids)


def shift_all(connection: sa.Connection, identity: ScopeIdentity,
              shift: datetime.timedelta) -> int:
    """Move every scope's row by ``shift`` (a period change); returns how
    many rows moved."""
    rows = connection.execute(sa.select(_t.c.id, _t.c.last_processed_timestamp)
                              .where(_ours_or_legacy(identity)).with_for_update()).all()
    for row_id, last in rows:
        connection.execute(_t.update().where(_t.c.id == row_id)
                           .values(last_processed_timestamp=last + shift))
    return len(rows)
