"""The drop-in mode's RPC server (cloudkitty_proc/dropin/rpc.py) on a real
RabbitMQ: a client built like cloudkitty-api's (oslo.messaging RPCClient,
exchange and topic ``cloudkitty``, version 1.0/1.1, namespace ``rating``,
fanout casts for the module notifications, a topic cast for reset_state)
sends every message shape of CLOUDKITTY-DROPIN.md §4, and the effects are
asserted: the state reset in storage so T is the next period, the quote's
price string, the reload callback, 1.1 accepted; malformed messages get an
error reply (calls) or a log line (casts) and the server keeps serving.

Each test has a RabbitMQ vhost of its own (the topic is fixed:
``cloudkitty``). The server runs in this process on the global cfg.CONF
(oslo.messaging needs it); storage is the drop-in one, as
``plugins.load_storage`` builds it from that configuration (the server's
own, too): CloudKitty's tables on SQLite (tests/cloudkitty_db.py), the
points in a real influxd (``[storage] backend = influxdb``), read back both
through the storage and with InfluxQL.
"""

from __future__ import annotations

import datetime
import decimal
import logging
import shutil
import threading
import uuid

import oslo_messaging
import oslo_messaging.opts
import pytest
from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf  # noqa: F401 - registers the options
from cloudkitty_proc import messaging, plugins
from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.dropin import rpc
from tests import cloudkitty_db
from tests.cloudkitty_rules_db import RulesDB
from tests.conftest import service_unavailable
from tests.daemon import wait_until

pytestmark = pytest.mark.service

D = decimal.Decimal
UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
H = datetime.timedelta(hours=1)
SCOPES = ["p1", "p2"]
#: what the API sends for POST /v1/rating/quote {"resources": [{"service":
#: "instance", "desc": {"groupby": {"id": "vm-1"}, "metadata": {"flavor_name":
#: "m1.small"}}, "volume": "2"}]} (the groupby/metadata form: CloudKitty's
#: quote reads only those); priced 0.50 by write_rules' rules
QUOTE = {"usage": {"instance": [
    {"desc": {"groupby": {"id": "vm-1"}, "metadata": {"flavor_name": "m1.small"}},
     "vol": {"qty": "2", "unit": "undef"}}]}}


def write_rules(db_url):
    """The rating rules, in CloudKitty's tables as cloudkitty-api writes
    them: hashmap enabled, service instance, field flavor_name, m1.small
    flat 0.25."""
    db = RulesDB(db_url)
    try:
        db.module("hashmap", True)
        field = db.field(db.service("instance"), "flavor_name")
        db.mapping("0.25", "flat", field=field, value="m1.small")
    finally:
        db.close()


def scope_row(scope_id, **kw):
    """A scope as PUT /v2/scope serialises its state row."""
    return {"scope_id": scope_id, "scope_key": "project_id", "fetcher": "source",
            "collector": "prometheus", **kw}


def reset_data(*scopes, at=T0 + H):
    return {"scopes": [scope_row(s) for s in scopes],
            "last_processed_timestamp": at.isoformat()}


@pytest.fixture
def vhost_url(amqp_url):
    """A RabbitMQ vhost and user of this test's own."""
    if not shutil.which("rabbitmqctl"):
        service_unavailable("rabbitmqctl", "not on PATH (apt-get install rabbitmq-server)")
    from tests.cloudkitty_stack import rabbit_vhost

    with rabbit_vhost("ckprpc_" + uuid.uuid4().hex[:10], uuid.uuid4().hex) as url:
        yield url


class Overrides:
    """set_override on the global cfg.CONF, all cleared at the end."""

    def __init__(self):
        self.done = []

    def set(self, name, value, group=None):
        cfg.CONF.set_override(name, value, group=group)
        self.done.append((name, group))

    def clear(self):
        for name, group in reversed(self.done):
            cfg.CONF.clear_override(name, group=group)


