"""What the daemon does when the configuration, a backend or the database
fails it (issue 15 items 5, 7 and 9; doc/source/operations.rst, "Failure
modes"): every case ends, with one line naming the cause."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tests import daemon, datagen
from tests.functional.test_cli_errors import _one_line_error, run
from tests.functional.test_daemon import _prepare


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def small(tmp_path):
    ds = datagen.generate(n_scopes=2, hours=3)
    return ds, _prepare(tmp_path, f"sqlite:///{tmp_path}/ckp.sqlite", ds, workers=2)


# -- item 5: what the workers build is built (or checked) before the fork -----

@pytest.mark.parametrize("section,line,needle", [
    ("orchestrator", "coordination_url = nosuch://x", "unknown scheme 'nosuch'"),
    ("collector_file", "path = /nonexistent/usage.om", "/nonexistent/usage.om"),
])
@pytest.mark.parametrize("cmd,args", [("daemon", ("--oneshot",)), ("manage", ("check",))])
def test_bad_plugin_settings_stop_the_start_with_one_line(small, cmd, args, section, line,
                                                          needle):
    _ds, conf = small
    conf.write_text(conf.read_text() + f"\n[{section}]\n{line}\n")
    message = _one_line_error(run(cmd, conf, *args))
    assert needle in message


@pytest.mark.parametrize("settings,env,needle", [
    ("prometheus_url = localhost:9090", {}, "prometheus_url 'localhost:9090': expected"),
    ("prometheus_url = http://127.0.0.1:99999", {}, "prometheus_url 'http://127.0.0.1:99999'"),
    ("prometheus_url = http://127.0.0.1:9\ncafile = /nonexistent/ca.pem", {},
     "cafile '/nonexistent/ca.pem': No such file"),
    ("prometheus_url = http://127.0.0.1:9", {"all_proxy": "socks5://127.0.0.1:1080"},
     "proxy 'socks5://127.0.0.1:1080' from the environment"),
    ("prometheus_url = http://127.0.0.1:9", {"http_proxy": "https://127.0.0.1:3128"},
     "proxy 'https://127.0.0.1:3128' from the environment"),
], ids=["no-scheme", "port-99999", "missing-cafile", "socks-proxy", "https-proxy"])
def test_bad_prometheus_settings_stop_the_start_before_the_fork(small, settings, env, needle):
    """Workers used to crash-loop on these, and --oneshot never ended."""
    _ds, conf = small
    conf.write_text(conf.read_text().replace("collector = file", "collector = prometheus")
                    + f"\n[collector_prometheus]\n{settings}\n")
    proc = daemon.run_oneshot(conf, env=env, timeout=120)
    message = _one_line_error(proc)
    assert "[collect] collector = prometheus" in message and needle in message
    assert "cannot start" not in proc.stdout + proc.stderr  # no worker was forked for it


def test_check_reports_an_unreachable_coordination_backend(small):
    _ds, conf = small
    port = _dead_port()
    conf.write_text(conf.read_text() + f"\n[orchestrator]\n"
                    f"coordination_url = redis://:s3cret@127.0.0.1:{port}\n")
    message = _one_line_error(run("manage", conf, "check"))
    assert f"[orchestrator] coordination_url redis://:***@127.0.0.1:{port}" in message
    assert "s3cret" not in message


@pytest.fixture
def redis_with_password(tmp_path):
    """A Redis server of this test's own that requires a password."""
    from tests.conftest import need_binary

    binary = need_binary("redis-server")
    port = _dead_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                             "--requirepass", "Right0ne", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        daemon.wait_until(lambda: _answers(port), timeout=30, what="redis-server")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_workers_that_cannot_start_stop_the_oneshot_run(small, redis_with_password):
    """A wrong Redis password: cotyledon respawned the failing workers
    forever and --oneshot never ended. Now the crash-loop guard stops it."""
    _ds, conf = small
    url = f"redis://:Wr0ngPass@127.0.0.1:{redis_with_password}"
    conf.write_text(conf.read_text() + f"\n[orchestrator]\ncoordination_url = {url}\n")
    proc = daemon.run_oneshot(conf, timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert "workers failed to start 5 times in a row, stopping" in line
    assert f"coordination_url redis://:***@127.0.0.1:{redis_with_password}" in line
    assert "Wr0ngPass" not in proc.stdout + proc.stderr


# -- item 7: a refused reload leaves every process on the configuration in force

def _sighup_and_wait(proc, log, needle, count=1, timeout=60):
    os.kill(proc.pid, signal.SIGHUP)
    daemon.wait_until(lambda: log.read_text().count(needle) >= count, timeout=timeout,
                      what=f"{needle!r} in the log")


def _last_processed(db_url: str, scopes) -> set:
    """The scopes' states read from the database (``status`` would read the
    configuration file, which these tests make invalid)."""
    from cloudkitty_proc.storage.sql import SQLStorage

    storage = SQLStorage(url=db_url)
    try:
        return {s.last_processed for s in storage.get_states(list(scopes)).values()}
    finally:
        storage.close()


def test_bad_reload_is_refused_by_the_master_and_the_workers(tmp_path):
    ds = datagen.generate(n_scopes=2, hours=6)
    db_url = f"sqlite:///{tmp_path}/ckp.sqlite"
    conf = _prepare(tmp_path, db_url, ds, workers=2)
    text = conf.read_text()
    half = ds.begin + (ds.end - ds.begin) / 2
    conf.write_text(text.replace(f"end = {ds.end.isoformat()}", f"end = {half.isoformat()}"))
    hour = datetime.timedelta(hours=1)
    log = tmp_path / "daemon.log"
    proc = daemon.start_daemon(conf, log=log)
    try:
        daemon.wait_until(lambda: _last_processed(db_url, ds.scopes) == {half - hour},
                          timeout=60, what="the first half rated")
        # the whole new file is refused: its new end too
        conf.write_text(text.replace("wait_periods = 2", "wait_periods = abc"))
        _sighup_and_wait(proc, log, "config reload refused", count=2)
        assert "reload refused, keeping the configuration in force" in log.read_text()
        assert "[collect] wait_periods" in log.read_text()
        time.sleep(2.5)  # two poll intervals: the workers pass with the old configuration
        assert "pass failed" not in log.read_text()
        assert _last_processed(db_url, ds.scopes) == {half - hour}
        # a good file is taken by every process
        conf.write_text(text)
        _sighup_and_wait(proc, log, "reloaded its configuration", count=2)
        daemon.wait_until(lambda: _last_processed(db_url, ds.scopes) == {ds.end - hour},
                          timeout=60, what="the new end rated")
        assert "pass failed" not in log.read_text()
    finally:
        assert daemon.stop_daemon(proc) == 0


def test_bad_max_workers_on_sighup_during_oneshot_still_ends_it(tmp_path):
    """max_workers = -1 on SIGHUP killed --oneshot's watcher: it never ended."""
    from tooz import coordination

    from cloudkitty_proc.leases import partition_lock_name, partition_of

    ds = datagen.generate(n_scopes=3, hours=3)
    conf = _prepare(tmp_path, f"sqlite:///{tmp_path}/ckp.sqlite", ds, workers=2)
    held = ds.scopes[0]
    coord = coordination.get_coordinator(f"file://{tmp_path}/state/locks",
                                         uuid.uuid4().hex.encode())
    coord.start(start_heart=True)
    # the lease the daemon takes for it: its partition's (default count)
    partitions = 64
    lock = coord.get_lock(partition_lock_name(partition_of(held, partitions), partitions))
    assert lock.acquire(blocking=False)
    log = tmp_path / "daemon.log"
    proc = daemon.start_daemon(conf, log=log, extra_args=("--oneshot",))
    released = False
    try:
        others = {s for s in ds.scopes[1:]
                  if partition_of(s, partitions) != partition_of(held, partitions)}
        assert others
        daemon.wait_until(lambda: {s["scope_id"] for s in daemon.status(conf)["scopes"]
                                   if s["last_processed"]} >= others, timeout=60,
                          what="the scopes not held rated")
        conf.write_text(conf.read_text().replace("max_workers = 2", "max_workers = -1"))
        _sighup_and_wait(proc, log, "reload refused, keeping the configuration in force")
        lock.release()
        released = True
        assert proc.wait(timeout=120) == 0, log.read_text()
    finally:
        if not released:
            lock.release()
        coord.stop()
        if proc.poll() is None:
            proc.kill()


# -- item 9: an error that cannot even be stored -----------------------------

def test_errors_that_cannot_be_stored_end_oneshot_with_exit_1(tmp_path, pg_url):
    """A role that may read but not write: every commit fails and so does
    recording the error. The scope was retried at once, forever (~10,000
    ERROR lines in 45 s, --oneshot never ended)."""
    import sqlalchemy as sa

    ds = datagen.generate(n_scopes=2, hours=3)
    conf = _prepare(tmp_path, pg_url, ds, workers=1)
    from cloudkitty_proc.storage.sql import SQLStorage
    owner = SQLStorage(url=pg_url)
    owner.set_rating_period(3600, expected=None)  # as a first start did
    owner.close()
    role = "ckp_ro_" + uuid.uuid4().hex[:8]
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        c.exec_driver_sql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    admin.dispose()
    ro_url = pg_url.replace("postgres@", f"{role}@")
    conf.write_text(conf.read_text().replace(f"connection = {pg_url}",
                                             f"connection = {ro_url}"))
    try:
        proc = daemon.run_oneshot(conf, timeout=180)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "failure(s) could not be stored in the database" in proc.stderr
        unrecorded = [x for x in (proc.stdout + proc.stderr).splitlines()
                      if "cannot record the error" in x]
        assert 1 <= len(unrecorded) <= len(ds.scopes)  # once per scope, then left alone
        assert "waits 1 s before its next try (1 in a row)" in unrecorded[0]
    finally:
        admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}")
            c.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
        admin.dispose()


def test_scope_ids_longer_than_the_storage_allows_are_left_out(tmp_path):
    ds = datagen.generate(n_scopes=2, hours=2)
    conf = _prepare(tmp_path, f"sqlite:///{tmp_path}/ckp.sqlite", ds, workers=1)
    long_id = "p" * 256
    conf.write_text(conf.read_text().replace(f"sources = {','.join(ds.scopes)}",
                                             f"sources = {','.join(ds.scopes)},{long_id}"))
    proc = daemon.run_oneshot(conf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert out.count("(256 characters) is longer than 255: left out") == 1
    assert {s["scope_id"] for s in daemon.status(conf)["scopes"]} == set(ds.scopes)


def test_failure_modes_module_runs_standalone():
    """The helpers above come from the CLI error tests: importable alone."""
    out = subprocess.run([sys.executable, "-c", "import tests.functional.test_failure_modes"],
                         cwd=daemon.REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
