"""The gnocchi collector against a real Gnocchi 4.7.1, compared with
CloudKitty 25.0.0's own GnocchiCollector (issue 19, acceptance 1).

One Gnocchi (tests/gnocchi_server.py) holds instances and volumes of four
projects with measures every 5 minutes over the hours around now (Gnocchi's
history query refuses periods before a resource's creation), one instance
changing flavor inside the first hour (two revisions). CloudKitty's
collector runs in its own venv (tools/ck_gnocchi_driver.py) on the same
Gnocchi, metrics.yml, scopes and periods; both must return the same rows:
unit, quantity (as text), groupby (keys in the same order, the four time
keys included) and metadata. A null attribute is "" here, None (null) in
CloudKitty's rows: InfluxDB, where CloudKitty writes them, drops both alike.
"""

from __future__ import annotations

import datetime
import decimal
import json

import pytest
import yaml

from cloudkitty_proc.collectors.gnocchi import GNOCCHI_EXTRA_ARGS, GnocchiCollector
from cloudkitty_proc.dataframe import time_groupby
from cloudkitty_proc.exceptions import CollectError, ConfigError
from cloudkitty_proc.fetchers.gnocchi import GnocchiFetcher
from cloudkitty_proc.metrics_conf import load_metrics_conf
from tests.fakes.gnocchi_proxy import FaultProxy
from tests.functional.test_collector_prometheus import make_conf
from tests.gnocchi_server import current_hour, run_cloudkitty_driver, running_gnocchi

HOUR = datetime.timedelta(hours=1)
MINUTE = datetime.timedelta(minutes=1)
HOURS = 4
POLICY = "ck-test"
SCOPES = ["p-a", "p-b", "p-c", "p-d"]   # p-c: no memory metric; p-d: no resource

METRICS = {"metrics": {
    "cpu": [
        {"unit": "instance", "alt_name": "instance", "groupby": ["id", "user_id", "project_id"],
         "metadata": ["flavor_name", "vcpus"], "mutate": "NUMBOOL",
         "extra_args": {"resource_type": "instance", "aggregation_method": "mean"}},
        # flavor_name in groupby: the two revisions of vm-b1 are two rows
        {"unit": "instance", "alt_name": "instance_by_flavor", "groupby": ["id", "flavor_name"],
         "extra_args": {"resource_type": "instance"}},
        # one row per resource, the latest revision's attributes, the sum
        {"unit": "instance", "alt_name": "instance_last_revision",
         "groupby": ["id", "flavor_name", "revision_start"], "metadata": ["vcpus"],
         "extra_args": {"resource_type": "instance", "use_all_resource_revisions": False}},
    ],
    "memory.usage": {
        "unit": "MiB", "groupby": ["id"], "metadata": ["flavor_name"],
        "extra_args": {"resource_type": "instance", "aggregation_method": "mean",
                       "re_aggregation_method": "sum"}},
    "volume.size": {
        "unit": "GiB", "factor": "1/3", "mutate": "CEIL", "groupby": ["id", "project_id"],
        "metadata": ["volume_type"], "extra_args": {"resource_type": "volume"}},
    "disk.write.bytes": {
        "unit": "MB", "factor": "1/1000000", "groupby": ["id"],
        "extra_args": {"resource_type": "volume", "aggregation_method": "rate:max",
                       "re_aggregation_method": "sum"}},
    "network.missing": {"unit": "B", "extra_args": {"resource_type": "instance"}},
}}


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """(server, first hour) with the module docstring's data."""
    with running_gnocchi(tmp_path_factory.mktemp("gnocchi")) as server:
        server.create_archive_policy(POLICY, [{"granularity": "1h", "timespan": "30 days"},
                                              {"granularity": "5m", "timespan": "7 days"}],
                                     methods=("mean", "max", "min", "sum", "last", "first",
                                              "count", "rate:max"))
        server.create_resource_type("instance", {
            "flavor_name": {"type": "string", "required": False},
            "vcpus": {"type": "number", "required": False}})
        server.create_resource_type("volume", {
            "volume_type": {"type": "string", "required": False}})
        h0 = current_hour()   # vm-b1's second revision starts in it
        steps = [h0 + 5 * i * MINUTE for i in range(HOURS * 12)]
        measures = {}

        def instance(name, project, metrics=("cpu", "memory.usage"), **attrs):
            res = server.create_resource("instance", name, project_id=project,
                                         metrics={m: POLICY for m in metrics}, **attrs)
            measures[res["id"]] = {
                "cpu": [(t, 1.0) for t in steps],
                **({"memory.usage": [(t, 512 + (i % 7) * 0.3) for i, t in enumerate(steps)]}
                   if "memory.usage" in metrics else {})}

        def volume(name, project, size, **attrs):
            res = server.create_resource("volume", name, project_id=project,
                                         metrics={"volume.size": POLICY,
                                                  "disk.write.bytes": POLICY}, **attrs)
            measures[res["id"]] = {
                "volume.size": [(t, float(size)) for t in steps],
                "disk.write.bytes": [(t, 1e9 + i * 123456.7) for i, t in enumerate(steps)]}

        instance("vm-a1", "p-a", flavor_name="m1.small", vcpus=2)
        instance("vm-a2", "p-a")                       # null flavor_name and vcpus
        volume("vol-a1", "p-a", 10, volume_type="ssd")
        instance("vm-b1", "p-b", flavor_name="m1.large", vcpus=4)
        volume("vol-b1", "p-b", 20, volume_type="hdd")
        instance("vm-c1", "p-c", metrics=("cpu",), flavor_name="m1.tiny", vcpus=1)
        server.push_measures(measures)
        server.update_resource("instance", "vm-b1", flavor_name="m1.xlarge")
        server.wait_processed()
        yield server, h0


