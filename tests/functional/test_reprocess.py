"""Reprocessing, reset-state and the AMQP control plane, with the real daemon.

The daemon runs as a subprocess (tests/daemon.py) on generated usage
(tests/datagen.py) with hashmap rules; RPC goes through the real RabbitMQ
(``amqp_url`` fixture). Acceptance of issue 4:

1. re-rating a window after a rules change: new prices inside, untouched
   outside, every period exactly once;
2. a worker SIGKILLed inside a re-rated period's transaction: the task
   finishes after the respawn, every period exactly once;
3. the same request twice, and a request written while the daemon is
   stopped: results as if sent once;
4. every validation error and malformed messages get an error reply naming
   the problem, and the worker keeps serving;
5. reset-state re-rates the ``to`` period (CloudKitty loses it).
"""

from __future__ import annotations

import datetime
import decimal
import json
import re
import time
import uuid

import pytest
from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc import messaging
from cloudkitty_proc.leases import partition_lock_name, partition_of
from cloudkitty_proc.storage.sql import SQLStorage
from tests import daemon, datagen

D = decimal.Decimal
UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
HOURS = 8

RULES_V1 = """\
hashmap:
  services:
    instance:
      mappings:
        - {cost: "0.01", type: flat}
    volume.size:
      mappings:
        - {cost: "0.1", type: flat}
"""

# new prices; the volume price changes again at 04:00 (validity by period start)
RULES_V2 = """\
hashmap:
  services:
    instance:
      mappings:
        - {cost: "0.02", type: flat}
    volume.size:
      mappings:
        - {cost: "0.1", type: flat, end: 2026-01-01T04:00:00Z}
        - {cost: "0.3", type: flat, start: 2026-01-01T04:00:00Z}
"""


def iso(hour: int) -> str:
    return (T0 + datetime.timedelta(hours=hour)).isoformat()


def expected_price(record: dict, rules: str) -> D:
    hour = (datetime.datetime.fromisoformat(record["begin"]) - T0) // datetime.timedelta(hours=1)
    qty = D(record["qty"])
    if record["type"] == "instance":
        return qty * (D("0.01") if rules == "v1" else D("0.02"))
    if record["type"] == "volume.size":
        if rules == "v1" or hour < 4:
            return qty * D("0.1")
        return qty * D("0.3")
    return D(0)


class Env:
    """A dataset, its config and database (SQLite file)."""

    def __init__(self, tmp_path, amqp_url: str | None, *, workers: int = 2,
                 scopes: int = 3) -> None:
        self.ds = datagen.generate(n_scopes=scopes, hours=HOURS, seed=5)
        om = tmp_path / "usage.om"
        om.write_text(self.ds.openmetrics)
        self.db_url = f"sqlite:///{tmp_path}/ckp.sqlite"
        self.tmp_path = tmp_path
        self.transport_url = amqp_url
        # a topic of its own: tests running at the same time on the same
        # broker (another checkout, another session) never answer each other
        self.topic = f"cloudkitty_proc_test_{uuid.uuid4().hex[:10]}"
        self.conf = daemon.write_config(
            tmp_path, db_url=self.db_url, scopes=self.ds.scopes, begin=self.ds.begin.isoformat(),
            end=self.ds.end.isoformat(), metrics_yml=datagen.METRICS_YML, om_path=om,
            workers=workers, processors="hashmap", rules_yml=RULES_V1,
            transport_url=amqp_url, rpc_topic=self.topic, host=f"test-{tmp_path.name[-12:]}")
        daemon.manage(self.conf, "db", "upgrade")
        self.storage = SQLStorage(url=self.db_url)
        self.daemons = []

    def set_rules(self, text: str) -> None:
        (self.tmp_path / "rating.yml").write_text(text)

    def manage(self, *args, **kw):
        return daemon.manage(self.conf, *args, **kw)

    def start(self, log_name: str = "daemon.log", env: dict | None = None):
        log = self.tmp_path / log_name
        proc = daemon.start_daemon(self.conf, log=log, env=env)
        self.daemons.append(proc)
        if self.transport_url:
            # serving once a worker answers status()
            daemon.wait_until(lambda: self._answers(proc, log), timeout=60,
                              what="a worker answering status()")
        return proc

    def _answers(self, proc, log) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode}:\n{log.read_text()}")
        try:
            self.call("status", timeout=2)
        except messaging.NoServerError:
            return False
        return True

    def call(self, method: str, timeout: float = 10, **kwargs):
        """A raw oslo.messaging call from this process (global cfg.CONF)."""
        messaging.register_opts(cfg.CONF)
        cfg.CONF.set_override("transport_url", self.transport_url)
        cfg.CONF.set_override("rpc_topic", self.topic)
        try:
            return messaging.call(cfg.CONF, method, timeout=timeout, **kwargs)
        finally:
            cfg.CONF.clear_override("transport_url")
            cfg.CONF.clear_override("rpc_topic")

    def close(self) -> None:
        for proc in self.daemons:
            daemon.stop_daemon(proc)
        self.storage.close()

    def last_processed(self) -> dict:
        return {sid: st.last_processed for sid, st in self.storage.get_states().items()}

    def wait_processed(self, timeout: float = 60) -> None:
        last = self.ds.end - datetime.timedelta(hours=1)
        daemon.wait_until(
            lambda: self.last_processed() == {s: last for s in self.ds.scopes},
            timeout=timeout, what="every scope processed")

    def wait_tasks_done(self, ids, timeout: float = 60) -> list:
        def done():
            tasks = self.storage.list_tasks(ids=ids)
            failed = [t for t in tasks if t.state == "failed"]
            assert not failed, failed
            return tasks if all(t.state == "done" for t in tasks) else None
        return daemon.wait_until(done, timeout=timeout, what=f"tasks {ids} done")

    def periods(self) -> dict:
        """(scope, begin) → committed_at of every rated period row."""
        out = {}
        for p in self.storage.iter_periods():
            key = (p.scope_id, p.begin.isoformat())
            assert key not in out, f"period {key} stored twice"
            out[key] = p.committed_at
        return out

    def check_complete(self) -> list[dict]:
        """Every expected row exactly once, every period exactly once."""
        records = daemon.export(self.conf)
        problems = datagen.check_export(self.ds, records)
        assert not problems, "\n".join(problems)
        periods = self.periods()
        assert sorted(periods) == sorted((s, iso(h)) for s in self.ds.scopes
                                         for h in range(HOURS))
        return records


