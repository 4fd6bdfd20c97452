"""The drop-in rating chain against rules made by the real cloudkitty-api 25.0.0.

The reference stack (tests/cloudkitty_stack.py: MariaDB schema from
``cloudkitty-dbsync upgrade``, the real API, and the real
cloudkitty-processor, idle (no scope), only to answer the ``quote`` RPC).
Rules and module states are created through the API; cloudkitty_proc's
chain reads them from the same database and must price what CloudKitty's
own quote prices, and follow changes made through the API from the next
period. The Core definitions of the rating tables are compared with the
tables the real migrations made.

Service-backed: MariaDB, RabbitMQ, influxd and the CloudKitty venv.
"""

from __future__ import annotations

import datetime
import subprocess
import time
from decimal import Decimal as D

import pytest
import sqlalchemy as sa

from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.dropin import rating_tables as rt
from cloudkitty_proc.dropin.rules import CloudKittyRatingChain, quote
from tests.cloudkitty_stack import cloudkitty_stack, cloudkitty_venv  # noqa: F401 (fixture)
from tests.functional.test_dropin_rules import make_conf

pytestmark = pytest.mark.service

HASHMAP = "/v1/rating/module_config/hashmap"
METRICS_YML = """\
metrics:
  instance_up:
    alt_name: instance
    unit: instance
    groupby: [id, project_id]
    metadata: [flavor_name]
"""


def _rpc_consumers(vhost: str) -> int:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "consumers"],
                         capture_output=True, text=True, timeout=60).stdout
    return sum(int(parts[1]) for parts in (line.split() for line in out.splitlines())
               if len(parts) == 2 and parts[0] == "cloudkitty" and parts[1].isdigit())


@pytest.fixture(scope="module")
def stack(cloudkitty_venv, influxdb_server, tmp_path_factory):  # noqa: F811
    with cloudkitty_stack(tmp_path_factory.mktemp("ckrules"), influx_host=influxdb_server.host,
                          influx_port=influxdb_server.port, influx_database="ckrules",
                          prometheus_url="http://127.0.0.1:9", metrics_yml=METRICS_YML,
                          scopes=[], processor=True, venv=cloudkitty_venv) as s:
        deadline = time.monotonic() + 120
        while _rpc_consumers(s.name) == 0:  # the processor's RPC server, for quotes
            assert s.processor_pid, "cloudkitty-processor exited:\n" + s.processor_log()
            assert time.monotonic() < deadline, "no RPC server:\n" + s.processor_log()
            time.sleep(1)
        yield s


@pytest.fixture(scope="module")
def chain(stack):
    made = CloudKittyRatingChain(make_conf(stack.db_url))
    yield made
    made.close()


def ck_quote(stack, resources: list[dict]) -> D:
    """CloudKitty's own quote (``POST /v1/rating/quote``; its processor
    prices it): the API returns a float."""
    return D(str(stack.call("POST", "/v1/rating/quote", json={"resources": resources})))


def res_data(resources: list[dict]) -> dict:
    """The RPC argument the API builds from ``resources`` (its to_json)."""
    usage: dict = {}
    for r in resources:
        usage.setdefault(r["service"], []).append(
            {"desc": r["desc"], "vol": {"qty": str(r["volume"]), "unit": "undef"}})
    return {"usage": usage}


def next_hour() -> datetime.datetime:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.replace(minute=0, second=0, microsecond=0) + datetime.timedelta(hours=1)


def period_price(chain, begin: datetime.datetime, scope: str, flavor: str, qty: str) -> D:
    frame = DataFrame(scope, begin, begin + datetime.timedelta(hours=1), {"instance": [
        DataPoint("instance", D(qty), D(0), {"project_id": scope}, {"flavor_name": flavor})]})
    return chain.process(frame).total_price()


def _type(column: sa.Column) -> str:
    """The column's type, generic (MariaDB's display widths and TINYINT
    booleans aside)."""
    generic = column.type.as_generic()
    if isinstance(generic, sa.Boolean) or type(column.type).__name__ == "TINYINT":
        return "BOOLEAN"
    if isinstance(generic, sa.Enum):
        return f"ENUM{tuple(generic.enums)}"
    if isinstance(generic, (sa.Text, sa.LargeBinary)):
        return type(generic).__name__.upper()
    return repr(generic)


def test_rating_tables_match_the_real_migrations(stack):
    engine = sa.create_engine(stack.db_url)
    try:
        real = sa.MetaData()
        real.reflect(engine, only=[t.name for t in rt.rating_metadata.sorted_tables])
    finally:
        engine.dispose()
    differences = []
    for ours in rt.rating_metadata.sorted_tables:
        theirs = {c.name: (c.nullable, _type(c)) for c in real.tables[ours.name].columns}
        mine = {c.name: (c.nullable, _type(c)) for c in ours.columns}
        differences += [f"{ours.name}.{name}: real {theirs.get(name)}, ours {mine.get(name)}"
                        for name in sorted(set(theirs) | set(mine))
                        if theirs.get(name) != mine.get(name)]
    assert differences == []


