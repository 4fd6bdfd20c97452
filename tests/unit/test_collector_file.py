"""The file collector: OpenMetrics parsing and PromQL-equivalent aggregation.

Expected values are computed by hand; tests/functional/test_collector_prometheus.py
checks the same code against a real Prometheus server.
"""

from __future__ import annotations

import datetime
import decimal
import importlib.util
import math
import textwrap
from pathlib import Path

import pytest
import yaml
from oslo_config import cfg

import cloudkitty_proc.conf as ckconf
from cloudkitty_proc import promql, promql_eval
from cloudkitty_proc.collectors import _openmetrics
from cloudkitty_proc.collectors.base import BaseCollector
from cloudkitty_proc.collectors.file import FileCollector
from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.skipping import Skipper
from cloudkitty_proc.exceptions import CollectError, ConfigError
from cloudkitty_proc.metrics_conf import PROMQL_EXTRA_ARGS, load_metrics_conf

ROOT = Path(__file__).resolve().parents[2]
UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
T0S = int(T0.timestamp())
D = decimal.Decimal


def hour(n: int) -> tuple[datetime.datetime, datetime.datetime]:
    return T0 + datetime.timedelta(hours=n), T0 + datetime.timedelta(hours=n + 1)


def make_conf(path: Path | None) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    ckconf.register_opts(conf)
    conf([], project="cloudkitty-proc", default_config_files=[])
    if path is not None:
        conf.set_override("path", str(path), "collector_file")
    return conf


def write_metrics(tmp_path: Path, metrics: dict) -> object:
    path = tmp_path / "metrics.yml"
    path.write_text(yaml.safe_dump({"metrics": metrics}, sort_keys=False))
    return load_metrics_conf(str(path), scope_key="project_id",
                             extra_args_schema=PROMQL_EXTRA_ARGS)


def om(lines: list[tuple[str, float, float]], header: str = "") -> str:
    """[(series, value, seconds after T0)] -> OpenMetrics text."""
    body = "".join(f"{s} {v} {T0S + dt}\n" for s, v, dt in lines)
    return header + body + "# EOF\n"


# Hour 0 of project p1, metric "usage":
#   S1 {id=a,host=h1}: 7 (at begin, included), 1, 3, 5; 100 at +3600 (next hour)
#   S2 {id=a,host=h2}: 2, 4
#   S3 {id=b}:         10
# and p2 has a series that must never show up in p1.
USAGE = om([
    ('usage{project_id="p1",id="a",host="h1"}', 7, 0),
    ('usage{project_id="p1",id="a",host="h1"}', 1, 60),
    ('usage{project_id="p1",id="a",host="h1"}', 3, 120),
    ('usage{project_id="p1",id="a",host="h1"}', 5, 180),
    ('usage{project_id="p1",id="a",host="h1"}', 100, 3600),
    ('usage{project_id="p1",id="a",host="h2"}', 2, 300),
    ('usage{project_id="p1",id="a",host="h2"}', 4, 600),
    ('usage{project_id="p1",id="b"}', 10, 900),
    ('usage{project_id="p2",id="a",host="h1"}', 1000, 60),
], header="# HELP usage Some usage.\n# TYPE usage gauge\n")


@pytest.fixture
def usage_file(tmp_path):
    path = tmp_path / "usage.om"
    path.write_text(USAGE)
    return path


def collector(tmp_path, path, metrics):
    mconf = write_metrics(tmp_path, metrics)
    return FileCollector(make_conf(path), mconf), mconf


def by_id(points):
    return {p.groupby.get("id"): p.qty for p in points}


@pytest.mark.parametrize("agg,expected", [
    ("max", {"a": D("7"), "b": D("10")}),
    ("min", {"a": D("1"), "b": D("10")}),
    ("sum", {"a": D("22"), "b": D("10")}),
    ("avg", {"a": D("3.5"), "b": D("10")}),
    # count_over_time counts samples, then count() counts series.
    ("count", {"a": D("2"), "b": D("1")}),
    # stddev_over_time: sqrt(5) and 1 (population); stddev of those:
    # (sqrt(5) - 1) / 2 = 0.6180339887... -> 9 significant digits.
    ("stddev", {"a": D("0.618033989"), "b": D("0")}),
    # stdvar_over_time: 5 and 1; population variance of [5, 1] = 4.
    ("stdvar", {"a": D("4"), "b": D("0")}),
])
def test_aggregations(tmp_path, usage_file, agg, expected):
    coll, mconf = collector(tmp_path, usage_file, {
        "usage": {"unit": "u", "groupby": ["id"], "extra_args": {"aggregation_method": agg}}})
    points = coll.retrieve(mconf.metrics[0], "p1", *hour(0))
    assert by_id(points) == expected
    for p in points:
        assert p.groupby["project_id"] == "p1"
        assert p.unit == "u"
        assert p.price == 0


