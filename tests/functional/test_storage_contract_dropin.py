"""The storage contract suite (tests/storage_contract.py) run by the drop-in
storage (``[cloudkitty_proc] mode = cloudkitty``): scope states and tasks in
CloudKitty 25.0.0's tables, on SQLite, PostgreSQL and MariaDB (``db_url``),
points in an in-memory point store."""

from __future__ import annotations

import datetime

import pytest

from cloudkitty_proc.exceptions import InvalidRequestError
from cloudkitty_proc.storage import external
from tests import cloudkitty_db
from tests.cloudkitty_db import DropinDB
from tests.storage_contract import (PERIOD, StorageContract, at, fail_point_writes, make_frame,
                                    rate)


class TestDropinStorageContract(StorageContract):

    @pytest.fixture
    def make_storage(self, db_url):
        cloudkitty_db.create_cloudkitty_schema(db_url)
        db = DropinDB(db_url)
        yield db.make
        db.close()

    def fail_storing(self, monkeypatch, storage, scope_id) -> None:
        fail_point_writes(monkeypatch, storage, scope_id)

    def small_fetch_batches(self, monkeypatch) -> None:
        monkeypatch.setattr(external, "READ_BATCH", 3)

    def move_frontier(self, storage, scope_id, last_processed) -> None:
        """As a reset through CloudKitty's own processor would."""
        with storage.engine.begin() as connection:
            connection.execute(cloudkitty_db.states_t.update().where(
                cloudkitty_db.states_t.c.identifier == scope_id).values(
                    last_processed_timestamp=cloudkitty_db.naive(last_processed)))

    def test_iter_rated_order_and_half_open_window(self, storage, monkeypatch):
        """On MariaDB, with scopes that differ by more than case: there
        CloudKitty's identifier column ignores case, so "B" and "b" cannot
        both have a state row (tested in test_dropin_storage.py)."""
        if storage.url.get_backend_name() != "mysql":
            super().test_iter_rated_order_and_half_open_window(storage, monkeypatch)
            return
        self.small_fetch_batches(monkeypatch)
        for scope in ("b", "a", "C"):
            v = 0
            for n in (0, 1, 2, 3):
                v = storage.commit_period(
                    make_frame(scope, n, points=2, types=("zeta", "alpha")), v)
        keys = [(r.scope_id, r.begin, r.type, r.groupby["i"]) for r in storage.iter_rated()]
        assert keys == [(s, at(n), t, i) for s in ("C", "a", "b") for n in range(4)
                        for t in ("alpha", "zeta") for i in ("0", "1")]
        window = list(storage.iter_rated(begin=at(1), end=at(3)))
        assert {r.begin for r in window} == {at(1), at(2)} and len(window) == 24
        assert [(p.scope_id, p.begin) for p in storage.iter_periods(begin=at(1), end=at(2))] \
            == [("C", at(1)), ("a", at(1)), ("b", at(1))]

    def test_validation_names_each_problem_and_writes_nothing(self, storage):
        """The contract's case without its "begin before the first rated
        period" check: the periods CloudKitty rated before the switch have
        no period record of ours, and CloudKitty's API has no such check."""
        rate(storage, "p1", 6)
        rate(storage, "p2", 3)
        cases = [
            (dict(begin=at(1) + datetime.timedelta(minutes=5)), "begin .* is not aligned"),
            (dict(begin=at(4), end=at(2)), "must be before end"),
            (dict(begin=at(2), end=at(2)), "must be before end"),
            (dict(reason="  "), "reason: a non-empty reason is required"),
            (dict(scopes=[]), "no scope given"),
            (dict(scopes=["never"]), "scope never: nothing rated yet"),
            (dict(end=at(7)), r"end 2026-01-01T07:00:00\+00:00 is beyond what was processed "
                              r".*end must be at most 2026-01-01T06:00:00\+00:00"),
            (dict(scopes=["p1", "p2"], end=at(5)), "scope p2: end .* is beyond"),
        ]
        for overrides, message in cases:
            args = dict(scopes=["p1"], begin=at(1), end=at(3), reason="fix")
            args.update(overrides)
            with pytest.raises(InvalidRequestError, match=message):
                storage.create_reprocess_tasks(args["scopes"], args["begin"], args["end"],
                                               args["reason"], PERIOD)
        assert storage.list_tasks() == []
        # before the first period rated here: accepted (CloudKitty rated it)
        [early] = storage.create_reprocess_tasks(["p2"], at(-2), at(0), "history", PERIOD)
        assert storage.list_tasks(ids=[early])[0].total_periods == 2
        [tid] = storage.create_reprocess_tasks(["p1"], at(0), at(6), "whole", PERIOD)
        task = storage.list_tasks(ids=[tid])[0]
        assert (task.state, task.total_periods, task.done_periods, task.next_period) == \
            ("pending", 6, 0, at(0))
