"""Issue 18's acceptance, items 1, 2 and 4: cloudkitty_proc in place of
cloudkitty-processor, side by side with the real one, seen through the real
cloudkitty-api 25.0.0.

Two CloudKitty deployments (tests/cloudkitty_stack.py: a MariaDB database,
a RabbitMQ vhost, an InfluxDB database and cloudkitty-api each) rate the
same input: a real Prometheus holding backfilled usage of two scopes and
three metrics (tests/dropin_pair.py), over the same hourly periods (each
scope's state row created through ``POST /v2/scope`` one period before
the first, ``wait_periods = 1``), with the same rules created through each
API. A is rated by CloudKitty 25.0.0's own ``cloudkitty-processor``; B by
``cloudkitty-proc --config-file <B's cloudkitty.conf> --config-file
<extra>``, the extra file holding ``[cloudkitty_proc] mode = cloudkitty``
and test settings only, while its workers are SIGKILLed (from outside at
random, and each worker life inside its 3rd commit, after the points are
written and before the SQL commit) — item 4.

Item 1: ``/v2/summary`` (several groupbys, filters), ``/v2/dataframes``,
``/v1/report/total``, ``/v1/report/summary`` (and ``/v1/report/tenants``,
``/v1/storage/dataframes``) and ``/v2/scope`` answer the same JSON from A
and B; the one field that differs is named in
``test_v2_scope_is_the_same``. Item 2, on B through its API: the quote,
``PUT /v2/scope`` (re-rates T: our semantics), a reprocessing task (done;
on A it never completes with InfluxDB v1), and, the rules being read live
from CloudKitty's database (cloudkitty_proc/dropin/rules.py), a mapping
created through the API and hashmap disabled through the API changing the
prices of the next periods rated, without a restart. With hourly periods
"the next period" is made by the API itself: the mapping's ``start`` is
forced to a past period T and ``PUT /v2/scope`` (or the reprocessing task)
makes T the next one rated.

The module's tests run in order (later ones change B). Service-backed:
MariaDB, RabbitMQ, influxd, prometheus/promtool, the CloudKitty venv.
"""

from __future__ import annotations

import datetime
import random
import re
import time
from decimal import Decimal

import psutil
import pytest

from tests import daemon
from tests.chaos import helpers
from tests.cloudkitty_stack import cloudkitty_stack, cloudkitty_venv  # noqa: F401 (fixture)
from tests.dropin_pair import (HASHMAP, METRICS_YML, PERIOD, SCOPES, DropinProcessor,
                               api_both, as_dt, create_rules, create_scope_rows, rated_up_to,
                               usage_openmetrics)
from tests.prometheus_server import running_prometheus

pytestmark = pytest.mark.service

H = datetime.timedelta(seconds=PERIOD)
UTC = datetime.timezone.utc
#: periods rated by both processors
HOURS = 8
#: the test reads what both rated up to the current hour: it starts only
#: when that hour has this long left (else it waits for the next hour)
HOUR_MARGIN = 240
#: a worker of B is SIGKILLed from outside every KILL_EVERY s while B rates;
#: each worker life SIGKILLs itself in its COMMIT_FAULT-th commit
KILL_EVERY = 1.0
COMMIT_FAULT = 3
#: and in its REPROCESS_FAULT-th commit of a reprocessed period
REPROCESS_FAULT = 2

#: more of cloudkitty.conf, read by both processors
CK_CONF = {"orchestrator": {"max_threads": 4}}

TIMINGS: dict[str, float] = {}


class Window:
    """The periods both rate: ``first`` .. ``last`` (period starts)."""

    def __init__(self, now: datetime.datetime) -> None:
        hour = now.replace(minute=0, second=0, microsecond=0)
        self.last = hour - H                 # wait_periods = 1: the period ending at `hour`
        self.first = self.last - (HOURS - 1) * H
        self.end = self.last + H
        self.params = {"begin": self.first.isoformat(), "end": self.end.isoformat()}

    def at(self, hours: int) -> datetime.datetime:
        return self.first + hours * H


