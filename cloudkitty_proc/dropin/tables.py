"""CloudKitty 25.0.0's tables, as its migrations leave them (SQLAlchemy Core).

What cloudkitty_proc reads and writes in CloudKitty's database in the
drop-in mode, described on a MetaData of their own (never ``create_all``'d
by cloudkitty_proc: CloudKitty's tables are created and migrated by
CloudKitty's tools only; the tests create them from these definitions).

Checked against the real migrations: ``cloudkitty-dbsync upgrade`` and the
storage-state migrations of CloudKitty 25.0.0 (``cloudkitty-storage-init``)
run on MariaDB 10.11, PostgreSQL and SQLite, the result reflected into
``tests/fixtures/cloudkitty_schema/*.json`` (``tools/cloudkitty_schema_reference.py``),
which ``tests/functional/test_dropin_tables.py`` compares with these tables.

Each CloudKitty alembic tree keeps its revision in its own version table;
``HEADS`` holds the head of each at 25.0.0 (from the migrations:
``cloudkitty/db/sqlalchemy/alembic`` → ``cloudkitty_alembic``,
``cloudkitty/storage_state/alembic`` → ``storage_states_alembic``,
``cloudkitty/rating/hash/db/sqlalchemy/alembic`` → ``hashmap_alembic``,
``cloudkitty/rating/pyscripts/db/sqlalchemy/alembic`` → ``pyscripts_alembic``).
``check_schema`` refuses a database where a head differs or one of the
tables used here is missing (``SchemaError``, one line naming the version
table, the expected head and CloudKitty's command).

Datetimes in these tables are naive and mean UTC, as CloudKitty stores them
(``tzutils.local_to_utc(..., naive=True)``).
"""

from __future__ import annotations

import sqlalchemy as sa

from cloudkitty_proc.dropin.rating_tables import RATING_TABLES
from cloudkitty_proc.exceptions import SchemaError

__all__ = ["CLOUDKITTY_VERSION", "HEADS", "TABLES", "check_schema", "metadata",
           "reprocessing_schedule", "storage_states", "version_table"]

#: the CloudKitty release these definitions and heads are taken from
CLOUDKITTY_VERSION = "25.0.0"

#: version table -> alembic head at CloudKitty 25.0.0
HEADS: dict[str, str] = {
    "cloudkitty_alembic": "385e33fef139",
    "storage_states_alembic": "9feccd32",
    "hashmap_alembic": "8a591f85865f",
    "pyscripts_alembic": "c6e4cda29654",
}

#: CloudKitty's command that brings each version table to its head
UPGRADE_COMMANDS: dict[str, str] = {
    "cloudkitty_alembic": "cloudkitty-dbsync upgrade",
    "storage_states_alembic": "cloudkitty-storage-init",
    "hashmap_alembic": "cloudkitty-dbsync upgrade",
    "pyscripts_alembic": "cloudkitty-dbsync upgrade",
}

metadata = sa.MetaData()

#: One row per (identifier, scope_key, fetcher, collector): the scope's
#: processing state (``cloudkitty/storage_state/models.py``
#: ``IdentifierState``; migrations c14eea9d3cc1 .. 4d69395f). Rows written
#: by CloudKitty's ``create_scope`` before 25.0.0's second period have NULL
#: scope_key, fetcher and collector ("legacy" rows, adopted by the next
#: processor that finds them). ``last_processed_timestamp`` is the start of
#: the last rated period. The MariaDB table has the database's default
#: charset: migration 4d69395f re-creates it without one.
storage_states = sa.Table(
    "cloudkitty_storage_states", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("identifier", sa.String(256), nullable=False),
    sa.Column("scope_key", sa.String(40), nullable=True),
    sa.Column("fetcher", sa.String(40), nullable=True),
    sa.Column("collector", sa.String(40), nullable=True),
    sa.Column("last_processed_timestamp", sa.DateTime, nullable=False),
    sa.Column("scope_activation_toggle_date", sa.DateTime, nullable=False,
              server_default=sa.func.now()),
    sa.Column("active", sa.Boolean, nullable=False, default=True),
    sa.UniqueConstraint("identifier", "scope_key", "collector", "fetcher",
                        name="uq_cloudkitty_storage_states_identifier"),
    mysql_engine="InnoDB",
)

#: One row per scope of a ``POST /v2/task/reprocesses`` request
#: (``ReprocessingScheduler``; migration 9feccd32): re-rate the periods
#: starting from ``start_reprocess_time`` to ``end_reprocess_time``, both
#: INCLUSIVE; ``current_reprocess_time`` is the start of the last period
#: re-rated (NULL: none yet). Unfinished: current IS NULL OR current < end.
reprocessing_schedule = sa.Table(
    "storage_scope_reprocessing_schedule", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("identifier", sa.String(256), nullable=False),
    sa.Column("start_reprocess_time", sa.DateTime, nullable=False),
    sa.Column("end_reprocess_time", sa.DateTime, nullable=False),
    sa.Column("current_reprocess_time", sa.DateTime, nullable=True),
    sa.Column("reason", sa.Text, nullable=False),
    mysql_charset="utf8", mysql_engine="InnoDB",
)

#: version table -> the CloudKitty tables of that tree that cloudkitty_proc
#: uses (each must exist; the rating tables join here as they are used)
TABLES: dict[str, tuple[sa.Table, ...]] = {
    "cloudkitty_alembic": (),
    "storage_states_alembic": (storage_states, reprocessing_schedule),
    "hashmap_alembic": (),
    "pyscripts_alembic": (),
}


def version_table(name: str, meta: sa.MetaData | None = None) -> sa.Table:
    """An alembic version table as alembic creates it (for the tests that
    stamp a database; cloudkitty_proc only reads these)."""
    return sa.Table(name, meta if meta is not None else sa.MetaData(),
                    sa.Column("version_num", sa.String(32), nullable=False),
                    sa.PrimaryKeyConstraint("version_num", name=f"{name}_pkc"))


def _problems(connection: sa.Connection) -> list[str]:
    inspector = sa.inspect(connection)
    problems = []
    for name, head in HEADS.items():
        hint = (f"run CloudKitty {CLOUDKITTY_VERSION}'s `{UPGRADE_COMMANDS[name]}` "
                "(cloudkitty_proc never migrates CloudKitty's tables)")
        if not inspector.has_table(name):
            problems.append(f"CloudKitty's version table {name} is missing (expected head "
                            f"{head}): is [database] connection CloudKitty's database? "
                            f"{hint}")
            continue
        found = sorted(r[0] for r in connection.execute(
            sa.text(f"SELECT version_num FROM {name}")))  # noqa: S608 - fixed names
        if found != [head]:
            shown = ", ".join(found) or "no revision"
            problems.append(f"CloudKitty's {name} is at {shown}, expected head {head} "
                            f"(CloudKitty {CLOUDKITTY_VERSION}): {hint}")
            continue
        for table in TABLES[name] + RATING_TABLES.get(name, ()):
            if not inspector.has_table(table.name):
                problems.append(f"CloudKitty's table {table.name} is missing although "
                                f"{name} is at head {head}: {hint}")
    return problems


def check_schema(connection: sa.Connection) -> None:
    """SchemaError (one line) unless every CloudKitty version table is at
    its 25.0.0 head and every table used here exists. Reads only."""
    problems = _problems(connection)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise SchemaError(problems[0] + more)
