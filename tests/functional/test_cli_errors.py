"""Bad input gets one clear line naming the file and key, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import daemon, datagen


def run(cmd, conf, *args):
    module = {"daemon": "cloudkitty_proc.cli.daemon", "manage": "cloudkitty_proc.cli.manage"}[cmd]
    return subprocess.run([sys.executable, "-m", module, "--config-file", str(conf), *args],
                          capture_output=True, text=True, timeout=120, cwd=daemon.REPO,
                          env=daemon._env())


@pytest.fixture
def conf(tmp_path, sqlite_url):
    return daemon.write_config(tmp_path, db_url=sqlite_url, scopes=["p1"],
                               begin="2026-01-01T00:00:00Z", end="2026-01-01T02:00:00Z",
                               metrics_yml=datagen.METRICS_YML, om_path=tmp_path / "x.om")


def _one_line_error(proc):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("cmd,args", [("daemon", ("--oneshot",)), ("manage", ("check",))])
def test_bad_option_value_names_file_group_and_key(conf, cmd, args):
    conf.write_text(conf.read_text().replace("max_workers = 2", "max_workers = many"))
    line = _one_line_error(run(cmd, conf, *args))
    assert str(conf) in line
    assert "[orchestrator] max_workers" in line and "many" in line


@pytest.mark.parametrize("cmd,args", [("daemon", ("--oneshot",)), ("manage", ("check",))])
def test_bad_metrics_yml_names_file_metric_and_key(conf, tmp_path, cmd, args):
    (tmp_path / "metrics.yml").write_text(
        "metrics:\n  instance_up:\n    unit: instance\n    factor: lots\n")
    line = _one_line_error(run(cmd, conf, *args))
    assert str(tmp_path / "metrics.yml") in line
    assert "metric 'instance_up'" in line and "key 'factor'" in line


def test_misaligned_begin(conf):
    conf.write_text(conf.read_text().replace("begin = 2026-01-01T00:00:00Z",
                                             "begin = 2026-01-01T00:30:00Z"))
    line = _one_line_error(run("manage", conf, "check"))
    assert "[collect] begin" in line and "aligned" in line


def test_unknown_plugin(conf):
    conf.write_text(conf.read_text().replace("processors = noop", "processors = nope"))
    line = _one_line_error(run("manage", conf, "check"))
    assert "[rating] processors = nope: no such plugin" in line


@pytest.mark.parametrize("value", ["", "  ", "project id"])
@pytest.mark.parametrize("cmd,args", [("daemon", ("--oneshot",)), ("manage", ("check",))])
def test_empty_scope_key_is_refused(conf, cmd, args, value):
    """An empty scope_key matched no datapoint: every period committed empty."""
    conf.write_text(conf.read_text() + f"\n[collect]\nscope_key = {value}\n")
    line = _one_line_error(run(cmd, conf, *args))
    assert "[collect] scope_key" in line and "not a label name" in line


@pytest.mark.parametrize("body,needle", [
    (b"metrics:\n  instance_up:\n    unit: instance\n    factor: 1e400\n",
     "metric 'instance_up': key 'factor': '1e400' is out of range"),
    (b"metrics:\n  instance_up:\n    unit: inst\xe2nce\n", "not UTF-8 text (byte 0xe2 at offset"),
], ids=["factor-1e400", "not-utf8"])
def test_metrics_yml_unclear_errors_are_one_line(conf, tmp_path, body, needle):
    (tmp_path / "metrics.yml").write_bytes(body)
    line = _one_line_error(run("manage", conf, "check"))
    assert str(tmp_path / "metrics.yml") in line and needle in line


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1", "host:http"])
@pytest.mark.parametrize("cmd,args", [("daemon", ("--oneshot",)), ("manage", ("check",))])
def test_metrics_listen_must_be_host_and_port(conf, cmd, args, listen):
    conf.write_text(conf.read_text() + f"\n[metrics]\nlisten = {listen}\n")
    line = _one_line_error(run(cmd, conf, *args))
    assert "[metrics] listen" in line and "port from 1 to 65535" in line


@pytest.mark.parametrize("end", ["2025-12-31T23:00:00Z", "2025-12-31T00:00:00Z"])
def test_end_before_begin_is_refused(conf, end):
    conf.write_text(conf.read_text().replace("end = 2026-01-01T02:00:00Z", f"end = {end}"))
    line = _one_line_error(run("manage", conf, "check"))
    assert "[collect] end" in line and "is before [collect] begin" in line


@pytest.mark.parametrize("url,needle", [
    ("garbage", "[database] connection 'garbage': not a database URL"),
    ("postgresql+psycopg2://ck:s3cret@127.0.0.1:1/x",
     "[database] connection postgresql+psycopg2://ck:***@127.0.0.1:1/x: "
     "(psycopg2.OperationalError) connection to server at"),
    ("sqlite:////proc/nonexistent/ckp.sqlite", "cannot create or open /proc/nonexistent: "),
], ids=["garbage", "unreachable", "uncreatable"])
@pytest.mark.parametrize("cmd,args", [("daemon", ("--oneshot",)), ("manage", ("db", "upgrade"))])
def test_bad_or_unreachable_database_is_one_line(conf, cmd, args, url, needle):
    """It was CRITICAL and a traceback (issue 15, unclear errors)."""
    text = conf.read_text()
    old = next(line for line in text.splitlines() if line.startswith("connection = "))
    conf.write_text(text.replace(old, f"connection = {url}"))
    line = _one_line_error(run(cmd, conf, *args))
    assert needle in line and "s3cret" not in line


@pytest.mark.parametrize("url,needle", [
    ("mysql://root:s3cret@127.0.0.1/test",
     "the mysqldb driver is not installed (no module 'MySQLdb'): use a mysql+pymysql:// URL"),
    ("postgresql+pg8000://ck:s3cret@127.0.0.1/x",
     "the pg8000 driver is not installed (no module 'pg8000')"),
], ids=["mysqldb", "pg8000"])
@pytest.mark.parametrize("cmd,args", [("daemon", ("--oneshot",)), ("manage", ("db", "upgrade")),
                                      ("manage", ("status",))])
def test_missing_database_driver_is_one_line_naming_what_to_install(conf, cmd, args, url,
                                                                     needle):
    """A traceback (ModuleNotFoundError) before (issue 16 item 8)."""
    text = conf.read_text()
    old = next(line for line in text.splitlines() if line.startswith("connection = "))
    conf.write_text(text.replace(old, f"connection = {url}"))
    line = _one_line_error(run(cmd, conf, *args))
    assert "[database] connection" in line and needle in line and "s3cret" not in line


def test_influxdb_database_missing_until_storage_init(conf, influxdb_database):
    """The daemon refuses to start while the InfluxDB database is missing,
    naming the command that creates it; `storage init` creates it; a
    second run is harmless."""
    server, name = influxdb_database
    conf.write_text(conf.read_text() + (
        f"\n[storage]\nbackend = influxdb\n[storage_influxdb]\nhost = {server.host}\n"
        f"port = {server.port}\ndatabase = {name}\n"))
    upgrade = run("manage", conf, "db", "upgrade")  # the SQL tables (and the database)
    assert upgrade.returncode == 0, upgrade.stderr
    server.drop_database(name)
    line = _one_line_error(run("daemon", conf, "--oneshot"))
    assert "InfluxDB" in line and "cloudkitty-proc-manage storage init" in line
    for _ in range(2):
        proc = run("manage", conf, "storage", "init")
        assert proc.returncode == 0, proc.stderr
        assert "InfluxDB: ready" in proc.stdout
    assert name in server.databases()


def test_influxdb_unreachable_is_one_line(conf):
    conf.write_text(conf.read_text() + (
        "\n[storage]\nbackend = influxdb\n[storage_influxdb]\nhost = 127.0.0.1\n"
        "port = 1\ndatabase = ck\ntimeout = 5\n"))
    line = _one_line_error(run("manage", conf, "storage", "init"))
    assert "InfluxDB at http://127.0.0.1:1" in line and "creating database ck" in line