def test_stdvar_across_all_series(tmp_path, usage_file):
    # Over time: 5, 1, 0 -> population variance across series: 14/3.
    coll, mconf = collector(tmp_path, usage_file, {
        "usage": {"unit": "u", "extra_args": {"aggregation_method": "stdvar"}}})
    [point] = coll.retrieve(mconf.metrics[0], "p1", *hour(0))
    assert point.qty == D("4.66666667")
    assert point.groupby == {"project_id": "p1"}


def test_raw_values_render_like_prometheus(tmp_path, usage_file):
    coll, mconf = collector(tmp_path, usage_file, {
        "usage": {"unit": "u", "groupby": ["id"],
                  "extra_args": {"aggregation_method": "avg"}}})
    raw = dict((labels["id"], value) for labels, value in
               coll.fetch(mconf.metrics[0], "p1", *hour(0)))
    assert raw == {"a": "3.5", "b": "10"}      # "10", not "10.0"


def test_half_open_period(tmp_path):
    path = tmp_path / "edge.om"
    path.write_text(om([
        ('edge{project_id="p1"}', 1, 0),           # on begin: hour 0
        ('edge{project_id="p1"}', 2, 3599.999),    # last ms of hour 0
        ('edge{project_id="p1"}', 4, 3600),        # on the edge: hour 1
        ('edge{project_id="p1"}', 8, 7199.5),
    ]))
    coll, mconf = collector(tmp_path, path, {
        "edge": {"unit": "u", "extra_args": {"aggregation_method": "sum"}}})
    metric = mconf.metrics[0]
    assert [p.qty for p in coll.retrieve(metric, "p1", *hour(0))] == [D(3)]
    assert [p.qty for p in coll.retrieve(metric, "p1", *hour(1))] == [D(12)]
    assert coll.retrieve(metric, "p1", *hour(2)) == []
    assert coll.retrieve(metric, "p1", *hour(-1)) == []
    # A two-hour period sees all four samples.
    assert [p.qty for p in coll.retrieve(metric, "p1", T0, hour(1)[1])] == [D(15)]


def test_scope_filtering(tmp_path, usage_file):
    coll, mconf = collector(tmp_path, usage_file, {
        "usage": {"unit": "u", "groupby": ["id"], "extra_args": {"aggregation_method": "max"}}})
    metric = mconf.metrics[0]
    assert by_id(coll.retrieve(metric, "p2", *hour(0))) == {"a": D(1000)}
    assert coll.retrieve(metric, "p3", *hour(0)) == []
    assert coll.scopes() == ["p1", "p2"]


def test_unknown_metric_is_no_data(tmp_path, usage_file):
    coll, mconf = collector(tmp_path, usage_file, {"other": {"unit": "u"}})
    assert coll.retrieve(mconf.metrics[0], "p1", *hour(0)) == []


def test_groupby_metadata_split_and_missing_labels(tmp_path):
    path = tmp_path / "inst.om"
    path.write_text(om([
        # instance a resized from m1.tiny to m1.large within the hour
        ('inst{project_id="p1",id="a",user_id="u1",flavor_name="m1.tiny"}', 1, 60),
        ('inst{project_id="p1",id="a",user_id="u1",flavor_name="m1.large"}', 1, 1800),
        # instance c has no user_id nor flavor_name label; d an empty one
        ('inst{project_id="p1",id="c"}', 0, 60),
        ('inst{project_id="p1",id="d",flavor_name=""}', 5, 60),
    ]))
    coll, mconf = collector(tmp_path, path, {
        "inst": {"unit": "instance", "alt_name": "instance", "groupby": ["id", "user_id"],
                 "metadata": ["flavor_name"], "mutate": "NUMBOOL",
                 "extra_args": {"aggregation_method": "max"}}})
    points = coll.retrieve(mconf.metrics[0], "p1", *hour(0))
    got = sorted((p.groupby["id"], p.groupby["user_id"], p.metadata["flavor_name"], p.qty)
                 for p in points)
    assert got == [
        ("a", "u1", "m1.large", D(1)),
        ("a", "u1", "m1.tiny", D(1)),
        ("c", "", "", D(0)),          # NUMBOOL of 0
        ("d", "", "", D(1)),          # NUMBOOL of 5
    ]
    for p in points:
        assert set(p.groupby) == {"id", "user_id", "project_id"}
        assert set(p.metadata) == {"flavor_name"}


