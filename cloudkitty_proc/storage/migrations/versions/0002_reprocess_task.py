"""Reprocessing tasks: reprocess_task.

Revision ID: 0002
Revises: 0001
Create Date: 2026-02-01 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql

revision = "0002"
down_revision = "0001"
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


def upgrade() -> None:
    op.create_table(
        "reprocess_task",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("scope_id", _key(), nullable=False),
        sa.Column("begin", _dt(), nullable=False),
        sa.Column("end", _dt(), nullable=False),
        sa.Column("next_period", _dt(), nullable=False),
        sa.Column("total_periods", sa.Integer, nullable=False),
        sa.Column("done_periods", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("request_key", _key(128), nullable=False),
        sa.Column("created_at", _dt(), nullable=False),
        sa.Column("updated_at", _dt(), nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_reprocess_task"),
        sa.UniqueConstraint("scope_id", "request_key",
                            name="uq_reprocess_task_scope_id_request_key"),
        **_MYSQL,
    )
    op.create_index("ix_reprocess_task_state_scope_id", "reprocess_task",
                    ["state", "scope_id"])


def downgrade() -> None:
    op.drop_index("ix_reprocess_task_state_scope_id", table_name="reprocess_task")
    op.drop_table("reprocess_task")