@pytest.fixture(scope="module")
def window() -> Window:
    now = datetime.datetime.now(UTC)
    left = 3600 - (now.minute * 60 + now.second)
    if left < HOUR_MARGIN:
        time.sleep(left + 5)
    return Window(datetime.datetime.now(UTC))


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, window):
    t = time.monotonic()
    om = tmp_path_factory.mktemp("om") / "usage.om"
    om.write_text(usage_openmetrics(window.first, window.end))
    with running_prometheus(om, tmp_path_factory.mktemp("prom")) as url:
        TIMINGS["prometheus"] = time.monotonic() - t
        yield url


@pytest.fixture(scope="module")
def pair(cloudkitty_venv, influxdb_server, prometheus, tmp_path_factory):  # noqa: F811
    """Stacks A and B (each API serving, no processor yet)."""
    t = time.monotonic()
    with cloudkitty_stack(tmp_path_factory.mktemp("A"), influx_host=influxdb_server.host,
                          influx_port=influxdb_server.port, influx_database="acceptance_a",
                          prometheus_url=prometheus, metrics_yml=METRICS_YML, scopes=SCOPES,
                          period=PERIOD, wait_periods=1, extra_conf=CK_CONF,
                          venv=cloudkitty_venv) as a, \
         cloudkitty_stack(tmp_path_factory.mktemp("B"), influx_host=influxdb_server.host,
                          influx_port=influxdb_server.port, influx_database="acceptance_b",
                          prometheus_url=prometheus, metrics_yml=METRICS_YML, scopes=SCOPES,
                          period=PERIOD, wait_periods=1, extra_conf=CK_CONF,
                          venv=cloudkitty_venv) as b:
        TIMINGS["two stacks"] = time.monotonic() - t
        yield [a, b]
    for name in ("acceptance_a", "acceptance_b"):
        if name in influxdb_server.databases():
            influxdb_server.drop_database(name)


@pytest.fixture(scope="module")
def rated(pair, window, tmp_path_factory):
    """Rules and scope rows through both APIs; A rated by cloudkitty-processor,
    B by cloudkitty_proc under SIGKILLs; both up to window.last."""
    a, b = pair
    start = window.first - datetime.timedelta(days=1)
    for stack in pair:
        create_rules(stack, start)
        create_scope_rows(stack, window.first - H)
    ours = DropinProcessor(b, faults=f"during_commit:{COMMIT_FAULT},"
                                     f"during_reprocess_commit:{REPROCESS_FAULT}")
    ours.manage("db", "upgrade")
    t = time.monotonic()
    a.start_processor()
    ours.start()
    kills = []
    rng = random.Random(18)
    try:
        def done(stack):
            return all(v is not None and v >= window.last
                       for v in rated_up_to(stack).values())
        while not done(b):
            assert ours.running(), ours.log_text()[-4000:]
            assert time.monotonic() - t < 240, "B did not rate the window in 240 s:\n" + \
                ours.log_text()[-4000:]
            if "A rated" not in TIMINGS and done(a):
                TIMINGS["A rated"] = time.monotonic() - t
            time.sleep(rng.uniform(KILL_EVERY / 2, KILL_EVERY))
            victims = [w for w in helpers.workers_of(ours.proc.pid)
                       if time.time() - w.create_time() > 0.3]
            if victims and not done(b):
                try:
                    rng.choice(victims).send_signal(9)
                    kills.append(time.monotonic())
                except psutil.NoSuchProcess:
                    pass
        TIMINGS["B rated"] = time.monotonic() - t
        daemon.wait_until(lambda: done(a) or a.processor_errors(), timeout=240,
                          what="cloudkitty-processor rating the window")
        assert not a.processor_errors(), "\n".join(a.processor_errors()[:20])
        TIMINGS.setdefault("A rated", time.monotonic() - t)
        yield {"a": a, "b": b, "ours": ours, "kills": kills}
    finally:
        ours.stop()
        a.stop_processor()
        print("\nacceptance timings: " + ", ".join(f"{k} {v:.1f} s"
                                                   for k, v in TIMINGS.items()))


