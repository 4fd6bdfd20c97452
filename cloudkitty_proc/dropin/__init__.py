"""The CloudKitty drop-in mode (``[cloudkitty_proc] mode = cloudkitty``).

What lets cloudkitty_proc replace ``cloudkitty-processor`` in a CloudKitty
25 deployment: its RPC target (``rpc.py``), scope states and reprocessing
tasks in its tables, rules read from its database. See
doc/source/cloudkitty.rst and CLOUDKITTY-DROPIN.md.
"""
