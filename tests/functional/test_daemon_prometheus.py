"""The daemon with the prometheus collector against a real Prometheus server
backfilled (promtool) from the same OpenMetrics data the file collector reads.
"""

from __future__ import annotations

import datetime
import re
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests import daemon, datagen
from tests.fakes.prometheus import FakePrometheus
from tests.prometheus_server import running_prometheus


@pytest.fixture(scope="module")
def dataset():
    return datagen.generate(n_scopes=10, hours=24, seed=5, empty_scope_hours={(4, 10)})


@pytest.fixture(scope="module")
def prom_url(dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("prom")
    om = work / "usage.om"
    om.write_text(dataset.openmetrics)
    with running_prometheus(om, work) as url:
        yield url


class FailingProxy:
    """The tests' fake Prometheus forwarding queries to ``upstream``, but
    answering 500 to the queries of one scope for periods ending after
    ``fail_after_ts`` while ``broken`` is set."""

    def __init__(self, upstream: str, scope: str, fail_after_ts: float) -> None:
        self.upstream = upstream
        self.scope = scope
        self.fail_after_ts = fail_after_ts
        self.broken = True
        self.failed = 0
        self.fake = FakePrometheus(self._reply).__enter__()
        self.url = self.fake.url

    def _asks_scope(self, query: str) -> bool:
        """The query asks for the scope: alone (``project_id="s"``) or in a
        batch (``project_id=~"a|s|b"``: the batched query then fails as a
        whole, and the worker asks each of its scopes alone)."""
        match = re.search(r'project_id(=~?)"((?:[^"\\]|\\.)*)"', query)
        if match is None:
            return False
        if match.group(1) == "=":
            return match.group(2) == self.scope
        return self.scope in match.group(2).split("|")  # (ids without metacharacters)

    def _reply(self, handler):
        params = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        query = params.get("query", [""])[0]
        # an instant query's time, or a range query's last step (the range
        # fails as a whole when a step is after fail_after_ts)
        ts = (params.get("time") or params.get("end") or [""])[0]
        t = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() if ts else 0
        if self.broken and self._asks_scope(query) and t > self.fail_after_ts:
            with self.fake.lock:
                self.failed += 1
            return 500, b'{"status":"error","errorType":"internal","error":"boom"}'
        try:
            with urllib.request.urlopen(self.upstream + handler.path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def close(self):
        self.fake.__exit__(None, None, None)


def _conf(tmp_path, db_url, ds, url, name="ckp.conf"):
    return daemon.write_config(
        tmp_path, db_url=db_url, scopes=ds.scopes, begin=ds.begin.isoformat(),
        end=ds.end.isoformat(), metrics_yml=datagen.METRICS_YML, collector="prometheus",
        name=name, extra=f"""
        [collector_prometheus]
        prometheus_url = {url}
        retries = 1
        max_backoff = 0.2
        timeout = 10
        """)


def test_prometheus_collector_gives_exactly_the_file_collector_rows(tmp_path, dataset,
                                                                   prom_url):
    prom_dir = tmp_path / "prom"
    file_dir = tmp_path / "file"
    prom_dir.mkdir()
    file_dir.mkdir()
    conf_p = _conf(prom_dir, f"sqlite:///{prom_dir}/db.sqlite", dataset, prom_url)
    om = file_dir / "usage.om"
    om.write_text(dataset.openmetrics)
    conf_f = daemon.write_config(
        file_dir, db_url=f"sqlite:///{file_dir}/db.sqlite", scopes=dataset.scopes,
        begin=dataset.begin.isoformat(), end=dataset.end.isoformat(),
        metrics_yml=datagen.METRICS_YML, om_path=om)
    for conf in (conf_p, conf_f):
        daemon.manage(conf, "db", "upgrade")
        proc = daemon.run_oneshot(conf)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    rows_p = daemon.export(conf_p)
    rows_f = daemon.export(conf_f)
    assert len(rows_p) > 500
    assert rows_p == rows_f
    assert not datagen.check_export(dataset, rows_p)


def test_500_for_one_scope_leaves_its_state_and_others_complete(tmp_path, dataset,
                                                                prom_url):
    """Invariant 4 end to end: Prometheus answers 500 for proj-002 from its
    6th period on. The oneshot run exits 1; every other scope is complete;
    proj-002 stops at its 5th period with the error recorded; once healed,
    a second run completes it with nothing doubled."""
    bad = dataset.scopes[2]
    fail_after = dataset.begin.timestamp() + 5 * 3600  # periods ending after 05:00
    proxy = FailingProxy(prom_url, bad, fail_after)
    try:
        conf = _conf(tmp_path, f"sqlite:///{tmp_path}/db.sqlite", dataset, proxy.url)
        daemon.manage(conf, "db", "upgrade")
        proc = daemon.run_oneshot(conf)
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr
        assert proxy.failed >= 2  # retried before giving up
        assert f"scope {bad} failed" in proc.stdout
        states = {s["scope_id"]: s for s in daemon.status(conf)["scopes"]}
        assert states[bad]["last_processed"] == "2026-01-01T04:00:00+00:00"
        assert "HTTP 500" in states[bad]["last_error"] or "500" in states[bad]["last_error"]
        for sid in dataset.scopes:
            if sid != bad:
                assert states[sid]["last_processed"] == "2026-01-01T23:00:00+00:00", sid
                assert states[sid]["last_error"] is None
        partial = daemon.export(conf)
        assert {r["begin"] for r in partial if r["scope_id"] == bad} <= {
            f"2026-01-01T{h:02d}:00:00+00:00" for h in range(5)}
        proxy.broken = False
        proc = daemon.run_oneshot(conf)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
        assert not datagen.check_export(dataset, daemon.export(conf))
    finally:
        proxy.close()


def test_unreachable_prometheus_is_one_clear_line(tmp_path, dataset):
    conf = _conf(tmp_path, f"sqlite:///{tmp_path}/db.sqlite", dataset, "http://127.0.0.1:9")
    proc = daemon.manage(conf, "check", check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "http://127.0.0.1:9" in errors[0], proc.stderr