# -- item 1 (and 4): A and B answer the same ------------------------------------

def test_both_rated_the_window_and_b_survived_its_kills(rated, window):
    a, b, ours = rated["a"], rated["b"], rated["ours"]
    assert rated_up_to(a) == rated_up_to(b) == {s: window.last for s in SCOPES}
    log = ours.log_text()
    deaths = log.count("killed by signal")
    assert deaths >= 3, (deaths, len(rated["kills"]))
    # B read CloudKitty's own file: its API-only options are known, none is unknown
    assert "CloudKitty 25.0.0 options accepted, no effect in cloudkitty-proc: [DEFAULT] " \
           "api_paste_config" in log
    assert "unknown option" not in log
    print(f"\nB: {len(rated['kills'])} SIGKILLs from outside, {deaths} worker deaths")


SUMMARIES = [
    {"groupby": ["type"]},
    {"groupby": ["project_id"]},
    {"groupby": ["type", "project_id"]},
    {"groupby": ["time-d"]},
    {"groupby": ["time-m", "type"]},
    {"groupby": ["time", "type", "project_id"]},
    {"groupby": ["id", "type"], "filters": "project_id:p1"},
    {"groupby": ["time"], "filters": "type:volume.size"},
    {"groupby": ["flavor_name"], "filters": "type:instance"},
    {},
]


def _same(a_reply, b_reply, what):
    assert a_reply.status == 200, (what, a_reply.text[:500])
    assert (b_reply.status, b_reply.body) == (a_reply.status, a_reply.body), what


def test_v2_summary_is_the_same(rated, window):
    a, b = rated["a"], rated["b"]
    for params in SUMMARIES:
        for fmt in ("table", "object"):
            q = {**window.params, **params, "response_format": fmt}
            _same(*api_both(a, b, "GET", "/v2/summary", params=q), q)
    # the reference priced every type: not a comparison of empty answers
    reply = a.call("GET", "/v2/summary", params={**window.params, "groupby": ["type"],
                                                  "response_format": "object"})
    assert {r["type"] for r in reply["results"] if r["rate"] > 0} == {
        "instance", "volume.size", "ip.floating"}


def test_v2_dataframes_is_the_same(rated, window):
    a, b = rated["a"], rated["b"]
    for filters in (None, "project_id:p2", "type:instance"):
        q = {**window.params, "limit": 1000, **({"filters": filters} if filters else {})}
        _same(*api_both(a, b, "GET", "/v2/dataframes", params=q), q)
    body = a.call("GET", "/v2/dataframes", params={**window.params, "limit": 1000})
    assert body["total"] > HOURS * len(SCOPES)


def test_v1_reports_and_dataframes_are_the_same(rated, window):
    a, b = rated["a"], rated["b"]
    for path, params in [
            ("/v1/report/total", {}),
            ("/v1/report/total", {"tenant_id": "p1"}),
            ("/v1/report/total", {"service": "volume.size"}),
            ("/v1/report/summary", {}),
            ("/v1/report/summary", {"groupby": "tenant_id,res_type"}),
            ("/v1/report/summary", {"tenant_id": "p2", "groupby": "res_type"}),
            ("/v1/report/tenants", {}),
            ("/v1/storage/dataframes", {}),
            ("/v1/storage/dataframes", {"tenant_id": "p2", "resource_type": "instance"})]:
        _same(*api_both(a, b, "GET", path, params={**window.params, **params}),
              (path, params))
    assert float(a.call("GET", "/v1/report/total", params=window.params)) > 0
    frames = a.call("GET", "/v1/storage/dataframes", params=window.params)["dataframes"]
    assert len(frames) >= HOURS


