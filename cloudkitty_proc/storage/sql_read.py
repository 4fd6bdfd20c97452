"""The read queries of the ``sql`` storage: states, rated rows, periods, summary.

``SQLReads`` is a part of ``SQLStorage`` (sql.py); it only needs the
storage's ``reader_engine``. Rated rows and periods are streamed
(``STREAM_CHUNK`` rows a fetch: a server-side cursor on PostgreSQL and
MySQL; SQLite steps its cursor anyway): a generator holds one connection of
the reader pool until it is exhausted or closed.
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Iterator

import sqlalchemy as sa

from cloudkitty_proc import utils
from cloudkitty_proc.storage import models
from cloudkitty_proc.storage.base import RatedPeriod, RatedRow, ScopeState, TypeSummary
from cloudkitty_proc.storage.sql_rows import EXACT, loads, naive, state_from_row

#: rows fetched per round trip by the streaming readers
STREAM_CHUNK = 5000
#: scope ids per ``IN (...)``
IN_CHUNK = 500

_state_t = models.scope_state
_period_t = models.rated_period
_data_t = models.rated_data


def window(stmt: sa.Select, table: sa.Table, scope_id: str | None,
           begin: datetime.datetime | None, end: datetime.datetime | None) -> sa.Select:
    """``stmt`` limited to the scope and to begin <= table.begin < end."""
    if scope_id is not None:
        stmt = stmt.where(table.c.scope_id == scope_id)
    if begin is not None:
        stmt = stmt.where(table.c.begin >= naive(begin))
    if end is not None:
        stmt = stmt.where(table.c.begin < naive(end))
    return stmt


class SQLReads:
    """Read queries of SQLStorage (see BaseStorage for their contract)."""

    reader_engine: sa.Engine

    def get_state(self, scope_id: str) -> ScopeState:
        return self.get_states([scope_id])[scope_id]

    def get_states(self, scope_ids: list[str] | None = None) -> dict[str, ScopeState]:
        found: dict[str, ScopeState] = {}
        with self.reader_engine.connect() as connection:
            if scope_ids is None:
                stmt = sa.select(_state_t).order_by(_state_t.c.scope_id)
                for row in connection.execute(stmt):
                    found[row.scope_id] = state_from_row(row)
                return found
            wanted = list(dict.fromkeys(scope_ids))
            for i in range(0, len(wanted), IN_CHUNK):
                stmt = sa.select(_state_t).where(
                    _state_t.c.scope_id.in_(wanted[i:i + IN_CHUNK]))
                for row in connection.execute(stmt):
                    found[row.scope_id] = state_from_row(row)
        return {s: found.get(s) or ScopeState(scope_id=s, last_processed=None, version=0)
                for s in wanted}

    def _stream(self, stmt: sa.Select) -> Iterator[sa.Row]:
        """Rows of ``stmt`` fetched STREAM_CHUNK at a time."""
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

    def iter_rated(self, scope_id: str | None = None,
                   begin: datetime.datetime | None = None,
                   end: datetime.datetime | None = None) -> Iterator[RatedRow]:
        c = _data_t.c
        stmt = sa.select(c.scope_id, c.begin, c.end, c.type, c.unit, c.qty,
                         c.price, c.groupby, c["metadata"])
        stmt = window(stmt, _data_t, scope_id, begin, end)
        stmt = stmt.order_by(c.scope_id, c.begin, c.type, c.id)
        Dec, json_loads, from_db = decimal.Decimal, loads, utils.from_db
        last_naive = last_aware = None
        for row in self._stream(stmt):
            (scope, row_begin, row_end, usage_type, unit, qty, price, groupby,
             metadata) = row
            # consecutive rows share their period: convert it once
            if row_begin != last_naive:
                last_naive = row_begin
                last_aware = (from_db(row_begin), from_db(row_end))
            yield RatedRow(scope, last_aware[0], last_aware[1], usage_type, unit,
                           Dec(qty), Dec(price), json_loads(groupby), json_loads(metadata))

    def iter_periods(self, scope_id: str | None = None,
                     begin: datetime.datetime | None = None,
                     end: datetime.datetime | None = None) -> Iterator[RatedPeriod]:
        c = _period_t.c
        stmt = sa.select(c.scope_id, c.begin, c.end, c.points, c.price,
                         c.committed_at, c.worker)
        stmt = window(stmt, _period_t, scope_id, begin, end)
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
        add, Dec = EXACT.add, decimal.Decimal

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
