"""The period of the stored data: processor_setting.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "processor_setting",
        sa.Column("name", sa.String(64)
                  .with_variant(postgresql.VARCHAR(64, collation="C"), "postgresql")
                  .with_variant(mysql.VARCHAR(64, collation="utf8mb4_bin"), "mysql", "mariadb"),
                  nullable=False),
        sa.Column("value", sa.String(255), nullable=False),
        sa.Column("updated_at", sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql",
                                                          "mariadb"), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_processor_setting"),
        mysql_engine="InnoDB", mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("processor_setting")
