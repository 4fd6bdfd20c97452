"""The drop-in RPC server (cloudkitty_proc/dropin/rpc.py) answering the real
cloudkitty-api 25.0.0 (tests/cloudkitty_stack.py: MariaDB, a RabbitMQ
vhost, influxd): ``PUT /v2/scope`` reaches our reset_state, ``POST
/v1/rating/quote`` gets our price, ``GET /v1/rating/reload_modules`` (RPC
1.1) and ``PUT /v2/rating/modules/hashmap`` reach the reload callback.

Our server runs in this process on the stack's transport_url, with the
drop-in storage on the stack's own MariaDB database (CloudKitty's tables,
made by cloudkitty-dbsync) and InfluxDB database, so the API's ``GET
/v2/scope`` and ``GET /v2/dataframes`` show what our reset did; the quote
is priced by the daemon's quote function with rules created through the
stack's API (read from its tables).

Service-backed: MariaDB, RabbitMQ + rabbitmqctl, influxd and the CloudKitty
venv (built by a session fixture when missing).
"""

from __future__ import annotations

import datetime

import pytest
from oslo_config import cfg

from cloudkitty_proc import messaging
from tests.cloudkitty_stack import cloudkitty_stack, cloudkitty_venv  # noqa: F401 (fixture)
from tests.daemon import wait_until
from tests.functional.test_dropin_rpc import (Overrides, Server, commit_hours,
                                              dropin_overrides, dropin_storage,
                                              influx_period_starts)

pytestmark = pytest.mark.service

SCOPE = "p-rpc"
INFLUX_DB = "ckrpc"
H = datetime.timedelta(hours=1)
METRICS_YML = """\
metrics:
  instance_up:
    alt_name: instance
    unit: instance
    groupby: [id, project_id]
    metadata: [flavor_name]
"""