def periods(h0):
    # the hour before the resources existed: no data for both
    return [(h0 + n * HOUR, h0 + (n + 1) * HOUR) for n in range(-1, HOURS)]


def collector(server, path, **opts):
    conf = make_conf(collector_gnocchi={"gnocchi_auth_type": "basic", "gnocchi_user": "admin",
                                        "gnocchi_endpoint": server.url, "retries": 0, **opts},
                     orchestrator={"collect_executor": "threads"})
    metrics = load_metrics_conf(str(path), scope_key="project_id",
                                extra_args_schema=GNOCCHI_EXTRA_ARGS)
    return GnocchiCollector(conf, metrics)


def _text(value):
    return "" if value is None else value if isinstance(value, str) else str(value)


def ck_rows(result):
    """CloudKitty's rows: (type, scope, begin) -> sorted points."""
    out = {}
    for row in result["rows"]:
        assert "error" not in row, row
        out[(row["type"], row["scope"], row["begin"])] = sorted(
            (p["unit"], p["qty"], p["price"],
             [(k, _text(p["groupby"][k])) for k in p["groupby_keys"]],
             sorted((k, _text(v)) for k, v in p["metadata"].items()))
            for p in row["points"])
    return out


def our_rows(coll, scopes, spans):
    out = {}
    for metric in coll.metrics:
        for scope in scopes:
            for begin, end in spans:
                points = coll.retrieve(metric, scope, begin, end)
                out[(metric.usage_type, scope, begin.isoformat())] = sorted(
                    # the pipeline adds the time keys to every point
                    (p.unit, str(p.qty), str(p.price),
                     list({**p.groupby, **time_groupby(begin)}.items()),
                     sorted(p.metadata.items()))
                    for p in points)
    return out


def aggregates_queries(proxy):
    """The aggregates requests a proxy saw: (query string, JSON body) each."""
    return sorted((json.dumps(s.query, sort_keys=True), json.dumps(s.body, sort_keys=True))
                  for s in proxy.seen if s.path == "/v1/aggregates")


def test_same_rows_as_cloudkitty_gnocchi_collector(filled, tmp_path):
    server, h0 = filled
    path = tmp_path / "metrics.yml"
    path.write_text(yaml.safe_dump(METRICS))
    spans = periods(h0)
    # each through a proxy that records its requests
    with FaultProxy(server.url) as theirs_proxy, FaultProxy(server.url) as ours_proxy:
        spec = {"endpoint": theirs_proxy.url, "user": "admin", "scope_key": "project_id",
                "period": 3600, "metrics_yml": str(path), "scopes": SCOPES,
                "periods": [[b.isoformat(), e.isoformat()] for b, e in spans],
                "fetcher": {"resource_types": ["generic"], "scope_attribute": "project_id"}}
        theirs = run_cloudkitty_driver(spec, tmp_path)
        coll = collector(ours_proxy, path)
        try:
            ours = our_rows(coll, SCOPES, spans)
        finally:
            coll.close()
    # the same aggregates queries (query strings and bodies)
    sent = aggregates_queries(ours_proxy)
    assert sent == aggregates_queries(theirs_proxy)
    assert len(sent) == len(SCOPES) * len(spans) * 7
    expected = ck_rows(theirs)
    assert set(ours) == set(expected)
    for key in sorted(expected):
        assert ours[key] == expected[key], key
    # the comparison covered every kind of row
    rows = {key: points for key, points in expected.items() if points}
    assert sum(map(len, rows.values())) >= 60
    types = {key[0] for key in rows}
    assert types == {"instance", "instance_by_flavor", "instance_last_revision",
                     "memory.usage", "volume.size", "disk.write.bytes"}
    first = h0.isoformat()
    # before the resources existed, lacking a metric, no resource: no data
    assert not any(key[2] == (h0 - HOUR).isoformat() for key in rows)
    assert not any(key[0] == "network.missing" for key in rows)
    assert not any(key[0] == "memory.usage" and key[1] == "p-c" for key in rows)
    assert not any(key[1] == "p-d" for key in rows)
    # vm-b1's two revisions in the first hour: two rows, or one merged
    flavors = [dict(p[3])["flavor_name"] for p in rows[("instance_by_flavor", "p-b", first)]]
    assert sorted(flavors) == ["m1.large", "m1.xlarge"]
    merged = rows[("instance_last_revision", "p-b", first)]
    assert len(merged) == 1 and dict(merged[0][3])["flavor_name"] == "m1.xlarge"
    # null attributes, 28-digit conversion
    a2 = [p for p in rows[("instance", "p-a", first)] if dict(p[4])["flavor_name"] == ""]
    assert len(a2) == 1 and dict(a2[0][4])["vcpus"] == ""
    assert any(len(p[1]) > 20 for p in rows[("disk.write.bytes", "p-a", spans[2][0].isoformat())])
    # and the fetcher lists the same scopes as CloudKitty's
    fetcher = GnocchiFetcher(make_conf(fetcher_gnocchi={
        "gnocchi_auth_type": "basic", "gnocchi_user": "admin", "gnocchi_endpoint": server.url}))
    try:
        assert fetcher.get_scopes() == theirs["scopes"] == ["p-a", "p-b", "p-c"]
    finally:
        fetcher.close()


