"""Several hosts: two daemons (different ``host``), two workers each, one
Redis for the scope locks, one PostgreSQL database. First a clean run, then
the same run while workers are SIGKILLed at random and Redis, RabbitMQ and
PostgreSQL are each restarted once.

Both compare the export with rows computed independently (tests/datagen.py):
every (scope, period) exactly once, every quantity equal.
"""

from __future__ import annotations

import collections
import datetime
import random
import time
import uuid

import psutil

from cloudkitty_proc.storage.sql import SQLStorage
from tests import daemon, datagen
from tests.chaos import helpers
from tests.fakes.prometheus import DatasetPrometheus

N_SCOPES = 50
HOURS = 48


def _daemon_conf(tmp_path, pg_url, ds, host, coordination, *, extra="", **kw):
    d = tmp_path / host
    d.mkdir()
    return helpers.prepare(d, pg_url, ds, host=host, workers=2, extra=helpers.ini(f"""
        [orchestrator]
        coordination_url = {coordination}
        """, extra), **kw)


def _check_complete(conf, ds, hosts):
    """The export equals the independent computation; every period is
    stored once; returns (rows checked, periods, periods per host)."""
    records = daemon.export(conf)
    problems = datagen.check_export(ds, records)
    assert not problems, "\n".join(problems)
    storage = SQLStorage(url=_db_url(conf))
    try:
        periods = list(storage.iter_periods())
        states = storage.get_states(None)
    finally:
        storage.close()
    keys = [(p.scope_id, p.begin) for p in periods]
    assert len(keys) == len(set(keys)) == N_SCOPES * HOURS
    last = ds.end - datetime.timedelta(hours=1)
    assert {s: st.last_processed for s, st in states.items()} == {s: last for s in ds.scopes}
    assert all(st.last_error is None for st in states.values()), \
        {s: st.last_error for s, st in states.items() if st.last_error}
    per_host = collections.Counter(p.worker.rsplit("-", 1)[0] for p in periods)
    assert set(per_host) <= set(hosts)
    return len(records), len(periods), per_host


