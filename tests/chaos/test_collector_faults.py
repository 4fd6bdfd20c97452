"""Collector faults, end to end: the daemon against a Prometheus (played
from the usage file) that answers one query of one scope with a fault.

For every fault: the query is retried ``retries`` times with exponential
backoff (the server counts retries + 1 requests, each gap longer than the
previous), then the scope is left where it was (its state does not move
past the failure), its error kind shows in ``status --json``, and the other
scopes go on. "No data" (an empty answer) is not an error: the period is
committed empty. Once the backend heals, the next run completes.
"""

from __future__ import annotations

import collections
import datetime
import json
import re
import socket
import time

from cloudkitty_proc.storage.sql import SQLStorage
from tests import daemon, datagen
from tests.chaos import helpers
from tests.fakes.prometheus import DatasetPrometheus

HOUR = datetime.timedelta(hours=1)
RETRIES = 2
TIMEOUT = 0.5
FAILING_METRIC = "volume_size_mebibytes"  # one series at least in every hour

# scope index -> (fault, expected last_error_kind, a word of the message)
FAULTS = {
    0: ("timeout", "timeout", "timed out"),
    1: ("http500", "http", "HTTP 500"),
    2: ("not_json", "malformed", "not JSON"),
    3: ("nan", "malformed", "not a finite number"),
    4: ("negative", "malformed", "negative quantity"),
    5: ("status_error", "malformed", "status 'error'"),
}
NO_DATA = 6      # no sample at all in its third hour: an empty answer
HEALTHY = (7, 8)


def _with_value(answer: dict, value: str) -> dict:
    answer = json.loads(json.dumps(answer))
    for item in answer["data"]["result"]:
        item["value"][1] = value
    assert answer["data"]["result"], "the faulty query must have series"
    return answer


def test_each_collector_fault_is_retried_isolated_and_reported(tmp_path, sqlite_url):
    ds = datagen.generate(n_scopes=9, hours=6, seed=41, scope_prefix="fault-",
                          empty_scope_hours={(NO_DATA, 2)})
    failing_begin = ds.begin + 2 * HOUR
    broken = {"on": True}
    prom = None

    alone: dict[str, list[float]] = collections.defaultdict(list)

    def fault(q):
        if not (broken["on"] and q.begin == failing_begin and q.metric == FAILING_METRIC):
            return None
        if q.batched:
            # a query for several scopes (the worker's batches) that covers
            # a faulty scope fails as a whole: the worker then asks each
            # scope alone, where each fault below applies
            if any(ds.scopes.index(s) in FAULTS for s in q.scopes):
                return ("reply", 500, b"batch: upstream exploded")
            return None
        index = ds.scopes.index(q.scope)
        if index not in FAULTS:
            return None
        alone[q.scope].append(time.monotonic())
        kind = FAULTS[index][0]
        if kind == "timeout":
            return ("sleep", TIMEOUT + 1.0)
        if kind == "http500":
            return ("reply", 500, b"upstream exploded")
        if kind == "not_json":
            return ("reply", 200, b'{"status": "success", "data": {"resu')
        if kind == "nan":
            return ("reply", 200, _with_value(prom.answer(q), "NaN"))
        if kind == "negative":
            return ("reply", 200, _with_value(prom.answer(q), "-5"))
        return ("reply", 200, {"status": "error", "errorType": "execution",
                               "error": "query processing would load too many samples"})

    om = tmp_path / "usage.om"
    om.write_text(ds.openmetrics)
    metrics_yml = tmp_path / "metrics.yml"
    metrics_yml.write_text(datagen.METRICS_YML)
    with DatasetPrometheus(om, metrics_yml, fault=fault) as prom:
        conf = helpers.prepare(tmp_path, sqlite_url, ds, workers=1, collector="prometheus",
                               extra=helpers.prometheus_collector_conf(
                                   prom.url, timeout=TIMEOUT, retries=RETRIES,
                                   max_backoff=2))
        daemon.manage(conf, "db", "upgrade")
        proc = daemon.run_oneshot(conf, timeout=180)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out[-4000:]
        states = helpers.state_of(conf)
        for index, (name, kind, word) in FAULTS.items():
            scope = ds.scopes[index]
            st = states[scope]
            # the state stays on the last good period, the error is recorded
            assert st["last_processed"] == (failing_begin - HOUR).isoformat(), (name, st)
            assert st["last_error_kind"] == kind, (name, st)
            assert word in st["last_error"], (name, st["last_error"])
            assert f"after {RETRIES + 1} attempts" in st["last_error"], (name, st)
            assert f"scope {scope} failed" in out
            # retries + 1 requests of its own, with exponential backoff
            # between them
            times = alone[scope]
            assert len(times) == RETRIES + 1, (name, len(times))
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert gaps[0] >= 0.5 * 0.9 and gaps[1] >= 1.0 * 0.9, (name, gaps)
            assert gaps[1] > gaps[0], (name, gaps)
        # "no data" is not an error: the empty period is committed
        for index in (NO_DATA, *HEALTHY):
            st = states[ds.scopes[index]]
            assert st["last_processed"] == (ds.end - HOUR).isoformat(), st
            assert st["last_error"] is None and st["last_error_kind"] is None, st
        storage = SQLStorage(url=sqlite_url)
        try:
            empty = [p for p in storage.iter_periods(scope_id=ds.scopes[NO_DATA])
                     if p.begin == failing_begin]
        finally:
            storage.close()
        assert len(empty) == 1 and empty[0].points == 0
        # nothing of a failed scope past its last good period
        faulty = {ds.scopes[i] for i in FAULTS}
        got = datagen.export_keys(daemon.export(conf))
        want = {k for k in ds.expected
                if k[0] not in faulty or k[1] < failing_begin.isoformat()}
        assert set(got) == want and max(got.values()) == 1
        # the backend heals: the next run completes every scope, once
        broken["on"] = False
        proc = daemon.run_oneshot(conf, timeout=180)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    problems = datagen.check_export(ds, daemon.export(conf))
    assert not problems, "\n".join(problems)
    assert all(s["last_error"] is None for s in daemon.status(conf)["scopes"])


def test_connection_refused_is_retried_and_reported(tmp_path, sqlite_url):
    """A closed port: every query is retried, then the scopes stay where
    they were with the error kind "connection"."""
    ds = datagen.generate(n_scopes=2, hours=1, seed=42, scope_prefix="refused-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    conf = helpers.prepare(tmp_path, sqlite_url, ds, workers=1, collector="prometheus",
                           extra=helpers.prometheus_collector_conf(
                               closed, timeout=2, retries=RETRIES, max_backoff=0.5))
    daemon.manage(conf, "db", "upgrade")
    proc = daemon.run_oneshot(conf, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    for scope in ds.scopes:
        st = helpers.state_of(conf)[scope]
        assert st["last_processed"] is None
        assert st["last_error_kind"] == "connection", st
        assert "refused" in st["last_error"].lower() and closed in st["last_error"]
        assert f"after {RETRIES + 1} attempts" in st["last_error"]
        # the query of its only period (the batched query of both scopes)
        # was retried RETRIES times, each retry logged with its backoff
        lines = [line for line in out.splitlines()
                 if f"scope {scope}, metric instance_up (as instance): GET {closed}" in line
                 or ("metric instance_up (as instance): batch of 2 scopes" in line
                     and closed in line)]
        retries = [int(m.group(1)) for line in lines
                   if (m := re.search(rf"; retry (\d)/{RETRIES} in ", line))]
        assert retries == list(range(1, RETRIES + 1)), lines
    assert daemon.export(conf) == []