class _Series(BaseCollector):
    """A collector whose fetch() returns given series (to_points alone)."""

    def __init__(self, conf, metrics, series):
        super().__init__(conf, metrics)
        self.series = series

    def fetch(self, metric, scope_id, begin, end):
        return self.series


def _reference_points(coll, metric, scope_id, series):
    """BaseCollector.retrieve's loop as it was first written (skipping has
    moved after rating since: skipping.py)."""
    points = []
    for labels, raw in series:
        try:
            qty = metric.convert(raw)
        except ValueError as exc:
            raise CollectError(f"malformed value in reply: {exc}", metric=metric.label,
                               scope_id=scope_id, kind="malformed") from None
        if qty < 0 and not metric.extra_args.get("range_function"):
            raise CollectError(f"negative quantity {raw!r} in reply",
                               metric=metric.label, scope_id=scope_id, kind="malformed")
        groupby = {key: str(labels.get(key, "")) for key in metric.groupby}
        groupby[coll.scope_key] = scope_id
        metadata = {key: str(labels.get(key, "")) for key in metric.metadata}
        points.append(DataPoint(metric.unit, qty, D(0), groupby, metadata))
    return points


def _outcome(fn):
    try:
        return [(p, list(p.groupby), list(p.metadata), type(p)) for p in fn()]
    except CollectError as exc:
        return ("error", exc.kind, str(exc))


def test_retrieve_points_like_the_reference(tmp_path):
    """groupby (scope key in its place, set to the scope), metadata, missing
    labels, non-str label values, mutate, skip expressions (not applied at
    collection any more), negative values with and without a range function,
    non-numbers: the same points, in the same order, or the same error."""
    mconf = write_metrics(tmp_path, {
        "inst": {"unit": "instance", "groupby": ["id", "project_id", "user_id"],
                 "metadata": ["flavor_name", "az"], "mutate": "NUMBOOL"},
        "vol": {"unit": "GiB", "factor": "1/1073741824", "groupby": ["id"],
                "metadata": ["volume_type"],
                "skip_datapoints_expression": "metadata['volume_type'] == 'hdd'"},
        "cpu": {"unit": "s", "groupby": ["id"],
                "skip_datapoints_expression": "metadata['x'] < 1 or qty > 5",
                "extra_args": {"aggregation_method": "max", "range_function": "rate"}},
        "bare": {"unit": "u"},
    })
    rng = __import__("random").Random(3)
    series = []
    for i in range(300):
        labels = {"id": f"r{i}" if i % 7 else i, "project_id": "other",
                  "user_id": f"u{i % 3}", "flavor_name": "m1.tiny",
                  "volume_type": rng.choice(["ssd", "hdd"]), "extra": "x"}
        if i % 5 == 0:
            del labels["user_id"]
        if i % 11 == 0:
            labels["az"] = 1
        raw = rng.choice(["0", "1", "2.5", "10737418240", "0.123456789012", "7"])
        series.append((labels, raw))
    bad = [series + [({"id": "z"}, "-1")], series + [({"id": "z"}, "NaN")],
           series + [({"id": "z"}, "abc")]]
    coll = _Series(make_conf(None), mconf, series)
    for metric in mconf:
        for case in [series, *bad]:
            coll.series = case
            got = _outcome(lambda: coll.retrieve(metric, "p1", *hour(0)))
            want = _outcome(lambda: _reference_points(coll, metric, "p1", case))
            assert got == want, metric.name
        coll.series = series
        assert coll.retrieve(metric, "p1", *hour(0)), metric.name
    coll.series = series
    vol = mconf.by_usage_type()["vol"]
    collected = coll.retrieve(vol, "p1", *hour(0))
    assert {p.metadata["volume_type"] for p in collected} == {"ssd", "hdd"}
    # the metric's expression drops the hdd ones after rating (skipping.py)
    frame = DataFrame("p1", *hour(0))
    frame.add_points("vol", collected)
    kept = Skipper(make_conf(None), mconf).apply(frame).points("vol")
    assert kept and all(p.metadata["volume_type"] == "ssd" for p in kept)
    inst = mconf.by_usage_type()["inst"]
    [first] = coll.retrieve(inst, "p1", *hour(0))[:1]
    assert list(first.groupby) == ["id", "project_id", "user_id"]
    assert first.groupby["project_id"] == "p1" and first.groupby["id"] == "0"