def _cli_rows(rows: list[dict]) -> list[dict]:
    """The CLI's rows, the ``Group By``/``Metadata`` texts (``k="v" …``) as
    dicts: the order of their keys is CloudKitty's groupby list, which its
    metrics.yml validation builds from a set (``cloudkitty/collector/
    __init__.py`` L330), so it changes with each process's hash seed."""
    def pairs(text: str) -> dict:
        return dict(re.findall(r'(\S+?)="((?:[^"\\]|\\.)*)"', text))
    return [{k: pairs(v) if k in ("Group By", "Metadata") else v for k, v in row.items()}
            for row in rows]


def test_openstack_rating_cli_shows_the_same_data(rated, window):
    """Item 3: python-cloudkittyclient's ``openstack rating summary get`` and
    ``openstack rating dataframes get`` (cloudkitty-noauth) show B's data,
    as they show A's."""
    a, b = rated["a"], rated["b"]
    span = ["-b", window.params["begin"], "-e", window.params["end"]]
    for args in (["summary", "get", *span, "-g", "type", "-g", "project_id"],
                 ["summary", "get", *span, "-g", "time", "--limit", "1000"],
                 ["dataframes", "get", *span, "--limit", "1000"],
                 ["dataframes", "get", *span, "--filter", "project_id:p2",
                  "--limit", "1000"]):
        from_a, from_b = (_cli_rows(s.rating(*args)) for s in (a, b))
        assert from_a, args  # not a comparison of empty answers
        assert from_b == from_a, args
    rows = b.rating("summary", "get", *span, "-g", "type", "-g", "project_id")
    assert {row["Project id"] for row in rows} == set(SCOPES), rows
    assert {row["Type"] for row in rows} == {"instance", "volume.size", "ip.floating"}, rows
    assert all(float(row["Rate"]) > 0 for row in rows), rows


def test_v2_scope_is_the_same(rated, window):
    """Every field but ``scope_activation_toggle_date``: each API set it to
    its own "now" when the test created the rows (POST /v2/scope), seconds
    apart; the processors never write it. (CloudKitty's NULL-column first
    row does not show here: the rows were created through the API.)"""
    a, b = rated["a"], rated["b"]
    ra, rb = api_both(a, b, "GET", "/v2/scope")
    assert ra.status == rb.status == 200

    def fields(body):
        return sorted(({k: v for k, v in r.items() if k != "scope_activation_toggle_date"}
                       for r in body["results"]), key=lambda r: r["scope_id"])
    assert fields(rb.body) == fields(ra.body)
    assert [as_dt(r["last_processed_timestamp"]) for r in fields(ra.body)] == [
        window.last] * len(SCOPES)
    assert {r["scope_id"] for r in rb.body["results"]} == set(SCOPES)


# -- item 2: the API acting on B ---------------------------------------------

QUOTES = [
    # CloudKitty's quote reads desc.groupby / desc.metadata only
    [{"service": "instance", "volume": "2",
      "desc": {"groupby": {"id": "vm-9", "project_id": "p1"},
               "metadata": {"flavor_name": "m1.small"}}}],
    [{"service": "volume.size", "volume": "70",
      "desc": {"groupby": {"id": "vol-9"}, "metadata": {"volume_type": "ssd"}}},
     {"service": "ip.floating", "volume": "3", "desc": {"groupby": {}, "metadata": {}}}],
    # global rules only: p2's own m1.large price is not used
    [{"service": "instance", "volume": "1",
      "desc": {"groupby": {"project_id": "p2"}, "metadata": {"flavor_name": "m1.large"}}}],
]
#: the API's flat desc keys, which CloudKitty's quote ignores (0 here)
FLAT_QUOTE = [{"service": "instance", "volume": "2", "desc": {"flavor_name": "m1.small"}}]