def task_ids(output: str) -> list[int]:
    found = re.search(r"reprocessing tasks committed: ([\d, ]+)", output)
    assert found, output
    return [int(x) for x in found.group(1).split(",")]


@pytest.fixture
def env(tmp_path, amqp_url):
    e = Env(tmp_path, amqp_url)
    yield e
    e.close()


def by_key(records):
    return {(r["scope_id"], r["begin"], r["type"], r["groupby"]["id"]): r for r in records}


# -- 1 ----------------------------------------------------------------------

def test_reprocess_window_after_rules_change(env):
    """Rules change → reload-rules → reprocess [02:00, 06:00) of two scopes
    over RPC: new prices (per period start) inside, nothing else moves."""
    proc = env.start()
    env.wait_processed()
    before = by_key(env.check_complete())
    assert all(D(r["price"]) == expected_price(r, "v1") for r in before.values())
    periods_before = env.periods()

    env.set_rules(RULES_V2)
    out = env.manage("reload-rules").stdout
    assert "reload_rules sent to every worker" in out
    log = env.tmp_path / "daemon.log"
    daemon.wait_until(lambda: log.read_text().count("reloaded its configuration") >= 2,
                      timeout=30, what="both workers reloaded")
    # quote over RPC prices with the rules in force in the daemon
    usage = env.tmp_path / "usage.json"
    usage.write_text(json.dumps({"resources": [{"service": "instance", "volume": "3"}],
                                 "period_start": iso(1)}))
    assert env.manage("quote", "--usage", str(usage)).stdout.strip() == "0.06"

    s0, s1, s2 = env.ds.scopes
    out = env.manage("reprocess", "--scope", s0, "--scope", s1, "--begin", iso(2),
                     "--end", iso(6), "--reason", "price change").stdout
    ids = task_ids(out)
    assert len(ids) == 2
    tasks = env.wait_tasks_done(ids)
    assert [(t.done_periods, t.total_periods) for t in tasks] == [(4, 4), (4, 4)]

    after = by_key(env.check_complete())
    assert after.keys() == before.keys()
    inside = 0
    for key, rec in after.items():
        hour = (datetime.datetime.fromisoformat(rec["begin"]) - T0).seconds // 3600
        if rec["scope_id"] in (s0, s1) and 2 <= hour < 6:
            assert D(rec["price"]) == expected_price(rec, "v2"), rec
            inside += rec["type"] != "requests_count"
        else:
            assert rec == before[key]
    assert inside > 0
    # period rows: re-written inside the window only
    periods_after = env.periods()
    for (scope, begin), committed in periods_after.items():
        hour = (datetime.datetime.fromisoformat(begin) - T0).seconds // 3600
        moved = committed != periods_before[(scope, begin)]
        assert moved == (scope in (s0, s1) and 2 <= hour < 6), (scope, begin)

    status = json.loads(env.manage("status", "--json").stdout)
    assert [(t["id"], t["state"], t["done_periods"], t["total_periods"])
            for t in status["tasks"]] == [(ids[0], "done", 4, 4), (ids[1], "done", 4, 4)]
    table = env.manage("status").stdout
    assert "reprocessing tasks" in table and "4/4" in table
    assert daemon.stop_daemon(proc) == 0
    text = log.read_text()
    assert "guest:guest@" not in text  # the transport URL password is masked
    assert "rabbit://guest:***@" in text
    assert "Traceback" not in text


