"""Worker lifecycle on the real process tree: SIGTERM (a clean stop, or a
period abandoned when its query hangs), SIGKILL of a worker (respawned, its
scopes resume), and fairness (a scope with months to catch up does not
starve the others). SIGHUP is covered by tests/functional/test_operations.py.
"""

from __future__ import annotations

import collections
import datetime
import signal
import threading
import time

import redis

from cloudkitty_proc.storage.sql import SQLStorage
from tests import daemon, datagen
from tests.chaos import helpers
from tests.fakes.prometheus import DatasetPrometheus

HOUR = datetime.timedelta(hours=1)
#: two queries in flight per worker: runs last seconds, not a blink
SLOW = """
    [orchestrator]
    max_threads = 2
    """


def _files(tmp_path, ds):
    om = tmp_path / "usage.om"
    om.write_text(ds.openmetrics)
    metrics_yml = tmp_path / "metrics.yml"
    metrics_yml.write_text(datagen.METRICS_YML)
    return om, metrics_yml


def _committed(db_url):
    storage = SQLStorage(url=db_url)
    try:
        return list(storage.iter_periods())
    finally:
        storage.close()


def _assert_whole_periods(ds, conf, db_url):
    """Every committed period holds exactly its expected rows, and nothing
    is stored for a period not committed (no half-written period)."""
    committed = {(p.scope_id, p.begin.isoformat()) for p in _committed(db_url)}
    got = datagen.export_keys(daemon.export(conf))
    want = {k for k in ds.expected if (k[0], k[1]) in committed}
    assert set(got) == want and (not got or max(got.values()) == 1)
    return committed


def test_sigterm_stops_between_periods_and_restart_completes(tmp_path, sqlite_url):
    ds = datagen.generate(n_scopes=4, hours=24, seed=51, scope_prefix="term-")
    om, metrics_yml = _files(tmp_path, ds)
    with DatasetPrometheus(om, metrics_yml, delay=0.14) as prom:
        extra = helpers.ini(SLOW, helpers.prometheus_collector_conf(prom.url))
        conf = helpers.prepare(tmp_path, sqlite_url, ds, workers=2, collector="prometheus",
                               extra=extra)
        daemon.manage(conf, "db", "upgrade")
        proc = daemon.start_daemon(conf, log=tmp_path / "daemon.log")
        try:
            daemon.wait_until(lambda: len(_committed(sqlite_url)) >= 10, timeout=60,
                              what="10 committed periods")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
            stop_seconds = time.monotonic() - t0
        finally:
            helpers.kill_tree(proc)
        log = helpers.read_log(tmp_path / "daemon.log")
        assert code == 0, log[-3000:]
        # the periods in flight (0.14 s per query) finish well within the
        # graceful_shutdown_timeout (20 s)
        assert stop_seconds < 10, stop_seconds
        assert "Graceful shutdown timeout" not in log
        committed = _assert_whole_periods(ds, conf, sqlite_url)
        assert 10 <= len(committed) < 4 * 24
        proc = daemon.run_oneshot(conf, timeout=120)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert not datagen.check_export(ds, daemon.export(conf))


def test_sigterm_abandons_a_hung_period_within_the_timeout(tmp_path, sqlite_url, redis_url):
    """A query that never answers (the collector timeout is longer than the
    graceful shutdown timeout): SIGTERM abandons that period, nothing of it
    is stored, the worker frees its Redis lock on the way out, and the
    daemon exits within graceful_shutdown_timeout."""
    ds = datagen.generate(n_scopes=2, hours=8, seed=52, scope_prefix="hang-")
    om, metrics_yml = _files(tmp_path, ds)
    # the worker asks 6 periods per range query (max_periods_per_query): the
    # hung query is that of periods 6 and 7, after the first 6 committed
    hung_scope, hung_begin = ds.scopes[0], ds.begin + 7 * HOUR
    last_committed = ds.begin + 5 * HOUR
    release = threading.Event()
    held = []

    def fault(q):
        if hung_scope in q.scopes and q.begin == hung_begin and release.is_set() is False:
            held.append(q)
            return ("hold", release)
        return None

    grace = 6
    coordination = helpers.redis_coordination(redis_url, lock_timeout=60)
    namespace = coordination.rsplit("namespace=", 1)[1]
    redis_client = redis.Redis.from_url(redis_url)
    with DatasetPrometheus(om, metrics_yml, fault=fault) as prom:
        conf = helpers.prepare(tmp_path, sqlite_url, ds, workers=1, collector="prometheus",
                               extra=helpers.ini(f"""
                                   [DEFAULT]
                                   graceful_shutdown_timeout = {grace}
                                   [orchestrator]
                                   coordination_url = {coordination}
                                   """, helpers.prometheus_collector_conf(prom.url, timeout=120)))
        daemon.manage(conf, "db", "upgrade")
        proc = daemon.start_daemon(conf, log=tmp_path / "daemon.log")
        try:
            daemon.wait_until(lambda: held, timeout=60, what="the hung query")
            time.sleep(0.5)
            assert redis_client.keys(f"{namespace}_*_lock")  # the scope lock is held
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(grace + 10)
            stop_seconds = time.monotonic() - t0
        finally:
            release.set()
            helpers.kill_tree(proc)
        log = helpers.read_log(tmp_path / "daemon.log")
        assert stop_seconds <= grace + 1.5, (stop_seconds, log[-3000:])
        assert code == 0, log[-3000:]
        assert "abandoning it" in log, log[-3000:]
        # the lock was freed on the way out, not left to its 60 s lease
        assert redis_client.keys(f"{namespace}_*_lock") == []
        state = helpers.state_of(conf)[hung_scope]
        assert state["last_processed"] == last_committed.isoformat()
        assert state["last_error"] is None
        _assert_whole_periods(ds, conf, sqlite_url)
        # a new run does not wait for a lease
        t0 = time.monotonic()
        proc = daemon.run_oneshot(conf, timeout=120)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert time.monotonic() - t0 < 30
    assert not datagen.check_export(ds, daemon.export(conf))


