"""The storage contract suite (tests/storage_contract.py) run by the ``sql``
storage on SQLite, PostgreSQL and MariaDB (the ``db_url`` fixture)."""

from __future__ import annotations

import pytest

from cloudkitty_proc import utils
from cloudkitty_proc.storage import models, sql_read
from cloudkitty_proc.storage.sql import SQLStorage
from tests.storage_contract import InjectedStoreError, StorageContract


class TestSQLStorageContract(StorageContract):

    @pytest.fixture
    def make_storage(self, db_url):
        made: list[SQLStorage] = []

        def make(upgrade: bool = True) -> SQLStorage:
            storage = SQLStorage(url=db_url)
            made.append(storage)
            if upgrade:
                storage.upgrade()
            return storage

        yield make
        for storage in made:
            storage.close()

    def small_fetch_batches(self, monkeypatch) -> None:
        monkeypatch.setattr(sql_read, "STREAM_CHUNK", 3)

    def fail_storing(self, monkeypatch, storage, scope_id) -> None:
        """The commit's ``_store_points`` hook raises for the scope (inside
        the transaction, after its compare-and-set)."""
        store_points = storage._store_points

        def failing(frame, *, replace=False):
            if frame.scope_id == scope_id:
                raise InjectedStoreError(f"injected: storing {scope_id} failed")
            return store_points(frame, replace=replace)

        monkeypatch.setattr(storage, "_store_points", failing)

    def move_frontier(self, storage, scope_id, last_processed) -> None:
        with storage.engine.begin() as connection:
            connection.execute(models.scope_state.update()
                               .where(models.scope_state.c.scope_id == scope_id)
                               .values(last_processed=utils.to_naive_utc(last_processed)))