def _db_url(conf):
    for line in conf.read_text().splitlines():
        if line.strip().startswith("connection ="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("no [database] connection")


def test_two_daemons_share_the_scopes_exactly_once(tmp_path, pg_url, redis_url):
    """Acceptance 1: 50 scopes × 48 periods, two --oneshot daemons at once."""
    ds = datagen.generate(n_scopes=N_SCOPES, hours=HOURS, seed=21, scope_prefix="dist-")
    coordination = helpers.redis_coordination(redis_url, lock_timeout=5)
    confs = [_daemon_conf(tmp_path, pg_url, ds, host, coordination)
             for host in ("host-a", "host-b")]
    daemon.manage(confs[0], "db", "upgrade")
    t0 = time.monotonic()
    procs = [daemon.start_daemon(c, log=c.parent / "daemon.log", extra_args=("--oneshot",))
             for c in confs]
    try:
        for p in procs:
            p.wait(240)
    finally:
        for p in procs:
            helpers.kill_tree(p)
    elapsed = time.monotonic() - t0
    logs = [helpers.read_log(c.parent / "daemon.log") for c in confs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    rows, periods, per_host = _check_complete(confs[0], ds, {"host-a", "host-b"})
    # both hosts did part of the work
    assert per_host["host-a"] > 0 and per_host["host-b"] > 0, per_host
    print(f"\nclean run: {rows} rows / {periods} periods checked in {elapsed:.1f} s; "
          f"periods per host {dict(per_host)}")


#: the fault plan of the chaos run
KILLS = 22
KILL_EVERY = 2.0  # seconds
RESTART_AFTER_KILL = {6: "redis", 12: "rabbitmq", 18: "postgresql"}


def test_chaos_kills_and_service_restarts(tmp_path, pg_url, redis_url, amqp_url):
    """Acceptance 2: the same two-daemon run, slowed down by a Prometheus
    that answers in 150 ms with 2 concurrent queries per worker and batches
    of two scopes asked period by period (batched queries cut the queries
    by the batch size: the run must last as long as the fault plan), while
    22 workers are SIGKILLed at random (cotyledon respawns them) and Redis
    (every lock lost), RabbitMQ and PostgreSQL are each restarted once.

    The run must end by itself. A scope whose period failed during a
    restart (its error recorded) makes that --oneshot exit 1; one more
    --oneshot must then exit 0. Either way the export is exact."""
    ds = datagen.generate(n_scopes=N_SCOPES, hours=HOURS, seed=22, scope_prefix="chaos-")
    coordination = helpers.redis_coordination(redis_url, lock_timeout=5)
    om = tmp_path / "usage.om"
    om.write_text(ds.openmetrics)
    metrics_yml = tmp_path / "metrics.yml"
    metrics_yml.write_text(datagen.METRICS_YML)
    rng = random.Random(2026)
    with DatasetPrometheus(om, metrics_yml, delay=0.15) as prom:
        extra = helpers.ini("""
            [orchestrator]
            max_threads = 2
            lookahead_periods = 2
            [collect]
            max_scopes_per_query = 2
            max_periods_per_query = 1
            """, helpers.prometheus_collector_conf(prom.url, timeout=10, retries=3,
                                                     max_backoff=1))
        topic = "ckp-chaos-" + uuid.uuid4().hex[:8]
        confs = [_daemon_conf(tmp_path, pg_url, ds, host, coordination, extra=extra,
                              collector="prometheus", transport_url=amqp_url,
                              rpc_topic=topic)
                 for host in ("host-a", "host-b")]
        daemon.manage(confs[0], "db", "upgrade")
        t0 = time.monotonic()
        procs = [daemon.start_daemon(c, log=c.parent / "daemon.log",
                                     extra_args=("--oneshot",)) for c in confs]
        kills: list[int] = []
        restarts: dict[str, float] = {}
        rpc_after_amqp_restart = None
        try:
            for p in procs:
                helpers.wait_workers(p.pid, 2)
            while len(kills) < KILLS and all(p.poll() is None for p in procs):
                time.sleep(KILL_EVERY)
                victims = [w for p in procs for w in helpers.workers_of(p.pid)
                           if time.time() - w.create_time() > 1.0]
                if not victims:
                    continue
                victim = rng.choice(victims)
                try:
                    victim.send_signal(9)
                except psutil.NoSuchProcess:
                    continue
                kills.append(victim.pid)
                service = RESTART_AFTER_KILL.get(len(kills))
                if service == "redis":
                    restarts["redis"] = helpers.restart_redis()
                elif service == "rabbitmq":
                    # every worker respawned: the one answering below was
                    # connected before the restart
                    before = {w.pid for p in procs for w in helpers.wait_workers(p.pid, 2)}
                    restarts["rabbitmq"] = helpers.restart_rabbitmq()
                    # the RPC servers of the running workers reconnect by themselves
                    rpc_after_amqp_restart = daemon.wait_until(
                        lambda: helpers.rpc_status(confs[0]), timeout=90, interval=1,
                        what="a worker answering RPC after the RabbitMQ restart")
                    assert rpc_after_amqp_restart["pid"] in before, rpc_after_amqp_restart
                elif service == "postgresql":
                    restarts["postgresql"] = helpers.restart_postgres()
            injected = time.monotonic() - t0
            for p in procs:
                p.wait(300)
        finally:
            for p in procs:
                helpers.kill_tree(p)
            helpers.ensure_services()
        elapsed = time.monotonic() - t0
        logs = [helpers.read_log(c.parent / "daemon.log") for c in confs]
        assert len(kills) >= 20 and len(restarts) == 3, (
            f"the run ended after {len(kills)} kills and restarts {sorted(restarts)}: "
            "it is too fast for the fault plan")
        codes = [p.returncode for p in procs]
        for code, log in zip(codes, logs):
            assert code in (0, 1), log[-4000:]
        # every kill was seen (and the worker respawned) by cotyledon
        seen = sum(log.count("killed by signal") for log in logs)
        assert seen >= len(kills), (seen, len(kills))
        reruns = 0
        if codes != [0, 0]:
            reruns = 1
            proc = daemon.run_oneshot(confs[0], timeout=240)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows, periods, per_host = _check_complete(confs[0], ds, {"host-a", "host-b"})
    print(f"\nchaos run: {len(kills)} worker SIGKILLs survived, restarts "
          + ", ".join(f"{k} {v:.1f} s" for k, v in restarts.items())
          + f"; faults injected over {injected:.1f} s, run {elapsed:.1f} s, exit codes "
          f"{codes}, {reruns} extra --oneshot; {prom.total} Prometheus queries; "
          f"RPC answered after the RabbitMQ restart by {rpc_after_amqp_restart['worker']}; "
          f"{rows} rows / {periods} periods checked; periods per host {dict(per_host)}")