def dropin_overrides(db_url, influx_server, influx_database):
    """The drop-in storage options: CloudKitty's database, points in InfluxDB."""
    return [("mode", "cloudkitty", "cloudkitty_proc"),
            ("connection", db_url, "database"),
            ("backend", "influxdb", "storage"),
            ("host", influx_server.host, "storage_influxdb"),
            ("port", influx_server.port, "storage_influxdb"),
            ("database", influx_database, "storage_influxdb")]


@pytest.fixture
def conf(tmp_path, vhost_url, influxdb_database):
    """cfg.CONF in the drop-in mode, on a SQLite database holding CloudKitty's
    tables at their 25.0.0 heads (and rules: write_rules) and a fresh
    InfluxDB database."""
    messaging.register_opts(cfg.CONF)
    db_url = f"sqlite:///{tmp_path}/db.sqlite"
    cloudkitty_db.create_cloudkitty_schema(db_url)
    write_rules(db_url)
    o = Overrides()
    for name, value, group in [
            ("transport_url", vhost_url, None),
            ("host", "ckp-rpc-test", None),
            ("state_path", str(tmp_path), None),
            *dropin_overrides(db_url, *influxdb_database),
            ("begin", T0.isoformat(), "collect"),
            ("sources", SCOPES, "fetcher_source"),
            ("coordination_url", f"file://{tmp_path}/locks", "orchestrator")]:
        o.set(name, value, group)
    yield cfg.CONF
    o.clear()


def commit_hours(storage, scope, begin, hours):
    """Rate ``hours`` periods of ``scope`` from ``begin``: one point each."""
    for h in range(hours):
        frame = DataFrame(scope, begin + h * H, begin + (h + 1) * H)
        frame.add_points("instance", [DataPoint("instance", D(1), D("0.5"),
                                                {"project_id": scope, "id": "vm"}, {})])
        storage.commit_period(frame, storage.get_state(scope).version)


def dropin_storage(conf):
    """The storage the daemon builds from ``conf`` (the drop-in one), upgraded."""
    s = plugins.load_storage(conf)
    assert type(s).__name__ == "CloudKittyInfluxStorage", type(s)
    s.upgrade()
    return s


@pytest.fixture
def storage(conf):
    """Four periods rated for each scope (T0 .. T0+3h)."""
    s = dropin_storage(conf)
    for scope in SCOPES:
        commit_hours(s, scope, T0, 4)
    yield s
    s.close()


@pytest.fixture
def influx(influxdb_database):
    """The period starts InfluxDB holds for a scope, read with InfluxQL."""
    server, database = influxdb_database

    def period_starts(scope):
        return influx_period_starts(server, database, scope)
    return period_starts


