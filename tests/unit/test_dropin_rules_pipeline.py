"""The drop-in rating chain in a worker's pipeline: the hook is ``Pipeline._rate``.

A real Worker (SQL storage on SQLite, file locks, threads executor; the
collector is tests/unit/test_orchestrator.py's double) rates six periods
of one scope with ``CloudKittyRatingChain`` on a SQLite database holding
CloudKitty's rating tables: each period is priced with the mappings valid
at its start, with one fingerprint query per period (and one per build); with pyscripts
enabled but not allowed every period fails, recorded on the scope, and the
state does not move.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from cloudkitty_proc.dropin.rules import CloudKittyRatingChain
from tests.cloudkitty_rules_db import RulesDB
from tests.unit.test_orchestrator import (HOUR, T0, FakeCollector, conf,  # noqa: F401 (fixtures)
                                          make_worker, storage)


@pytest.fixture
def rules_db(tmp_path):
    db = RulesDB(f"sqlite:///{tmp_path}/cloudkitty.sqlite")
    yield db
    db.close()


def run(conf, storage, rules_db, *, allow_pyscripts=False):  # noqa: F811
    """One visit of scope "a" by a worker whose chain is the drop-in one
    (as ``plugins.load_rating_chain`` builds it in cloudkitty mode): the
    visit's result, the fingerprint queries it sent, the chain."""
    conf.set_override("allow_pyscripts", allow_pyscripts, group="rating")
    chain = CloudKittyRatingChain(conf, url=rules_db.url)
    fingerprints = []

    def on_execute(conn, cursor, statement, *args):
        if statement.startswith("SELECT (SELECT count(*)"):
            fingerprints.append(statement)
    sa.event.listen(chain.engine, "before_cursor_execute", on_execute)
    worker = make_worker(conf, storage, FakeCollector())
    worker.rating_chain[:] = [chain]  # the list the worker's Pipeline rates with
    assert worker.pipeline.rating_chain is worker.rating_chain
    result = worker.process_scope("a")
    chain.close()
    return result, fingerprints, chain


def test_each_period_priced_with_the_mappings_valid_at_its_start(conf, storage,  # noqa: F811
                                                                 rules_db):
    m1 = rules_db.service("m1")
    rules_db.module("hashmap", True)
    rules_db.mapping("1", service=m1, end=T0 + 3 * HOUR)
    rules_db.mapping("2", service=m1, start=T0 + 3 * HOUR)
    result, fingerprints, chain = run(conf, storage, rules_db)
    assert result.committed == 6
    prices = {(row.begin, row.type): row.price for row in storage.iter_rated("a")}
    for hour in range(6):
        qty = hour + 1  # FakeCollector's quantity
        assert prices[(T0 + hour * HOUR, "m1")] == qty * (1 if hour < 3 else 2)
        assert prices[(T0 + hour * HOUR, "two")] == 0   # no rules: its price stays
    # one per period, and the build's own (read in its snapshot)
    assert chain.builds == 1 and len(fingerprints) == 6 + 1


def test_pyscripts_enabled_but_not_allowed_rates_nothing(conf, storage, rules_db):  # noqa: F811
    rules_db.module("pyscripts", True)
    rules_db.script("noop", "pass\n")
    result, fingerprints, _ = run(conf, storage, rules_db)
    assert result.committed == 0 and result.error
    state = storage.get_state("a")
    assert state.last_processed is None
    assert "modules_state" in state.last_error and "allow_pyscripts" in state.last_error
    # the first period failed (after its check and the build): the scope stops there
    assert len(fingerprints) == 1 + 1
    assert list(storage.iter_rated("a")) == []
    result, _, _ = run(conf, storage, rules_db, allow_pyscripts=True)
    assert result.committed == 6
    assert storage.get_state("a").last_processed == T0 + 5 * HOUR
