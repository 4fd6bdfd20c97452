"""PrometheusCollector.retrieve_batch: several scopes in one query.

Against a real Prometheus (tests/prometheus_server.py) holding samples of
tools/gen_openmetrics.py for scope ids full of regex metacharacters, a
batch over all scopes returns, for each, exactly what ``retrieve`` returns
for it alone (points and order). The failure paths (one scope's malformed
value, a failed batch) are played by the tests' fake Prometheus
(tests/fakes/prometheus.py), which understands the batched query too.
"""

from __future__ import annotations

import datetime
import importlib.util
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from cloudkitty_proc.collectors import prometheus
from cloudkitty_proc.collectors.prometheus import PrometheusCollector
from cloudkitty_proc.exceptions import CollectError
from tests import datagen
from tests.fakes.prometheus import DatasetPrometheus, FakePrometheus
from tests.functional.test_collector_prometheus import make_conf, metrics_conf
from tests.prometheus_server import running_prometheus

ROOT = Path(__file__).resolve().parents[2]
UTC = datetime.timezone.utc
BEGIN = datetime.datetime(2026, 1, 1, tzinfo=UTC)
HOURS = 6
#: scope ids of the dataset: RE2 metacharacters, quotes and backslashes
#: (an unescaped "x+y" or "p|q" would not match itself: a wrong escaping
#: shows as missing points, not only as extra ones)
SCOPES = ["a.b", "x+y", "p|q", "r[1]", "s{2}", "t^$", 'w"q', "u\\v", "(z)?*", "plain"]
#: asked, not in the dataset: no data
NO_DATA = "nobody"


def hour(n: int, hours: int = 1) -> tuple[datetime.datetime, datetime.datetime]:
    return (BEGIN + datetime.timedelta(hours=n),
            BEGIN + datetime.timedelta(hours=n + hours))


PERIODS = [hour(-1), hour(0), hour(3), hour(HOURS - 1), hour(HOURS), hour(2, hours=2),
           (BEGIN + datetime.timedelta(minutes=65), BEGIN + datetime.timedelta(minutes=70))]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_openmetrics",
                                                  ROOT / "tools" / "gen_openmetrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.project_ids = lambda count: SCOPES[:count]
    return module


@pytest.fixture(scope="module")
def prom_url(tmp_path_factory):
    path = tmp_path_factory.mktemp("usage") / "usage.om"
    with open(path, "w", encoding="utf-8") as fh:
        _generator().generate(fh, projects=len(SCOPES), begin=BEGIN, hours=HOURS, step=300)
    with running_prometheus(path, tmp_path_factory.mktemp("prometheus")) as url:
        yield url


def collector(url, **options):
    opts = {"prometheus_url": url, "retries": 0, "max_backoff": 0, **options}
    return PrometheusCollector(make_conf(collector_prometheus=opts), metrics_conf())


def every_metric(tmp_path):
    """metrics.yml's definitions, and variants with every aggregation, a
    query_function (ln of a ratio is negative: refused) and a
    range_function."""
    defs = {
        "cpu_utilization_ratio": [
            *({"unit": "r", "alt_name": f"cpu.{a}", "groupby": ["id"],
               "extra_args": {"aggregation_method": a}}
              for a in ("avg", "count", "min", "stddev", "sum")),
            {"unit": "r", "alt_name": "cpu.ceil", "groupby": ["id"],
             "extra_args": {"aggregation_method": "avg", "query_function": "ceil"}},
            {"unit": "r", "alt_name": "cpu.ln", "groupby": ["id"],
             "extra_args": {"aggregation_method": "avg", "query_function": "ln"}},
            {"unit": "r", "alt_name": "cpu.all", "extra_args": {"aggregation_method": "max"}},
        ],
        "volume_size_bytes": [
            {"unit": "GiB/s", "alt_name": "volume.rate", "groupby": ["id"],
             "extra_args": {"aggregation_method": "sum", "range_function": "delta"}}],
    }
    path = tmp_path / "metrics.yml"
    path.write_text(yaml.safe_dump({"metrics": defs}, sort_keys=False))
    return [*metrics_conf(), *metrics_conf(path)]


def alone(coll, metric, scope, period):
    """retrieve() for one scope, or None when it fails (what a batch gives
    for a scope whose values are not quantities)."""
    try:
        return coll.retrieve(metric, scope, *period)
    except CollectError as exc:
        assert exc.kind == "malformed", exc
        return None


# ---------------------------------------------------------------------------
# Real Prometheus
# ---------------------------------------------------------------------------

def test_batch_equals_per_scope_queries(prom_url, tmp_path):
    coll = collector(prom_url)
    asked = [*SCOPES, NO_DATA]
    nonempty = refused = 0
    try:
        for metric in every_metric(tmp_path):
            assert coll.batchable(metric)
            for period in PERIODS:
                got = coll.retrieve_batch(metric, asked, *period)
                assert list(got) == asked
                for scope in asked:
                    expected = alone(coll, metric, scope, period)
                    # the same points, in the same order
                    assert got[scope] == expected, (metric.label, scope, period)
                    nonempty += bool(expected)
                    refused += expected is None
                assert got[NO_DATA] == []
    finally:
        coll.close()
    assert nonempty > 500 and refused > 0


