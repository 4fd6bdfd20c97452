"""Rated points in an external store, states in SQL: the v2-layout backends.

``ExternalStorage`` is the ``BaseStorage`` of the ``influxdb``,
``elasticsearch`` and ``opensearch`` backends: the rated points go to a
point store (``storage/points.py``) in CloudKitty's v2 layout, so that
cloudkitty-api, Horizon and ``openstack rating …`` read them; the scope
states, the period records (points, exact Σprice) and the reprocessing
tasks stay in the SQL tables of the ``sql`` backend (``[database]
connection``), whose rated-rows table stays empty.

No transaction spans the two stores. How invariants 1-2 still hold
(doc/source/design.rst, "Backends without transactions"):

* The SQL transaction of a commit first advances the state with the same
  fenced compare-and-set as the ``sql`` backend (which locks the scope's
  state row; on SQLite the write lock is held from BEGIN IMMEDIATE), then
  writes the period's points to the store, then records the period and
  commits. A worker fenced off writes no point; two writers of one scope
  never write points at once (the second waits for the lock, then fails
  its compare-and-set); the state never moves past points that were not
  stored (a failed write rolls the transaction back).
* Writes are idempotent per (scope, period, type, groupby) (InfluxDB: same
  series and time; Elasticsearch/OpenSearch: a deterministic ``_id``).
* Points of a scope beyond its committed frontier belong to no committed
  period: they are left by a write whose commit did not happen (a crash, a
  failed SQL commit, a reset whose point delete failed). Before its first
  write of a scope, and after anything but its own successful commit, a
  storage object deletes the scope's points from the period it is about to
  write on; only a commit, under the same lease (``scope_taken``), whose
  expected version this object itself produced skips that delete. Each (scope, period, type, groupby) is
  therefore stored once once its period is committed.
* A reprocessed period's points are replaced (deleted, then written) in
  the SQL transaction that moves the task, once its checks passed.
* ``reset_state``: the SQL reset, then, in a transaction holding the
  scope's lock again, the points from ``to`` up to the first period
  committed since (a worker that committed meanwhile already deleted them
  from there on, and its points must stay).

Reads (``iter_rated``, ``summary``) follow the SQL period records: only
points of committed periods are returned, in batches of about
``READ_BATCH`` points.
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Iterator, Sequence

import sqlalchemy as sa
from oslo_config import cfg

from cloudkitty_proc import utils
from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.exceptions import SchemaError
from cloudkitty_proc.storage import models
from cloudkitty_proc.storage.base import RatedRow, TypeSummary, check_batch
from cloudkitty_proc.storage.points import PointStore
from cloudkitty_proc.storage.sql import SQLStorage
from cloudkitty_proc.storage.sql_rows import EXACT, naive

__all__ = ["ExternalStorage", "READ_BATCH"]

#: points read per request (a batch of whole periods, one period at least)
READ_BATCH = 5000

_state_t = models.scope_state
_period_t = models.rated_period
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=utils.UTC)


class ExternalStorage(SQLStorage):
    """States, periods and tasks in SQL; rated points in ``point_store``.

    Subclasses set ``point_store_class`` (a ``PointStore``) and ``store_option``
    (the option group, for messages).
    """

    point_store_class: type[PointStore]
    #: the ``cloudkitty-proc-manage`` command that creates the store
    INIT_HINT = "run `cloudkitty-proc-manage storage init`"

    def __init__(self, conf: cfg.ConfigOpts | None = None, *, url=None,
                 points: PointStore | None = None, scope_key: str | None = None) -> None:
        super().__init__(conf, url=url)
        if points is None:
            if scope_key is None:
                scope_key = conf.collect.scope_key if conf is not None else "project_id"
            points = self.point_store_class(conf, scope_key)
        self.points = points
        #: scope -> the state version this object's last commit produced; a
        #: commit expecting another version first deletes the scope's
        #: uncommitted points (module docstring)
        self._clean: dict[str, int] = {}
        #: commit_period's decision for _store_points
        self._skip_delete = False
        #: scope -> expected version, while commit_periods runs
        self._batch_expected: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.points.name}, {super().__repr__()})"

    @property
    def green(self) -> bool:
        return self.points.green

    @green.setter
    def green(self, value: bool) -> None:
        self.points.green = value

    def close(self) -> None:
        super().close()
        self.points.close()

    # -- schema ---------------------------------------------------------------
    def upgrade(self) -> None:
        """The SQL schema, then the point store's database or index."""
        super().upgrade()
        self.points.init()

    def check_schema(self) -> None:
        super().check_schema()
        if not self.points.initialized():
            raise SchemaError(f"{self.points.name}: the database or index does not exist: "
                              f"{self.INIT_HINT}")

    # -- writing ------------------------------------------------------------------
    def _frame_rows(self, frame: DataFrame, now: datetime.datetime,
                    worker: str) -> tuple[list, dict]:
        """The period record only: the points are in the point store."""
        _rows, period_row = super()._frame_rows(frame, now, worker)
        return [], period_row

    def commit_period(self, frame: DataFrame, expected_version: int,
                      *, worker: str = "") -> int:
        """The SQL commit, which calls ``_store_points`` once its
        compare-and-set succeeded (module docstring)."""
        scope_id = frame.scope_id
        # this object's own commit produced the expected version: nothing
        # was written past the frontier since
        self._skip_delete = self._clean.pop(scope_id, None) == expected_version
        version = super().commit_period(frame, expected_version, worker=worker)
        self._clean[scope_id] = version
        return version

    def commit_periods(self, items: Sequence[tuple[DataFrame, int]],
                       *, worker: str = "") -> list[int | Exception]:
        """The ``sql`` backend's batched commit (storage/sql_batch.py): one
        SQL transaction, each scope fenced by its own compare-and-set, and
        the points of every scope whose compare-and-set held written by
        ``_store_batch_points`` in ONE point store write (one request per
        ``write_batch_size`` points, not one per scope). Should the batch
        fail (a point write refused, a database error), it is rolled back
        and each item is committed alone with ``commit_period``: the points
        the batch wrote are the same frames' and are written again, or, for
        an item that then fails, lie past its frontier, deleted by its next
        commit (module docstring)."""
        items = check_batch(items)
        self._batch_expected = {frame.scope_id: version for frame, version in items}
        try:
            results = super().commit_periods(items, worker=worker)
        finally:
            self._batch_expected = {}
        for (frame, _), result in zip(items, results):
            if isinstance(result, int):
                self._clean[frame.scope_id] = result
            else:
                self._clean.pop(frame.scope_id, None)
        return results

    def _store_batch_points(self, frames: list[DataFrame]) -> None:
        """In the batch's transaction, the scopes' states locked (on SQLite,
        the write lock): the uncommitted points of each scope whose version
        this object did not produce deleted (as ``commit_period`` decides
        it; one request for the scopes of a period), then every frame's
        points in one write."""
        unclean: dict[datetime.datetime, list[str]] = {}
        for frame in frames:
            expected = self._batch_expected.get(frame.scope_id)
            if expected is None or self._clean.get(frame.scope_id) != expected:
                unclean.setdefault(frame.begin, []).append(frame.scope_id)
        for begin, scope_ids in unclean.items():
            self.points.delete_from(scope_ids, begin)
        self.points.write_many([frame for frame in frames if len(frame)])

    def scope_taken(self, scope_id: str) -> None:
        """A new lease: another worker may have written points past the
        frontier since this object's last commit (and crashed before its
        own), so the next commit deletes them first."""
        self._clean.pop(scope_id, None)

    def _store_points(self, frame: DataFrame, *, replace: bool = False) -> None:
        """In the SQL commit transaction, the scope locked: the frame's
        points to the store (``write_points``)."""
        self.write_points(frame, replace=replace, skip_delete=self._skip_delete)

    def write_points(self, frame: DataFrame, *, replace: bool = False,
                     skip_delete: bool = False) -> None:
        """The frame's points to the store, from inside a commit
        transaction whose checks passed. A reprocessed period (``replace``)
        loses its old points first (a changed groupby set leaves nothing
        stale); a normal commit deletes the points past the frontier first
        unless ``skip_delete``."""
        if replace:
            self.points.delete(frame.scope_id, frame.begin, frame.end)
        elif not skip_delete:
            # points past the committed frontier belong to no committed period
            self.points.delete(frame.scope_id, frame.begin, None)
        if len(frame):
            self.points.write(frame)

    def reset_state(self, scope_id: str, to: datetime.datetime | None,
                    period: int) -> None:
        """The SQL reset first (it fences every writer of the scope), then,
        the scope locked again, the points from ``to`` up to the first
        period committed since the reset. Should the second step fail, the
        points left are past the frontier: the next commit of the scope
        deletes them before writing."""
        super().reset_state(scope_id, to, period)
        self._clean.pop(scope_id, None)
        begin = to or EPOCH
        with self.engine.begin() as connection:  # SQLite: BEGIN IMMEDIATE
            connection.execute(sa.select(_state_t.c.scope_id)
                               .where(_state_t.c.scope_id == scope_id).with_for_update())
            first = connection.execute(
                sa.select(sa.func.min(_period_t.c.begin))
                .where(_period_t.c.scope_id == scope_id,
                       _period_t.c.begin >= naive(begin))).scalar()
            end = None if first is None else utils.from_db(first)
            if end is None or end > begin:
                self.points.delete(scope_id, begin, end)

    # -- reading ---------------------------------------------------------------
    def _batches(self, scope_id: str | None, begin: datetime.datetime | None,
                 end: datetime.datetime | None) -> Iterator[tuple[str, list]]:
        """(scope, [periods]) runs of consecutive committed periods with
        points, about READ_BATCH points each, ordered by scope and begin."""
        batch: list = []
        size = 0
        for period in self.iter_periods(scope_id, begin, end):
            if not period.points:
                continue
            if batch and (period.scope_id != batch[0].scope_id
                          or size + period.points > READ_BATCH):
                yield batch[0].scope_id, batch
                batch, size = [], 0
            batch.append(period)
            size += period.points
        if batch:
            yield batch[0].scope_id, batch

    def iter_rated(self, scope_id: str | None = None,
                   begin: datetime.datetime | None = None,
                   end: datetime.datetime | None = None) -> Iterator[RatedRow]:
        """Rows of committed periods, ordered by scope, begin, type, then
        groupby (the stores keep no insertion order)."""
        for scope, periods in self._batches(scope_id, begin, end):
            starts = {p.begin for p in periods}
            last = periods[-1]
            rows = [r for r in self.points.read(scope, periods[0].begin, last.end)
                    if r.begin in starts]
            rows.sort(key=_row_order)
            yield from rows

    def summary(self, scope_id: str | None = None) -> list[TypeSummary]:
        out: list[TypeSummary] = []
        add = EXACT.add
        current: str | None = None
        totals: dict[str, list] = {}

        def flush() -> None:
            for usage_type in sorted(totals):
                periods, points, qty, price, _last = totals[usage_type]
                out.append(TypeSummary(current, usage_type, periods, points, qty, price))
            totals.clear()

        for row in self.iter_rated(scope_id):
            if row.scope_id != current:
                flush()
                current = row.scope_id
            entry = totals.get(row.type)
            if entry is None:
                entry = totals[row.type] = [0, 0, decimal.Decimal(0), decimal.Decimal(0),
                                            None]
            if entry[4] != row.begin:
                entry[0] += 1
                entry[4] = row.begin
            entry[1] += 1
            entry[2] = add(entry[2], row.qty)
            entry[3] = add(entry[3], row.price)
        flush()
        return out


def _row_order(row: RatedRow) -> tuple:
    return (row.begin, row.type, sorted(row.groupby.items()), sorted(
        (k, str(v)) for k, v in row.metadata.items()))
