"""The master process validates everything but never loads eventlet or
tooz (DESIGN: no eventlet before the fork)."""

from __future__ import annotations

import subprocess
import sys

from tests import daemon, datagen

PROBE = """
import sys
from cloudkitty_proc.cli import common, daemon
from cloudkitty_proc.dropin import config_compat
common.parse_args(["--config-file", sys.argv[1]], "cloudkitty-proc", daemon.CLI_OPTS)
config_compat.log_at_start(common.CONF)
common.validate_all()
daemon._check_storage()
bad = [m for m in ("eventlet", "tooz", "oslo_messaging") if m in sys.modules]
print("LOADED:", ",".join(bad))
"""


def test_master_validation_loads_no_eventlet(tmp_path, sqlite_url):
    conf = daemon.write_config(tmp_path, db_url=sqlite_url, scopes=["p1"],
                               begin="2026-01-01T00:00:00Z", end="2026-01-01T02:00:00Z",
                               metrics_yml=datagen.METRICS_YML, collector="prometheus")
    daemon.manage(conf, "db", "upgrade")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(conf)], capture_output=True,
                          text=True, timeout=60, cwd=daemon.REPO, env=daemon._env())
    assert proc.returncode == 0, proc.stderr
    assert "LOADED: \n" in proc.stdout, proc.stdout