def test_post_v1_rating_quote_answers_as_on_a(rated):
    """The same answer, to the character: CloudKitty answers str() of a
    Decimal computed from the DECIMAL(40,28) costs of its database
    ("0.5000000000000000000000000000"), and ignores the flat desc keys
    the API's own documentation shows (FLAT_QUOTE: 0)."""
    a, b = rated["a"], rated["b"]
    for resources in [*QUOTES, FLAT_QUOTE]:
        ra, rb = api_both(a, b, "POST", "/v1/rating/quote", json={"resources": resources})
        assert ra.status == rb.status == 200, (ra.text, rb.text)
        assert rb.text == ra.text, resources
    assert Decimal(a.call("POST", "/v1/rating/quote", json={"resources": QUOTES[0]})) == \
        Decimal("0.5")
    assert Decimal(a.call("POST", "/v1/rating/quote", json={"resources": FLAT_QUOTE})) == 0


def _rated_periods(stack, scope):
    """begin -> committed_at of our period records in B's database."""
    rows = stack.sql("SELECT `begin`, committed_at FROM rated_period WHERE scope_id = :s",
                     s=scope)
    return {r["begin"].replace(tzinfo=UTC): r["committed_at"].replace(tzinfo=UTC)
            for r in rows}


def _by_period(stack, window, scope):
    """(period start, type) -> (qty, rate) from /v2/summary."""
    body = stack.call("GET", "/v2/summary", params={
        **window.params, "groupby": ["time", "type"], "filters": f"project_id:{scope}",
        "response_format": "object"})
    return {(as_dt(r["begin"]), r["type"]): (r["qty"], r["rate"]) for r in body["results"]}


def _wait_rerated(stack, scope, since, periods, window):
    """Until every period in ``periods`` was committed again after ``since``
    and the scope is back at window.last."""
    def again():
        records = _rated_periods(stack, scope)
        return (all(p in records and records[p] > since for p in periods)
                and rated_up_to(stack)[scope] >= window.last)
    daemon.wait_until(again, timeout=120, what=f"{scope} rated again")


EXTRA = "0.05"   # the instance service mapping created on B for item 2 (group "extra")


def test_put_v2_scope_is_carried_out_and_a_new_mapping_prices_the_next_periods(rated,
                                                                               window):
    """A flat instance mapping created through B's API (start T, forced; in
    a group of its own, so it adds to the flavour's price instead of
    competing with it: CloudKitty keeps the highest flat of a group), then
    ``PUT /v2/scope`` p1 to T: B rates T .. last again (CloudKitty would
    leave T empty), and those periods only cost EXTRA more per instance
    than A's; the earlier ones are A's, untouched; p2 is untouched."""
    a, b = rated["a"], rated["b"]
    T = window.at(5)
    group = b.call("POST", f"{HASHMAP}/groups", json={"name": "extra"})
    b.call("POST", f"{HASHMAP}/mappings", params={"force": "true"}, json={
        "service_id": rated_service(b, "instance"), "cost": EXTRA, "type": "flat",
        "group_id": group["group_id"], "start": T.replace(tzinfo=None).isoformat()})
    before = _rated_periods(b, "p1")
    since = datetime.datetime.now(UTC)
    b.call("PUT", "/v2/scope", json={"scope_id": "p1",
                                     "last_processed_timestamp": T.isoformat()})
    again = [p for p in before if p >= T]
    assert again == [T, T + H, T + 2 * H]
    _wait_rerated(b, "p1", since, again, window)
    after = _rated_periods(b, "p1")
    assert {p: c for p, c in after.items() if p < T} == {
        p: c for p, c in before.items() if p < T}
    ref, ours = _by_period(a, window, "p1"), _by_period(b, window, "p1")
    assert ref.keys() == ours.keys()
    for (period, usage), (qty, rate) in ref.items():
        extra = float(EXTRA) * qty if (usage == "instance" and period >= T) else 0
        assert ours[period, usage] == (qty, pytest.approx(rate + extra, rel=1e-12)), \
            (period, usage)
    assert _by_period(b, window, "p2") == _by_period(a, window, "p2")


def rated_service(stack, name):
    services = stack.call("GET", f"{HASHMAP}/services")["services"]
    return next(s["service_id"] for s in services if s["name"] == name)


def _tasks(stack, scope):
    return stack.call("GET", "/v2/task/reprocesses", params={"scope_ids": scope})["results"]


