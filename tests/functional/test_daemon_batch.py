"""Batched collection end to end: the daemon against a real Prometheus
(backfilled with promtool), scopes leased by partition and collected with
one query per metric for a batch of scopes and a chunk of periods.

One scope's exporter is broken for one hour (a negative volume size): that
scope fails alone at that hour, its error recorded, its state on the hour
before; every other scope commits every period, and their rows are those
of a run with CloudKitty's per-scope queries.
"""

from __future__ import annotations

import collections
import datetime
import re
import urllib.request

import pytest

from tests import daemon, datagen
from tests.prometheus_server import running_prometheus

HOUR = datetime.timedelta(hours=1)
BROKEN_HOUR = 3
METRIC = "volume_size_mebibytes"


@pytest.fixture(scope="module")
def dataset():
    return datagen.generate(n_scopes=8, hours=8, seed=77, scope_prefix="batch-")


def _broken(ds) -> tuple[str, str]:
    """(victim scope, OpenMetrics with its volume samples of BROKEN_HOUR
    negative)."""
    victim = ds.scopes[3]
    start = (ds.begin + BROKEN_HOUR * HOUR).timestamp()
    lines = []
    changed = 0
    for line in ds.openmetrics.splitlines():
        if line.startswith(METRIC + "{") and f'project_id="{victim}"' in line:
            labels, value, ts = line.rsplit(" ", 2)
            if start < float(ts) <= start + 3600:
                line = f"{labels} -5 {ts}"
                changed += 1
        lines.append(line)
    assert changed, "the victim must have volume samples in that hour"
    return victim, "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def prom(dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("prom-batch")
    om = work / "usage.om"
    om.write_text(_broken(dataset)[1])
    with running_prometheus(om, work) as url:
        yield url


def _conf(tmp_path, ds, url, mode: str):
    extra = {
        "batched": "",   # the defaults: partitions, batches, range queries
        "per-scope": "[orchestrator]\nlease_partitions = 0\n"
                     "[collect]\nmax_scopes_per_query = 1\n",
    }[mode]
    tmp_path.mkdir(exist_ok=True)
    return daemon.write_config(
        tmp_path, db_url=f"sqlite:///{tmp_path}/db.sqlite", scopes=ds.scopes,
        begin=ds.begin.isoformat(), end=ds.end.isoformat(), metrics_yml=datagen.METRICS_YML,
        collector="prometheus", workers=2,
        extra=(f"[collector_prometheus]\nprometheus_url = {url}\nretries = 1\n"
               f"max_backoff = 0.2\ntimeout = 10\n{extra}"))


def _requests(url: str) -> dict[str, float]:
    """Prometheus' own count of HTTP requests by handler."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out: dict[str, float] = collections.Counter()
    for m in re.finditer(r'^prometheus_http_requests_total\{code="\d+",handler="([^"]+)"\} '
                         r'(\S+)$', text, re.M):
        out[m.group(1)] += float(m.group(2))
    return out


def _rows(conf, exclude: str):
    """The exported rows of every scope but ``exclude``, as a sorted list
    (a range reply may order the rows of one scope, period and type
    otherwise than per-period queries: design.rst)."""
    return sorted((r for r in daemon.export(conf) if r["scope_id"] != exclude),
                  key=lambda r: repr(sorted(r.items())))


def test_a_malformed_scope_fails_alone_and_the_batch_matches_per_scope(tmp_path, dataset,
                                                                        prom):
    ds = dataset
    victim, _om = _broken(ds)
    broken_begin = ds.begin + BROKEN_HOUR * HOUR
    results = {}
    for mode in ("batched", "per-scope"):
        conf = _conf(tmp_path / mode, ds, prom, mode)
        daemon.manage(conf, "db", "upgrade")
        before = _requests(prom)
        proc = daemon.run_oneshot(conf)
        after = _requests(prom)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out[-3000:]   # the victim failed
        asked = {h: after[h] - before.get(h, 0) for h in after}
        states = {s["scope_id"]: s for s in daemon.status(conf)["scopes"]}
        st = states[victim]
        assert st["last_processed"] == (broken_begin - HOUR).isoformat(), (mode, st)
        assert st["last_error_kind"] == "malformed", (mode, st)
        assert "negative quantity" in st["last_error"] and \
            f"period {broken_begin.isoformat()}" in st["last_error"], st["last_error"]
        for scope in ds.scopes:
            if scope != victim:
                assert states[scope]["last_processed"] == (ds.end - HOUR).isoformat(), \
                    (mode, states[scope])
                assert states[scope]["last_error"] is None
        results[mode] = (_rows(conf, victim), asked)
    batched_rows, batched_asked = results["batched"]
    per_scope_rows, per_scope_asked = results["per-scope"]
    # the others' rows are those of CloudKitty's per-scope queries
    assert batched_rows == per_scope_rows and len(batched_rows) > 100
    got = datagen.export_keys(batched_rows)
    want = {k for k in ds.expected if k[0] != victim}
    assert set(got) == want and max(got.values()) == 1
    # per scope: one instant query per scope, metric and period (and the
    # victim's retries); batched: range queries, and the few instant
    # queries of the failed hour (the batch's, then the victim's alone)
    assert per_scope_asked.get("/api/v1/query_range", 0) == 0
    assert per_scope_asked["/api/v1/query"] >= len(ds.scopes) * ds.hours * 3 - 3 * 8
    assert 0 < batched_asked["/api/v1/query_range"] <= 2 * 3 * 2
    assert batched_asked.get("/api/v1/query", 0) <= 10
