"""The daemon as systemd and Prometheus see it: sd_notify, /metrics,
/healthz, SIGHUP and SIGTERM on the real process tree."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

from tests import daemon, datagen


def _wait(pred, timeout=60.0, interval=0.2, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metric(text, name):
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            m = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})? (\S+)", line)
            if m:
                total += float(m.group(2))
                found = True
    return total if found else None


def _workers(proc):
    # zombies (a stopped worker not yet reaped) are not workers
    return daemon.workers_of(proc.pid)


@pytest.fixture
def setup(tmp_path, sqlite_url, free_port):
    ds = datagen.generate(n_scopes=4, hours=24, seed=3)
    om = tmp_path / "usage.om"
    om.write_text(ds.openmetrics)

    def write(end, workers=2):
        return daemon.write_config(
            tmp_path, db_url=sqlite_url, scopes=ds.scopes, begin=ds.begin.isoformat(),
            end=end, metrics_yml=datagen.METRICS_YML, om_path=om, workers=workers,
            extra=f"""
            [metrics]
            listen = 127.0.0.1:{free_port}
            stall_timeout = 5
            """)
    conf = write(ds.begin.isoformat())  # nothing due yet
    daemon.manage(conf, "db", "upgrade")
    return ds, conf, write, f"http://127.0.0.1:{free_port}"


def test_metrics_health_reload_and_stop(setup, tmp_path):
    ds, conf, write, base = setup
    proc = daemon.start_daemon(conf, log=tmp_path / "daemon.log")
    try:
        status, body = _wait(lambda: _safe_get(base + "/healthz"), what="/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        _, text = _get(base + "/metrics")
        assert (_metric(text, "cloudkitty_proc_periods_rated_total") or 0) == 0
        # SIGHUP with a later [collect] end: the workers reload and rate
        write(ds.end.isoformat())
        os.kill(proc.pid, signal.SIGHUP)
        expected_periods = len(ds.scopes) * ds.hours

        def rated():
            _, text = _get(base + "/metrics")
            value = _metric(text, "cloudkitty_proc_periods_rated_total") or 0
            # the database gauges are cached for 2 s: wait for them too
            done = (value >= expected_periods
                    and 'cloudkitty_proc_scope_lag_seconds{scope="proj-003"}' in text)
            return text if done else None
        text = _wait(rated, timeout=120, what="all periods in /metrics")
        assert _metric(text, "cloudkitty_proc_periods_rated_total") == expected_periods
        assert _metric(text, "cloudkitty_proc_datapoints_rated_total") == len(ds.expected)
        assert _metric(text, "cloudkitty_proc_collector_query_seconds_count") >= \
            expected_periods * 3
        assert "cloudkitty_proc_scope_lag_seconds{scope=\"proj-000\"}" in text
        assert _metric(text, "cloudkitty_proc_scopes_due") == 0
        status, body = _get(base + "/healthz")
        assert status == 200, body
        # SIGHUP with max_workers = 1: one worker is stopped
        assert len(_workers(proc)) == 2
        write(ds.end.isoformat(), workers=1)
        os.kill(proc.pid, signal.SIGHUP)
        _wait(lambda: len(_workers(proc)) == 1, timeout=60, what="one worker left")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0
    assert not datagen.check_export(ds, daemon.export(conf))


def _safe_get(url):
    try:
        return _get(url)
    except OSError:
        return None


def test_healthz_reports_a_stall(tmp_path, sqlite_url, free_port):
    """Work is due but Prometheus is unreachable: every period fails, no
    worker makes progress for stall_timeout (3 s) → 503 "stalled"."""
    ds = datagen.generate(n_scopes=3, hours=4, seed=3)
    conf = daemon.write_config(
        tmp_path, db_url=sqlite_url, scopes=ds.scopes, begin=ds.begin.isoformat(),
        end=ds.end.isoformat(), metrics_yml=datagen.METRICS_YML, collector="prometheus",
        extra=f"""
        [collector_prometheus]
        prometheus_url = http://127.0.0.1:9
        retries = 0
        [metrics]
        listen = 127.0.0.1:{free_port}
        stall_timeout = 3
        """)
    daemon.manage(conf, "db", "upgrade")
    base = f"http://127.0.0.1:{free_port}"
    proc = daemon.start_daemon(conf, log=tmp_path / "daemon.log")
    try:
        status, body = _wait(lambda: (r := _safe_get(base + "/healthz")) and r[0] == 503 and r,
                             timeout=60, what="/healthz 503")
        info = json.loads(body)
        assert info["status"] == "stalled" and info["due_scopes"] == len(ds.scopes)
        _, text = _get(base + "/metrics")
        assert _metric(text, "cloudkitty_proc_errors_total") >= 1
        assert _metric(text, "cloudkitty_proc_scopes_in_error") >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_sd_notify_ready_watchdog_stopping(tmp_path, sqlite_url):
    ds = datagen.generate(n_scopes=2, hours=4, seed=9)
    om = tmp_path / "usage.om"
    om.write_text(ds.openmetrics)
    conf = daemon.write_config(tmp_path, db_url=sqlite_url, scopes=ds.scopes,
                               begin=ds.begin.isoformat(), end=ds.end.isoformat(),
                               metrics_yml=datagen.METRICS_YML, om_path=om)
    daemon.manage(conf, "db", "upgrade")
    sock_path = str(tmp_path / "notify.sock")
    received = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(sock_path)
        srv.settimeout(1.0)
        proc = daemon.start_daemon(conf, log=tmp_path / "daemon.log",
                                   env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "1000000"})

        def got(msg):
            try:
                received.extend(srv.recv(4096).decode().split("\n"))
            except OSError:
                pass
            return msg in received
        try:
            _wait(lambda: got("READY=1"), timeout=60, what="READY=1")
            _wait(lambda: got("WATCHDOG=1"), timeout=30, what="WATCHDOG=1")
            proc.send_signal(signal.SIGTERM)
            _wait(lambda: got("STOPPING=1"), timeout=30, what="STOPPING=1")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
    # READY comes once, after the workers ran
    assert received.count("READY=1") == 1
    assert received.index("READY=1") < received.index("WATCHDOG=1")