def test_post_v2_task_reprocesses_completes_on_b_never_on_a(rated, window):
    """The same task on A and B: p2 from T-2h to T+1h (end inclusive, a
    period start). B re-rates those four periods (a worker life dies in
    its 2nd reprocessed commit) (each with the rules in
    force at its start: T and T+1h cost EXTRA more per instance, T-2h and
    T-1h are A's prices) and ``current_reprocess_time``
    reaches the end. A's reprocessor never completes it: its InfluxDB v1
    delete gets naive timestamps, which InfluxDB refuses ("invalid
    timestamp string"), every pass (CLOUDKITTY-DROPIN §6.2)."""
    a, b = rated["a"], rated["b"]
    T = window.at(5)
    start, end = T - 2 * H, T + H
    task = {"scope_ids": ["p2"], "start_reprocess_time": start.isoformat(),
            "end_reprocess_time": end.isoformat(), "reason": "acceptance"}
    before = _rated_periods(b, "p2")
    deaths = rated["ours"].log_text().count("killed by signal")
    since = datetime.datetime.now(UTC)
    for stack in (a, b):
        stack.call("POST", "/v2/task/reprocesses", json=task)

    def finished():
        [row] = _tasks(b, "p2")
        return row["current_reprocess_time"] and as_dt(row["current_reprocess_time"]) == end
    daemon.wait_until(finished, timeout=120, what="B's reprocessing task done")
    # a worker died inside its 2nd reprocessed commit (item 4 again)
    assert rated["ours"].log_text().count("killed by signal") > deaths
    window_periods = [start + k * H for k in range(4)]
    after = _rated_periods(b, "p2")
    assert all(after[p] > since for p in window_periods)
    assert {p: c for p, c in after.items() if p not in window_periods} == {
        p: c for p, c in before.items() if p not in window_periods}
    ref, ours = _by_period(a, window, "p2"), _by_period(b, window, "p2")
    assert ref.keys() == ours.keys()
    for (period, usage), (qty, rate) in ref.items():
        extra = float(EXTRA) * qty if (usage == "instance" and T <= period <= end) else 0
        assert ours[period, usage] == (qty, pytest.approx(rate + extra, rel=1e-12)), \
            (period, usage)
    assert as_dt(b.call("GET", "/v2/scope", params={"scope_id": "p2"})["results"][0][
        "last_processed_timestamp"]) >= window.last

    # A: its reprocessor sleeps a period between passes; a restart makes it
    # take the task now
    a.stop_processor()
    a.start_processor()
    daemon.wait_until(lambda: "invalid timestamp string" in a.processor_log(400),
                      timeout=120, what="A's reprocessor failing on InfluxDB")
    [row] = _tasks(a, "p2")
    assert row["current_reprocess_time"] == "", row    # the API's rendering of NULL


def test_disabling_hashmap_through_the_api_stops_rating_from_the_next_period(rated, window):
    """``PUT /v2/rating/modules/hashmap {"enabled": false}`` on B, then p1's
    last two periods are rated again (``PUT /v2/scope``): they cost 0 (no
    rating module left), with A's quantities; the earlier ones keep their
    prices."""
    a, b = rated["a"], rated["b"]
    T, T2 = window.at(5), window.last - H
    b.call("PUT", "/v2/rating/modules/hashmap", json={"enabled": False})
    since = datetime.datetime.now(UTC)
    b.call("PUT", "/v2/scope", json={"scope_id": "p1",
                                     "last_processed_timestamp": T2.isoformat()})
    _wait_rerated(b, "p1", since, [T2, window.last], window)
    ref, ours = _by_period(a, window, "p1"), _by_period(b, window, "p1")
    assert ref.keys() == ours.keys()
    for (period, usage), (qty, rate) in ref.items():
        if period >= T2:
            assert ours[period, usage] == (qty, 0), (period, usage)
        else:
            extra = float(EXTRA) * qty if (usage == "instance" and period >= T) else 0
            assert ours[period, usage] == (qty, pytest.approx(rate + extra, rel=1e-12))