def test_batch_of_some_scopes_only_returns_those(prom_url):
    """Series of scopes not asked are not returned; a one-scope batch is
    the scope's own answer; the order of the ids asked does not matter."""
    coll = collector(prom_url)
    try:
        metric = metrics_conf().metrics[0]
        period = hour(2)
        got = coll.retrieve_batch(metric, ["p|q", "a.b"], *period)
        assert list(got) == ["p|q", "a.b"]
        assert got["p|q"] == coll.retrieve(metric, "p|q", *period) != []
        assert got["a.b"] == coll.retrieve(metric, "a.b", *period) != []
        assert coll.retrieve_batch(metric, ["x+y"], *period) == {
            "x+y": coll.retrieve(metric, "x+y", *period)}
        # "p" and "q" are not "p|q"; "xy" is not "x+y"
        assert coll.retrieve_batch(metric, ["p", "q", "xy"], *period) == {
            "p": [], "q": [], "xy": []}
    finally:
        coll.close()


def _recording_proxy(upstream: str) -> FakePrometheus:
    """A fake that forwards each request (GET, or POST with its body) to
    ``upstream`` and records it."""

    def forward(handler):
        parsed = urllib.parse.urlsplit(handler.path)
        url = upstream + parsed.path + (f"?{parsed.query}" if parsed.query else "")
        request = urllib.request.Request(url, data=handler.body, method=handler.command)
        if handler.body is not None:
            request.add_header("Content-Type", handler.headers["Content-Type"])
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read()

    return FakePrometheus(forward)


