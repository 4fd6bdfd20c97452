"""Alembic migrations of the ``sql`` storage.

Configured from code (``cloudkitty_proc.storage.sql.alembic_config``); no
alembic.ini is needed. To write a new migration::

    python -c "from alembic import command; \
from cloudkitty_proc.storage.sql import alembic_config; \
command.revision(alembic_config('sqlite:////tmp/x.sqlite'), 'what it does', \
rev_id='0002')"

then edit ``versions/0002_*.py`` by hand (keep the migration independent of
``storage/models.py``) and update ``models.py`` to match:
``tests/functional/test_storage_sql.py::test_models_match_migrations`` fails
until both describe the same schema.
"""