# -- 2 ----------------------------------------------------------------------

def test_worker_killed_mid_task_finishes_each_period_once(tmp_path):
    """Each worker SIGKILLs itself inside its 3rd re-rated period's
    transaction (rows replaced, task advanced, not committed); respawned
    workers finish the tasks: every period exactly once, new prices."""
    env = Env(tmp_path, None, workers=2, scopes=2)
    try:
        proc = daemon.run_oneshot(env.conf)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        before = by_key(env.check_complete())
        env.set_rules(RULES_V2)
        out = env.manage("reprocess", "--all", "--begin", iso(0), "--end", iso(HOURS),
                         "--reason", "kill test").stdout
        ids = task_ids(out)
        assert len(ids) == 2
        proc = daemon.run_oneshot(env.conf, env={"CKP_FAULTS": "during_reprocess_commit:3"})
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output
        assert output.count("killed by signal") >= 2  # both workers died at least once
        tasks = env.storage.list_tasks(ids=ids)
        assert [(t.state, t.done_periods, t.total_periods) for t in tasks] == \
            [("done", HOURS, HOURS)] * 2
        after = by_key(env.check_complete())
        assert after.keys() == before.keys()
        assert all(D(r["price"]) == expected_price(r, "v2") for r in after.values())
    finally:
        env.close()


# -- 3 ----------------------------------------------------------------------

