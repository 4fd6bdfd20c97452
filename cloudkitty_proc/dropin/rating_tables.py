"""CloudKitty 25.0.0's rating tables, as its migrations leave them (SQLAlchemy Core).

What the drop-in mode reads to rate (``cloudkitty_proc.dropin.rules``):
the module states and the rules that cloudkitty-api writes. cloudkitty_proc
never writes, creates or migrates these tables (the tests create them from
these definitions; the real ones come from ``cloudkitty-dbsync upgrade``).

Sources (CloudKitty 25.0.0): ``cloudkitty/db/sqlalchemy/models.py``
(``modules_state``), ``cloudkitty/rating/hash/db/sqlalchemy/models.py`` and
its alembic tree up to ``8a591f85865f`` (hashmap), the pyscripts models and
migrations up to ``c6e4cda29654``, and the columns both ``8a591f85865f``
and ``c6e4cda29654`` add through ``create_common_tables``
(``cloudkitty/rating/common/db/migrations.py``): ``created_at``, ``start``,
``end``, ``description``, ``deleted``, ``created_by``, ``updated_by``,
``deleted_by`` (and ``name`` on mappings). ``8a591f85865f`` also dropped the
unique constraints of ``hashmap_mappings``; ``c6e4cda29654`` the unique
constraint on ``pyscripts_scripts.name`` (except on SQLite).

Datetimes are naive; cloudkitty_proc reads them as UTC (deploy CloudKitty
in UTC: its API stores the host's local ``datetime.now()``). ``cost`` and
``level`` are DECIMAL columns read as Decimals, digit for digit (a cost set
from the CLI as ``1.1`` is stored, and priced, as
``1.1000000000000000888178419700``, as CloudKitty prices it).
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["RATING_TABLES", "hashmap_fields", "hashmap_groups", "hashmap_mappings",
           "hashmap_services", "hashmap_thresholds", "modules_state", "pyscripts_scripts",
           "rating_metadata"]

rating_metadata = sa.MetaData()

_MYSQL = {"mysql_charset": "utf8", "mysql_engine": "InnoDB"}


#: ``cost`` is NOT NULL in CloudKitty's models but nullable in its
#: databases: migrations Ifbf5b2515c7 and 4e0232ce alter its type without
#: ``existing_nullable``, which drops NOT NULL on MariaDB (checked against
#: ``cloudkitty-dbsync upgrade`` by tests/functional/test_dropin_rules_api.py).
#: A NULL cost fails the rating of every period, as in CloudKitty.
_COST_NULLABLE = True


def _map_type(name: str) -> sa.Enum:
    # the enum type names of CloudKitty's models (PostgreSQL creates types)
    return sa.Enum("flat", "rate", name=name, create_constraint=True)


def _rule_refs(table: str) -> list[sa.Column]:
    """service_id | field_id, group_id, tenant_id of mappings and thresholds."""
    return [
        sa.Column("service_id", sa.Integer,
                  sa.ForeignKey("hashmap_services.id", ondelete="CASCADE",
                                name=f"fk_{table}_service_id_hashmap_services"),
                  nullable=True),
        sa.Column("field_id", sa.Integer,
                  sa.ForeignKey("hashmap_fields.id", ondelete="CASCADE",
                                name=f"fk_{table}_field_id_hashmap_fields"),
                  nullable=True),
        sa.Column("group_id", sa.Integer,
                  sa.ForeignKey("hashmap_groups.id", ondelete="SET NULL",
                                name=f"fk_{table}_group_id_hashmap_groups"),
                  nullable=True),
        sa.Column("tenant_id", sa.String(255), nullable=True),
    ]


def _audit_columns() -> list[sa.Column]:
    """``create_common_tables``: validity window, soft deletion and audit."""
    return [
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
        sa.Column("start", sa.DateTime, nullable=False, server_default=sa.func.now()),
        sa.Column("end", sa.DateTime, nullable=True),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("deleted", sa.DateTime, nullable=True),
        sa.Column("created_by", sa.String(32), nullable=False),
        sa.Column("updated_by", sa.String(32), nullable=True),
        sa.Column("deleted_by", sa.String(32), nullable=True),
    ]


#: Which rating modules run, and in which order (highest priority first).
#: Written by ``PUT /v1/rating/modules/<m>`` and ``/v2/rating/modules/<m>``.
#: A module without a row is disabled with priority 1; a NULL or 0 priority
#: reads as 1 (``ModuleInfo.get_priority``).
modules_state = sa.Table(
    "modules_state", rating_metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("state", sa.Boolean, nullable=False, default=False),
    sa.Column("priority", sa.Integer, nullable=True, default=1),
    mysql_engine="InnoDB",
)

#: A usage type rated by hashmap (``name`` = the metric's alt_name/type).
hashmap_services = sa.Table(
    "hashmap_services", rating_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("service_id", sa.String(36), nullable=False, unique=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    **_MYSQL,
)

#: A groupby/metadata key of a service whose values field rules look at.
hashmap_fields = sa.Table(
    "hashmap_fields", rating_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("field_id", sa.String(36), nullable=False, unique=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("service_id", sa.Integer,
              sa.ForeignKey("hashmap_services.id", ondelete="CASCADE"), nullable=False),
    sa.UniqueConstraint("service_id", "name", name="uniq_field_per_service"),
    **_MYSQL,
)

#: A group of rules combined into one price term (``rate * flat * qty``).
hashmap_groups = sa.Table(
    "hashmap_groups", rating_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("group_id", sa.String(36), nullable=False, unique=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    **_MYSQL,
)

#: Service mappings (``service_id``, no value: '' from the API's JSON, NULL
#: from the CLI) and field mappings (``field_id`` and ``value``); active
#: for a period starting at T when ``start <= T AND (end > T OR end IS
#: NULL) AND deleted IS NULL`` (deleting through the API sets ``deleted``).
hashmap_mappings = sa.Table(
    "hashmap_mappings", rating_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("mapping_id", sa.String(36), nullable=False, unique=True),
    sa.Column("value", sa.String(255), nullable=True),
    sa.Column("cost", sa.Numeric(40, 28), nullable=_COST_NULLABLE),
    sa.Column("map_type", _map_type("enum_map_type"), nullable=False),
    *_rule_refs("hashmap_mappings"),
    sa.Column("name", sa.String(32), nullable=False),
    *_audit_columns(),
    **_MYSQL,
)

#: Service thresholds (compare the quantity) and field thresholds (compare
#: the field's value); no validity window, deleted for real.
hashmap_thresholds = sa.Table(
    "hashmap_thresholds", rating_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("threshold_id", sa.String(36), nullable=False, unique=True),
    sa.Column("level", sa.Numeric(20, 8), nullable=True),
    sa.Column("cost", sa.Numeric(40, 28), nullable=_COST_NULLABLE),
    sa.Column("map_type", _map_type("enum_hashmap_type"), nullable=False),
    *_rule_refs("hashmap_thresholds"),
    sa.UniqueConstraint("level", "field_id", "tenant_id", name="uniq_field_threshold"),
    sa.UniqueConstraint("level", "service_id", "tenant_id", name="uniq_service_threshold"),
    **_MYSQL,
)

#: Python scripts (``data``: the source, zlib-compressed; ``checksum``: its
#: sha512), run in id order on each frame with a global ``data`` dict;
#: active with the same start/end/deleted rule as mappings.
pyscripts_scripts = sa.Table(
    "pyscripts_scripts", rating_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("script_id", sa.String(36), nullable=False, unique=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    # NULL allowed in fact: migration 75c205f6f1a2 widened it without
    # existing_nullable, which drops NOT NULL on MariaDB
    sa.Column("checksum", sa.String(128), nullable=True),
    *_audit_columns(),
    **_MYSQL,
)

#: every table above, by alembic tree (for a schema check at start)
RATING_TABLES: dict[str, tuple[sa.Table, ...]] = {
    "cloudkitty_alembic": (modules_state,),
    "hashmap_alembic": (hashmap_services, hashmap_fields, hashmap_groups,
                        hashmap_mappings, hashmap_thresholds),
    "pyscripts_alembic": (pyscripts_scripts,),
}
