"""The storage of the drop-in mode: CloudKitty's state tables + a point store.

``[cloudkitty_proc] mode = cloudkitty`` makes ``plugins.load_storage`` build
``storage_class(<the [storage] backend class>)(conf)``: the configured
point-store backend (``influxdb``, ``elasticsearch``, ``opensearch``: an
``ExternalStorage``, rated points in CloudKitty's v2 layout) with the
``CloudKittyMode`` mixin in front, which keeps the scope states and the
reprocessing tasks in CloudKitty's own tables (``states.py``, ``tasks.py``)
instead of ours. Another backend is refused (ConfigError): CloudKitty's API
reads rated data from its v2 storage only.

In the same database (``[database] connection``, CloudKitty's), our own
tables stay, created by our own migrations (``upgrade()``, version table
``alembic_version``): ``scope_state`` (version, last error), ``rated_period``
(the period records that reads follow), ``processor_setting`` (the period),
``reprocess_task`` (task notes, ``notes.py``); ``rated_data`` stays empty.
CloudKitty's tables are never created, migrated or altered: ``upgrade()``
and ``check_schema()`` first check CloudKitty's alembic heads
(``tables.check_schema``: SchemaError naming the version table and the
expected head), and only rows are written.

A commit (normal or reprocessed) runs ONE SQL transaction: the
compare-and-sets (our version and CloudKitty's timestamp, or the task's
progress), then the period's points to the store, then the period record;
a worker fenced off writes no point, and two writers of a scope never
write points at once (the second waits for the first's row lock, then
fails its compare-and-set). Before its first write of a scope, and after
anything but its own successful commit, a storage object deletes the
scope's points from the period it writes on (points past the committed
frontier belong to no committed period: a crash between the point write and
the SQL commit leaves some). A reprocessed period's points are deleted,
then written. ``reset_state``: the SQL reset (both rows, tasks cut, period
records deleted), then, the scope's row locked again, the points from
``to`` up to the first period committed since. ``commit_periods`` is
ExternalStorage's (many scopes' periods in one transaction, their points in
one write) around this module's ``_commit_batch`` (``states.py``): each
item in a savepoint with both compare-and-sets. This is the flow of
``storage/external.py`` with CloudKitty's rows in its transaction; it does
not depend on ExternalStorage's own single-period commit methods.

Reads (``iter_rated``, ``summary``, ``export``) are ExternalStorage's: they
follow our period records, so the periods CloudKitty rated before the
switch are not in them (their points stay in the store, where CloudKitty's
API reads them).
"""

from __future__ import annotations

import datetime
from typing import Any

import sqlalchemy as sa
from oslo_config import cfg

from cloudkitty_proc import utils
from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.dropin import tables
from cloudkitty_proc.dropin.scope_rows import ScopeIdentity
from cloudkitty_proc.dropin.states import CloudKittyStates
from cloudkitty_proc.dropin.tasks import CloudKittyTasks
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.storage import models
from cloudkitty_proc.storage.base import ReprocessTask
from cloudkitty_proc.storage.external import ExternalStorage
from cloudkitty_proc.storage.sql_rows import naive

__all__ = ["CloudKittyMode", "POINT_STORE_BACKENDS", "check_backend", "storage_class"]

#: the ``[storage] backend`` values the drop-in mode accepts
POINT_STORE_BACKENDS = ("influxdb", "elasticsearch", "opensearch")
#: the period (s) of a storage built without a conf nor ``period``
DEFAULT_PERIOD = 3600
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=utils.UTC)

_state_t = models.scope_state
_period_t = models.rated_period


def check_backend(backend: str) -> None:
    """ConfigError (one line) unless ``backend`` is a point-store backend."""
    if backend not in POINT_STORE_BACKENDS:
        raise ConfigError(
            f"[storage] backend = {backend}: [cloudkitty_proc] mode = cloudkitty needs a "
            f"backend CloudKitty's API reads ({', '.join(POINT_STORE_BACKENDS)})")


