"""Tables of the ``sql`` storage (SQLAlchemy Core).

This module describes the schema at the *latest* migration; the migrations
in ``storage/migrations/versions`` create it (they do not import this module,
so an old migration never changes when a table here does). A test compares
the two (``test_models_match_migrations``).

Column conventions:

- datetimes are naive and mean UTC (``utils.to_naive_utc`` on the way in,
  ``utils.from_db`` on the way out); MySQL/MariaDB keep microseconds;
- quantities and prices are exact decimal strings (``utils.decimal_str``) in
  TEXT columns: no backend rounds them;
- ``groupby`` / ``metadata`` are JSON text with sorted keys;
- key strings (scope ids, usage types) compare and sort bytewise on every
  backend (collation ``C`` on PostgreSQL, ``utf8mb4_bin`` on MySQL/MariaDB),
  as in SQLite and Python, so ``P1`` and ``p1`` are two scopes everywhere
  and exports come out in the same order whatever the backend.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

#: whatever the database default, InnoDB (transactions) and utf8mb4
MYSQL_TABLE_ARGS = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}


def key_string(length: int = 255) -> sa.types.TypeEngine:
    """A VARCHAR that compares bytewise on every backend."""
    return (sa.String(length)
            .with_variant(postgresql.VARCHAR(length, collation="C"), "postgresql")
            .with_variant(mysql.VARCHAR(length, collation="utf8mb4_bin"),
                          "mysql", "mariadb"))


def utc_datetime() -> sa.types.TypeEngine:
    """A naive-UTC DATETIME; microseconds kept on MySQL/MariaDB too."""
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


#: One row per scope ever seen: the processing state and the last error.
scope_state = sa.Table(
    "scope_state", metadata,
    sa.Column("scope_id", key_string(), primary_key=True),
    #: start of the last committed period; NULL: nothing committed yet
    sa.Column("last_processed", utc_datetime(), nullable=True),
    #: compare-and-set token, +1 on every state change
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("last_error_kind", sa.String(32), nullable=True),
    sa.Column("last_error_at", utc_datetime(), nullable=True),
    sa.Column("last_commit_at", utc_datetime(), nullable=True),
    sa.Column("created_at", utc_datetime(), nullable=False),
    sa.Column("updated_at", utc_datetime(), nullable=False),
    **MYSQL_TABLE_ARGS,
)

#: One row per committed (scope, period), empty periods included: the
#: unique key is the database's own guard against rating a period twice.
rated_period = sa.Table(
    "rated_period", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
              primary_key=True, autoincrement=True),
    sa.Column("scope_id", key_string(), nullable=False),
    sa.Column("begin", utc_datetime(), nullable=False),
    sa.Column("end", utc_datetime(), nullable=False),
    sa.Column("points", sa.Integer, nullable=False),
    sa.Column("price", sa.Text, nullable=False),
    sa.Column("committed_at", utc_datetime(), nullable=False),
    sa.Column("worker", sa.String(255), nullable=False),
    sa.UniqueConstraint("scope_id", "begin"),
    **MYSQL_TABLE_ARGS,
)

#: One row per rated datapoint (the export record, CONTRACTS §5).
rated_data = sa.Table(
    "rated_data", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
              primary_key=True, autoincrement=True),
    sa.Column("scope_id", key_string(), nullable=False),
    sa.Column("begin", utc_datetime(), nullable=False),
    sa.Column("end", utc_datetime(), nullable=False),
    sa.Column("type", key_string(), nullable=False),
    sa.Column("unit", sa.String(255), nullable=False),
    sa.Column("qty", sa.Text, nullable=False),
    sa.Column("price", sa.Text, nullable=False),
    sa.Column("groupby", sa.Text, nullable=False),
    sa.Column("metadata", sa.Text, nullable=False),
    sa.Index(None, "scope_id", "begin", "type"),
    **MYSQL_TABLE_ARGS,
)

#: One row per reprocessing request and scope (migration 0002): the window
#: [begin, end) of period starts to re-rate, and the progress cursor
#: ``next_period`` that advances in the same transaction as each re-rated
#: period (``SQLStorage.commit_reprocessed_period``).
reprocess_task = sa.Table(
    "reprocess_task", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
              primary_key=True, autoincrement=True),
    sa.Column("scope_id", key_string(), nullable=False),
    sa.Column("begin", utc_datetime(), nullable=False),
    sa.Column("end", utc_datetime(), nullable=False),
    #: start of the next period to re-rate; == end when done
    sa.Column("next_period", utc_datetime(), nullable=False),
    sa.Column("total_periods", sa.Integer, nullable=False),
    sa.Column("done_periods", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    #: pending, running, done, failed
    sa.Column("state", sa.String(16), nullable=False),
    #: idempotency key: the client's request id, or a hash of the request
    sa.Column("request_key", key_string(128), nullable=False),
    sa.Column("created_at", utc_datetime(), nullable=False),
    sa.Column("updated_at", utc_datetime(), nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.UniqueConstraint("scope_id", "request_key"),
    sa.Index(None, "state", "scope_id"),
    **MYSQL_TABLE_ARGS,
)

#: Facts about the stored data as a whole (migration 0003), one row each:
#: ``period``, the [collect] period every state and rated row is aligned to.
processor_setting = sa.Table(
    "processor_setting", metadata,
    sa.Column("name", key_string(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
    sa.Column("updated_at", utc_datetime(), nullable=False),
    **MYSQL_TABLE_ARGS,
)
