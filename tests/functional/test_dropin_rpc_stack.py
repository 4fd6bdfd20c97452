"""The drop-in RPC server (cloudkitty_proc/dropin/rpc.py) answering the real
cloudkitty-api 25.0.0 (tests/cloudkitty_stack.py: MariaDB, a RabbitMQ
vhost, influxd): ``PUT /v2/scope`` reaches our reset_state, ``POST
/v1/rating/quote`` gets our price, ``GET /v1/rating/reload_modules`` (RPC
1.1) and ``PUT /v2/rating/modules/hashmap`` reach the reload callback.

Our server runs in this process on the stack's transport_url, with the
native SQL storage on SQLite and the quote priced by our native path
(rules in a YAML file): the CloudKitty-table storage and rules are other
modules' tests.

Service-backed: MariaDB, RabbitMQ + rabbitmqctl, influxd and the CloudKitty
venv (built by a session fixture when missing).
"""

from __future__ import annotations

import datetime

import pytest
from oslo_config import cfg

from cloudkitty_proc import messaging
from cloudkitty_proc.storage.sql import SQLStorage
from tests.cloudkitty_stack import cloudkitty_stack, cloudkitty_venv  # noqa: F401 (fixture)
from tests.daemon import wait_until
from tests.functional.test_dropin_rpc import RULES, Overrides, Server, commit_hours

pytestmark = pytest.mark.service

SCOPE = "p-rpc"
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
                          influx_port=influxdb_server.port, influx_database="ckrpc",
                          prometheus_url="http://127.0.0.1:9", metrics_yml=METRICS_YML,
                          scopes=[SCOPE], venv=cloudkitty_venv) as s:
        yield s


@pytest.fixture
def ours(stack, t0, tmp_path):
    """Our server on the stack's vhost: four periods of SCOPE rated in our
    storage (t0 .. t0+3h), the same state row in CloudKitty's table (the
    API resets only scopes it has a row for)."""
    messaging.register_opts(cfg.CONF)
    (tmp_path / "rating.yml").write_text(RULES)
    o = Overrides()
    for name, value, group in [
            ("transport_url", stack.transport_url, None),
            ("host", "ckp-stack-test", None),
            ("mode", "cloudkitty", "cloudkitty_proc"),
            ("begin", t0.isoformat(), "collect"),
            ("sources", [SCOPE], "fetcher_source"),
            ("connection", f"sqlite:///{tmp_path}/db.sqlite", "database"),
            ("coordination_url", f"file://{tmp_path}/locks", "orchestrator"),
            ("processors", ["hashmap"], "rating"),
            ("rules_file", str(tmp_path / "rating.yml"), "hashmap")]:
        o.set(name, value, group)
    storage = SQLStorage(cfg.CONF)
    storage.upgrade()
    commit_hours(storage, SCOPE, t0, 4)
    if stack.request("GET", "/v2/scope", params={"scope_id": SCOPE}).status == 404:
        stack.call("POST", "/v2/scope", json={
            "scope_id": SCOPE, "scope_key": "project_id", "fetcher": "source",
            "collector": "prometheus", "active": True,
            "last_processed_timestamp": (t0 + 3 * H).isoformat()})
    server = Server(cfg.CONF)
    try:
        yield server, storage
    finally:
        server.stop()
        storage.close()
        o.clear()


def test_put_v2_scope_reaches_our_reset_state(stack, ours, t0):
    server, storage = ours
    reply = stack.request("PUT", "/v2/scope", json={
        "scope_id": SCOPE, "last_processed_timestamp": (t0 + H).isoformat()})
    assert reply.status == 202, reply.text
    wait_until(lambda: storage.get_state(SCOPE).last_processed == t0, timeout=30,
               what="our storage reset by PUT /v2/scope")
    assert sorted({r.begin for r in storage.iter_rated(SCOPE)}) == [t0]
    assert server.wakes


def test_post_v1_rating_quote_gets_our_price(stack, ours):
    """2 × m1.small at 0.25 (a flat field mapping): CloudKitty's own quote
    ignores the API's flat desc keys and would answer 0. The API answers
    the processor's string as it is (a JSON string, not a number)."""
    reply = stack.request("POST", "/v1/rating/quote", json={"resources": [
        {"service": "instance", "desc": {"flavor_name": "m1.small"}, "volume": "2"}]})
    assert (reply.status, reply.text) == (200, '"0.50"')


def test_module_changes_through_the_api_reach_the_reload_callback(stack, ours):
    """GET /v1/rating/reload_modules casts reload_modules at RPC 1.1 (the API
    sends it twice); PUT /v2/rating/modules/hashmap casts disable_module."""
    server, _storage = ours
    stack.call("GET", "/v1/rating/reload_modules")
    wait_until(lambda: len(server.reloads) >= 1, timeout=30, what="reload_modules at 1.1")
    before = len(server.reloads)
    stack.call("PUT", "/v2/rating/modules/hashmap", json={"enabled": False})
    wait_until(lambda: len(server.reloads) > before, timeout=30, what="disable_module")