def test_every_granule_of_the_period_is_used(filled, tmp_path):
    """force_granularity 300 in 3600 s periods: CloudKitty's quantity is the
    first 5-minute granule, ours combines the twelve by
    re_aggregation_method (sum here)."""
    server, h0 = filled
    metrics = {"metrics": {"memory.usage": {
        "unit": "MiB", "groupby": ["id"],
        "extra_args": {"resource_type": "instance", "aggregation_method": "mean",
                       "re_aggregation_method": "sum", "force_granularity": 300}}}}
    path = tmp_path / "metrics.yml"
    path.write_text(yaml.safe_dump(metrics))
    begin, end = h0 + HOUR, h0 + 2 * HOUR
    theirs = run_cloudkitty_driver(
        {"endpoint": server.url, "user": "admin", "scope_key": "project_id",
         "period": 3600, "metrics_yml": str(path), "scopes": ["p-a"],
         "periods": [[begin.isoformat(), end.isoformat()]]}, tmp_path)
    granules = server.aggregates(
        ["aggregate", "sum", ["metric", "memory.usage", "mean"]], resource_type="instance",
        search={"and": [{"=": {"type": "instance"}}, {"=": {"project_id": "p-a"}}]},
        groupby=["id", "project_id"], start=begin, stop=end, granularity=300)
    by_id = {g["group"]["id"]: [m[2] for m in g["measures"]["measures"]["aggregated"]]
             for g in granules}
    assert len(by_id) == 2 and all(len(v) == 12 for v in by_id.values())
    [row] = theirs["rows"]

    def ck_qty(value):   # CloudKitty's conversion: the default context, factor 1
        return decimal.Decimal(value) * 1 + 0

    assert sorted(decimal.Decimal(p["qty"]) for p in row["points"]) == sorted(
        ck_qty(v[0]) for v in by_id.values())
    coll = collector(server, path)
    try:
        points = coll.retrieve(coll.metrics.metrics[0], "p-a", begin, end)
    finally:
        coll.close()
    assert {p.groupby["id"]: p.qty for p in points} == {
        rid: ck_qty(sum(v[1:], v[0])) for rid, v in by_id.items()}
    assert all(p.qty != ck_qty(by_id[p.groupby["id"]][0]) for p in points)


def test_use_all_resource_revisions_false_needs_revision_start(filled, tmp_path):
    server, _ = filled
    path = tmp_path / "metrics.yml"
    path.write_text(yaml.safe_dump({"metrics": {"cpu": {
        "unit": "instance", "groupby": ["id"],
        "extra_args": {"resource_type": "instance", "use_all_resource_revisions": False}}}}))
    with pytest.raises(ConfigError, match="needs 'revision_start' in groupby"):
        collector(server, path)


def test_check_and_authentication(filled, tmp_path):
    """check() reaches Gnocchi and finds each metric's resource type;
    without credentials a basic-auth Gnocchi answers 401: an error at once."""
    server, h0 = filled
    path = tmp_path / "metrics.yml"
    path.write_text(yaml.safe_dump(METRICS))
    coll = collector(server, path)
    try:
        coll.check()
    finally:
        coll.close()
    path.write_text(yaml.safe_dump({"metrics": {"cpu": {
        "unit": "instance", "extra_args": {"resource_type": "instanse"}}}}))
    coll = collector(server, path)
    try:
        with pytest.raises(CollectError, match="has no resource type instanse"):
            coll.check()
    finally:
        coll.close()
    coll = collector(server, path, gnocchi_auth_type="noauth")
    try:
        with pytest.raises(CollectError, match="HTTP 401") as err:
            coll.retrieve(coll.metrics.metrics[0], "p-a", h0, h0 + HOUR)
        assert err.value.kind == "http" and "after" not in str(err.value)
    finally:
        coll.close()