def test_rules_made_through_the_api_price_as_cloudkittys_quote(stack, chain):
    past = "2026-01-01T00:00:00"
    service = stack.call("POST", f"{HASHMAP}/services", json={"name": "instance"})
    flavor = stack.call("POST", f"{HASHMAP}/fields",
                        json={"service_id": service["service_id"], "name": "flavor_name"})
    group = stack.call("POST", f"{HASHMAP}/groups", json={"name": "flavors"})
    # a service mapping posted without value ('' in the row), a cost as a JSON
    # number (float noise in the row), a grouped field mapping, a threshold,
    # a per-tenant mapping (never used by quotes)
    stack.call("POST", f"{HASHMAP}/mappings", params={"force": "true"}, json={
        "service_id": service["service_id"], "cost": 1.1, "type": "flat", "start": past})
    stack.call("POST", f"{HASHMAP}/mappings", params={"force": "true"}, json={
        "field_id": flavor["field_id"], "value": "m1.small", "cost": "0.25", "type": "flat",
        "group_id": group["group_id"], "start": past})
    stack.call("POST", f"{HASHMAP}/mappings", params={"force": "true"}, json={
        "field_id": flavor["field_id"], "value": "m1.small", "cost": "7", "type": "flat",
        "group_id": group["group_id"], "tenant_id": "p-tenant", "start": past})
    stack.call("POST", f"{HASHMAP}/thresholds", json={
        "service_id": service["service_id"], "level": "10", "cost": "0.5", "type": "rate"})
    stack.call("PUT", "/v2/rating/modules/hashmap", json={"enabled": True})
    rows = {r["value"]: r for r in stack.sql("SELECT value, cost FROM hashmap_mappings")}
    assert rows[""]["cost"] == D("1.1000000000000000888178419700")   # as §3.3 observed

    cases = [
        [{"service": "instance", "volume": "2",
          "desc": {"groupby": {"project_id": "p-tenant"},
                   "metadata": {"flavor_name": "m1.small"}}}],
        [{"service": "instance", "volume": "12", "desc": {"metadata": {"flavor_name": "m1.small"}}},
         {"service": "instance", "volume": "1", "desc": {"flavor_name": "m1.small"}}],
        [{"service": "volume", "volume": "3", "desc": {}}],
    ]
    for resources in cases:
        theirs = ck_quote(stack, resources)
        ours = quote(make_conf(stack.db_url), res_data(resources), chain=chain)
        assert float(ours) == float(theirs), resources

    # per period, with the tenant's rule (a scope is rated, not quoted)
    hour = next_hour()
    assert period_price(chain, hour, "p-tenant", "m1.small", "2") == \
        D("1.1000000000000000888178419700") * 2 + 14
    assert period_price(chain, hour, "p-other", "m1.small", "2") == \
        D("1.1000000000000000888178419700") * 2 + D("0.5")


def test_a_mapping_created_through_the_api_prices_the_next_period(stack, chain):
    fields = stack.call("GET", f"{HASHMAP}/fields", params={
        "service_id": stack.call("GET", f"{HASHMAP}/services")["services"][0]["service_id"]})
    [flavor] = fields["fields"]
    resources = [{"service": "instance", "volume": "1",
                  "desc": {"metadata": {"flavor_name": "m1.large"}}}]
    current = next_hour() - datetime.timedelta(hours=1)
    before = period_price(chain, current + datetime.timedelta(hours=1), "p1", "m1.large", "1")
    builds = chain.builds
    # no start given: the API's "now"; active in quotes at once, and from the
    # next period on (the current period started before it)
    stack.call("POST", f"{HASHMAP}/mappings", json={
        "field_id": flavor["field_id"], "value": "m1.large", "cost": "3", "type": "flat"})
    assert ck_quote(stack, resources) == D("3")
    assert quote(make_conf(stack.db_url), res_data(resources), chain=chain) == D("3")
    assert period_price(chain, current, "p1", "m1.large", "1") == before
    assert period_price(chain, current + datetime.timedelta(hours=1), "p1", "m1.large",
                        "1") == D("3")
    assert chain.builds == builds + 1

    stack.call("PUT", "/v2/rating/modules/hashmap", json={"enabled": False})
    assert ck_quote(stack, resources) == 0
    assert period_price(chain, current + datetime.timedelta(hours=1), "p1", "m1.large",
                        "1") == 0