class CloudKittyMode(CloudKittyStates, CloudKittyTasks):
    """The drop-in mixin, placed before an ExternalStorage subclass (see
    ``storage_class``). Built as ``cls(conf)``; tests and tools may pass
    ``identity`` (the scope_key, fetcher and collector of the state rows)
    and ``period`` instead of taking them from ``conf``, and the
    ExternalStorage keywords (``url``, ``points``, ``scope_key``)."""

    points: Any
    _clean: dict[str, int]

    def __init__(self, conf: cfg.ConfigOpts | None = None, *,
                 identity: ScopeIdentity | None = None, period: int | None = None,
                 **kwargs: Any) -> None:
        if identity is None:
            if conf is None:
                raise ValueError("the drop-in storage needs a conf or an identity")
            try:
                identity = ScopeIdentity.from_conf(conf)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        self.ck_identity = identity
        if period is None:
            period = conf.collect.period if conf is not None else DEFAULT_PERIOD
        #: the period (s) of CloudKitty's schedule rows, for their task view
        self.ck_period = int(period)
        kwargs.setdefault("scope_key", identity.scope_key)
        super().__init__(conf, **kwargs)

    # -- schema ---------------------------------------------------------------------
    def check_cloudkitty_schema(self) -> None:
        """SchemaError unless CloudKitty's tables are at its 25.0.0 heads."""
        with self.reader_engine.connect() as connection:
            tables.check_schema(connection)

    def check_schema(self) -> None:
        self.check_cloudkitty_schema()
        super().check_schema()

    def upgrade(self) -> None:
        """Our own tables (and the point store), in a database whose
        CloudKitty tables are at their heads; CloudKitty's are not touched."""
        self.check_cloudkitty_schema()
        super().upgrade()

    # -- writing --------------------------------------------------------------------
    def commit_period(self, frame: DataFrame, expected_version: int,
                      *, worker: str = "") -> int:
        scope_id = frame.scope_id
        # this object's own commit produced the expected version: nothing
        # was written past the frontier since
        skip = self._clean.pop(scope_id, None) == expected_version
        version = self._ck_commit(frame, expected_version, worker,
                                  lambda: self.write_points(frame, skip_delete=skip))
        self._clean[scope_id] = version
        return version

    def commit_reprocessed_period(self, task_id: int, frame: DataFrame,
                                  expected_next_period: datetime.datetime,
                                  *, worker: str = "") -> ReprocessTask:
        return self._ck_commit_reprocessed(task_id, frame, expected_next_period, worker,
                                           lambda: self.write_points(frame, replace=True))

    def reset_state(self, scope_id: str, to: datetime.datetime | None,
                    period: int) -> None:
        """The SQL reset first (it fences every writer of the scope), then,
        the scope locked again, the points from ``to`` up to the first
        period committed since. Should the second step fail, the points
        left are past the frontier: the next commit deletes them."""
        self._ck_reset(scope_id, to, period)
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


_classes: dict[type, type] = {}


def storage_class(backend_cls: type) -> type:
    """The drop-in storage class over ``backend_cls`` (an ExternalStorage
    subclass: the point store of the configured backend)."""
    if not (isinstance(backend_cls, type) and issubclass(backend_cls, ExternalStorage)):
        raise ConfigError(f"[storage] backend: {getattr(backend_cls, '__name__', backend_cls)}"
                          " keeps no points in CloudKitty's v2 layout: [cloudkitty_proc] "
                          "mode = cloudkitty needs one of "
                          f"{', '.join(POINT_STORE_BACKENDS)}")
    cls = _classes.get(backend_cls)
    if cls is None:
        cls = _classes[backend_cls] = type(
            f"CloudKitty{backend_cls.__name__}", (CloudKittyMode, backend_cls),
            {"__module__": __name__,
             "__doc__": f"{backend_cls.__name__}'s points, CloudKitty's state tables."})
    return cls