def test_factor_applied(tmp_path):
    path = tmp_path / "vol.om"
    path.write_text(om([
        ('volume_size_bytes{project_id="p1",id="v1",volume_type="ssd"}', 10737418240, 60),
        ('volume_size_bytes{project_id="p1",id="v2",volume_type="hdd"}', 1610612736, 60),
        ('image_size_bytes{project_id="p1",id="i1"}', 123456789, 60),
    ]))
    coll, mconf = collector(tmp_path, path, {
        "volume_size_bytes": {"unit": "GiB", "alt_name": "volume.size", "factor": "1/1073741824",
                              "groupby": ["id"], "metadata": ["volume_type"]},
        "image_size_bytes": {"unit": "MiB", "alt_name": "image.size", "factor": "1/1048576",
                             "groupby": ["id"]},
    })
    vol, img = mconf.metrics
    # CloudKitty's conversion rounds the raw value to 9 significant digits
    # before applying the factor: 10737418240 -> 1.07374182E+10 -> 9.99999996.
    assert by_id(coll.retrieve(vol, "p1", *hour(0))) == {"v1": D("9.99999996"),
                                                         "v2": D("1.5")}
    # 123456789 / 1048576 = 117.737568... -> 9 significant digits
    assert by_id(coll.retrieve(img, "p1", *hour(0))) == {"i1": D("117.737569")}


def test_query_function_applies_per_series_before_aggregation(tmp_path):
    # CloudKitty: sum(round(sum_over_time(...))) -- round(1.4) + round(1.4) = 2,
    # not round(2.8) = 3.
    path = tmp_path / "qf.om"
    path.write_text(om([
        ('m{project_id="p1",host="h1"}', 1.4, 60),
        ('m{project_id="p1",host="h2"}', 1.4, 60),
    ]))
    coll, mconf = collector(tmp_path, path, {
        "m": [
            {"unit": "u", "alt_name": "rounded",
             "extra_args": {"aggregation_method": "sum", "query_function": "round"}},
            {"unit": "u", "alt_name": "plain", "extra_args": {"aggregation_method": "sum"}},
            {"unit": "u", "alt_name": "sqrt",
             "extra_args": {"aggregation_method": "max", "query_function": "sqrt"}},
            {"unit": "u", "alt_name": "log10",
             "extra_args": {"aggregation_method": "max", "query_function": "log10"}},
        ]})
    rounded, plain, sqrt, log10 = mconf.metrics
    assert [p.qty for p in coll.retrieve(rounded, "p1", *hour(0))] == [D(2)]
    assert [p.qty for p in coll.retrieve(plain, "p1", *hour(0))] == [D("2.8")]
    assert [p.qty for p in coll.retrieve(sqrt, "p1", *hour(0))] == [D("1.18321596")]
    assert [p.qty for p in coll.retrieve(log10, "p1", *hour(0))] == [D("0.146128036")]


@pytest.mark.parametrize("key,value", [
    ("range_function", "rate"),
    ("query_prefix", "sum by (project_id)"),
    ("query_suffix", "> 0"),
])
def test_unsupported_extra_args_refused(tmp_path, usage_file, key, value):
    mconf = write_metrics(tmp_path, {
        "usage": {"unit": "u"},
        "usage_total": {"unit": "u", "extra_args": {key: value}}})
    with pytest.raises(ConfigError) as err:
        FileCollector(make_conf(usage_file), mconf)
    msg = str(err.value)
    assert mconf.path in msg and "usage_total" in msg and key in msg


