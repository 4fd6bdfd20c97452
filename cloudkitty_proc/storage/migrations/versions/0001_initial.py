"""Initial schema: scope_state, rated_period, rated_data.

Revision ID: 0001
Revises:
Create Date: 2026-01-01 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_MYSQL = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}


def _key(length: int = 255):
    # bytewise comparison and ordering on every backend (see models.py)
    return (sa.String(length)
            .with_variant(postgresql.VARCHAR(length, collation="C"), "postgresql")
            .with_variant(mysql.VARCHAR(length, collation="utf8mb4_bin"),
                          "mysql", "mariadb"))


def _dt():
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _bigid():
    return sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "scope_state",
        sa.Column("scope_id", _key(), nullable=False),
        sa.Column("last_processed", _dt(), nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("last_error_kind", sa.String(32), nullable=True),
        sa.Column("last_error_at", _dt(), nullable=True),
        sa.Column("last_commit_at", _dt(), nullable=True),
        sa.Column("created_at", _dt(), nullable=False),
        sa.Column("updated_at", _dt(), nullable=False),
        sa.PrimaryKeyConstraint("scope_id", name="pk_scope_state"),
        **_MYSQL,
    )
    op.create_table(
        "rated_period",
        sa.Column("id", _bigid(), autoincrement=True, nullable=False),
        sa.Column("scope_id", _key(), nullable=False),
        sa.Column("begin", _dt(), nullable=False),
        sa.Column("end", _dt(), nullable=False),
        sa.Column("points", sa.Integer, nullable=False),
        sa.Column("price", sa.Text, nullable=False),
        sa.Column("committed_at", _dt(), nullable=False),
        sa.Column("worker", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rated_period"),
        sa.UniqueConstraint("scope_id", "begin",
                            name="uq_rated_period_scope_id_begin"),
        **_MYSQL,
    )
    op.create_table(
        "rated_data",
        sa.Column("id", _bigid(), autoincrement=True, nullable=False),
        sa.Column("scope_id", _key(), nullable=False),
        sa.Column("begin", _dt(), nullable=False),
        sa.Column("end", _dt(), nullable=False),
        sa.Column("type", _key(), nullable=False),
        sa.Column("unit", sa.String(255), nullable=False),
        sa.Column("qty", sa.Text, nullable=False),
        sa.Column("price", sa.Text, nullable=False),
        sa.Column("groupby", sa.Text, nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rated_data"),
        **_MYSQL,
    )
    op.create_index("ix_rated_data_scope_id_begin_type", "rated_data",
                    ["scope_id", "begin", "type"])


def downgrade() -> None:
    op.drop_index("ix_rated_data_scope_id_begin_type", table_name="rated_data")
    op.drop_table("rated_data")
    op.drop_table("rated_period")
    op.drop_table("scope_state")
