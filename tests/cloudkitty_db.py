"""A CloudKitty 25.0.0 database for the drop-in tests, and the drop-in storage on it.

``create_cloudkitty_schema(url)`` creates CloudKitty's tables from
``cloudkitty_proc.dropin.tables`` and its four alembic version tables
stamped at the 25.0.0 heads, as ``cloudkitty-dbsync upgrade`` and
``cloudkitty-storage-init`` leave a database (the tables are compared with
the real migrations' in tests/functional/test_dropin_tables.py).
``DropinDB`` builds drop-in storages on it (``make``), sharing one
in-memory point store (tests/fakes/memory_points.py), and offers the raw
SQL helpers the tests use to act as cloudkitty-api or a
cloudkitty-processor would.
"""

from __future__ import annotations

import datetime

import sqlalchemy as sa

from cloudkitty_proc import utils
from cloudkitty_proc.dropin import rating_tables
from cloudkitty_proc.dropin import storage as dropin_storage
from cloudkitty_proc.dropin import tables
from cloudkitty_proc.dropin.scope_rows import ScopeIdentity
from cloudkitty_proc.storage.external import ExternalStorage
from tests.fakes.memory_points import MemoryPointStore, PointData

IDENTITY = ScopeIdentity("project_id", "source", "prometheus")
PERIOD = 3600
states_t = tables.storage_states
schedule_t = tables.reprocessing_schedule


class MemoryExternalStorage(ExternalStorage):
    """An ExternalStorage whose points stay in memory."""

    point_store_class = MemoryPointStore


DropinMemoryStorage = dropin_storage.storage_class(MemoryExternalStorage)


def create_cloudkitty_schema(url: str, heads: dict[str, str] | None = None) -> None:
    """CloudKitty's tables and version tables, stamped at ``heads``."""
    engine = sa.create_engine(url)
    try:
        meta = sa.MetaData()
        versions = [tables.version_table(name, meta) for name in tables.HEADS]
        with engine.begin() as connection:
            tables.metadata.create_all(connection)
            rating_tables.rating_metadata.create_all(connection)
            meta.create_all(connection)
            for table in versions:
                connection.execute(table.insert().values(
                    version_num=(heads or tables.HEADS)[table.name]))
    finally:
        engine.dispose()


def naive(dt: datetime.datetime) -> datetime.datetime:
    return utils.to_naive_utc(dt)


class DropinDB:
    """One CloudKitty database; the drop-in storages made on it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.data = PointData()
        self.made: list = []
        self.engine = sa.create_engine(url)

    def make(self, upgrade: bool = True, identity: ScopeIdentity = IDENTITY):
        storage = DropinMemoryStorage(
            url=self.url, identity=identity, period=PERIOD,
            points=MemoryPointStore(data=self.data))
        self.made.append(storage)
        if upgrade:
            storage.upgrade()
        return storage

    def close(self) -> None:
        for storage in self.made:
            storage.close()
        self.engine.dispose()

    # -- CloudKitty's side ------------------------------------------------------
    def state_rows(self, scope_id: str | None = None) -> list[sa.Row]:
        stmt = sa.select(states_t).order_by(states_t.c.id)
        if scope_id is not None:
            stmt = stmt.where(states_t.c.identifier == scope_id)
        with self.engine.connect() as connection:
            return connection.execute(stmt).all()

    def insert_state(self, scope_id: str, last: datetime.datetime, *, active: bool = True,
                     identity: ScopeIdentity | None = IDENTITY) -> int:
        """A state row as CloudKitty writes it (``identity`` None: a legacy
        row with NULL scope_key, fetcher and collector)."""
        values = identity.values() if identity is not None else {}
        with self.engine.begin() as connection:
            return connection.execute(states_t.insert().values(
                identifier=scope_id, last_processed_timestamp=naive(last), active=active,
                **values)).inserted_primary_key[0]

    def set_state(self, scope_id: str, last: datetime.datetime, **values) -> None:
        """A cloudkitty-processor moving the scope (or PATCH /v2/scope)."""
        with self.engine.begin() as connection:
            connection.execute(states_t.update().where(
                states_t.c.identifier == scope_id).values(
                    last_processed_timestamp=naive(last), **values))

    def insert_schedule(self, scope_id: str, start: datetime.datetime,
                        end: datetime.datetime, reason: str = "api") -> int:
        """A row as POST /v2/task/reprocesses inserts it (``end`` inclusive)."""
        with self.engine.begin() as connection:
            return connection.execute(schedule_t.insert().values(
                identifier=scope_id, start_reprocess_time=naive(start),
                end_reprocess_time=naive(end), reason=reason)).inserted_primary_key[0]

    def schedule_rows(self) -> list[sa.Row]:
        with self.engine.connect() as connection:
            return connection.execute(sa.select(schedule_t).order_by(schedule_t.c.id)).all()