def test_same_request_twice_and_while_stopped_rate_once(env):
    proc = daemon.run_oneshot(env.conf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env.check_complete()
    env.set_rules(RULES_V2)
    s0 = env.ds.scopes[0]
    args = ("reprocess", "--scope", s0, "--begin", iso(1), "--end", iso(5),
            "--reason", "twice")

    # daemon stopped: the RPC client says so, and how to write it anyway
    failed = env.manage(*args, "--timeout", "2", check=False)
    assert failed.returncode == 1
    assert (f"no cloudkitty-proc worker answered on topic {env.topic} within 2 s "
            "(is the daemon running? transport_url=rabbit://guest:***@") in failed.stderr
    assert "--direct" in failed.stderr and "guest:guest" not in failed.stderr
    first = task_ids(env.manage(*args, "--direct").stdout)
    assert task_ids(env.manage(*args, "--direct").stdout) == first  # written once
    assert len(env.storage.list_tasks()) == 1

    env.start()  # picks the durable task up
    [task] = env.wait_tasks_done(first)
    assert task.done_periods == 4
    committed = env.periods()
    # the same request again, over RPC now: the same (done) task, nothing re-rated
    assert task_ids(env.manage(*args).stdout) == first
    assert env.call("reprocess", scope_ids=[s0], begin=iso(1), end=iso(5),
                    reason="twice") == first
    time.sleep(2.5)  # more than a poll interval: nothing runs
    assert env.periods() == committed
    assert len(env.storage.list_tasks()) == 1

    # two identical requests racing over RPC: one task, re-rated once
    s1 = env.ds.scopes[1]
    a = env.call("reprocess", scope_ids=[s1], begin=iso(0), end=iso(8), reason="race")
    b = env.call("reprocess", scope_ids=[s1], begin=iso(0), end=iso(8), reason="race")
    assert a == b
    [task] = env.wait_tasks_done(a)
    assert (task.done_periods, task.total_periods) == (8, 8)
    records = env.check_complete()
    for r in records:
        hour = (datetime.datetime.fromisoformat(r["begin"]) - T0).seconds // 3600
        new = (r["scope_id"] == s0 and 1 <= hour < 5) or r["scope_id"] == s1
        assert D(r["price"]) == expected_price(r, "v2" if new else "v1"), r


# -- 4 ----------------------------------------------------------------------

def test_validation_errors_and_malformed_messages(env):
    proc = daemon.run_oneshot(env.conf)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env.start()
    s0 = env.ds.scopes[0]
    good = {"scope_ids": [s0], "begin": iso(1), "end": iso(3), "reason": "r"}

    def refused(method, expected, **kwargs):
        with pytest.raises(messaging.RemoteRequestError) as info:
            env.call(method, **kwargs)
        assert re.search(expected, str(info.value)), str(info.value)

    bad_reprocess = [
        ({"reason": None}, "missing argument 'reason'"),
        ({"begin": None, "end": None}, "missing arguments 'begin', 'end'"),
        ({"colour": "blue"}, "unknown argument 'colour'"),
        ({"begin": "yesterday"}, "invalid begin 'yesterday': expected ISO 8601"),
        ({"end": 1767225600}, "end: expected an ISO 8601 string, got int"),
        ({"scope_ids": s0}, "scope_ids: expected a list of scope ids or \"ALL\", got the string"),
        ({"scope_ids": {"a": 1}}, "scope_ids: expected .* got dict"),
        ({"scope_ids": []}, "scope_ids: .* empty list"),
        ({"scope_ids": [s0, 7]}, "every scope id must be a non-empty string, got 7"),
        ({"scope_ids": ["nope", s0]}, "unknown scope: nope"),
        ({"reason": ""}, "reason: must not be empty"),
        ({"reason": ["x"]}, "reason: expected a string, got list"),
        ({"begin": "2026-01-01T01:30:00Z"}, "begin .* is not aligned to the period"),
        ({"begin": iso(3), "end": iso(1)}, "must be before end"),
        ({"end": iso(HOURS + 1)}, f"scope {s0}: end .* is beyond what was processed"),
        ({"request_id": 5}, "request_id: expected a string"),
    ]
    for change, expected in bad_reprocess:
        kwargs = {k: v for k, v in {**good, **change}.items() if v is not None}
        refused("reprocess", expected, **kwargs)
    # an overlapping window of another pending task: refused with the reason
    # (the test holds the scope's lock, so the task stays pending: invariant 5)
    from tooz import coordination
    holder = coordination.get_coordinator(f"file://{env.tmp_path}/state/locks", b"holder")
    holder.start()
    # its lease: its partition's, with the default partition count
    lock = holder.get_lock(partition_lock_name(partition_of(s0, 64), 64))
    assert lock.acquire(blocking=False)
    try:
        env.storage.create_reprocess_tasks([s0], T0 + datetime.timedelta(hours=2),
                                           T0 + datetime.timedelta(hours=4), "held", 3600)
        refused("reprocess", r"overlaps task \d+ .*'held'", **good)
        time.sleep(1.5)  # a poll interval: the workers see the task, cannot run it
        status = env.call("status")
        assert [(t["reason"], t["state"]) for t in status["tasks"]] == [("held", "pending")]
    finally:
        lock.release()
        holder.stop()

    refused("reset_state", "missing argument 'to'", scope_ids=[s0])
    refused("reset_state", "invalid to 'soon'", scope_ids=[s0], to="soon")
    refused("reset_state", "scope_ids: expected a list of scope ids, got the string 'ALL'",
            scope_ids="ALL", to=iso(2))
    refused("reset_state", "unknown scope: ghost", scope_ids=["ghost"], to=iso(2))
    refused("reset_state", "to .* is not aligned", scope_ids=[s0], to="2026-01-01T02:00:01Z")
    refused("reset_state", "resetting forward would skip periods", scope_ids=[s0],
            to=iso(HOURS + 2))
    refused("quote", "missing argument 'usage'")
    refused("quote", "usage: expected a quote body", usage=5)
    refused("quote", r"'volume' is missing", usage={"resources": [{"service": "instance"}]})
    refused("status", "unknown argument 'verbose'", verbose=True)
    refused("reload_rules", "unknown argument 'now'", now=1)
    refused("no_such_method", "does not support RPC method no_such_method")

    # the worker kept serving
    status = env.call("status")
    assert status["topic"] == env.topic and status["worker"].startswith("test-")
    # tests use topics of their own; the contract's topic is the default
    [opt] = [o for o in ckp_conf.default_opts if o.name == "rpc_topic"]
    assert opt.default == messaging.TOPIC == "cloudkitty_proc"
    assert env.call("quote", usage=[{"service": "instance", "volume": 2}]) == "0.02"
    # the CLI shows the refusal on one line
    out = env.manage("reprocess", "--scope", "nope", "--begin", iso(1), "--end", iso(2),
                     "--reason", "x", check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == ("error: refused by the daemon: unknown scope: nope (not "
                                  "in the scope list of the fetcher)")
    # the same refusals on the database path
    out = env.manage("reprocess", "--scope", s0, "--begin", iso(1), "--end", iso(20),
                     "--reason", "x", "--direct", check=False)
    assert out.returncode == 1 and "is beyond what was processed" in out.stderr
    assert proc.returncode == 0


# -- 5 ----------------------------------------------------------------------

def test_reset_state_rerates_the_to_period(env):
    env.start()
    env.wait_processed()
    env.check_complete()
    committed = env.periods()
    s0 = env.ds.scopes[0]
    out = env.manage("reset-state", "--scope", s0, "--to", iso(3)).stdout
    assert f"scope {s0}: next period rated is {iso(3)}" in out
    env.wait_processed()

    def rerated():
        periods = env.periods()
        return all(periods[(s0, iso(h))] != committed[(s0, iso(h))]
                   for h in range(3, HOURS))
    daemon.wait_until(rerated, timeout=30, what="periods from 03:00 re-rated")
    periods = env.periods()
    for (scope, begin), at in periods.items():
        hour = (datetime.datetime.fromisoformat(begin) - T0).seconds // 3600
        assert (at != committed[(scope, begin)]) == (scope == s0 and hour >= 3)
    # the `to` period itself is there, exactly once (CloudKitty skips it)
    env.check_complete()


# -- the CLI when nothing answers ---------------------------------------------

def test_cli_without_broker_or_transport(tmp_path):
    """An unreachable broker is one clear line with the password masked;
    without transport_url the commands use the database, and reload-rules
    says to send SIGHUP."""
    down = tmp_path / "down"
    down.mkdir()
    env = Env(down, "rabbit://ops:s3cret@127.0.0.1:1/", scopes=1)
    try:
        s0 = env.ds.scopes[0]
        out = env.manage("reset-state", "--scope", s0, "--to", iso(0), "--timeout", "3",
                         check=False)
        assert out.returncode == 1
        assert "cannot reach the message broker" in out.stderr
        assert "rabbit://ops:***@127.0.0.1:1/" in out.stderr and "s3cret" not in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        env.close()
    local = tmp_path / "local"
    local.mkdir()
    env = Env(local, None, scopes=1)
    try:
        s0 = env.ds.scopes[0]
        out = env.manage("reload-rules", check=False)
        assert out.returncode == 1 and "send SIGHUP" in out.stderr
        # reset-state without AMQP: straight into the database, same checks
        out = env.manage("reset-state", "--scope", s0, "--to", iso(2), check=False)
        assert out.returncode == 1 and "resetting forward would skip periods" in out.stderr
        out = env.manage("reset-state", "--scope", s0, "--to", iso(-1)).stdout
        assert f"scope {s0}: next period rated is {iso(-1)}" in out
        assert env.storage.get_state(s0).last_processed == T0 - datetime.timedelta(hours=2)
        out = env.manage("reset-state", "--scope", "ghost", "--to", iso(2), check=False)
        assert out.returncode == 1 and "unknown scope: ghost" in out.stderr
    finally:
        env.close()


def test_wrong_broker_password_is_one_line_without_the_password(tmp_path, amqp_url):
    """A broker refusing the login was a traceback (issue 15, unclear errors)."""
    assert amqp_url.startswith("rabbit://guest:guest@")
    env = Env(tmp_path, amqp_url.replace("guest:guest@", "guest:Wr0ng@pw@"))
    try:
        failed = env.manage("reprocess", "--scope", env.ds.scopes[0], "--begin", iso(1),
                            "--end", iso(2), "--reason", "x", "--timeout", "5", check=False)
        assert failed.returncode == 1
        assert "Traceback" not in failed.stderr
        [line] = [x for x in failed.stderr.splitlines() if x.strip()]
        assert line.startswith("error: the message broker at rabbit://guest:***@127.0.0.1")
        assert "ACCESS_REFUSED" in line and "Wr0ng" not in line
        assert env.storage.list_tasks() == []  # nothing written behind the operator's back
    finally:
        env.close()