def influx_period_starts(server, database, scope):
    points = server.points(f"SELECT qty FROM dataframes WHERE project_id = '{scope}'", database)
    return sorted({datetime.datetime.fromtimestamp(p["time"] // 10**9, UTC) for p in points})


def cloudkitty_row(conf, scope):
    """``last_processed_timestamp`` of the scope's row in CloudKitty's
    ``cloudkitty_storage_states`` (what GET /v2/scope answers), as UTC."""
    db = cloudkitty_db.DropinDB(conf.database.connection)
    try:
        [row] = db.state_rows(scope)
    finally:
        db.close()
    return row.last_processed_timestamp.replace(tzinfo=UTC)


class Server:
    """Our server in this process, with counting callbacks; quotes by the
    daemon's own function (the rules of CloudKitty's tables)."""

    def __init__(self, conf):
        self.wakes = []
        self.reloads = []
        self.server = rpc.start_server(
            conf, "ckp-rpc-test-0", wake=lambda: self.wakes.append(1),
            request_reload=lambda: self.reloads.append(threading.current_thread().name))
        assert self.server is not None
        assert self.server.wait_listening(30), "the RPC server did not start listening"

    def stop(self):
        self.server.stop()


@pytest.fixture
def server(conf, storage):
    s = Server(conf)
    yield s
    s.stop()


class Client:
    """What cloudkitty-api holds: cloudkitty/messaging.py get_client()."""

    def __init__(self, conf, exchange="cloudkitty"):
        self.transport = oslo_messaging.get_rpc_transport(conf)
        target = oslo_messaging.Target(exchange=exchange, topic="cloudkitty", version="1.0")
        self.client = oslo_messaging.get_rpc_client(self.transport, target, timeout=15)

    def reset_state(self, **kwargs):        # api/v2/scope/state.py: a topic cast
        self.client.cast({}, "reset_state", **kwargs)

    def quote(self, **kwargs):             # api/v1/controllers/rating.py: a call
        return self.client.prepare(namespace="rating").call({}, "quote", **kwargs)

    def module(self, method, **kwargs):    # rating/__init__.py: fanout casts
        self.client.prepare(namespace="rating", fanout=True).cast({}, method, **kwargs)

    def reload_modules(self):              # api/v1 notify_reload: version 1.1
        self.client.prepare(namespace="rating", version="1.1").cast({}, "reload_modules")

    def close(self):
        self.transport.cleanup()


@pytest.fixture
def client(conf):
    c = Client(conf)
    yield c
    c.close()


def rated_periods(storage, scope):
    return sorted({row.begin for row in storage.iter_rated(scope)})


def logged(caplog, text, since=0):
    return [r.getMessage() for r in caplog.records[since:] if text in r.getMessage()]


def wait_logged(caplog, text, since=0):
    return wait_until(lambda: logged(caplog, text, since), timeout=20, what=repr(text))


# -- the exchange ------------------------------------------------------------

def test_exchange_is_cloudkittys_unless_control_exchange_is_set(conf, tmp_path):
    assert rpc.control_exchange(conf) == "cloudkitty"
    conf.set_override("control_exchange", "billing")
    try:
        assert rpc.control_exchange(conf) == "billing"     # an explicit value wins
    finally:
        conf.clear_override("control_exchange")
    assert rpc.control_exchange(conf) == "cloudkitty"
    # from a configuration file, even oslo.messaging's default wins
    local = cfg.ConfigOpts()
    local.register_opts([o for g, opts in oslo_messaging.opts.list_opts() if g is None
                         for o in opts])
    (tmp_path / "x.conf").write_text("[DEFAULT]\ncontrol_exchange = openstack\n")
    local(["--config-file", str(tmp_path / "x.conf")], project="x")
    assert rpc.control_exchange(local) == "openstack"


def test_server_answers_in_an_explicit_control_exchange(conf, storage):
    conf.set_override("control_exchange", "billing")
    try:
        server = Server(conf)
        client = Client(conf, exchange="billing")
        try:
            assert client.quote(res_data=QUOTE) == "0.50"
        finally:
            client.close()
            server.stop()
    finally:
        conf.clear_override("control_exchange")


# -- the message shapes of §4 -------------------------------------------------

def test_reset_state_cast_makes_T_the_next_period_rated(conf, server, client, storage,
                                                        influx, caplog):
    """PUT /v2/scope {"scope_id": "p1", "last_processed_timestamp": T}: p1's
    data from T on is deleted (from InfluxDB too) and T is rated again
    (state = T - period in CloudKitty's row, where CloudKitty leaves T empty
    with state = T); p2 is untouched."""
    caplog.set_level(logging.INFO, logger="cloudkitty_proc.dropin.rpc")
    four = [T0 + h * H for h in range(4)]
    assert rated_periods(storage, "p1") == influx("p1") == four
    client.reset_state(res_data=reset_data("p1", at=T0 + H))
    wait_until(lambda: storage.get_state("p1").last_processed == T0, timeout=20,
               what="p1 reset")
    assert cloudkitty_row(conf, "p1") == T0
    assert rated_periods(storage, "p1") == influx("p1") == [T0]
    assert storage.get_state("p2").last_processed == cloudkitty_row(conf, "p2") == T0 + 3 * H
    assert rated_periods(storage, "p2") == influx("p2") == four
    wait_until(lambda: server.wakes, timeout=5, what="the worker woken")
    # every row of the table with all_scopes=true: both, in one message
    client.reset_state(res_data=reset_data("p1", "p2", at=T0))
    wait_until(lambda: storage.get_state("p2").last_processed == T0 - H, timeout=20,
               what="p2 reset")
    assert rated_periods(storage, "p1") == rated_periods(storage, "p2") == []
    assert influx("p1") == influx("p2") == []
    assert storage.get_state("p1").last_processed == T0 - H
    assert cloudkitty_row(conf, "p1") == cloudkitty_row(conf, "p2") == T0 - H


def test_quote_call_answers_the_price_string(server, client):
    """POST /v1/rating/quote: 2 × m1.small at a 0.25 flat field mapping, in
    CloudKitty's groupby/metadata form. As CloudKitty's quote, the flat desc
    keys the API's own documentation shows are not read (0), several
    resources add up, and the answer is str() of the Decimal."""
    assert client.quote(res_data=QUOTE) == "0.50"
    flat = {"usage": {"instance": [{"desc": {"flavor_name": "m1.small"},
                                    "vol": {"qty": "2", "unit": "undef"}}]}}
    assert client.quote(res_data=flat) == "0"
    several = {"usage": {"instance": [
        {"desc": {"groupby": {"id": "vm-1"}, "metadata": {"flavor_name": "m1.small"}},
         "vol": {"qty": "3", "unit": "instance"}},
        {"desc": {"metadata": {"flavor_name": "m1.small"}}, "vol": {"qty": 1, "unit": "undef"}},
        {"desc": {"metadata": {"flavor_name": "m1.tiny"}}, "vol": {"qty": 5, "unit": "undef"}}]}}
    assert client.quote(res_data=several) == "1.00"
    assert client.quote(res_data={"usage": {}}) == "0"


def test_module_notifications_request_a_reload_at_1_0_and_1_1(server, client, caplog):
    """PUT /v2/rating/modules/hashmap (enabled false/true, priority) and GET
    /v1/rating/reload_modules (version 1.1, which CloudKitty's server
    refuses): each one fires the reload callback."""
    caplog.set_level(logging.INFO, logger="cloudkitty_proc.dropin.rpc")
    client.module("disable_module", name="hashmap")
    client.module("enable_module", name="hashmap")
    client.module("reload_module", name="hashmap")
    client.reload_modules()
    client.reload_modules()                # the API sends it twice
    wait_until(lambda: len(server.reloads) == 5, timeout=20, what="5 reloads")
    for method in ("disable_module hashmap", "enable_module hashmap",
                   "reload_module hashmap", "reload_modules"):
        assert logged(caplog, f": {method}: the rating rules will be re-read"), method
    assert not logged(caplog, "UnsupportedVersion")


# -- malformed messages: never stop the server ---------------------------------

BAD_RESETS = [
    ({}, "missing argument 'res_data'"),
    ({"res_data": reset_data("p1"), "extra": 1}, "unknown argument 'extra'"),
    ({"res_data": []}, "res_data: expected an object"),
    ({"res_data": {"scopes": [scope_row("p1")]}}, "missing 'last_processed_timestamp'"),
    ({"res_data": {"scopes": [], "last_processed_timestamp": T0.isoformat()}},
     "res_data.scopes: expected a non-empty list"),
    ({"res_data": {"scopes": [{"scope_id": "p1"}], "last_processed_timestamp": T0.isoformat()}},
     "res_data.scopes[0]: missing 'scope_key', 'fetcher', 'collector'"),
    ({"res_data": {"scopes": [scope_row(7)], "last_processed_timestamp": T0.isoformat()}},
     "res_data.scopes[0].scope_id: expected a non-empty string"),
    ({"res_data": {"scopes": [scope_row("p1", fetcher=["x"])],
                   "last_processed_timestamp": T0.isoformat()}},
     "res_data.scopes[0].fetcher: expected a string or null"),
    ({"res_data": {**reset_data("p1"), "last_processed_timestamp": "yesterday"}},
     "invalid last_processed_timestamp 'yesterday'"),
    ({"res_data": {**reset_data("p1"), "last_processed_timestamp": 1767225600}},
     "last_processed_timestamp: expected an ISO 8601 string"),
    ({"res_data": reset_data("p1", at=T0 + H + datetime.timedelta(minutes=30))},
     "is not aligned to [collect] period (3600 s)"),
    ({"res_data": reset_data("p9")}, "unknown scope: p9"),
    ({"res_data": {"scopes": [scope_row("p1", fetcher="gnocchi")],
                   "last_processed_timestamp": T0.isoformat()}},
     "p1: not this processor's scope row: fetcher 'gnocchi' (ours: 'source')"),
    ({"res_data": reset_data("p1", at=T0 + 6 * H)},
     "scope p1: to 2026-01-01T06:00:00+00:00 is after the next period to rate"),
]


def test_malformed_reset_state_casts_are_logged_and_change_nothing(server, client, storage,
                                                                  influx, caplog):
    caplog.set_level(logging.INFO, logger="cloudkitty_proc.dropin.rpc")
    for kwargs, message in BAD_RESETS:
        since = len(caplog.records)
        client.reset_state(**kwargs)
        [line] = wait_logged(caplog, message, since)
        assert "reset_state" in line, line
        assert storage.get_state("p1").last_processed == T0 + 3 * H, message
        assert len(rated_periods(storage, "p1")) == 4, message
        assert len(influx("p1")) == 4, message
    assert not logged(caplog, "Exception during message handling")
    # one bad scope of a message does not stop the others
    client.reset_state(res_data=reset_data("p9", "p2", at=T0 + 2 * H))
    wait_until(lambda: storage.get_state("p2").last_processed == T0 + H, timeout=20,
               what="p2 reset")
    assert influx("p2") == [T0, T0 + H]
    assert storage.get_state("p1").last_processed == T0 + 3 * H
    assert logged(caplog, "unknown scope: p9")
    # and the server still serves
    assert client.quote(res_data=QUOTE) == "0.50"


BAD_QUOTES = [
    ({}, "missing argument 'res_data'"),
    ({"res_data": QUOTE, "scope": "p1"}, "unknown argument 'scope'"),
    ({"res_data": ["instance"]}, "res_data: expected an object with 'usage'"),
    ({"res_data": {"usage": []}}, "res_data.usage: expected an object, got list"),
    ({"res_data": {"usage": {"instance": {"vol": 1}}}},
     "res_data.usage['instance']: expected a list"),
    ({"res_data": {"usage": {"instance": [{"desc": {}}]}}},
     "res_data.usage['instance'][0]: expected an object with 'vol'"),
    ({"res_data": {"usage": {"instance": [{"vol": {"qty": "two", "unit": "undef"}}]}}},
     "res_data.usage['instance'][0].vol.qty: not a decimal: 'two'"),
    ({"res_data": {"usage": {"instance": [{"vol": {"qty": True, "unit": "undef"}}]}}},
     "res_data.usage['instance'][0].vol.qty: expected a decimal string or a number"),
    ({"res_data": {"usage": {"instance": [{"desc": {"flavor": {"a": [1]}},
                                           "vol": {"qty": "1", "unit": "undef"}}]}}},
     "res_data.usage['instance'][0].desc['flavor']: expected a string"),
]


def test_malformed_quote_calls_get_an_error_reply(server, client, caplog):
    caplog.set_level(logging.INFO, logger="cloudkitty_proc.dropin.rpc")
    for kwargs, message in BAD_QUOTES:
        with pytest.raises(oslo_messaging.RemoteError) as err:
            client.quote(**kwargs)
        assert err.value.exc_type == "InvalidRequestError", err.value
        assert message in err.value.value, (message, err.value.value)
    # our refusals are expected exceptions: no traceback in the log
    assert not logged(caplog, "Exception during message handling")
    # calls the API never makes: oslo.messaging's own refusals (logged with a
    # traceback by oslo.messaging), still replies
    with pytest.raises(oslo_messaging.RemoteError) as err:
        client.client.prepare(namespace="rating").call({}, "no_such_method")
    assert err.value.exc_type == "NoSuchMethod"
    with pytest.raises(oslo_messaging.RemoteError) as err:
        client.client.prepare(namespace="rating", version="1.2").call({}, "quote",
                                                                      res_data=QUOTE)
    assert err.value.exc_type == "UnsupportedVersion"
    assert client.quote(res_data=QUOTE) == "0.50"


def test_a_failing_quote_function_is_an_error_reply(conf, storage, client, caplog):
    """A failure of the rules (a database down, say) is a reply naming it."""
    def broken(conf, res_data):
        raise OSError("connection refused by 127.0.0.1:3306")

    server = rpc.start_server(conf, "w-0", wake=lambda: None, request_reload=lambda: None,
                              quote_fn=broken)
    try:
        assert server.wait_listening(30)
        with pytest.raises(oslo_messaging.RemoteError) as err:
            client.quote(res_data=QUOTE)
        assert err.value.exc_type == "RemoteRequestError"
        assert "quote failed: OSError: connection refused by 127.0.0.1:3306" in err.value.value
    finally:
        server.stop()


def test_malformed_module_notifications_are_logged_and_ignored(server, client, caplog):
    caplog.set_level(logging.INFO, logger="cloudkitty_proc.dropin.rpc")
    for method, kwargs, message in [
            ("reload_module", {}, "reload_module: missing argument 'name'"),
            ("enable_module", {"name": 3}, "enable_module: name: expected a module name"),
            ("disable_module", {"name": "hashmap", "why": "x"}, "unknown argument 'why'"),
            ("reload_modules", {"name": "hashmap"}, "unknown argument 'name'")]:
        since = len(caplog.records)
        client.module(method, **kwargs)
        [line] = wait_logged(caplog, message, since)
        assert "ignored" in line
    assert server.reloads == []
    client.module("reload_module", name="pyscripts")
    wait_until(lambda: server.reloads, timeout=20, what="a reload")


# -- wired into the daemon ---------------------------------------------------



def test_daemon_workers_serve_cloudkittys_target_in_cloudkitty_mode(tmp_path, vhost_url,
                                                                  influxdb_database):
    """``cloudkitty-proc`` with ``[cloudkitty_proc] mode = cloudkitty`` (CloudKitty's
    tables on SQLite, points in InfluxDB): its workers serve CloudKitty's
    target (no control_exchange set). After rating everything at 0.01 (a
    service mapping in CloudKitty's tables), the mapping's cost becomes 0.02
    (as ``PUT .../hashmap/mappings`` writes it) and the API's fanout
    ``reload_module(hashmap)`` follows: both workers reload; a
    ``reset_state`` cast to T0+4h makes them rate T0+4h.. again: those
    periods at the new price (in InfluxDB), the earlier ones still at the
    old one. A quote is answered with the new rules."""
    from cloudkitty_proc.dropin.scope_rows import ScopeIdentity
    from cloudkitty_proc.dropin.storage import storage_class
    from cloudkitty_proc.storage.influx import InfluxPointStore, InfluxStorage
    from tests import daemon, datagen

    influx_server, database = influxdb_database
    hours = 6
    ds = datagen.generate(n_scopes=2, hours=hours, seed=5)
    (tmp_path / "usage.om").write_text(ds.openmetrics)
    db_url = f"sqlite:///{tmp_path}/ckp.sqlite"
    cloudkitty_db.create_cloudkitty_schema(db_url)
    rules = RulesDB(db_url)
    rules.module("hashmap", True)
    mapping = rules.mapping("0.01", "flat", service=rules.service("instance"), value="")
    conf_path = daemon.write_config(
        tmp_path, db_url=db_url, scopes=ds.scopes, begin=ds.begin.isoformat(),
        end=ds.end.isoformat(), metrics_yml=datagen.METRICS_YML, om_path=tmp_path / "usage.om",
        workers=2, transport_url=vhost_url, host="ckp-dropin", extra=f"""\
            [cloudkitty_proc]
            mode = cloudkitty
            [fetcher]
            backend = source
            [orchestrator]
            coordination_url = file://{tmp_path}/locks
            [storage]
            backend = influxdb
            [storage_influxdb]
            host = {influx_server.host}
            port = {influx_server.port}
            database = {database}
            """)
    daemon.manage(conf_path, "db", "upgrade")
    storage = storage_class(InfluxStorage)(
        url=db_url, identity=ScopeIdentity("project_id", "source", "file"), period=3600,
        points=InfluxPointStore(None, "project_id", host=influx_server.host,
                                port=influx_server.port, database=database))
    log = tmp_path / "daemon.log"
    proc = daemon.start_daemon(conf_path, log=log)
    messaging.register_opts(cfg.CONF)
    o = Overrides()
    o.set("transport_url", vhost_url)
    client = Client(cfg.CONF)
    last = ds.end - H
    try:
        def processed():
            assert proc.poll() is None, log.read_text()
            return all(storage.get_state(s).last_processed == last for s in ds.scopes)
        daemon.wait_until(processed, timeout=90, what="every scope rated")
        daemon.wait_until(lambda: log.read_text().count(
            "listening on topic cloudkitty in exchange cloudkitty") == 2, timeout=30,
            what="both workers listening")

        def prices(scope):
            """(period, unit price) of the instance points InfluxDB holds
            (floats there: the unit price rounded to 6 places)."""
            return {(r.begin, (r.price / r.qty).quantize(D("0.000001")))
                    for r in storage.iter_rated(scope) if r.type == "instance" and r.qty}
        scope = ds.scopes[0]
        assert {p for _b, p in prices(scope)} == {D("0.01")}
        assert influx_period_starts(influx_server, database, scope) == [
            ds.begin + h * H for h in range(hours)]

        rules.update_mapping(mapping, cost="0.02")
        client.module("reload_module", name="hashmap")
        daemon.wait_until(lambda: log.read_text().count("reloaded its configuration") == 2,
                          timeout=60, what="both workers reloaded")
        at = ds.begin + 4 * H
        client.reset_state(res_data={
            "scopes": [{"scope_id": scope, "scope_key": "project_id", "fetcher": "source",
                        "collector": "file"}],
            "last_processed_timestamp": at.isoformat()})
        daemon.wait_until(
            lambda: {p for b, p in prices(scope) if b >= at} == {D("0.02")}
            and storage.get_state(scope).last_processed == last,
            timeout=60, what="T0+4h.. rated again at the new price")
        assert {p for b, p in prices(scope) if b < at} == {D("0.01")}
        assert {p for _b, p in prices(ds.scopes[1])} == {D("0.01")}
        assert influx_period_starts(influx_server, database, scope) == [
            ds.begin + h * H for h in range(hours)]
        quote = {"usage": {"instance": [{"desc": {}, "vol": {"qty": "3", "unit": "undef"}}]}}
        assert client.quote(res_data=quote) == "0.06"
    finally:
        client.close()
        o.clear()
        daemon.stop_daemon(proc)
        storage.close()
        rules.close()
