"""The CloudKitty drop-in mode (``[cloudkitty_proc] mode = cloudkitty``).

cloudkitty_proc replaces ``cloudkitty-processor`` in an existing CloudKitty
25.0.0 deployment: it reads and writes CloudKitty's own tables (scope
states, reprocessing schedule) so that cloudkitty-api, Horizon and
``openstack rating …`` keep working unchanged. CloudKitty's tables are never
created, migrated or altered here: ``tables.py`` describes them as CloudKitty
25.0.0 leaves them and checks their alembic heads.
"""