def test_killed_worker_is_respawned_and_its_scopes_resume(tmp_path, sqlite_url):
    ds = datagen.generate(n_scopes=4, hours=24, seed=53, scope_prefix="respawn-")
    om, metrics_yml = _files(tmp_path, ds)
    with DatasetPrometheus(om, metrics_yml, delay=0.09) as prom:
        # one period a query: range queries of 6 periods would rate the whole
        # dataset in about 2 s, and a kill observed late (a loaded machine)
        # would leave the respawned worker nothing to resume
        extra = helpers.ini(SLOW, """
            [collect]
            max_periods_per_query = 1
            """, helpers.prometheus_collector_conf(prom.url))
        conf = helpers.prepare(tmp_path, sqlite_url, ds, workers=2, collector="prometheus",
                               extra=extra)
        daemon.manage(conf, "db", "upgrade")
        proc = daemon.start_daemon(conf, log=tmp_path / "daemon.log")
        try:
            first = helpers.wait_workers(proc.pid, 2)
            daemon.wait_until(lambda: len(_committed(sqlite_url)) >= 6, timeout=60,
                              what="6 committed periods")
            victim = first[0]
            victim.send_signal(signal.SIGKILL)
            killed_at = datetime.datetime.now(datetime.timezone.utc)
            pids = {w.pid for w in first}
            respawned = daemon.wait_until(
                lambda: [w for w in helpers.workers_of(proc.pid) if w.pid not in pids],
                timeout=30, what="a respawned worker")
            last = (ds.end - HOUR).isoformat()
            daemon.wait_until(
                lambda: all(s["last_processed"] == last
                            for s in helpers.state_of(conf).values())
                and len(helpers.state_of(conf)) == len(ds.scopes),
                timeout=120, interval=1, what="every scope complete")
        finally:
            daemon.stop_daemon(proc)
            helpers.kill_tree(proc)
        log = helpers.read_log(tmp_path / "daemon.log")
        assert f"Child {victim.pid} killed by signal" in log
        assert len(respawned) == 1
    assert not datagen.check_export(ds, daemon.export(conf))
    # both worker slots committed after the kill: the respawned one resumed
    after = collections.Counter(p.worker for p in _committed(sqlite_url)
                                if p.committed_at > killed_at)
    assert set(after) == {"testhost-0", "testhost-1"}, after


def test_a_scope_months_behind_does_not_starve_the_others(tmp_path, sqlite_url):
    """One worker, max_periods_per_lock = 4. Five scopes are 12 periods
    behind; a new scope starts 90 days back (2,160 + 24 periods). The five
    reach their end while the big one is still months behind, and it was
    not starved either (it moved a few periods on each pass)."""
    ds = datagen.generate(n_scopes=6, hours=24, seed=54, scope_prefix="fair-")
    big, others = ds.scopes[0], ds.scopes[1:]
    om, metrics_yml = _files(tmp_path, ds)
    far_begin = ds.begin - datetime.timedelta(days=90)
    with DatasetPrometheus(om, metrics_yml, delay=0.06) as prom:
        extra = helpers.ini(SLOW, """
            [orchestrator]
            max_periods_per_lock = 4
            """, helpers.prometheus_collector_conf(prom.url))
        first = tmp_path / "first"
        first.mkdir()
        conf = helpers.prepare(first, sqlite_url, ds, workers=1, collector="prometheus",
                               extra=extra, scopes=others,
                               end=(ds.begin + 12 * HOUR).isoformat())
        daemon.manage(conf, "db", "upgrade")
        proc = daemon.run_oneshot(conf, timeout=120)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        # the big scope first in the list: without the bound it would keep
        # the only worker for its 2,184 periods
        conf = helpers.prepare(tmp_path, sqlite_url, ds, workers=1, collector="prometheus",
                               extra=extra, scopes=[big, *others],
                               begin=far_begin.isoformat())
        proc = daemon.start_daemon(conf, log=tmp_path / "daemon.log")
        last = (ds.end - HOUR).isoformat()
        try:
            states = daemon.wait_until(
                lambda: (st := helpers.state_of(conf))
                and all(st.get(s, {}).get("last_processed") == last for s in others) and st,
                timeout=120, interval=0.3, what="the five scopes at their end")
        finally:
            daemon.stop_daemon(proc)
            helpers.kill_tree(proc)
    big_at = states[big]["last_processed"]
    assert big_at is not None, "the big scope was starved"
    assert datetime.datetime.fromisoformat(big_at) < ds.begin - datetime.timedelta(days=80)
    # from the store: how far the big scope had got when the last of the
    # others was committed (a few passes of 4 periods, not 2,184)
    periods = _committed(sqlite_url)
    others_done = max(p.committed_at for p in periods if p.scope_id in others)
    big_by_then = sum(1 for p in periods if p.scope_id == big and p.committed_at <= others_done)
    assert 4 <= big_by_then <= 4 * 5, big_by_then
    print(f"\nfairness: the 5 scopes (12 periods each) done while the big one had "
          f"{big_by_then} of {90 * 24 + 24} periods")