def test_path_not_set(tmp_path):
    mconf = write_metrics(tmp_path, {"usage": {"unit": "u"}})
    with pytest.raises(ConfigError, match=r"\[collector_file\] path"):
        FileCollector(make_conf(None), mconf)


def test_missing_file(tmp_path):
    mconf = write_metrics(tmp_path, {"usage": {"unit": "u"}})
    missing = tmp_path / "nope.om"
    with pytest.raises(ConfigError, match="nope.om: usage file not found"):
        FileCollector(make_conf(missing), mconf)


@pytest.mark.parametrize("text,line,what", [
    ("# TYPE m gauge\nm{project_id=\"p1\"} 1 100\nm{project_id=\"p1\" 2 200\n# EOF\n",
     3, "malformed sample"),
    ("m{project_id=\"p1\"} abc 100\n# EOF\n", 1, "invalid value"),
    ("m{project_id=\"p1\"} 1\n# EOF\n", 1, "without a timestamp"),
    ("m{project_id=\"p1\"} 1 1_000\n# EOF\n", 1, "invalid timestamp"),
    ("m{project_id=\"p1\",project_id=\"p2\"} 1 100\n# EOF\n", 1, "duplicate label"),
    ("m{project_id=\"p1\"} 1 100\n", 1, "missing '# EOF'"),
    ("m{project_id=\"p1\"} 1 100\n# EOF\nm{project_id=\"p1\"} 1 200\n", 3, "after '# EOF'"),
    ("# TYPE m gauge\n# TYPE m counter\n# EOF\n", 2, "second TYPE"),
    ("# TYPE m weird\n# EOF\n", 1, "unknown metric type"),
    ("# a free comment\n# EOF\n", 1, "expected '# HELP'"),
    ("m{project_id=\"p1\"} 1 100\n\n# EOF\n", 2, "empty line"),
])
def test_malformed_file_names_file_and_line(tmp_path, text, line, what):
    path = tmp_path / "bad.om"
    path.write_text(text)
    mconf = write_metrics(tmp_path, {"m": {"unit": "u"}})
    with pytest.raises(ConfigError) as err:
        FileCollector(make_conf(path), mconf)
    msg = str(err.value)
    assert str(path) in msg
    assert f"line {line}:" in msg
    assert what in msg


def test_not_utf8(tmp_path):
    path = tmp_path / "bin.om"
    path.write_bytes(b'm{project_id="p1"} 1 100\nm{project_id="\xff"} 1 100\n# EOF\n')
    with pytest.raises(ConfigError, match="line 2: not valid UTF-8"):
        _openmetrics.parse_file(str(path))


def test_parser_escapes_types_and_exemplars():
    text = textwrap.dedent("""\
        # HELP req_total Requests.
        # TYPE req_total counter
        # UNIT size_bytes bytes
        req_total{project_id="p1",path="a\\"b\\\\c\\nd"} 3 100.25 # {trace_id="x"} 1 100
        req_total{path="a\\"b\\\\c\\nd",project_id="p1"} 4 101
        req_total{project_id="p1",empty=""} 5 102
        plain 1.5e3 103
        nan_metric{project_id="p1"} NaN 104
        # EOF
        """)
    parsed = _openmetrics.parse_text(text, "mem")
    assert parsed.types == {"req_total": "counter"}
    series = {(s.name, s.labels): (s.timestamps, s.values) for s in parsed.series}
    escaped = (("path", 'a"b\\c\nd'), ("project_id", "p1"))
    # Label order does not matter: one series; ms timestamps as Prometheus.
    assert series[("req_total", escaped)] == ([100250, 101000], [3.0, 4.0])
    # Empty label values are dropped (as the TSDB does).
    assert series[("req_total", (("project_id", "p1"),))] == ([102000], [5.0])
    assert series[("plain", ())] == ([103000], [1500.0])
    assert math.isnan(series[("nan_metric", (("project_id", "p1"),))][1][0])


def test_parser_sorts_samples_and_drops_exact_duplicates():
    text = ('m{a="1"} 3 300\nm{a="1"} 1 100\nm{a="1"} 2 200\nm{a="1"} 2 200\n# EOF\n')
    [s] = _openmetrics.parse_text(text, "mem").series
    assert s.timestamps == [100000, 200000, 300000]
    assert s.values == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError, match="two different values"):
        _openmetrics.parse_text('m{a="1"} 3 300\nm{a="1"} 4 300\n# EOF\n', "mem")


