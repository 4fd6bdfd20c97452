"""Alembic environment of the ``sql`` storage.

Run through ``SQLStorage.upgrade()`` (``cloudkitty-proc-manage db upgrade``),
which passes its own connection in ``config.attributes["connection"]``
inside an open transaction; with ``sqlalchemy.url`` only (e.g. the alembic
command line with a hand-made config) a NullPool engine is used instead.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from cloudkitty_proc.storage import models

config = context.config
target_metadata = models.metadata


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things: later migrations use batch mode
        render_as_batch=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"),
               literal_binds=True,
               dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: sa.Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url"),
                              poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
