"""The tooz backends of the scope locks: ``file`` (one host), ``redis`` and
``etcd3+http`` (several hosts; etcd from the Debian package
``etcd-server``, started by the ``etcd_url`` fixture on loopback ports).

For each: a --oneshot run with two workers rates every (scope, period)
exactly once, and the lock of a worker killed with SIGKILL is free again
when its lease ends (at once for ``file``: the lock dies with the process).
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
import uuid

import pytest

from cloudkitty_proc.storage.sql import SQLStorage
from tests import daemon, datagen
from tests.chaos import helpers
from tests.fakes.prometheus import DatasetPrometheus

LEASE = 3  # lock_timeout of the redis and etcd URLs, seconds


@pytest.fixture(params=["file", "redis", "etcd3+http"])
def coordination_url(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/locks"
    if request.param == "redis":
        return helpers.redis_coordination(request.getfixturevalue("redis_url"), LEASE)
    return f"{request.getfixturevalue('etcd_url')}?lock_timeout={LEASE}"


def test_oneshot_two_workers_exactly_once(tmp_path, sqlite_url, coordination_url):
    ds = datagen.generate(n_scopes=6, hours=12, seed=61, scope_prefix="tooz-")
    om = tmp_path / "usage.om"
    om.write_text(ds.openmetrics)
    metrics_yml = tmp_path / "metrics.yml"
    metrics_yml.write_text(datagen.METRICS_YML)
    # 70 ms per query, 2 in flight per worker: both workers get a share
    with DatasetPrometheus(om, metrics_yml, delay=0.07) as prom:
        conf = helpers.prepare(tmp_path, sqlite_url, ds, workers=2, collector="prometheus",
                               extra=helpers.ini(f"""
            [orchestrator]
            coordination_url = {coordination_url}
            max_threads = 2
            """, helpers.prometheus_collector_conf(prom.url)))
        daemon.manage(conf, "db", "upgrade")
        proc = daemon.run_oneshot(conf, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    problems = datagen.check_export(ds, daemon.export(conf))
    assert not problems, "\n".join(problems)
    storage = SQLStorage(url=sqlite_url)
    try:
        periods = list(storage.iter_periods())
    finally:
        storage.close()
    assert len(periods) == len({(p.scope_id, p.begin) for p in periods}) == 6 * 12
    assert set(collections.Counter(p.worker for p in periods)) == {"testhost-0", "testhost-1"}


_HOLDER = """
import sys, time, warnings
warnings.filterwarnings("ignore")
from cloudkitty_proc.leases import start_coordinator
from cloudkitty_proc import conf as ckconf
from oslo_config import cfg
conf = cfg.ConfigOpts()
ckconf.register_opts(conf)
conf([], default_config_files=[])
conf.set_override("coordination_url", sys.argv[1], "orchestrator")
coord = start_coordinator(conf, "holder")
lock = coord.get_lock(b"ckp-probe")  # referenced: a file lock dies with its object
assert lock.acquire(blocking=False)
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_of_a_killed_holder_frees_when_its_lease_ends(coordination_url):
    from oslo_config import cfg

    from cloudkitty_proc import conf as ckconf
    from cloudkitty_proc.leases import start_coordinator

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, coordination_url],
                              stdout=subprocess.PIPE, text=True, cwd=daemon.REPO,
                              env=daemon._env())
    conf = cfg.ConfigOpts()
    ckconf.register_opts(conf)
    conf([], default_config_files=[])
    conf.set_override("coordination_url", coordination_url, "orchestrator")
    coord = None
    try:
        assert holder.stdout.readline().strip() == "locked"
        coord = start_coordinator(conf, f"probe-{uuid.uuid4().hex[:6]}")
        lock = coord.get_lock(b"ckp-probe")
        assert not lock.acquire(blocking=False)  # held
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        t0 = time.monotonic()
        while not lock.acquire(blocking=False):
            assert time.monotonic() - t0 < LEASE + 5, "the lock never came free"
            time.sleep(0.05)
        freed_after = time.monotonic() - t0
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        if coord is not None:
            coord.stop()
    print(f"\n{coordination_url.split(':', 1)[0]}: lock of a SIGKILLed holder free "
          f"after {freed_after:.2f} s")
    if coordination_url.startswith("file://"):
        assert freed_after < 0.5, freed_after
    else:
        # the lease was renewed every LEASE / 2 s until the kill
        assert 0.5 <= freed_after <= LEASE + 1.5, freed_after
