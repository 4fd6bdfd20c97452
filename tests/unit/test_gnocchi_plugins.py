"""The gnocchi collector's and fetcher's pieces that need no server: options
read from a CloudKitty section, authentication, metrics.yml extra_args,
the query, and what is made of replies (conversion, revisions, granules,
"no such metric")."""

from __future__ import annotations

import datetime
import decimal
import textwrap

import pytest
from oslo_config import cfg

import cloudkitty_proc.conf as ckconf
from cloudkitty_proc import gnocchi_client
from cloudkitty_proc.collectors import _gnocchi_reply as reply
from cloudkitty_proc.collectors.gnocchi import (GNOCCHI_EXTRA_ARGS, GnocchiCollector,
                                                _metric_missing, with_gnocchi_groupby)
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.fetchers.gnocchi import GnocchiFetcher
from cloudkitty_proc.gnocchi_client import GnocchiError
from cloudkitty_proc.metrics_conf import parse_metrics

UTC = datetime.timezone.utc
BEGIN = datetime.datetime(2026, 1, 1, 10, tzinfo=UTC)
END = BEGIN + datetime.timedelta(hours=1)


def load_conf(tmp_path, text: str) -> cfg.ConfigOpts:
    path = tmp_path / "cloudkitty.conf"
    path.write_text(textwrap.dedent(text))
    conf = cfg.ConfigOpts()
    ckconf.register_opts(conf)
    conf(["--config-file", str(path)], project="cloudkitty-proc", default_config_files=[])
    return conf


def metrics(*defs: dict, scope_key: str = "project_id"):
    return parse_metrics({"metrics": {d.pop("name", f"m{i}"): d for i, d in enumerate(defs)}},
                         path="metrics.yml", scope_key=scope_key,
                         extra_args_schema=GNOCCHI_EXTRA_ARGS)


# -- options and authentication ----------------------------------------------------

CLOUDKITTY_SECTIONS = """
    [collect]
    collector = gnocchi
    [collector_gnocchi]
    auth_section = ks_auth
    gnocchi_auth_type = basic
    gnocchi_user = cloudkitty
    gnocchi_endpoint = http://gnocchi.example:8041
    interface = internalURL
    region_name = RegionTwo
    http_pool_maxsize = 32
    cafile = /etc/ssl/ca.pem
    insecure = false
    timeout = 12.5
    auth_url = http://keystone:5000/v3
    [fetcher_gnocchi]
    scope_attribute = project_id
    resource_types = instance,volume
    gnocchi_auth_type = basic
    gnocchi_user = cloudkitty
    gnocchi_endpoint = http://gnocchi.example:8041/
    [ks_auth]
    auth_type = password
    password = secret
"""


def test_a_cloudkitty_section_reads_unchanged(tmp_path):
    conf = load_conf(tmp_path, CLOUDKITTY_SECTIONS)
    group = conf.collector_gnocchi
    assert (group.gnocchi_auth_type, group.gnocchi_user, group.region_name,
            group.interface, group.http_pool_maxsize, group.cafile, group.timeout,
            group.auth_section) == ("basic", "cloudkitty", "RegionTwo", "internalURL", 32,
                                    "/etc/ssl/ca.pem", 12.5, "ks_auth")
    assert conf.fetcher_gnocchi.resource_types == ["instance", "volume"]
    # CloudKitty's defaults
    fresh = load_conf(tmp_path, "")
    assert fresh.collector_gnocchi.gnocchi_auth_type == "keystone"
    assert fresh.fetcher_gnocchi.resource_types == ["generic"]
    assert fresh.fetcher_gnocchi.scope_attribute == "project_id"


def test_auth_modes(tmp_path):
    conf = load_conf(tmp_path, CLOUDKITTY_SECTIONS)
    auth = gnocchi_client.auth_from_conf(conf, "collector_gnocchi")
    # gnocchiclient's GnocchiBasicPlugin: the user, an empty password
    assert auth.endpoint == "http://gnocchi.example:8041"
    assert auth.headers() == {"Authorization": "Basic Y2xvdWRraXR0eTo="}
    conf.set_override("gnocchi_auth_type", "noauth", "collector_gnocchi")
    assert gnocchi_client.auth_from_conf(conf, "collector_gnocchi").headers() == {}
    conf.set_override("gnocchi_endpoint", " ", "collector_gnocchi")
    with pytest.raises(ConfigError, match=r"\[collector_gnocchi\] gnocchi_endpoint is not set"):
        gnocchi_client.auth_from_conf(conf, "collector_gnocchi")
    # keystone without credentials in the group: one line naming it
    conf.set_override("gnocchi_auth_type", "keystone", "fetcher_gnocchi")
    with pytest.raises(ConfigError, match=r"^\[fetcher_gnocchi\] auth_type is not set"):
        GnocchiFetcher(conf)


