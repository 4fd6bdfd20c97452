"""``commit_periods`` of the SQL backend: one period of many scopes in one
transaction, each scope fenced by its own compare-and-set (a mixin of
``SQLStorage``, whose engines, row builders and state helpers it uses)."""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Sequence

import sqlalchemy as sa

from cloudkitty_proc import faults
from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.exceptions import StoreUnreachableError
from cloudkitty_proc.storage import models
from cloudkitty_proc.storage.base import BaseStorage, check_batch
from cloudkitty_proc.storage.sql_rows import db_now, naive

LOG = logging.getLogger(__name__)

_INSERT_PERIOD = models.rated_period.insert()


@dataclasses.dataclass
class BatchItem:
    """One item of ``commit_periods``, its rows computed."""

    index: int
    frame: DataFrame
    expected_version: int
    begin: datetime.datetime
    rows: list
    period_row: dict


class NotBegun(Exception):
    """commit_periods' transaction could not begin (``error``)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _first_line(exc: BaseException) -> str:
    """The error's type and first line (SQLAlchemy's add a second line)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class SQLBatchCommit:
    """Mixed into storage.sql.SQLStorage."""

    def commit_periods(self, items: Sequence[tuple[DataFrame, int]],
                       *, worker: str = "") -> list[int | Exception]:
        """See BaseStorage. ONE transaction for the whole batch: per item,
        in scope order (the lock order of concurrent batches), the state
        compare-and-set; an item whose compare-and-set fails writes nothing
        and gets StaleStateError. Then ``_store_batch_points`` with the
        frames of the others (a point store's write: one request for the
        whole batch), their period rows and rated rows in multi-row INSERTs
        over all of them, and one COMMIT.

        Should that transaction fail (a database error on one item's rows,
        a lock timeout on one scope, ...), it is rolled back and the items
        are committed one by one with ``commit_period``, so that a bad item
        fails alone. Should it not even begin (no connection, the SQLite
        write lock not obtained within the busy timeout), or should the
        point store give no reply (StoreUnreachableError), every item gets
        that error: one by one, each would wait as long again."""
        items = check_batch(items)
        if len(items) < 2:
            return BaseStorage.commit_periods(self, items, worker=worker)
        now = db_now()
        results: list[int | Exception | None] = [None] * len(items)
        batch: list[BatchItem] = []
        # everything computed before the transaction: keep the lock short
        for index, (frame, expected_version) in enumerate(items):
            try:
                rows, period_row = self._frame_rows(frame, now, worker)
            except Exception as exc:  # noqa: BLE001 - that item's outcome
                results[index] = exc
                continue
            batch.append(BatchItem(index, frame, expected_version, naive(frame.begin),
                                   rows, period_row))
        batch.sort(key=lambda item: item.frame.scope_id)
        try:
            held = self._commit_batch(batch, now)
        except (NotBegun, StoreUnreachableError) as exc:
            # the database or the point store unreachable: one by one, each
            # item would wait as long again
            for item in batch:
                results[item.index] = getattr(exc, "error", exc)
            return results
        except Exception as exc:  # noqa: BLE001 - rolled back: one by one
            LOG.warning("batched commit of %d scopes failed (%s); committing them one by "
                        "one", len(batch), _first_line(exc))
            for item in batch:
                try:
                    results[item.index] = self.commit_period(
                        item.frame, item.expected_version, worker=worker)
                except Exception as item_exc:  # noqa: BLE001 - that item's outcome
                    results[item.index] = item_exc
            return results
        for item, ok in zip(batch, held):
            if isinstance(ok, Exception):
                results[item.index] = ok
            else:
                results[item.index] = (item.expected_version + 1 if ok else self._stale(
                    item.frame.scope_id, item.expected_version, item.begin))
        return results

    def _commit_batch(self, batch: list[BatchItem],
                      now: datetime.datetime) -> list[bool | Exception]:
        """The batch's transaction: per item (in ``batch``'s order), True
        when it was committed, False when its compare-and-set was refused
        (or the StaleStateError to give it); any other error rolls the whole
        transaction back and is raised (NotBegun when it could not begin).
        The drop-in storage always takes the Core path (dropin/states.py)."""
        return (self._commit_batch_sqlite if self.is_sqlite
                else self._commit_batch_core)(batch, now)

    def _commit_batch_sqlite(self, batch: list[BatchItem],
                             now: datetime.datetime) -> list[bool]:
        """commit_periods' transaction on SQLite (sqlite_fast.py)."""
        try:
            raw = self._sqlite_writer()
            self._commit.begin(raw, self.sleep)
        except Exception as exc:  # noqa: BLE001 - reported per item
            raise NotBegun(exc) from exc

        def after_states(held: list[bool]) -> None:
            self._store_batch_points([item.frame for item, ok in zip(batch, held) if ok])

        return self._commit.commit_periods(raw, [
            (item.frame.scope_id, item.expected_version, item.rows, item.period_row)
            for item in batch], after_states)

    def _batch_fence(self, connection: sa.Connection, item: BatchItem,
                     now: datetime.datetime) -> bool | Exception:
        """The compare-and-set of one item of ``_commit_batch_core``: True
        when it held; when it did not, False (or the error to give the
        item), its writes undone (a SAVEPOINT) so the batch goes on."""
        return self._advance_state(connection, item.frame.scope_id, item.expected_version,
                                   item.begin, now, savepoint=True)

    def _commit_batch_core(self, batch: list[BatchItem],
                           now: datetime.datetime) -> list[bool | Exception]:
        """commit_periods' transaction on SQLAlchemy Core (PostgreSQL,
        MySQL; the drop-in storage on every database): ``_batch_fence`` per
        item, then ``_store_batch_points`` with the frames whose fence held,
        their period and rated rows, and one COMMIT."""
        try:
            connection = self.engine.connect()
        except Exception as exc:  # noqa: BLE001 - reported per item
            raise NotBegun(exc) from exc
        held: list[bool | Exception] = []
        period_rows: list[dict] = []
        data_rows: list = []
        with connection, connection.begin():  # SQLite: BEGIN IMMEDIATE
            for item in batch:
                ok = self._batch_fence(connection, item, now)
                held.append(ok)
                if ok is not True:
                    continue
                period_rows.append(item.period_row)
                data_rows.extend(item.rows)
            self._store_batch_points([item.frame for item, ok in zip(batch, held)
                                      if ok is True])
            if period_rows:
                connection.execute(_INSERT_PERIOD, period_rows)
            self._insert_data(connection, data_rows)
            faults.point("during_commit")  # crash tests: rows in, not committed
        return held
