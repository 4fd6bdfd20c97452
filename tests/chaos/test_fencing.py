"""Fencing (DESIGN.md invariant 2) with a real lost lease.

Daemon A's only worker holds the Redis lock of scope S (lock_timeout=3 s)
and has committed S's first two periods; its queries for the third are in
flight, held by the fake Prometheus. A is frozen with SIGSTOP: its tooz
heartbeat stops with it and the lease lapses. Daemon B takes the lock and
rates S to the end. A is resumed with SIGCONT, gets its answers and tries
to commit the third period with the state version it read: the
compare-and-set refuses it (stale state), A drops the frame. (A may also
have locked the next scope ahead and collected its first period: that
lease lapsed too, B rated the scope, and A's commit there is refused the
same way.)

Without the compare-and-set, A's UPDATE would match and only the
UNIQUE(scope_id, begin) of rated_period would stop the double commit, as a
storage error recorded on the scope: the test asserts the stale-state drop
itself (log line, no error recorded), so it fails then.
"""

from __future__ import annotations

import datetime
import signal
import threading
import time

import pytest
import redis

from cloudkitty_proc.leases import lock_name, partition_lock_name, partition_of
from cloudkitty_proc.storage.sql import SQLStorage
from tests import daemon, datagen
from tests.chaos import helpers
from tests.fakes.prometheus import DatasetPrometheus

HOUR = datetime.timedelta(hours=1)
LOCK_TIMEOUT = 3


#: the two ways a worker goes through scopes: batched (the default: scopes
#: leased by partition, collected together, here by range queries of two
#: periods) and per scope (CloudKitty's queries, one lock per scope)
MODES = {
    "batched": ("[collect]\nmax_periods_per_query = 2\n", 64),
    "per-scope": ("[orchestrator]\nlease_partitions = 0\n"
                  "[collect]\nmax_scopes_per_query = 1\n", 0),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_worker_paused_past_its_lease_cannot_commit(tmp_path, pg_url, redis_url, mode):
    mode_conf, partitions = MODES[mode]
    ds = datagen.generate(n_scopes=3, hours=6, seed=31, scope_prefix="fence-")
    scope = ds.scopes[0]  # A's single worker visits it first
    held_begin = ds.begin + 2 * HOUR
    release = threading.Event()
    held: list[str] = []
    lock = threading.Lock()

    def fault(q):
        # hold A's three queries (one per metric) of S's third period (with
        # batches: of the batch holding S, for periods 2 and 3)
        if scope in q.scopes and q.begin == held_begin:
            with lock:
                if len(held) < 3:
                    held.append(q.metric)
                    return ("hold", release)
        return None

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    om = tmp_path / "usage.om"
    om.write_text(ds.openmetrics)
    metrics_yml = tmp_path / "metrics.yml"
    metrics_yml.write_text(datagen.METRICS_YML)
    coordination = helpers.redis_coordination(redis_url, lock_timeout=LOCK_TIMEOUT)
    namespace = coordination.rsplit("namespace=", 1)[1]
    lease = (partition_lock_name(partition_of(scope, partitions), partitions) if partitions
             else lock_name(scope))
    lock_key = namespace.encode() + b"_" + lease + b"_lock"
    redis_client = redis.Redis.from_url(redis_url)
    with DatasetPrometheus(om, metrics_yml, fault=fault) as prom:
        extra = helpers.ini(f"""
            [orchestrator]
            coordination_url = {coordination}
            """, helpers.prometheus_collector_conf(prom.url, timeout=60, retries=0), mode_conf)
        conf_a, conf_b = (
            helpers.prepare(tmp_path / name, pg_url, ds, host=f"host-{name}", workers=1,
                            collector="prometheus", extra=extra) for name in ("a", "b"))
        daemon.manage(conf_a, "db", "upgrade")
        storage = SQLStorage(url=pg_url)
        proc_a = daemon.start_daemon(conf_a, log=tmp_path / "a.log", extra_args=("--oneshot",))
        proc_b = None
        worker_a = None
        try:
            [worker_a] = helpers.wait_workers(proc_a.pid, 1)
            # A committed periods 0 and 1 of S and waits for period 2
            daemon.wait_until(
                lambda: len(held) == 3
                and storage.get_state(scope).last_processed == ds.begin + HOUR,
                timeout=60, what="A holding S with two periods committed")
            version_read = storage.get_state(scope).version
            assert redis_client.exists(lock_key)
            worker_a.send_signal(signal.SIGSTOP)
            paused_at = time.monotonic()
            # A's heartbeat is frozen too: its lease lapses
            daemon.wait_until(lambda: not redis_client.exists(lock_key),
                              timeout=LOCK_TIMEOUT + 5, interval=0.05,
                              what="A's lease to lapse")
            lapsed_after = time.monotonic() - paused_at
            proc_b = daemon.start_daemon(conf_b, log=tmp_path / "b.log",
                                         extra_args=("--oneshot",))
            assert proc_b.wait(120) == 0, helpers.read_log(tmp_path / "b.log")[-4000:]
            state = storage.get_state(scope)
            assert state.last_processed == ds.end - HOUR
            assert state.version > version_read
            release.set()
            worker_a.send_signal(signal.SIGCONT)
            assert proc_a.wait(120) == 0, helpers.read_log(tmp_path / "a.log")[-4000:]
        finally:
            release.set()
            if worker_a is not None:
                try:
                    worker_a.send_signal(signal.SIGCONT)
                except Exception:  # noqa: BLE001, S110 - already gone
                    pass
            helpers.kill_tree(proc_a)
            if proc_b is not None:
                helpers.kill_tree(proc_b)
        log_a = helpers.read_log(tmp_path / "a.log")
        # A dropped its frame on the stale state (and, for the same reason,
        # the first period of the scope it had locked ahead, if it had
        # collected it: B rated that scope too while A was frozen) ...
        dropped = [line for line in log_a.splitlines()
                   if "another worker moved the scope on" in line]
        of_s = [line for line in dropped if f"scope {scope}]" in line]
        assert len(of_s) == 1, log_a[-4000:]
        assert held_begin.isoformat() in of_s[0]
        # (batched: the other scopes of S's batch were refused the same way)
        assert len(dropped) <= (2 if mode == "per-scope" else len(ds.scopes)), log_a[-4000:]
        assert "storing period" not in log_a, log_a[-4000:]
        # ... and the store holds every period once, S's last ones by B
        assert not datagen.check_export(ds, daemon.export(conf_a))
        try:
            periods = {p.begin: p.worker for p in storage.iter_periods(scope_id=scope)}
            state = storage.get_state(scope)
        finally:
            storage.close()
        assert periods == {ds.begin + i * HOUR: ("host-a-0" if i < 2 else "host-b-0")
                           for i in range(ds.hours)}
        assert state.last_error is None and state.last_error_kind is None
        assert state.last_processed == ds.end - HOUR
        print(f"\nfencing: A paused, its lease lapsed after {lapsed_after:.1f} s; B rated "
              f"{ds.hours - 2} periods of {scope}; A's late commit refused (stale state)")