def test_keystone_auth_is_built_without_network_io(tmp_path):
    """gnocchi_auth_type = keystone: the session from auth_section, no
    request at start-up (the endpoint is looked up at the first request
    unless gnocchi_endpoint overrides it), a missing option named."""
    conf = load_conf(tmp_path, CLOUDKITTY_SECTIONS.replace(
        "gnocchi_auth_type = basic", "gnocchi_auth_type = keystone"))
    with pytest.raises(ConfigError, match=r"\[ks_auth\] auth_type = password: missing "
                       r"auth_url") as err:
        gnocchi_client.auth_from_conf(conf, "collector_gnocchi")
    assert "secret" not in str(err.value)
    conf.set_override("auth_url", "http://127.0.0.1:9/v3", "ks_auth")
    conf.set_override("username", "ck", "ks_auth")
    auth = gnocchi_client.auth_from_conf(conf, "collector_gnocchi")
    assert auth.endpoint == "http://gnocchi.example:8041" and auth.resolve is None
    assert auth.invalidate is not None
    conf.set_override("gnocchi_endpoint", "", "collector_gnocchi")
    auth = gnocchi_client.auth_from_conf(conf, "collector_gnocchi")
    assert auth.endpoint == "" and auth.resolve is not None
    client = gnocchi_client.GnocchiClient(auth, group="collector_gnocchi", green=False,
                                          timeout=2, size=1, cafile=None, insecure=False)
    assert "internalURL metric endpoint of region RegionTwo" in client.safe_url
    # nothing listens on port 9: the first request fails as a connection error
    with pytest.raises(GnocchiError) as exc:
        client.request("GET", "/v1/resource_type")
    assert exc.value.kind == "connection" and exc.value.retryable
    assert "[collector_gnocchi] auth_section = ks_auth" in exc.value.message
    assert "secret" not in exc.value.message
    client.close()


def test_the_collector_refuses_a_bad_endpoint(tmp_path):
    conf = load_conf(tmp_path, CLOUDKITTY_SECTIONS)
    conf.set_override("gnocchi_endpoint", "gnocchi:8041", "collector_gnocchi")
    with pytest.raises(ValueError, match=r"\[collector_gnocchi\] gnocchi_endpoint"):
        GnocchiCollector(conf, metrics({"unit": "u", "extra_args": {"resource_type": "x"}}))


# -- metrics.yml ------------------------------------------------------------------------

def test_extra_args_defaults_and_refusals():
    [m] = metrics({"unit": "instance", "groupby": ["user_id"],
                   "extra_args": {"resource_type": "instance"}})
    assert m.extra_args == {"resource_type": "instance", "resource_key": "id",
                            "aggregation_method": "max", "re_aggregation_method": "max",
                            "force_granularity": 3600, "use_all_resource_revisions": True,
                            "custom_query": ""}
    for extra, word in (({}, "resource_type"),
                        ({"resource_type": "i", "aggregation_method": "avg"},
                         "aggregation_method"),
                        ({"resource_type": "i", "re_aggregation_method": "50pct"},
                         "re_aggregation_method"),
                        ({"resource_type": "i", "force_granularity": -1}, "force_granularity"),
                        ({"resource_type": "i", "query_prefix": "x"}, "query_prefix")):
        with pytest.raises(ConfigError, match=f"metrics.yml: metric 'm0': key "
                                              f"'extra_args.{word}'"):
            metrics({"unit": "u", "extra_args": extra})
    [m] = metrics({"unit": "u", "extra_args": {"resource_type": "i",
                                               "aggregation_method": "rate:95pct"}})
    assert m.extra_args["aggregation_method"] == "rate:95pct"


