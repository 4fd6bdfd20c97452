"""The reference CloudKitty 25.0.0 stack (tests/cloudkitty_stack.py) works,
and shows the facts the drop-in mode relies on (CLOUDKITTY-DROPIN §3, §5.2):

* hashmap rules and module state created through the API are rows in
  MariaDB (``hashmap_*``, ``modules_state``), with the mapping's ``start``
  as given (``?force=true`` allows a past one);
* ``POST /v2/scope`` makes a complete state row that ``GET /v2/scope``
  lists; ``/v2/summary`` answers, empty before any rating;
* the real cloudkitty-processor rates periods of a Prometheus dataset with
  those rules, and ``/v2/summary`` shows the prices;
* ``openstack rating`` (cloudkitty-noauth) talks to the API.

Service-backed: MariaDB, RabbitMQ, influxd, prometheus/promtool and the
CloudKitty venv (built by a session fixture when missing).
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import subprocess
import time
import urllib.request
from decimal import Decimal

import pytest

from tests.cloudkitty_stack import cloudkitty_stack, cloudkitty_venv  # noqa: F401 (fixture)
from tests.conftest import need_binary
from tests.prometheus_server import running_prometheus

pytestmark = pytest.mark.service

PERIOD = 3600
SCOPE = "p-alpha"
#: two instances, up all the time; only m1.small has a price
INSTANCES = (("vm-1", "m1.small"), ("vm-2", "m1.tiny"))
SMALL_PRICE = Decimal("0.25")
HOURS_OF_DATA = 3

METRICS_YML = """\
metrics:
  instance_up:
    alt_name: instance
    unit: instance
    groupby: [id, project_id]
    metadata: [flavor_name]
    extra_args:
      aggregation_method: max
"""


# -- InfluxDB: tests/influxdb_server.py when it exists, else a minimal influxd
try:
    from tests.influxdb_server import running_influxdb
except ImportError:
    @contextlib.contextmanager
    def running_influxdb(work):
        """influxd on free loopback ports with the config of CLOUDKITTY-DROPIN §5.1."""
        influxd = need_binary("influxd", package="influxdb")
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        (work / "influxdb.conf").write_text(
            f'reporting-disabled = true\nbind-address = "127.0.0.1:{ports[1]}"\n'
            f'[meta]\n  dir = "{work}/meta"\n[data]\n  dir = "{work}/data"\n'
            f'  wal-dir = "{work}/wal"\n  query-log-enabled = false\n'
            f'[http]\n  bind-address = "127.0.0.1:{ports[0]}"\n  log-enabled = false\n')
        with open(work / "influxd.log", "ab") as log:
            proc = subprocess.Popen([influxd, "-config", str(work / "influxdb.conf")],
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(300):
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/ping", timeout=2)
                    break
                if proc.poll() is not None:
                    raise RuntimeError((work / "influxd.log").read_text()[-2000:])
                time.sleep(0.1)
            yield type("Influx", (), {"host": "127.0.0.1", "port": ports[0]})
        finally:
            proc.terminate()
            proc.wait(timeout=15)


# -- fixtures --------------------------------------------------------------

@pytest.fixture(scope="module")
def first_period() -> datetime.datetime:
    """The first period the processor rates: 4 hours before the current
    hour, so that with wait_periods = 2 at least two periods are due."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.replace(minute=0, second=0, microsecond=0) - datetime.timedelta(hours=4)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, first_period):
    """instance_up = 1 every 5 minutes for HOURS_OF_DATA hours from first_period."""
    start = int(first_period.timestamp())
    lines = ["# TYPE instance_up gauge"]
    for vm, flavor in INSTANCES:
        labels = f'project_id="{SCOPE}",id="{vm}",flavor_name="{flavor}"'
        lines += [f"instance_up{{{labels}}} 1 {start + 150 + k * 300}"
                  for k in range(HOURS_OF_DATA * 12)]
    om = tmp_path_factory.mktemp("om") / "usage.om"
    om.write_text("\n".join(lines) + "\n# EOF\n")
    with running_prometheus(om, tmp_path_factory.mktemp("prom")) as url:
        yield url


@pytest.fixture(scope="module")
def influx(tmp_path_factory):
    need_binary("influxd", package="influxdb")
    with running_influxdb(tmp_path_factory.mktemp("influxdb")) as server:
        yield server


