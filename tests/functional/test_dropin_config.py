"""A real cloudkitty.conf (the one the reference stack gives CloudKitty,
tests/cloudkitty_conf.py) drives the commands in the drop-in mode, with an
option CloudKitty has and we do not, unknown ones, and CloudKitty's
``max_threads``: ``cloudkitty-proc-manage check`` prints the
classification, the daemon logs it once at start (one INFO line, a WARNING
per unknown option) and rates into CloudKitty's tables on MariaDB and a
real InfluxDB, from a real Prometheus. ``[storage] version = 1`` is
refused with one line. The committed list of CloudKitty's options is what
tools/cloudkitty_options.py collects from CloudKitty 25.0.0's venv.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests import daemon, datagen
from tests.cloudkitty_conf import build_conf, render_conf
from tests.cloudkitty_db import create_cloudkitty_schema, states_t
from tests.cloudkitty_stack import cloudkitty_venv  # noqa: F401 (fixture)
from tests.prometheus_server import running_prometheus

pytestmark = pytest.mark.service

UNKNOWN = {"collect": {"perod": 600}, "no_such_section": {"foo": 1}}
NO_EFFECT_LINE = (
    "CloudKitty 25.0.0 options accepted, no effect in cloudkitty-proc: "
    "[DEFAULT] api_paste_config (cloudkitty-api's), auth_strategy (cloudkitty-api's); "
    "[api] (cloudkitty-api's) port; [keystone_authtoken] (cloudkitty-api's) auth_url; "
    "[orchestrator] max_workers_reprocessing (reprocessing runs in the same workers); "
    "[oslo_policy] (cloudkitty-api's) policy_file")


@pytest.fixture(scope="module")
def dataset():
    return datagen.generate(n_scopes=2, hours=3, seed=11, scope_prefix="cfg-")


@pytest.fixture(scope="module")
def prom_url(dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("prom")
    om = work / "usage.om"
    om.write_text(dataset.openmetrics)
    with running_prometheus(om, work) as url:
        yield url


def write_conf(work: Path, ds, *, db_url: str, prometheus_url: str, influx=("127.0.0.1", 8086),
               influx_database: str = "ck", extra: dict | None = None) -> Path:
    """cloudkitty.conf as the reference stack writes it, in the drop-in mode."""
    (work / "metrics.yml").write_text(datagen.METRICS_YML)
    (work / "state").mkdir(exist_ok=True)
    ours = {"cloudkitty_proc": {"mode": "cloudkitty"},
            "DEFAULT": {"state_path": work / "state", "log_file": work / "ckp.log"},
            "collect": {"begin": ds.begin.isoformat(), "end": ds.end.isoformat()},
            "orchestrator": {"max_workers": 2, "max_threads": 7},
            "api": {"port": 8889},
            "keystone_authtoken": {"auth_url": "http://keystone.example:5000"}}
    for section, options in (extra or {}).items():
        ours.setdefault(section, {}).update(options)
    sections = build_conf(
        work, name="ckp-cfg", db_url=db_url, transport_url=None, influx_host=influx[0],
        influx_port=influx[1], influx_database=influx_database, prometheus_url=prometheus_url,
        scopes=ds.scopes, fetcher_metric=None, period=3600, wait_periods=2, extra=ours)
    path = work / "cloudkitty.conf"
    path.write_text(render_conf(sections))
    return path


@pytest.fixture
def deployment(tmp_path, dataset, prom_url, mysql_url, influxdb_database):
    """CloudKitty's database (tables at the 25.0.0 heads) and InfluxDB
    database, and its cloudkitty.conf with our extras."""
    server, database = influxdb_database
    create_cloudkitty_schema(mysql_url)
    conf = write_conf(tmp_path, dataset, db_url=mysql_url, prometheus_url=prom_url,
                      influx=(server.host, server.port), influx_database=database,
                      extra=UNKNOWN)
    daemon.manage(conf, "db", "upgrade")
    return conf, mysql_url


def unknown_lines(conf: Path) -> list[str]:
    return [f"{conf}: [collect] perod: unknown option, ignored (did you mean period?)",
            f"{conf}: [no_such_section] foo: unknown option, ignored"]


def test_check_prints_the_classification(deployment):
    conf, _ = deployment
    proc = daemon.manage(conf, "check")
    out = proc.stdout.splitlines()
    assert out[0] == NO_EFFECT_LINE
    assert out[-1].startswith("ok: 3 metric definitions")
    assert proc.stderr.splitlines() == [f"warning: {line}" for line in unknown_lines(conf)]


def test_the_daemon_logs_it_once_at_start_and_rates(deployment, dataset):
    conf, db_url = deployment
    proc = daemon.run_oneshot(conf)
    log = (conf.parent / "ckp.log").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr + log
    lines = log.splitlines()
    info = [line for line in lines if "accepted, no effect in cloudkitty-proc" in line]
    assert len(info) == 1 and " INFO " in info[0] and info[0].endswith(NO_EFFECT_LINE), info
    for expected in unknown_lines(conf):
        found = [line for line in lines if line.endswith(expected)]
        assert len(found) == 1 and " WARNING " in found[0], (expected, found)
    # the conf drove a real run: CloudKitty's state rows show the last period
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as c:
            rows = c.execute(sa.select(states_t.c.identifier,
                                       states_t.c.last_processed_timestamp)).all()
    finally:
        engine.dispose()
    last = (dataset.end - datetime.timedelta(hours=1)).replace(tzinfo=None)
    assert sorted(rows) == [(scope, last) for scope in dataset.scopes]


@pytest.mark.parametrize("command", ["check", "daemon"])
def test_storage_version_1_is_refused(tmp_path, dataset, command):
    conf = write_conf(tmp_path, dataset, db_url=f"sqlite:///{tmp_path}/ck.sqlite",
                      prometheus_url="http://127.0.0.1:9", extra={"storage": {"version": 1}})
    if command == "check":
        proc = daemon.manage(conf, "check", check=False)
    else:
        proc = daemon.run_oneshot(conf)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {conf}: [storage] version = 1: v1 storage is not supported (only "
        "CloudKitty's v2 storage, version = 2)"]


def test_the_cloudkitty_option_list_is_up_to_date(cloudkitty_venv):  # noqa: F811
    proc = subprocess.run([sys.executable, "tools/cloudkitty_options.py", "--check"],
                          capture_output=True, text=True, timeout=300, cwd=daemon.REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "cloudkitty_proc/dropin/cloudkitty_options.json is up to date"
