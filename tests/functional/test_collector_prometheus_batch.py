"""PrometheusCollector.retrieve_batch: several scopes in one query.

Against a real Prometheus (tests/prometheus_server.py) holding samples of
tools/gen_openmetrics.py for scope ids full of regex metacharacters, a
batch over all scopes returns, for each, exactly what ``retrieve`` returns
for it alone (points and order), and ``retrieve_batch_periods`` (the same
query as one range query over consecutive periods) returns for each
period what ``retrieve_batch`` returns for it (the same points; their
order may differ, see test_range_batch_equals_batches_per_period). The
failure paths (one scope's malformed value, a failed batch) are played by
the tests' fake Prometheus (tests/fakes/prometheus.py), which understands
the batched query and range queries too.
"""

from __future__ import annotations

import datetime
import importlib.util
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from cloudkitty_proc.collectors import prometheus_batch
from cloudkitty_proc.collectors.prometheus import PrometheusCollector
from cloudkitty_proc.exceptions import CollectError
from tests import datagen
from tests.fakes.prometheus import EMPTY_VECTOR, DatasetPrometheus, FakePrometheus
from tests.functional.test_collector_prometheus import canon, make_conf, metrics_conf
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
    assert len(post["body"]) > prometheus_batch.POST_QUERY_BYTES
    assert set(post["params"]) == {"query", "time"}
    assert post["params"]["time"] == "2026-01-01T05:00:00Z"
    assert get["method"] == "GET" and get["body"] is None
    assert len(urllib.parse.urlencode(get["params"])) <= prometheus_batch.POST_QUERY_BYTES
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
# Range queries: several periods of a batch in one query (real Prometheus)
# ---------------------------------------------------------------------------

def chunks(periods, size):
    return [periods[i:i + size] for i in range(0, len(periods), size)]


def minutes(n: int, length: int = 5) -> tuple[datetime.datetime, datetime.datetime]:
    return (BEGIN + datetime.timedelta(minutes=n),
            BEGIN + datetime.timedelta(minutes=n + length))


def assert_same_points(got, expected, what):
    """The same points (values, labels, units) as a multiset, or both None.

    Not in the same order: Prometheus sorts the series of a range reply by
    their labels, while an instant reply keeps the order of the
    aggregation (on this data, 234 of 557 (scope, period) pairs with more
    than one point came in another order)."""
    if expected is None or got is None:
        assert got is expected is None, what
    else:
        assert canon(got) == canon(expected), what


def test_range_batch_equals_batches_per_period(prom_url, tmp_path):
    """For every metric, chunks of consecutive periods (hours from before
    the data to after it, 5-minute periods; chunks of 1, 3 and 5, the last
    one partial): each period's answer is retrieve_batch's."""
    coll = collector(prom_url)
    asked = [*SCOPES, NO_DATA]
    hours = [hour(n) for n in range(-1, HOURS + 1)]                # 8 periods
    fives = [minutes(n) for n in range(60, 120, 5)]                # 12 periods
    runs = [*chunks(hours, 3), *chunks(hours[2:5], 1), *chunks(fives, 5)]
    assert [len(c) for c in runs] == [3, 3, 2, 1, 1, 1, 5, 5, 2]
    nonempty = refused = partial = 0
    try:
        for metric in every_metric(tmp_path):
            for run in runs:
                got = coll.retrieve_batch_periods(metric, asked, run)
                assert len(got) == len(run)
                steps_with_data = {scope: 0 for scope in asked}
                for period, answer in zip(run, got):
                    assert list(answer) == asked
                    expected = coll.retrieve_batch(metric, asked, *period)
                    for scope in asked:
                        assert_same_points(answer[scope], expected[scope],
                                           (metric.label, scope, period))
                        nonempty += bool(expected[scope])
                        refused += expected[scope] is None
                        steps_with_data[scope] += bool(expected[scope])
                    assert answer[NO_DATA] == []
                partial += sum(0 < n < len(run) for n in steps_with_data.values())
    finally:
        coll.close()
    assert nonempty > 1000 and refused > 0
    # scopes with data at some steps of a range only (the first hour is
    # before the data, the last after it)
    assert partial > 50


