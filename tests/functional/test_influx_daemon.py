"""The daemon with ``[storage] backend = influxdb`` on a real InfluxDB 1.x
(issue 17, acceptance items 1 and 2).

Generated usage (tests/datagen.py, 10 scopes × 24 periods × 3 metrics),
priced by hashmap rules, is rated twice: by the ``sql`` backend (the
reference) and by the ``influxdb`` backend (states in SQLite, points in a
private influxd). The points InfluxDB holds, read with InfluxQL through its
HTTP API (``SELECT * FROM dataframes``, not through our store), must be the
reference's rows: every (scope, period, type, groupby) exactly once, with
equal qty and price (as floats: the layout keeps floats). The second run
SIGKILLs workers over and over while they rate, as the chaos suite does:
at random from outside, and inside the commit (points written, SQL
transaction not committed) through the ``during_commit`` fault point.
"""

from __future__ import annotations

import datetime
import decimal
import random
import time

import psutil
import pytest

from cloudkitty_proc.storage.sql import SQLStorage
from tests import daemon, datagen
from tests.chaos import helpers
from tests.fakes.prometheus import DatasetPrometheus

N_SCOPES = 10
HOURS = 24

RULES_YML = """\
hashmap:
  services:
    instance:
      fields:
        flavor_name:
          mappings:
            - {value: m1.tiny, cost: "0.01", type: flat}
            - {value: m1.small, cost: "0.02", type: flat}
            - {value: m1.large, cost: "0.085", type: flat}
    volume.size:
      mappings:
        - {cost: "0.0015", type: rate}
    requests_count:
      mappings:
        - {cost: "0.0001", type: rate}
"""