@pytest.fixture(scope="module")
def t0() -> datetime.datetime:
    """The first of four rated periods: a day ago, on the hour."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.replace(minute=0, second=0, microsecond=0) - datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def stack(cloudkitty_venv, influxdb_server, tmp_path_factory):  # noqa: F811
    # no processor runs: the Prometheus URL is never queried
    with cloudkitty_stack(tmp_path_factory.mktemp("ck"), influx_host=influxdb_server.host,
                          influx_port=influxdb_server.port, influx_database=INFLUX_DB,
                          prometheus_url="http://127.0.0.1:9", metrics_yml=METRICS_YML,
                          scopes=[SCOPE], venv=cloudkitty_venv) as s:
        yield s


@pytest.fixture(scope="module")
def rules(stack):
    """Through the API: hashmap enabled, service instance, field
    flavor_name, m1.small flat 0.25 (a past start: ``?force=true``)."""
    base = "/v1/rating/module_config/hashmap"
    service = stack.call("POST", f"{base}/services", json={"name": "instance"})
    field = stack.call("POST", f"{base}/fields",
                       json={"service_id": service["service_id"], "name": "flavor_name"})
    stack.call("POST", f"{base}/mappings", params={"force": "true"}, json={
        "field_id": field["field_id"], "value": "m1.small", "cost": "0.25", "type": "flat",
        "start": "2020-01-01T00:00:00"})
    stack.call("PUT", "/v2/rating/modules/hashmap", json={"enabled": True})


@pytest.fixture
def ours(stack, rules, t0, influxdb_server, tmp_path):
    """Our server on the stack's vhost, our storage on the stack's database
    and InfluxDB database: SCOPE rated up to t0+3h (four periods from t0;
    the first test's reset leaves fewer, rated again here)."""
    messaging.register_opts(cfg.CONF)
    o = Overrides()
    for name, value, group in [
            ("transport_url", stack.transport_url, None),
            ("host", "ckp-stack-test", None),
            *dropin_overrides(stack.db_url, influxdb_server, INFLUX_DB),
            ("begin", t0.isoformat(), "collect"),
            ("sources", [SCOPE], "fetcher_source"),
            ("coordination_url", f"file://{tmp_path}/locks", "orchestrator")]:
        o.set(name, value, group)
    storage = dropin_storage(cfg.CONF)
    last = storage.get_state(SCOPE).last_processed
    begin = t0 if last is None else last + H
    commit_hours(storage, SCOPE, begin, int((t0 + 4 * H - begin) / H))
    server = Server(cfg.CONF)
    try:
        yield server, storage
    finally:
        server.stop()
        storage.close()
        o.clear()


def api_scope_state(stack):
    """SCOPE's row as ``GET /v2/scope`` answers it."""
    [row] = stack.call("GET", "/v2/scope", params={"scope_id": SCOPE})["results"]
    return row


def test_put_v2_scope_reaches_our_reset_state(stack, ours, t0, influxdb_server):
    """Before: the API shows the row our storage wrote (complete, at
    t0+3h). PUT /v2/scope to t0+H: our reset runs, and the API then shows
    the state at t0 (T = t0+H is the next period to rate) and only t0's
    points in /v2/dataframes."""
    server, storage = ours
    row = api_scope_state(stack)
    assert (row["scope_key"], row["fetcher"], row["collector"], row["active"]) == (
        "project_id", "source", "prometheus", True)
    assert datetime.datetime.fromisoformat(row["last_processed_timestamp"]) == t0 + 3 * H
    reply = stack.request("PUT", "/v2/scope", json={
        "scope_id": SCOPE, "last_processed_timestamp": (t0 + H).isoformat()})
    assert reply.status == 202, reply.text
    wait_until(lambda: storage.get_state(SCOPE).last_processed == t0, timeout=30,
               what="our storage reset by PUT /v2/scope")
    assert datetime.datetime.fromisoformat(
        api_scope_state(stack)["last_processed_timestamp"]) == t0
    assert sorted({r.begin for r in storage.iter_rated(SCOPE)}) == [t0]
    assert influx_period_starts(influxdb_server, INFLUX_DB, SCOPE) == [t0]
    frames = stack.call("GET", "/v2/dataframes", params={
        "begin": (t0 - H).isoformat(), "end": (t0 + 5 * H).isoformat(),
        "filters": f"project_id:{SCOPE}"})["dataframes"]
    assert [datetime.datetime.fromisoformat(f["period"]["begin"]) for f in frames] == [t0]
    assert server.wakes


def test_post_v1_rating_quote_gets_our_price(stack, ours):
    """2 × m1.small at 0.25 (a flat field mapping), with CloudKitty's
    decimals: the cost is DECIMAL(40,28) in MariaDB. The API answers the
    processor's string as it is (a JSON string, not a number). As
    CloudKitty's quote, the API's flat desc keys are not read (0)."""
    reply = stack.request("POST", "/v1/rating/quote", json={"resources": [
        {"service": "instance", "desc": {"groupby": {"id": "vm-1"},
                                         "metadata": {"flavor_name": "m1.small"}},
         "volume": "2"}]})
    assert (reply.status, reply.text) == (200, '"0.5000000000000000000000000000"')
    reply = stack.request("POST", "/v1/rating/quote", json={"resources": [
        {"service": "instance", "desc": {"flavor_name": "m1.small"}, "volume": "2"}]})
    assert (reply.status, reply.text) == (200, '"0"')


def test_module_changes_through_the_api_reach_the_reload_callback(stack, ours):
    """GET /v1/rating/reload_modules casts reload_modules at RPC 1.1 (the API
    sends it twice); PUT /v2/rating/modules/hashmap casts disable_module."""
    server, _storage = ours
    stack.call("GET", "/v1/rating/reload_modules")
    wait_until(lambda: len(server.reloads) >= 1, timeout=30, what="reload_modules at 1.1")
    before = len(server.reloads)
    stack.call("PUT", "/v2/rating/modules/hashmap", json={"enabled": False})
    wait_until(lambda: len(server.reloads) > before, timeout=30, what="disable_module")
