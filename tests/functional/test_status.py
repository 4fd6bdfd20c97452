"""`cloudkitty-proc-manage status` on a database with scopes in several
states and a reprocessing task half done."""

from __future__ import annotations

import datetime
import decimal
import json

import pytest

from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.storage.sql import SQLStorage
from tests import daemon, datagen

UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
H = datetime.timedelta(hours=1)


def frame(scope, i):
    f = DataFrame(scope, T0 + i * H, T0 + (i + 1) * H)
    f.add_points("instance", [DataPoint("instance", decimal.Decimal(1), decimal.Decimal("0.5"),
                                        {"id": "vm", "project_id": scope}, {})])
    return f


@pytest.fixture
def conf(tmp_path, db_url):
    conf = daemon.write_config(tmp_path, db_url=db_url, scopes=["ok", "broken", "behind"],
                               begin=T0.isoformat(), end=(T0 + 6 * H).isoformat(),
                               metrics_yml=datagen.METRICS_YML, om_path=tmp_path / "x.om")
    daemon.manage(conf, "db", "upgrade")
    storage = SQLStorage(url=db_url)
    try:
        v = 0
        for i in range(6):
            v = storage.commit_period(frame("ok", i), v)
        v = 0
        for i in range(2):
            v = storage.commit_period(frame("broken", i), v)
        storage.record_error("broken", "collect of period 2026-01-01T02:00:00+00:00 failed: "
                                       "HTTP 500 from http://prom:9090", "http")
        v = 0
        for i in range(3):
            v = storage.commit_period(frame("behind", i), v)
        (task_id,) = storage.create_reprocess_tasks(["ok"], T0, T0 + 6 * H, "new prices", 3600)
        for i in range(3):
            storage.commit_reprocessed_period(task_id, frame("ok", i), T0 + i * H)
    finally:
        storage.close()
    return conf


def test_status_table(conf):
    out = daemon.manage(conf, "status").stdout
    lines = {line.split("│")[1].strip(): line for line in out.splitlines()
             if line.startswith("│") and line.split("│")[1].strip() in ("ok", "broken", "behind")}
    assert "up to date" in lines["ok"]
    assert "error (http)" in lines["broken"] and "HTTP 500" in lines["broken"]
    assert "due" in lines["behind"]
    assert "2026-01-01T05:00:00Z" in lines["ok"] and "2026-01-01T02:00:00Z" in lines["behind"]
    assert "totals: 3 scopes, 2 ok, 1 in error, 2 with work due" in out
    task_line = next(line for line in out.splitlines() if "new prices" in line)
    assert "running" in task_line and "3/6" in task_line
    assert "ETA" in out


def test_status_json(conf):
    data = json.loads(daemon.manage(conf, "status", "--json").stdout)
    scopes = {s["scope_id"]: s for s in data["scopes"]}
    assert scopes["ok"]["last_processed"] == "2026-01-01T05:00:00+00:00"
    assert scopes["ok"]["due"] is False and scopes["behind"]["due"] is True
    assert scopes["broken"]["last_error_kind"] == "http"
    assert scopes["behind"]["lag_seconds"] > 0
    assert data["totals"] == {"scopes": 3, "in_error": 1, "due": 2, "tasks_active": 1}
    (task,) = data["tasks"]
    assert (task["state"], task["done_periods"], task["total_periods"]) == ("running", 3, 6)
    assert task["eta_seconds"] is not None and task["eta_seconds"] >= 0