def _iso(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns // 10**9, datetime.timezone.utc).isoformat()


def _key(scope: str, begin: str, usage_type: str, groupby: dict) -> tuple:
    return (scope, begin, usage_type, tuple(sorted(groupby.items())))


def influx_rows(server, database: str) -> tuple[dict, list]:
    """(key -> (unit, qty, price, metadata), every key in order of the
    points) of the points InfluxDB holds, rebuilt as CloudKitty's API
    rebuilds them (groupby and metadata from their ``|`` key lists)."""
    rows, keys = {}, []
    for p in server.points("SELECT * FROM dataframes", database):
        assert "__ck_dup" not in p or p["__ck_dup"] is None, p
        groupby = {k: p[k] for k in p["groupby"].split("|") if k}
        metadata = {k: p[k] for k in p["metadata"].split("|") if k}
        key = _key(p["project_id"], _iso(p["time"]), p["type"], groupby)
        assert p["__ck_collect_period"] == 3600, p
        keys.append(key)
        rows[key] = (p["unit"], p["qty"], p["price"], metadata)
    return rows, keys


def export_rows(records: list[dict]) -> tuple[dict, list]:
    """The same from ``cloudkitty-proc-manage export`` records, numbers as
    the floats the InfluxDB layout keeps."""
    rows, keys = {}, []
    for r in records:
        key = _key(r["scope_id"], r["begin"], r["type"], r["groupby"])
        keys.append(key)
        rows[key] = (r["unit"], float(decimal.Decimal(r["qty"])),
                     float(decimal.Decimal(r["price"])), r["metadata"])
    return rows, keys


@pytest.fixture(scope="module")
def dataset():
    return datagen.generate(n_scopes=N_SCOPES, hours=HOURS, seed=17, scope_prefix="ifx-",
                            empty_scope_hours={(2, 7)})


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """The rows of the ``sql`` backend for the dataset (file collector)."""
    work = tmp_path_factory.mktemp("sql-reference")
    conf = _conf(work, f"sqlite:///{work}/ckp.sqlite", dataset)
    daemon.manage(conf, "db", "upgrade")
    proc = daemon.run_oneshot(conf)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = daemon.export(conf)
    assert not datagen.check_export(dataset, records)
    rows, keys = export_rows(records)
    assert len(keys) == len(rows) == len(dataset.expected)
    assert sum(price for _u, _q, price, _m in rows.values()) > 0
    return rows


def _conf(work, db_url, ds, *, extra="", collector="file"):
    """A config of two workers rating ``ds`` with RULES_YML."""
    return daemon.write_config(
        work, db_url=db_url, scopes=ds.scopes, begin=ds.begin.isoformat(),
        end=ds.end.isoformat(), metrics_yml=datagen.METRICS_YML, om_path=_om(work, ds),
        workers=2, collector=collector, processors="hashmap", rules_yml=RULES_YML,
        extra=extra)


def _om(work, ds):
    om = work / "usage.om"
    if not om.exists():
        om.write_text(ds.openmetrics)
    return om


def _influx_extra(server, database: str) -> str:
    return helpers.ini(f"""
        [storage]
        backend = influxdb
        [storage_influxdb]
        host = {server.host}
        port = {server.port}
        database = {database}
        """)


def _check(conf, server, database, ds, reference):
    """The points in InfluxDB, the period records and our export all equal
    the reference, every key once."""
    rows, keys = influx_rows(server, database)
    assert len(keys) == len(set(keys)), "a (scope, period, type, groupby) stored twice"
    missing = set(reference) - set(rows)
    extra = set(rows) - set(reference)
    assert not missing and not extra, (
        f"{len(missing)} missing, e.g. {sorted(missing)[:2]}; "
        f"{len(extra)} unexpected, e.g. {sorted(extra)[:2]}")
    wrong = [(k, rows[k], reference[k]) for k in reference if rows[k] != reference[k]]
    assert not wrong, f"{len(wrong)} points differ, e.g. {wrong[:2]}"
    assert sum(r[2] for r in rows.values()) == pytest.approx(
        sum(r[2] for r in reference.values()), rel=1e-12)

    # the SQL side: every period once, the state at the end, points counted
    storage = SQLStorage(url=_db_url(conf))
    try:
        periods = list(storage.iter_periods())
        states = storage.get_states(None)
    finally:
        storage.close()
    assert len({(p.scope_id, p.begin) for p in periods}) == len(periods) == N_SCOPES * HOURS
    last = ds.end - datetime.timedelta(hours=1)
    assert {s: st.last_processed for s, st in states.items()} == {s: last for s in ds.scopes}
    per_period = {}
    for scope, begin, _t, _g in keys:
        per_period[scope, begin] = per_period.get((scope, begin), 0) + 1
    assert {(p.scope_id, p.begin.isoformat()): p.points for p in periods if p.points} == \
        per_period

    # and our own read path (iter_rated through the store) gives them back
    exported, export_keys = export_rows(daemon.export(conf))
    assert len(export_keys) == len(set(export_keys)) and exported == rows
    return len(keys), len(periods)


def _db_url(conf) -> str:
    for line in conf.read_text().splitlines():
        if line.strip().startswith("connection ="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("no [database] connection")


def test_two_workers_write_the_sql_backends_rows_to_influxdb(tmp_path, dataset, reference,
                                                             influxdb_database):
    """Acceptance 1: 10 scopes × 24 periods × 3 metrics, two workers."""
    server, database = influxdb_database
    conf = _conf(tmp_path, f"sqlite:///{tmp_path}/ckp.sqlite", dataset,
                 extra=_influx_extra(server, database))
    daemon.manage(conf, "db", "upgrade")
    proc = daemon.run_oneshot(conf)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    points, periods = _check(conf, server, database, dataset, reference)
    print(f"\ninfluxdb: {points} points / {periods} periods equal to the sql backend's")


#: the fault plan of the kill run
KILL_EVERY = 1.5  # seconds between two SIGKILLs from outside
#: each worker life SIGKILLs itself inside its 6th commit transaction (a
#: batched commit holds several scopes' periods: about 100 transactions a run)
COMMIT_FAULT = 6


def test_workers_killed_again_and_again_leave_no_duplicate_or_missing_point(
        tmp_path, dataset, reference, influxdb_database):
    """Acceptance 2: the same run, slowed by a Prometheus answering in 50
    ms, while workers are SIGKILLed every 1.5 s at random and each worker
    life SIGKILLs itself inside its 6th commit (after the points write,
    before the SQL COMMIT). The --oneshot run must end by itself; InfluxDB
    then holds exactly the reference rows."""
    server, database = influxdb_database
    om = _om(tmp_path, dataset)
    metrics_yml = tmp_path / "metrics.yml"
    metrics_yml.write_text(datagen.METRICS_YML)
    rng = random.Random(17)
    with DatasetPrometheus(om, metrics_yml, delay=0.05) as prom:
        extra = helpers.ini(
            """
            [orchestrator]
            max_threads = 2
            lookahead_periods = 2
            """, helpers.prometheus_collector_conf(prom.url, timeout=10, retries=3,
                                                     max_backoff=1),
            _influx_extra(server, database))
        conf = _conf(tmp_path, f"sqlite:///{tmp_path}/ckp.sqlite", dataset, extra=extra,
                     collector="prometheus")
        daemon.manage(conf, "db", "upgrade")
        log = tmp_path / "daemon.log"
        proc = daemon.start_daemon(conf, log=log, extra_args=("--oneshot",),
                                   env={"CKP_FAULTS": f"during_commit:{COMMIT_FAULT}"})
        kills: list[int] = []
        t0 = time.monotonic()
        try:
            helpers.wait_workers(proc.pid, 2)
            while proc.poll() is None:
                time.sleep(KILL_EVERY)
                victims = [w for w in helpers.workers_of(proc.pid)
                           if time.time() - w.create_time() > 0.5]
                if not victims or proc.poll() is not None:
                    continue
                victim = rng.choice(victims)
                try:
                    victim.send_signal(9)
                except psutil.NoSuchProcess:
                    continue
                kills.append(victim.pid)
            proc.wait(300)
        finally:
            helpers.kill_tree(proc)
        elapsed = time.monotonic() - t0
    text = helpers.read_log(log)
    assert proc.returncode == 0, text[-4000:]
    deaths = text.count("killed by signal")
    # the commit fault fired in many worker lives, on top of the outside kills
    assert len(kills) >= 3 and deaths >= len(kills) + 8, (len(kills), deaths)
    points, periods = _check(conf, server, database, dataset, reference)
    print(f"\ninfluxdb kill run: {len(kills)} SIGKILLs from outside, {deaths} worker "
          f"deaths in all, {elapsed:.1f} s; {points} points / {periods} periods equal to "
          "the sql backend's")
