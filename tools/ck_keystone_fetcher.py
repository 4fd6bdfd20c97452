"""Prints the scopes CloudKitty 25.0.0's own KeystoneFetcher returns.

Run with the python of tools/cloudkitty_venv.py's virtualenv (never
imported by cloudkitty_proc or its tests: CloudKitty's oslo.config options
would clash with ours)::

    <venv>/bin/python tools/ck_keystone_fetcher.py cloudkitty.conf

``cloudkitty.conf`` holds a ``[fetcher_keystone]`` section (and the
``auth_section`` it names), as for ``cloudkitty-processor``. Output, one
JSON object on stdout: for each combination of ``ignore_disabled_tenants``
and ``ignore_rating_role`` (keys ``"<disabled>,<role>"``, e.g.
``"False,True"``), the sorted list of ``get_tenants()``.
"""

import itertools
import json
import sys

from oslo_config import cfg

CONF = cfg.CONF


def main():
    CONF(["--config-file", sys.argv[1]], project="cloudkitty", default_config_files=[])
    # imported once the files are read, as cloudkitty-processor does (its
    # stevedore import of the plugin): keystoneauth1 then registers
    # auth_type in the group auth_section names
    from cloudkitty.fetcher import keystone

    fetcher = keystone.KeystoneFetcher()
    out = {}
    for disabled, role in itertools.product((False, True), repeat=2):
        CONF.set_override("ignore_disabled_tenants", disabled, "fetcher_keystone")
        CONF.set_override("ignore_rating_role", role, "fetcher_keystone")
        out[f"{disabled},{role}"] = sorted(fetcher.get_tenants())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