def test_range_batch_with_data_at_some_steps_only(prom_url):
    """Steps before and after the data are empty; a step's values are
    those of the instant query at its end."""
    coll = collector(prom_url)
    metric = metrics_conf().metrics[0]
    try:
        run = [hour(n) for n in (-2, -1, 0, 1)]
        got = coll.retrieve_batch_periods(metric, ["plain", NO_DATA], run)
        assert [g["plain"] != [] for g in got] == [False, False, True, True]
        assert all(g[NO_DATA] == [] for g in got)
        for period, answer in zip(run, got):
            assert canon(answer["plain"]) == canon(coll.retrieve(metric, "plain", *period))
        tail = [hour(n) for n in (HOURS - 1, HOURS, HOURS + 1)]
        got = coll.retrieve_batch_periods(metric, ["plain"], tail)
        assert [g["plain"] != [] for g in got] == [True, False, False]
    finally:
        coll.close()


def test_range_batch_requests(prom_url):
    """One range query per run of periods (start = first end, end = last
    end, step = the period): a GET, or a form-encoded POST when long; one
    period is retrieve_batch's instant query."""
    many = [*SCOPES, *(f"missing-{i:03d}.x" for i in range(290))]
    metric = metrics_conf().metrics[1]
    run = [hour(n) for n in range(1, 5)]
    with _recording_proxy(prom_url) as proxy:
        coll = collector(proxy.url)
        try:
            long = coll.retrieve_batch_periods(metric, many, run)
            short = coll.retrieve_batch_periods(metric, SCOPES[:2], run)
            one = coll.retrieve_batch_periods(metric, SCOPES[:2], run[:1])
        finally:
            coll.close()
    post, get, instant = proxy.requests
    assert post["method"] == "POST" and post["path"] == "/api/v1/query_range"
    assert post["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert len(post["body"]) > prometheus_batch.POST_QUERY_BYTES
    assert post["params"] == {"query": post["params"]["query"],
                              "start": "2026-01-01T02:00:00Z",
                              "end": "2026-01-01T05:00:00Z", "step": "3600s"}
    assert get["method"] == "GET" and get["path"] == "/api/v1/query_range"
    assert get["body"] is None and get["params"]["step"] == "3600s"
    assert instant["path"] == "/api/v1/query" and set(instant["params"]) == {"query", "time"}
    plain = collector(prom_url)
    try:
        for period, answer, small in zip(run, long, short):
            expected = plain.retrieve_batch(metric, many, *period)
            for scope in many:
                assert_same_points(answer[scope], expected[scope], (scope, period))
            assert all(answer[s] == [] for s in many[len(SCOPES):])
            assert sum(bool(answer[s]) for s in SCOPES) >= 5
            assert {s: canon(small[s]) for s in small} == \
                {s: canon(answer[s]) for s in SCOPES[:2]}
        assert one == [plain.retrieve_batch(metric, SCOPES[:2], *run[0])]
    finally:
        plain.close()


@pytest.mark.parametrize("periods", [
    [],
    [hour(0), hour(2)],                          # a gap
    [hour(0), hour(0)],                          # the same period twice
    [hour(1), hour(0)],                          # backwards
    [hour(0), (hour(1)[0], hour(1)[0] + datetime.timedelta(minutes=30))],
    [(BEGIN, BEGIN)],                            # empty period
    [(BEGIN, BEGIN + datetime.timedelta(seconds=1.5))],
], ids=["none", "gap", "twice", "backwards", "lengths", "empty", "fraction"])
def test_range_batch_refuses_periods_that_are_not_consecutive(periods):
    with FakePrometheus() as fake:
        coll = collector(fake.url)
        with pytest.raises(ValueError):
            coll.retrieve_batch_periods(metrics_conf().metrics[0], SCOPES, periods)
        coll.close()
    assert fake.requests == []


# ---------------------------------------------------------------------------
# The fake Prometheus: malformed values, failed batches
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # scope 2 has no sample at all in hour 1 (range queries: no data at
    # one step only)
    ds = datagen.generate(n_scopes=4, hours=4, scope_prefix="s.+",
                          empty_scope_hours={(2, 1)})
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


# ---------------------------------------------------------------------------
# Range queries against the fake Prometheus
# ---------------------------------------------------------------------------

def hours_of(ds, first, count):
    return [(ds.begin + datetime.timedelta(hours=h), ds.begin + datetime.timedelta(hours=h + 1))
            for h in range(first, first + count)]


def test_fake_answers_range_queries_as_instant_ones(dataset):
    """Each step is the instant query at its end; the hook sees each step
    with its own period; a matrix sorted by labels."""
    ds, om, yml = dataset
    seen = []
    asked = [*ds.scopes, "none"]
    run = hours_of(ds, 0, 4)
    with DatasetPrometheus(om, yml, fault=lambda q: seen.append(q)) as fake:
        coll = fake_collector(fake.url, yml)
        results = {}
        for metric in coll.metrics:
            results[metric.label] = coll.retrieve_batch_periods(metric, asked, run)
        ranged, total = len(seen), fake.total
        nonempty = 0
        for metric in coll.metrics:
            for period, answer in zip(run, results[metric.label]):
                expected = coll.retrieve_batch(metric, asked, *period)
                for scope in asked:
                    assert_same_points(answer[scope], expected[scope], (scope, period))
                    nonempty += bool(expected[scope])
        # scope 2 has no sample in hour 1: no data at that step only
        volumes = results[coll.metrics.metrics[1].label]
        assert [bool(answer[ds.scopes[2]]) for answer in volumes] == [True, False, True, True]
        matrix = fake.answer_range(seen[0])
        coll.close()
    assert nonempty >= 30   # of 48 (scope, metric, period): instances come and go
    # 3 metrics x 4 steps, then 3 x 4 instant queries
    assert total == 3 and ranged == 12 and fake.total == 15
    steps = seen[:4]
    assert [(q.begin, q.end) for q in steps] == run
    ends = tuple(end for _begin, end in run)
    assert all(q.range_ends == ends and q.ranged and q.scopes == tuple(asked)
               and q.scope == ds.scopes[0] and q.attempt == 1 for q in steps)
    assert seen[12].range_ends is None and seen[12].attempt == 2
    assert fake.queries[(ds.scopes[3], run[2][0].isoformat(), seen[0].metric)] != []
    assert [r["path"] for r in fake.requests[:3]] == ["/api/v1/query_range"] * 3
    items = matrix["data"]["result"]
    assert matrix["data"]["resultType"] == "matrix" and items
    assert [sorted(i["metric"].items()) for i in items] == \
        sorted(sorted(i["metric"].items()) for i in items)
    assert all([v[0] for v in i["values"]] == sorted(v[0] for v in i["values"]) for i in items)


@pytest.mark.parametrize("bad", ["-1", "abc", "NaN"])
def test_malformed_value_of_one_scope_at_one_step_is_none_there_only(dataset, bad):
    ds, om, yml = dataset
    victim = ds.scopes[1]
    run = hours_of(ds, 0, 3)

    def fault(q):
        if q.ranged and q.end == run[1][1]:
            reply = fake.answer_range(q)
            hit = 0
            for item in reply["data"]["result"]:
                if item["metric"]["project_id"] == victim:
                    for value in item["values"]:
                        if value[0] == q.end.timestamp():
                            value[1] = bad
                            hit += 1
            assert hit
            return ("reply", 200, reply)
        return None

    with DatasetPrometheus(om, yml, fault=fault) as fake:
        coll = fake_collector(fake.url, yml, retries=2)
        metric = coll.metrics.metrics[1]     # volumes: every scope, every hour
        got = coll.retrieve_batch_periods(metric, ds.scopes, run)
        # one query: the batch is not retried for one scope's values
        assert len(fake.requests) == 1
        for i, period in enumerate(run):
            expected = coll.retrieve_batch(metric, ds.scopes, *period)
            for scope in ds.scopes:
                if (i, scope) == (1, victim):
                    assert got[i][scope] is None
                else:
                    assert got[i][scope] is not None
                    assert_same_points(got[i][scope], expected[scope], (scope, period))
        coll.close()


def _matrix_with(values, scope="s.+000"):
    return {"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"project_id": scope}, "values": values}]}}


@pytest.mark.parametrize("action, kind, requests", [
    (("reply", 503, b"busy"), "http", 3),
    (("reply", 200, b"<html>garbage</html>"), "malformed", 3),
    (("reply", 200, EMPTY_VECTOR), "malformed", 3),
    (("reply", 200, _matrix_with([[1767225600, "1"]])), "malformed", 3),   # 00:00: no end
    (("reply", 200, _matrix_with([[1767225600, "1"]], "other")), "malformed", 3),
    (("reply", 200, _matrix_with([["1767232800", "1"]])), "malformed", 3),
    (("reply", 200, _matrix_with([[1767232800, 1]])), "malformed", 3),
    (("reply", 200, _matrix_with({"t": 1})), "malformed", 3),
    (("reply", 200, {"status": "success", "data": {"resultType": "matrix",
                                                   "result": [{"metric": {}}]}}), "malformed", 3),
    (("reply", 200, {"status": "success", "warnings": ["store down"],
                     "data": {"resultType": "matrix", "result": []}}), "partial", 3),
    (("reply", 400, {"status": "error", "errorType": "bad_data", "error": "parse error"}),
     "http", 1),
    (("close",), "connection", 3),
], ids=["5xx", "garbage", "vector", "other-time", "other-time-other-scope", "text-time",
        "number-value", "values-not-list", "no-values", "partial", "4xx", "hang-up"])
def test_failed_range_batch_raises_collect_error(dataset, action, kind, requests):
    ds, om, yml = dataset
    run = hours_of(ds, 0, 3)
    with DatasetPrometheus(om, yml, fault=lambda q: action) as fake:
        coll = fake_collector(fake.url, yml, retries=2)
        metric = coll.metrics.metrics[1]
        with pytest.raises(CollectError) as err:
            coll.retrieve_batch_periods(metric, ds.scopes, run)
        coll.close()
    exc = err.value
    assert exc.kind == kind and exc.metric == metric.label and exc.scope_id is None
    assert str(exc).startswith(
        f"metric {metric.label}: batch of {len(ds.scopes)} scopes, 3 periods: ")
    assert len(fake.requests) == requests
    assert all(r["path"] == "/api/v1/query_range" for r in fake.requests)
    if requests > 1:
        assert str(exc).endswith(f"(after {requests} attempts)")


def test_fault_of_one_step_fails_the_range_query_then_heals(dataset):
    """A hook keyed on one period fires for the step of that period; its
    fault is the whole request's (here retried once, then answered)."""
    ds, om, yml = dataset
    run = hours_of(ds, 0, 3)
    attempts = []

    def fault(q):
        if q.begin == run[2][0]:
            attempts.append(q.attempt)
            if q.attempt == 1:
                return ("reply", 503, b"busy")
        return None

    with DatasetPrometheus(om, yml, fault=fault) as fake:
        coll = fake_collector(fake.url, yml, retries=1)
        events = []
        coll.set_io_hooks(lambda: events.append("begin"), lambda: events.append("done"))
        metric = coll.metrics.metrics[1]
        got = coll.retrieve_batch_periods(metric, ds.scopes, run)
        assert events == ["begin", "done", "begin", "done"]
        assert attempts == [1, 2] and len(fake.requests) == 2
        for period, answer in zip(run, got):
            expected = coll.retrieve_batch(metric, ds.scopes, *period)
            for scope in ds.scopes:
                assert_same_points(answer[scope], expected[scope], (scope, period))
        coll.close()


def test_long_range_batch_by_post_to_the_fake(dataset):
    ds, om, yml = dataset
    many = [*ds.scopes, *(f"other|{i:03d}" for i in range(300))]
    seen = []
    run = hours_of(ds, 1, 2)
    with DatasetPrometheus(om, yml, fault=lambda q: seen.append(q)) as fake:
        coll = fake_collector(fake.url, yml)
        metric = coll.metrics.metrics[2]
        got = coll.retrieve_batch_periods(metric, many, run)
        assert [(r["method"], r["path"]) for r in fake.requests] == [
            ("POST", "/api/v1/query_range")]
        assert [q.scopes for q in seen] == [tuple(many)] * 2
        for period, answer in zip(run, got):
            expected = coll.retrieve_batch(metric, many, *period)
            for scope in many:
                assert_same_points(answer[scope], expected[scope], (scope, period))
        coll.close()
    assert any(answer[s] for answer in got for s in ds.scopes)


def test_range_batch_ignores_series_of_scopes_not_asked(dataset):
    """Items of another scope, or whose scope label is not a text, are
    checked (times, values) but not returned."""
    ds, om, yml = dataset
    run = hours_of(ds, 0, 2)
    ends = [end.timestamp() for _begin, end in run]
    reply = {"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"project_id": ["s.+000"]}, "values": [[ends[0], "7"]]},
        {"metric": {"project_id": "other"}, "values": [[ends[1], "8"]]},
        {"metric": {"project_id": "s.+000", "id": "v"}, "values": [[ends[1], "9"]]}]}}
    with DatasetPrometheus(om, yml, fault=lambda q: ("reply", 200, reply)) as fake:
        coll = fake_collector(fake.url, yml)
        metric = coll.metrics.metrics[1]
        got = coll.retrieve_batch_periods(metric, ds.scopes[:2], run)
        coll.close()
    assert got[0] == {ds.scopes[0]: [], ds.scopes[1]: []}
    assert got[1][ds.scopes[1]] == []
    [point] = got[1][ds.scopes[0]]
    assert point.groupby["project_id"] == ds.scopes[0] and point.groupby["id"] == "v"
    assert str(point.qty) == str(metric.convert("9"))
