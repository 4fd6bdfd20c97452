"""``cloudkitty_proc.dropin.tables`` against what CloudKitty 25.0.0 itself creates.

The fixtures ``tests/fixtures/cloudkitty_schema/<dialect>.json`` hold the
schema CloudKitty's own migrations create (recorded by
``tools/cloudkitty_schema_reference.py``, which runs them in CloudKitty's
virtualenv). Here the tables are created from our Core definitions (as the
drop-in tests create them) and reflected the same way: every table of a
CloudKitty alembic tree that CloudKitty could migrate on that database must
come out identical (on MariaDB down to ``SHOW CREATE TABLE``), and the
heads we require must be the heads CloudKitty's migrations reach.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from cloudkitty_proc.dropin import tables
from tests import cloudkitty_db, cloudkitty_schema

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cloudkitty_schema"


def fixture(dialect: str) -> dict:
    return json.loads((FIXTURES / f"{dialect}.json").read_text())


def test_the_heads_are_the_ones_cloudkittys_migrations_reach():
    mariadb = fixture("mariadb")
    assert mariadb["cloudkitty"] == tables.CLOUDKITTY_VERSION
    assert set(mariadb["migrations"].values()) == {"ok"}
    assert mariadb["versions"] == {name: [head] for name, head in tables.HEADS.items()}
    for dialect in ("postgresql", "sqlite"):
        data = fixture(dialect)
        for name, result in data["migrations"].items():
            if result == "ok":
                assert data["versions"][name] == [tables.HEADS[name]], (dialect, name)


def test_tables_are_created_as_cloudkittys_migrations_create_them(db_url):
    cloudkitty_db.create_cloudkitty_schema(db_url)
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as connection:
            dialect = cloudkitty_schema.DIALECTS[connection.dialect.name]
            reference = fixture(dialect)
            compared = []
            for tree, tree_tables in tables.TABLES.items():
                if reference["migrations"][tree] != "ok":
                    continue  # CloudKitty cannot migrate that tree there (§6 defect)
                names = [tree, *(t.name for t in tree_tables)]
                ours = cloudkitty_schema.reflect(connection, names)
                assert ours == {n: reference["tables"][n] for n in names}, tree
                compared.extend(names)
    finally:
        engine.dispose()
    assert {"storage_states_alembic", "cloudkitty_storage_states",
            "storage_scope_reprocessing_schedule"} <= set(compared)


@pytest.mark.parametrize("dialect", ["mariadb", "postgresql", "sqlite"])
def test_every_table_described_is_in_the_reference(dialect):
    """A table added to tables.py without a fixture would go unchecked."""
    reference = fixture(dialect)
    for tree, tree_tables in tables.TABLES.items():
        if reference["migrations"][tree] == "ok":
            assert {t.name for t in tree_tables} <= set(reference["tables"]), (dialect, tree)