@pytest.mark.parametrize("value,text", [
    (1.0, "1"), (0.0, "0"), (-0.0, "-0"), (10.0, "10"), (3.5, "3.5"), (0.1, "0.1"),
    (1 / 3, "0.3333333333333333"), (1e-5, "0.00001"), (1e-7, "1e-07"),
    (1e16, "10000000000000000"), (1.5e20, "150000000000000000000"), (1e21, "1e+21"),
    (math.nan, "NaN"), (math.inf, "+Inf"), (-math.inf, "-Inf"),
])
def test_format_value_like_prometheus(value, text):
    assert promql_eval.format_value(value) == text


def test_build_query_is_cloudkitty_shape(tmp_path):
    mconf = write_metrics(tmp_path, {
        "instance_up": {"unit": "instance", "groupby": ["id", "user_id"],
                        "metadata": ["flavor_name"]},
        "cpu": [{"unit": "s", "alt_name": "a",
                 "extra_args": {"aggregation_method": "avg", "query_function": "ceil"}},
                {"unit": "s", "alt_name": "b",
                 "extra_args": {"aggregation_method": "sum", "range_function": "rate",
                                "query_prefix": "1 +", "query_suffix": "> 0"}}],
    })
    inst, cpu_a, cpu_b = mconf.metrics
    assert promql.build_query(inst, "project_id", "p1", 3600) == (
        'max(max_over_time(instance_up{project_id="p1"}[3600s])) '
        'by (id, user_id, project_id, flavor_name)')
    assert promql.build_query(cpu_a, "project_id", 'p"1', 600) == (
        'avg(ceil(avg_over_time(cpu{project_id="p\\"1"}[600s]))) by (project_id)')
    assert promql.build_query(cpu_b, "project_id", "p1", 3600) == (
        '1 + sum(rate(cpu{project_id="p1"}[3600s])) by (project_id) > 0')


def test_build_batch_query_shape_and_escaping(tmp_path):
    """One query for several scopes: the same query with a
    ``<scope_key>=~"..."`` selector (each id escaped for RE2, then for the
    PromQL string) and the scope key first in ``by``; ids in the order
    given."""
    mconf = write_metrics(tmp_path, {
        "instance_up": {"unit": "instance", "groupby": ["id", "user_id"],
                        "metadata": ["flavor_name"]},
        "cpu": [{"unit": "s", "alt_name": "a",
                 "extra_args": {"aggregation_method": "avg", "query_function": "ceil"}},
                {"unit": "s", "alt_name": "b",
                 "extra_args": {"aggregation_method": "sum", "range_function": "rate"}}],
    })
    inst, cpu_a, cpu_b = mconf.metrics
    assert promql.build_batch_query(inst, "project_id", ["p2", "p1"], 3600) == (
        'max(max_over_time(instance_up{project_id=~"p2|p1"}[3600s])) '
        'by (project_id, id, user_id, flavor_name)')
    assert promql.build_batch_query(cpu_a, "project_id", ["p1"], 600) == (
        'avg(ceil(avg_over_time(cpu{project_id=~"p1"}[600s]))) by (project_id)')
    assert promql.build_batch_query(cpu_b, "tenant", ["p1", "p2"], 3600) == (
        'sum(rate(cpu{tenant=~"p1|p2"}[3600s])) by (tenant, project_id)')
    # RE2 metacharacters are escaped (Go's regexp.QuoteMeta), then \ and "
    # for the double-quoted string
    assert promql.build_batch_query(cpu_b, "project_id", ['a.b"c', "x\\y|(z)"], 60) == (
        'sum(rate(cpu{project_id=~"a\\\\.b\\"c|x\\\\\\\\y\\\\|\\\\(z\\\\)"}[60s])) '
        'by (project_id)')


