"""A database's tables, reflected into plain JSON data, to compare schemas.

Used by ``tools/cloudkitty_schema_reference.py`` (which records the schema
CloudKitty 25.0.0's own migrations create into
``tests/fixtures/cloudkitty_schema/<dialect>.json``) and by
``tests/functional/test_dropin_tables.py`` (which reflects the tables built
from ``cloudkitty_proc.dropin.tables`` the same way and compares).

What is kept per table: columns (name, type as the dialect spells it,
nullable, server default), the primary key's columns, unique constraints,
indexes and foreign keys (with their names), and on MariaDB the table
options and ``SHOW CREATE TABLE`` (without its ``AUTO_INCREMENT=n``
counter). Left out, as artefacts of how a table was created: PostgreSQL's
names of primary keys and id sequences (CloudKitty's batch migrations leave
``_alembic_tmp_...`` names there).
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa

DIALECTS = {"mysql": "mariadb", "postgresql": "postgresql", "sqlite": "sqlite"}


def _default(value: Any) -> Any:
    if value is None:
        return None
    text = str(value)
    if text.startswith("nextval("):
        return "nextval(<sequence>)"
    return text


def reflect(connection: sa.Connection, names: list[str]) -> dict[str, Any]:
    """{table: description} for the tables of ``names`` that exist."""
    inspector = sa.inspect(connection)
    dialect = connection.dialect
    out: dict[str, Any] = {}
    for name in names:
        if not inspector.has_table(name):
            continue
        table: dict[str, Any] = {
            "columns": [[c["name"], str(c["type"].compile(dialect=dialect)), c["nullable"],
                         _default(c.get("default"))]
                        for c in inspector.get_columns(name)],
            "primary_key": inspector.get_pk_constraint(name)["constrained_columns"],
            "unique": sorted([u["name"], u["column_names"]]
                             for u in inspector.get_unique_constraints(name)),
            "indexes": sorted([i["name"], i["column_names"], bool(i["unique"])]
                              for i in inspector.get_indexes(name)),
            "foreign_keys": sorted(
                [f["name"], f["constrained_columns"], f["referred_table"],
                 f["referred_columns"], (f.get("options") or {}).get("ondelete")]
                for f in inspector.get_foreign_keys(name)),
        }
        if dialect.name == "mysql":
            table["options"] = {k: v for k, v in sorted(inspector.get_table_options(name).items())}
            ddl = connection.exec_driver_sql(f"SHOW CREATE TABLE `{name}`").one()[1]
            table["show_create"] = re.sub(r" AUTO_INCREMENT=\d+", "", ddl)
        out[name] = table
    return out


def versions(connection: sa.Connection, names: list[str]) -> dict[str, list[str]]:
    """{version table: its revisions} for the version tables that exist."""
    inspector = sa.inspect(connection)
    return {name: sorted(r[0] for r in connection.exec_driver_sql(
                f"SELECT version_num FROM {name}"))
            for name in names if inspector.has_table(name)}