@pytest.fixture(scope="module")
def stack(cloudkitty_venv, influx, prometheus, tmp_path_factory):  # noqa: F811
    started = time.monotonic()
    with cloudkitty_stack(tmp_path_factory.mktemp("ck"), influx_host=influx.host,
                          influx_port=influx.port, influx_database="ckstack",
                          prometheus_url=prometheus, metrics_yml=METRICS_YML,
                          scopes=[SCOPE], period=PERIOD, venv=cloudkitty_venv) as s:
        print(f"\ncloudkitty stack up in {time.monotonic() - started:.1f} s: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in s.timings.items()))
        yield s


@pytest.fixture(scope="module")
def hashmap_rules(stack, first_period):
    """Service instance, field flavor_name, mapping m1.small -> flat 0.25
    from a day before first_period; hashmap enabled."""
    base = "/v1/rating/module_config/hashmap"
    service = stack.call("POST", f"{base}/services", json={"name": "instance"})
    fld = stack.call("POST", f"{base}/fields",
                     json={"service_id": service["service_id"], "name": "flavor_name"})
    start = (first_period - datetime.timedelta(days=1)).replace(tzinfo=None)
    mapping = stack.call("POST", f"{base}/mappings", params={"force": "true"},
                         json={"field_id": fld["field_id"], "value": "m1.small",
                               "cost": str(SMALL_PRICE), "type": "flat",
                               "start": start.isoformat()})
    stack.call("PUT", "/v2/rating/modules/hashmap", json={"enabled": True})
    return {"service": service, "field": fld, "mapping": mapping, "start": start}


@pytest.fixture(scope="module")
def scope_state(stack, first_period):
    """The scope's state row, so that the processor starts at first_period
    (not at the start of the month)."""
    last = first_period - datetime.timedelta(seconds=PERIOD)
    return stack.call("POST", "/v2/scope", json={
        "scope_id": SCOPE, "scope_key": "project_id", "fetcher": "source",
        "collector": "prometheus", "active": True,
        "last_processed_timestamp": last.isoformat()})


# -- tests -----------------------------------------------------------------

def test_rules_created_through_the_api_are_rows_in_mariadb(stack, hashmap_rules):
    [mapping] = stack.sql("SELECT * FROM hashmap_mappings")
    assert mapping["mapping_id"] == hashmap_rules["mapping"]["mapping_id"]
    assert mapping["value"] == "m1.small"
    assert mapping["cost"] == SMALL_PRICE
    assert mapping["map_type"] == "flat"
    assert mapping["start"] == hashmap_rules["start"]          # the past start, forced
    assert mapping["end"] is None and mapping["deleted"] is None
    assert mapping["created_by"] == "unknown"                  # noauth: no token
    [fld] = stack.sql("SELECT f.name, s.name AS service FROM hashmap_fields f "
                      "JOIN hashmap_services s ON s.id = f.service_id")
    assert fld == {"name": "flavor_name", "service": "instance"}
    assert mapping["field_id"] is not None and mapping["service_id"] is None
    states = {r["name"]: r["state"] for r in stack.sql("SELECT * FROM modules_state")}
    assert states["hashmap"] == 1


def test_the_rating_cli_sees_the_api(stack, hashmap_rules):
    modules = {m["Module"]: m["Enabled"] for m in stack.rating("module", "list")}
    assert modules["hashmap"] is True


def test_scope_state_and_an_empty_summary_before_rating(stack, scope_state, first_period):
    assert stack.processor_pid is None, "must run before the processor test"
    assert scope_state["scope_id"] == SCOPE
    [row] = stack.call("GET", "/v2/scope")["results"]
    assert (row["scope_id"], row["scope_key"], row["fetcher"], row["collector"], row["active"]) \
        == (SCOPE, "project_id", "source", "prometheus", True)
    end = first_period + datetime.timedelta(hours=HOURS_OF_DATA)
    summary = stack.call("GET", "/v2/summary", params={
        "begin": first_period.isoformat(), "end": end.isoformat()})
    assert summary["total"] == 0 and summary["results"] == []


def _wait_rated(stack, period_start: datetime.datetime, timeout: float = 240) -> None:
    """Until the scope's last_processed_timestamp reaches period_start."""
    want = period_start.replace(tzinfo=None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = stack.sql("SELECT last_processed_timestamp FROM cloudkitty_storage_states "
                         "WHERE identifier = :s", s=SCOPE)
        if rows and rows[0]["last_processed_timestamp"] >= want:
            return
        assert stack.processor_pid, "cloudkitty-processor exited:\n" + stack.processor_log()
        errors = stack.processor_errors()
        assert not errors, "cloudkitty-processor logged errors:\n" + "\n".join(errors[:30])
        time.sleep(1)
    pytest.fail(f"cloudkitty-processor did not rate {want} within {timeout:g} s "
                f"(state {rows}):\n{stack.processor_log()}")


def test_the_processor_rates_periods_shown_by_the_summary(stack, hashmap_rules, scope_state,
                                                          first_period):
    started = time.monotonic()
    stack.start_processor()
    _wait_rated(stack, first_period)
    print(f"\ncloudkitty-processor rated {first_period} after {time.monotonic() - started:.1f} s")
    end = first_period + datetime.timedelta(seconds=PERIOD)
    window = {"begin": first_period.isoformat(), "end": end.isoformat()}

    summary = stack.call("GET", "/v2/summary", params={
        **window, "groupby": ["type"], "response_format": "object"})
    [total] = summary["results"]
    assert total["type"] == "instance"
    assert Decimal(str(total["qty"])) == len(INSTANCES)
    assert Decimal(str(total["rate"])) == SMALL_PRICE          # only m1.small is priced

    by_id = stack.call("GET", "/v2/summary", params={
        **window, "groupby": ["id"], "response_format": "object"})
    prices = {r["id"]: Decimal(str(r["rate"])) for r in by_id["results"]}
    assert prices == {"vm-1": SMALL_PRICE, "vm-2": Decimal(0)}