def test_quote_meta_matches_exactly_the_ids():
    """The regex of a batch matches its ids and nothing else, whatever
    they contain (Python's re reads these escapes as RE2 does; PromQL
    anchors the matcher, as fullmatch)."""
    import re

    ids = ["a.b", "x+y", "p|q", "r[1]", "s{2}", "t^$", "u\\v", 'w"q', "(z)?*", "plain-1"]
    regex = "|".join(promql.quote_meta(i) for i in ids)
    assert promql.quote_meta(".+*?()|[]{}^$\\") == "\\" + "\\".join(".+*?()|[]{}^$\\")
    for i in ids:
        assert re.fullmatch(regex, i)
    for other in ["axb", "xy", "xxy", "p", "q", "r1", "s22", "t", "uv", "z", "plain-", ""]:
        assert not re.fullmatch(regex, other), other


def test_batchable_unless_query_prefix_or_suffix(tmp_path):
    mconf = write_metrics(tmp_path, {
        "cpu": [{"unit": "s", "alt_name": "plain"},
                {"unit": "s", "alt_name": "fn",
                 "extra_args": {"query_function": "abs", "range_function": "rate"}},
                {"unit": "s", "alt_name": "prefix", "extra_args": {"query_prefix": "1 +"}},
                {"unit": "s", "alt_name": "suffix", "extra_args": {"query_suffix": "> 0"}},
                {"unit": "s", "alt_name": "empty",
                 "extra_args": {"query_prefix": "", "query_suffix": ""}}],
    })
    assert [promql.batchable(m) for m in mconf.metrics] == [True, True, False, False, True]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_openmetrics",
                                                  ROOT / "tools" / "gen_openmetrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_sample_is_reproducible_and_matches_metrics_yml(tmp_path):
    gen = _load_generator()
    out = tmp_path / "sample.om"
    assert gen.main(["--projects", "4", "--begin", "2026-01-01T00:00:00Z", "--hours", "72",
                     "--step", "300", "--out", str(out)]) == 0
    bundled = ROOT / "etc" / "cloudkitty-proc" / "sample-usage.om"
    assert out.read_bytes() == bundled.read_bytes(), \
        "regenerate etc/cloudkitty-proc/sample-usage.om with tools/gen_openmetrics.py"
    assert bundled.stat().st_size < 4 * 1024 * 1024

    mconf = load_metrics_conf(str(ROOT / "etc" / "cloudkitty-proc" / "metrics.yml"),
                              scope_key="project_id", extra_args_schema=PROMQL_EXTRA_ARGS)
    coll = FileCollector(make_conf(bundled), mconf)
    assert coll.scopes() == ["p-alpha", "p-beta", "p-delta", "p-gamma"]
    for metric in mconf:
        total = 0
        for scope in coll.scopes():
            for h in range(72):
                points = coll.retrieve(metric, scope, *hour(h))
                total += len(points)
                for p in points:
                    assert all(p.groupby.values()), (metric.name, p)
                    assert all(p.metadata.values()), (metric.name, p)
        assert total > 0, metric.name
    # Nothing outside the window, and never a sample on an hour boundary.
    assert all(not coll.retrieve(m, "p-alpha", *hour(72)) for m in mconf)
    parsed = _openmetrics.parse_file(str(bundled))
    assert all(t % 3_600_000 for s in parsed.series for t in s.timestamps)


def test_generator_is_deterministic_and_promtool_shaped(tmp_path):
    gen = _load_generator()
    args = ["--projects", "2", "--begin", "2026-03-01T00:00:00Z", "--hours", "3",
            "--step", "450", "--series-per-metric", "2"]
    a, b = tmp_path / "a.om", tmp_path / "b.om"
    gen.main(args + ["--out", str(a)])
    gen.main(args + ["--out", str(b)])
    assert a.read_bytes() == b.read_bytes()
    text = a.read_text()
    assert text.endswith("# EOF\n")
    parsed = _openmetrics.parse_text(text, str(a))
    names = {s.name for s in parsed.series}
    assert names == {"instance_up", "volume_size_bytes", "image_size_bytes",
                     "ip_floating_up", "cpu_utilization_ratio"}
    assert {dict(s.labels)["project_id"] for s in parsed.series} == {"p-alpha", "p-beta"}
    # 225 s offsets: 225 + 450k never hits a multiple of 3600 by construction
    # of the filter; every sample is inside the window.
    start = int(datetime.datetime(2026, 3, 1, tzinfo=UTC).timestamp() * 1000)
    for s in parsed.series:
        assert all(start < t < start + 3 * 3_600_000 and t % 3_600_000 for t in s.timestamps)
        assert s.timestamps == sorted(s.timestamps)
