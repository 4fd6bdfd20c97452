"""The CloudKitty drop-in mode (``[cloudkitty_proc] mode = cloudkitty``).

cloudkitty_proc replaces ``cloudkitty-processor`` in an existing CloudKitty
25.0.0 deployment, so that cloudkitty-api, Horizon and ``openstack rating
…`` keep working unchanged. One module per concern: ``tables.py``
(CloudKitty's state and reprocessing tables as CloudKitty 25.0.0 leaves them,
and their alembic heads; never created, migrated or altered here),
``scope_rows.py``, ``states.py``, ``tasks.py``, ``notes.py`` and
``storage.py`` (scope states and reprocessing tasks in those tables),
``rpc.py`` and ``rpc_messages.py`` (CloudKitty's RPC target and message
shapes), ``rating_tables.py``, ``rules_fingerprint.py``, ``rules_load.py``
and ``rules.py`` (the rating chain read live from CloudKitty's database),
``config_compat.py`` (the options of ``cloudkitty.conf``: CloudKitty's
defaults, and each option classified against ``cloudkitty_options.json``).
"""