def test_long_batch_goes_by_post(prom_url):
    """300 scopes make a query longer than POST_QUERY_BYTES: a form-encoded
    POST, which Prometheus answers as the GET; a short batch stays a GET."""
    many = [*SCOPES, *(f"missing-{i:03d}.x" for i in range(290))]
    metric = metrics_conf().metrics[1]
    period = hour(4)
    with _recording_proxy(prom_url) as proxy:
        coll = collector(proxy.url)
        try:
            got = coll.retrieve_batch(metric, many, *period)
            short = coll.retrieve_batch(metric, SCOPES[:2], *period)
        finally:
            coll.close()
    post, get = proxy.requests
    assert post["method"] == "POST" and post["path"] == "/api/v1/query"
    assert post["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert len(post["body"]) > prometheus.POST_QUERY_BYTES
    assert set(post["params"]) == {"query", "time"}
    assert post["params"]["time"] == "2026-01-01T05:00:00Z"
    assert get["method"] == "GET" and get["body"] is None
    assert len(urllib.parse.urlencode(get["params"])) <= prometheus.POST_QUERY_BYTES
    plain = collector(prom_url)
    try:
        for scope in many:
            assert got[scope] == plain.retrieve(metric, scope, *period), scope
        assert short == {s: got[s] for s in SCOPES[:2]}
    finally:
        plain.close()
    assert sum(bool(got[s]) for s in SCOPES) >= 5
    assert all(got[s] == [] for s in many[len(SCOPES):])


# ---------------------------------------------------------------------------
# The fake Prometheus: malformed values, failed batches
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    ds = datagen.generate(n_scopes=4, hours=4, scope_prefix="s.+")
    tmp = tmp_path_factory.mktemp("ds")
    (tmp / "usage.om").write_text(ds.openmetrics)
    (tmp / "metrics.yml").write_text(datagen.METRICS_YML)
    return ds, tmp / "usage.om", tmp / "metrics.yml"


def fake_collector(url, metrics_yml, **options):
    opts = {"prometheus_url": url, "retries": 0, "max_backoff": 0, **options}
    return PrometheusCollector(make_conf(collector_prometheus=opts),
                               metrics_conf(metrics_yml))


def test_fake_answers_batches_as_per_scope_queries(dataset):
    ds, om, yml = dataset
    seen = []
    with DatasetPrometheus(om, yml, fault=lambda q: seen.append(q)) as fake:
        coll = fake_collector(fake.url, yml)
        period = (ds.begin, ds.begin + datetime.timedelta(hours=1))
        nonempty = 0
        for metric in coll.metrics:
            got = coll.retrieve_batch(metric, [*ds.scopes, "none"], *period)
            for scope in ds.scopes:
                assert got[scope] == coll.retrieve(metric, scope, *period)
                nonempty += bool(got[scope])
            assert got["none"] == []
        coll.close()
    assert nonempty >= 2 * len(ds.scopes)
    batch = seen[0]
    assert batch.scopes == (*ds.scopes, "none") and batch.scope == ds.scopes[0]
    assert batch.attempt == 1 and batch.metric == coll.metrics.metrics[0].name
    assert seen[1].scopes == (ds.scopes[0],) and seen[1].attempt == 2
    assert fake.total == len(seen) == 3 * (1 + len(ds.scopes))


@pytest.mark.parametrize("bad", ["-1", "abc", "NaN"])
def test_malformed_value_of_one_scope_is_none_for_it_only(dataset, bad):
    ds, om, yml = dataset
    victim = ds.scopes[1]

    def fault(q):
        if len(q.scopes) > 1:
            reply = fake.answer(q)
            for item in reply["data"]["result"]:
                if item["metric"]["project_id"] == victim:
                    item["value"][1] = bad
            return ("reply", 200, reply)
        return None

    with DatasetPrometheus(om, yml, fault=fault) as fake:
        coll = fake_collector(fake.url, yml, retries=2)
        metric = coll.metrics.metrics[1]     # volumes: every scope, every hour
        period = (ds.begin, ds.begin + datetime.timedelta(hours=1))
        got = coll.retrieve_batch(metric, ds.scopes, *period)
        # one query: the batch is not retried for one scope's values
        assert len(fake.requests) == 1
        assert got[victim] is None
        for scope in ds.scopes:
            if scope != victim:
                assert got[scope] == coll.retrieve(metric, scope, *period) != []
        coll.close()


@pytest.mark.parametrize("action, kind, requests", [
    (("reply", 503, b"busy"), "http", 3),
    (("reply", 200, b"<html>garbage</html>"), "malformed", 3),
    (("reply", 200, {"status": "success", "data": {"resultType": "matrix", "result": []}}),
     "malformed", 3),
    (("reply", 200, {"status": "success", "warnings": ["store down"],
                     "data": {"resultType": "vector", "result": []}}), "partial", 3),
    (("reply", 400, {"status": "error", "errorType": "bad_data", "error": "parse error"}),
     "http", 1),
    (("close",), "connection", 3),
], ids=["5xx", "garbage", "matrix", "partial", "4xx", "hang-up"])
def test_failed_batch_raises_collect_error(dataset, action, kind, requests):
    ds, om, yml = dataset
    with DatasetPrometheus(om, yml, fault=lambda q: action) as fake:
        coll = fake_collector(fake.url, yml, retries=2)
        metric = coll.metrics.metrics[1]
        with pytest.raises(CollectError) as err:
            coll.retrieve_batch(metric, ds.scopes, ds.begin,
                                ds.begin + datetime.timedelta(hours=1))
        coll.close()
    exc = err.value
    assert exc.kind == kind and exc.metric == metric.label and exc.scope_id is None
    assert str(exc).startswith(f"metric {metric.label}: batch of {len(ds.scopes)} scopes: ")
    assert len(fake.requests) == requests
    if requests > 1:
        assert str(exc).endswith(f"(after {requests} attempts)")


def test_batch_timeout(dataset):
    ds, om, yml = dataset
    with DatasetPrometheus(om, yml, fault=lambda q: ("sleep", 1.0)) as fake:
        coll = fake_collector(fake.url, yml, timeout=0.2)
        with pytest.raises(CollectError) as err:
            coll.retrieve_batch(coll.metrics.metrics[0], ds.scopes, ds.begin,
                                ds.begin + datetime.timedelta(hours=1))
        coll.close()
    assert err.value.kind == "timeout" and "batch of 4 scopes" in str(err.value)


def test_long_batch_by_post_to_the_fake(dataset):
    ds, om, yml = dataset
    many = [*ds.scopes, *(f"other|{i:03d}" for i in range(300))]
    seen = []
    with DatasetPrometheus(om, yml, fault=lambda q: seen.append(q)) as fake:
        coll = fake_collector(fake.url, yml)
        metric = coll.metrics.metrics[2]
        period = (ds.begin, ds.begin + datetime.timedelta(hours=2))
        got = coll.retrieve_batch(metric, many, *period)
        assert [r["method"] for r in fake.requests] == ["POST"]
        assert seen[0].scopes == tuple(many)
        for scope in many:
            assert got[scope] == coll.retrieve(metric, scope, *period)
        coll.close()
    assert any(got[s] for s in ds.scopes)


def test_batch_exchanges_are_bracketed_by_the_executor_hooks(dataset):
    ds, om, yml = dataset
    attempts = []

    def fault(q):
        attempts.append(q)
        return ("reply", 503, b"busy") if len(attempts) == 1 else None

    with DatasetPrometheus(om, yml, fault=fault) as fake:
        coll = fake_collector(fake.url, yml, retries=1)
        events = []
        coll.set_io_hooks(lambda: events.append("begin"), lambda: events.append("done"))
        got = coll.retrieve_batch(coll.metrics.metrics[1], ds.scopes, ds.begin,
                                  ds.begin + datetime.timedelta(hours=1))
        coll.close()
    assert events == ["begin", "done", "begin", "done"]
    assert attempts[1].attempt == 2 and all(got.values())
