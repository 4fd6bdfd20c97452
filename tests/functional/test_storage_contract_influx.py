"""The storage contract suite (tests/storage_contract.py) run by the
``influxdb`` storage: rated points in a real InfluxDB 1.x (a private
influxd, tests/influxdb_server.py), states, periods and tasks in SQLite."""

from __future__ import annotations

import pytest

from cloudkitty_proc import utils
from cloudkitty_proc.storage import external, models
from cloudkitty_proc.storage.influx import InfluxPointStore, InfluxStorage
from tests.storage_contract import StorageContract, fail_point_writes


def influx_storage(sql_url: str, server, database: str, **options) -> InfluxStorage:
    """An InfluxStorage on ``sql_url`` and the database of ``server``."""
    return InfluxStorage(url=sql_url, points=InfluxPointStore(
        None, "project_id", host=server.host, port=server.port, database=database,
        **options))


class TestInfluxStorageContract(StorageContract):

    exact_numbers = False

    @pytest.fixture
    def make_storage(self, tmp_path, influxdb_database):
        server, database = influxdb_database
        url = f"sqlite:///{tmp_path}/ckp.sqlite"
        made: list[InfluxStorage] = []

        def make(upgrade: bool = True) -> InfluxStorage:
            storage = influx_storage(url, server, database)
            made.append(storage)
            if upgrade:
                storage.upgrade()
            return storage

        yield make
        for storage in made:
            storage.close()

    def fail_storing(self, monkeypatch, storage, scope_id) -> None:
        fail_point_writes(monkeypatch, storage, scope_id)

    def small_fetch_batches(self, monkeypatch) -> None:
        monkeypatch.setattr(external, "READ_BATCH", 3)

    def move_frontier(self, storage, scope_id, last_processed) -> None:
        with storage.engine.begin() as connection:
            connection.execute(models.scope_state.update()
                               .where(models.scope_state.c.scope_id == scope_id)
                               .values(last_processed=utils.to_naive_utc(last_processed)))


class TestInfluxStoragePostgresContract(TestInfluxStorageContract):
    """The same with the states in PostgreSQL: there the scope's state row
    lock (not SQLite's database write lock) keeps two writers of one scope
    from writing points at once."""

    @pytest.fixture
    def make_storage(self, pg_url, influxdb_database):
        server, database = influxdb_database
        made: list[InfluxStorage] = []

        def make(upgrade: bool = True) -> InfluxStorage:
            storage = influx_storage(pg_url, server, database)
            made.append(storage)
            if upgrade:
                storage.upgrade()
            return storage

        yield make
        for storage in made:
            storage.close()