def test_groupby_gets_the_resource_key_and_revisions_need_revision_start():
    conf = with_gnocchi_groupby(metrics(
        {"unit": "u", "groupby": ["user_id"], "extra_args": {"resource_type": "i"}},
        {"unit": "u", "groupby": ["id"],
         "extra_args": {"resource_type": "i", "resource_key": "original_resource_id"}}))
    assert [m.groupby for m in conf] == [("user_id", "project_id", "id"),
                                         ("id", "project_id", "original_resource_id")]
    with pytest.raises(ConfigError, match="'m0': .*needs 'revision_start' in groupby"):
        with_gnocchi_groupby(metrics({"unit": "u", "extra_args": {
            "resource_type": "i", "use_all_resource_revisions": False}}))
    # with revision_start, or without id (CloudKitty then keeps every row)
    with_gnocchi_groupby(metrics({"unit": "u", "groupby": ["revision_start"], "extra_args": {
        "resource_type": "i", "use_all_resource_revisions": False}}))
    with_gnocchi_groupby(metrics({"unit": "u", "extra_args": {
        "resource_type": "i", "resource_key": "rk", "use_all_resource_revisions": False}}))


# -- the query ----------------------------------------------------------------------------

def test_cloudkittys_query():
    [m] = with_gnocchi_groupby(metrics({"name": "cpu", "unit": "instance",
                                        "groupby": ["user_id"],
                                        "extra_args": {"resource_type": "instance",
                                                       "aggregation_method": "mean"}}))
    assert reply.operations(m) == ["aggregate", "max", ["metric", "cpu", "mean"]]
    assert reply.search_filter("instance", "project_id", "p1") == {
        "and": [{"=": {"type": "instance"}}, {"=": {"project_id": "p1"}}]}
    params = reply.aggregates_params(m, BEGIN, END)
    assert params == {"details": "False", "granularity": "3600",
                      "groupby": ["user_id", "project_id", "id"],
                      "start": "2026-01-01T10:00:00+00:00", "stop": "2026-01-01T11:00:00+00:00",
                      "use_history": "True"}
    [rate] = metrics({"name": "net", "unit": "B", "extra_args": {
        "resource_type": "i", "re_aggregation_method": "rate:max", "force_granularity": 300,
        "custom_query": "(* 2 (aggregate RE_AGGREGATION_METHOD (metric METRIC_NAME "
                        "AGGREGATION_METHOD)))"}})
    assert reply.aggregates_params(rate, BEGIN, END)["start"] == "2026-01-01T09:55:00+00:00"
    assert reply.operations(rate) == "(* 2 (aggregate rate:max (metric net max)))"
    [free] = metrics({"unit": "u", "extra_args": {"resource_type": "i", "force_granularity": 0}})
    assert "granularity" not in reply.aggregates_params(free, BEGIN, END)


# -- replies --------------------------------------------------------------------------------

def group(gid, value, rev="2026-01-01T10:00:00+00:00", **attrs):
    return {"group": {"id": gid, "revision_start": rev, **attrs},
            "measures": {"measures": {"aggregated": [["2026-01-01T10:00:00+00:00", 3600.0,
                                                      value]]}}}


def test_parse_groups_checks_the_reply():
    assert reply.parse_groups([group("a", 1.0), {"group": {"id": "b"}, "measures": {
        "measures": {"aggregated": []}}}]) == [({"id": "a", "revision_start":
                                                 "2026-01-01T10:00:00+00:00"},
                                                [["2026-01-01T10:00:00+00:00", 3600.0, 1.0]])]
    for bad in ({"measures": {}}, [{"group": {}}], [{"group": [], "measures": {
            "measures": {"aggregated": []}}}], [group("a", 1.0) | {"measures": {
            "measures": {"aggregated": [[1, 2]]}}}]):
        with pytest.raises(reply.MalformedReply):
            reply.parse_groups(bad)


def test_merge_revisions_as_cloudkitty():
    groups = reply.parse_groups([
        group("b", 2.0, rev="2026-01-01T10:30:00+00:00", flavor="large"),
        group("a", 1.5),
        group("b", 0.5, rev="2026-01-01T10:00:00+00:00", flavor="small"),
    ])
    merged = reply.merge_revisions(groups, lambda granules: granules[0][2])
    assert merged == [({"id": "a", "revision_start": "2026-01-01T10:00:00+00:00"}, 1.5),
                      ({"id": "b", "revision_start": "2026-01-01T10:30:00+00:00",
                        "flavor": "large"}, 2.5)]
    # without id: unchanged
    no_id = [({"user": "u"}, [["t", 3600.0, 1.0]]), ({"user": "u"}, [["t", 3600.0, 2.0]])]
    assert reply.merge_revisions(no_id, lambda g: g[0][2]) == [({"user": "u"}, 1.0),
                                                                ({"user": "u"}, 2.0)]


def test_every_granule_combines_by_re_aggregation_method():
    granules = [["2026-01-01T10:10:00+00:00", 300.0, 4.0], ["2026-01-01T10:00:00+00:00", 300.0,
                                                           1.0],
                ["2026-01-01T10:05:00+00:00", 300.0, 7.0]]
    assert reply.combine(granules[:1], "sum") == 4.0
    expected = {"max": 7.0, "min": 1.0, "mean": 4.0, "sum": 12.0, "count": 12.0, "first": 1.0,
                "last": 4.0, "median": 4.0, "rate:max": 12.0, "std": 4.0}
    assert {m: reply.combine(granules, m) for m in expected} == expected
    # no granularity forced: Gnocchi mixes them; the coarsest is used
    mixed = granules + [["2026-01-01T10:00:00+00:00", 3600.0, 100.0]]
    assert reply.combine(mixed, "sum") == 100.0
    with pytest.raises(reply.MalformedReply):
        reply.combine(granules + [["2026-01-01T10:15:00+00:00", 300.0, "x"]], "max")


def test_quantity_as_cloudkittys_gnocchi_collector():
    [plain, gib, flag, ceil] = metrics(
        {"unit": "u", "extra_args": {"resource_type": "i"}},
        {"unit": "GiB", "factor": "1/1073741824", "extra_args": {"resource_type": "i"}},
        {"unit": "u", "mutate": "NUMBOOL", "extra_args": {"resource_type": "i"}},
        {"unit": "u", "factor": "1/3", "mutate": "CEIL", "extra_args": {"resource_type": "i"}})
    # Decimal(float) * Decimal(factor) + Decimal(offset), 28 digits
    assert reply.quantity(plain, 0.1) == decimal.Decimal("0.1000000000000000055511151231")
    assert str(reply.quantity(plain, 7.0)) == "7"   # CloudKitty: Decimal(7.0) * 1 + 0
    assert reply.quantity(gib, 10737418240.0) == decimal.Decimal("10.00000000000000000000")
    assert str(reply.quantity(flag, 0.25)) == "1.0" and str(reply.quantity(flag, 0.0)) == "0.0"
    assert reply.quantity(ceil, 10.0) == 4
    for bad, word in ((float("nan"), "not a finite"), ("1", "not a number"), (None, "not a"),
                      (-1.0, "negative"), (1e40, "out of the accepted range")):
        with pytest.raises(ValueError, match=word):
            reply.quantity(plain, bad)
    [rate] = metrics({"unit": "B", "extra_args": {"resource_type": "i",
                                                  "aggregation_method": "rate:mean"}})
    assert reply.quantity(rate, -5.0) == -5


def test_no_such_metric_is_no_data():
    def err(status, description):
        return GnocchiError("x", "http", retryable=False, status=status,
                            description=description)

    assert _metric_missing(err(404, "Metric ['cpu'] does not exist"))
    assert _metric_missing(err(404, "Metric cpu does not exist"))
    assert _metric_missing(err(400, {"cause": "Metrics not found", "detail": ["cpu"]}))
    assert not _metric_missing(err(404, {"cause": "Metrics with unknown aggregation",
                                         "detail": [["id", "max"]]}))
    assert not _metric_missing(err(404, "Resource type instance does not exist"))
    assert not _metric_missing(err(400, "Metric ['cpu'] does not exist"))
    assert not _metric_missing(err(500, "Metric ['cpu'] does not exist"))


def test_retries_only_what_may_heal():
    calls = []

    def fails(kind, retryable):
        def call():
            calls.append(kind)
            raise GnocchiError(f"{kind} failed", kind, retryable=retryable)
        return call

    with pytest.raises(GnocchiError) as exc:
        gnocchi_client.with_retries(fails("timeout", True), retries=2, max_backoff=0,
                                    sleep=lambda s: None, context="c")
    assert calls == ["timeout"] * 3 and exc.value.message == "timeout failed (after 3 attempts)"
    calls.clear()
    with pytest.raises(GnocchiError) as exc:
        gnocchi_client.with_retries(fails("http", False), retries=2, max_backoff=0,
                                    sleep=lambda s: None, context="c")
    assert calls == ["http"] and exc.value.message == "http failed"
    assert gnocchi_client.has_next_page({"Link": '<http://g/v1/x?marker=a>; rel="next"'})
    assert not gnocchi_client.has_next_page({})
