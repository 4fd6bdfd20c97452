"""A Gnocchi that answers 500, times out, or lacks one metric (issue 19,
acceptance 4): the failing scope stays where it was, the others go on, and
the missing metric is an empty type, not an error.

A real Gnocchi 4.7.1 (tests/gnocchi_server.py) holds four past hours of
usage for five projects (its resources backdated in the indexer so that
Gnocchi's history query serves those hours); p-nomem's instances have no
``memory.usage`` metric, so Gnocchi answers that query 404 "Metric
['memory.usage'] does not exist". A proxy (tests/fakes/gnocchi_proxy.py)
in front of it answers 500 to p-500's queries of the third hour and
delays p-slow's beyond the collector's timeout.
"""

from __future__ import annotations

import dataclasses
import datetime
import json

import pytest
import yaml

from cloudkitty_proc.collectors.gnocchi import GNOCCHI_EXTRA_ARGS, GnocchiCollector
from cloudkitty_proc.exceptions import CollectError
from cloudkitty_proc.metrics_conf import load_metrics_conf
from tests import daemon
from tests.fakes.gnocchi_proxy import FaultProxy
from tests.functional.test_collector_prometheus import make_conf
from tests.gnocchi_server import backdate_resources, hour_floor, plugin_env, running_gnocchi

HOUR = datetime.timedelta(hours=1)
POLICY = "ck-hourly"
RETRIES = 2
#: a real Gnocchi on a loaded machine may take over a second to answer
TIMEOUT = 3.0
SCOPES = ["p-500", "p-nomem", "p-ok1", "p-ok2", "p-slow"]
METRICS = {"metrics": {
    "cpu": {"unit": "instance", "alt_name": "instance", "groupby": ["id", "project_id"],
            "metadata": ["flavor_name"], "mutate": "NUMBOOL",
            "extra_args": {"resource_type": "instance", "aggregation_method": "mean"}},
    "memory.usage": {"unit": "MiB", "groupby": ["id"],
                     "extra_args": {"resource_type": "instance", "aggregation_method": "mean"}},
}}


@pytest.fixture(scope="module")
def usage(tmp_path_factory):
    """(server, first hour): hours first .. first+3 hold usage."""
    with running_gnocchi(tmp_path_factory.mktemp("gnocchi")) as server:
        server.create_archive_policy(POLICY, [{"granularity": "1h", "timespan": "30 days"}],
                                     methods=("mean", "max"))
        server.create_resource_type("instance", {
            "flavor_name": {"type": "string", "required": False}})
        first = hour_floor() - 6 * HOUR
        steps = [first + i * datetime.timedelta(minutes=10) for i in range(4 * 6)]
        measures = {}
        for scope in SCOPES:
            for n in range(2):
                metrics = ("cpu",) if scope == "p-nomem" else ("cpu", "memory.usage")
                res = server.create_resource("instance", f"{scope}-vm{n}", project_id=scope,
                                             metrics={m: POLICY for m in metrics},
                                             flavor_name=f"m1.{n}")
                measures[res["id"]] = {m: [(t, 256.0 * (n + 1)) for t in steps]
                                       for m in metrics}
        backdate_resources(server, first - HOUR)
        server.push_measures(measures)
        server.wait_processed()
        yield server, first


def faulty(first: datetime.datetime, broken: dict):
    """The proxy's fault: p-500 and p-slow fail in the third hour."""
    failing = (first + 2 * HOUR).isoformat()

    def fault(seen):
        if not broken["on"] or seen.start != failing:
            return None
        if seen.scope == "p-500":
            return ("reply", 500, b'{"code": 500, "description": "upstream exploded"}')
        if seen.scope == "p-slow":
            return ("sleep", TIMEOUT + 1.5)
        return None
    return fault


def test_collector_faults_one_scope_at_a_time(usage, tmp_path):
    server, first = usage
    broken = {"on": True}
    path = tmp_path / "metrics.yml"
    path.write_text(yaml.safe_dump(METRICS))
    metrics = load_metrics_conf(str(path), extra_args_schema=GNOCCHI_EXTRA_ARGS)
    with FaultProxy(server.url, faulty(first, broken)) as proxy:
        conf = make_conf(collector_gnocchi={
            "gnocchi_auth_type": "basic", "gnocchi_user": "admin", "gnocchi_endpoint": proxy.url,
            "retries": RETRIES, "max_backoff": 0.2, "timeout": TIMEOUT},
            orchestrator={"collect_executor": "threads"})
        coll = GnocchiCollector(conf, metrics)
        instance, memory = coll.metrics
        begin, end = first + 2 * HOUR, first + 3 * HOUR
        try:
            for scope, kind, word in (("p-500", "http", "HTTP 500"),
                                      ("p-slow", "timeout", "timed out")):
                with pytest.raises(CollectError) as err:
                    coll.retrieve(instance, scope, begin, end)
                assert err.value.kind == kind
                assert word in str(err.value) and proxy.url in str(err.value)
                assert f"after {RETRIES + 1} attempts" in str(err.value)
                assert str(err.value).startswith(f"scope {scope}, metric cpu (as instance): ")
                assert len(proxy.aggregates(scope, begin.isoformat())) == RETRIES + 1
            # the other scopes go on
            for scope in ("p-ok1", "p-ok2", "p-nomem"):
                points = coll.retrieve(instance, scope, begin, end)
                assert sorted(p.metadata["flavor_name"] for p in points) == ["m1.0", "m1.1"]
            assert len(coll.retrieve(memory, "p-ok1", begin, end)) == 2
            # a missing metric is no data, at once (not retried)
            before = len(proxy.aggregates("p-nomem"))
            assert coll.retrieve(memory, "p-nomem", begin, end) == []
            assert len(proxy.aggregates("p-nomem")) == before + 1
            # another 4xx fails at once: a resource type that does not exist
            wrong = dataclasses.replace(instance, extra_args={**instance.extra_args,
                                                              "resource_type": "instanse"})
            count = len(proxy.seen)
            with pytest.raises(CollectError, match=r"HTTP 400 .*instanse") as err:
                coll.retrieve(wrong, "p-ok1", begin, end)
            assert err.value.kind == "http" and len(proxy.seen) == count + 1
            # healed: the failed scope's period comes
            broken["on"] = False
            assert len(coll.retrieve(instance, "p-500", begin, end)) == 2
        finally:
            coll.close()


def test_daemon_failing_scopes_stay_the_others_go_on(usage, tmp_path, sqlite_url):
    """cloudkitty-proc --oneshot, collector and fetcher gnocchi: p-500 and
    p-slow stop before the third hour with their error kind, the others
    (p-nomem without its memory type) are rated to the end; once healed,
    the next run completes them."""
    server, first = usage
    broken = {"on": True}
    failing = first + 2 * HOUR
    env = plugin_env(tmp_path)
    with FaultProxy(server.url, faulty(first, broken)) as proxy:
        conf = daemon.write_config(
            tmp_path, db_url=sqlite_url, scopes=[], begin=first.isoformat(),
            end=(first + 4 * HOUR).isoformat(), metrics_yml=yaml.safe_dump(METRICS),
            workers=1, collector="gnocchi", extra=f"""
[fetcher]
backend = gnocchi
[fetcher_gnocchi]
gnocchi_auth_type = basic
gnocchi_user = admin
gnocchi_endpoint = {proxy.url}
resource_types = instance
[collector_gnocchi]
gnocchi_auth_type = basic
gnocchi_user = admin
gnocchi_endpoint = {proxy.url}
timeout = {TIMEOUT}
retries = {RETRIES}
max_backoff = 0.2
""")
        daemon.manage(conf, "db", "upgrade", env=env)
        proc = daemon.run_oneshot(conf, timeout=300, env=env)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out[-4000:]
        states = _states(conf, env)
        assert sorted(states) == SCOPES
        for scope, kind, word in (("p-500", "http", "HTTP 500"),
                                  ("p-slow", "timeout", "timed out")):
            st = states[scope]
            assert st["last_processed"] == (failing - HOUR).isoformat(), st
            assert st["last_error_kind"] == kind, st
            assert word in st["last_error"] and f"after {RETRIES + 1} attempts" in \
                st["last_error"], st
        for scope in ("p-ok1", "p-ok2", "p-nomem"):
            st = states[scope]
            assert st["last_processed"] == (first + 3 * HOUR).isoformat(), st
            assert st["last_error"] is None, st
        rows = _export(conf, env)
        by_scope: dict[str, set] = {}
        for row in rows:
            by_scope.setdefault(row["scope_id"], set()).add((row["begin"], row["type"]))
        hours = [(first + n * HOUR) for n in range(4)]

        def want(types, upto=4):
            return {(h.isoformat(), t) for h in hours[:upto] for t in types}

        assert by_scope["p-ok1"] == want(("instance", "memory.usage"))
        assert by_scope["p-nomem"] == want(("instance",))    # memory: an empty type
        assert by_scope["p-500"] == want(("instance", "memory.usage"), upto=2)
        assert by_scope["p-slow"] == want(("instance", "memory.usage"), upto=2)
        # healed: the next run completes them, once
        broken["on"] = False
        proc = daemon.run_oneshot(conf, timeout=300, env=env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        states = _states(conf, env)
        assert all(s["last_processed"] == (first + 3 * HOUR).isoformat()
                   and s["last_error"] is None for s in states.values()), states
        rows = _export(conf, env)
        keys = [(r["scope_id"], r["begin"], r["type"], r["groupby"].get("id")) for r in rows]
        assert len(keys) == len(set(keys)) == (4 * 4 * 2 * 2) + 4 * 2


def _states(conf, env):
    proc = daemon.manage(conf, "status", "--json", env=env)
    return {s["scope_id"]: s for s in json.loads(proc.stdout)["scopes"]}


def _export(conf, env):
    proc = daemon.manage(conf, "export", env=env)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_green_queries_overlap(usage, tmp_path):
    """collect_executor greenpool: queries from green threads run at once
    (green sockets, no monkey patching), with the same rows as real threads."""
    import warnings
    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
    import eventlet

    server, first = usage
    path = tmp_path / "metrics.yml"
    path.write_text(yaml.safe_dump(METRICS))
    metrics = load_metrics_conf(str(path), extra_args_schema=GNOCCHI_EXTRA_ARGS)
    begin, end = first + HOUR, first + 2 * HOUR
    results = {}
    with FaultProxy(server.url, lambda seen: ("sleep", 0.2)) as proxy:
        for executor in ("greenpool", "threads"):
            conf = make_conf(collector_gnocchi={"gnocchi_auth_type": "basic",
                                                "gnocchi_user": "admin",
                                                "gnocchi_endpoint": proxy.url},
                             orchestrator={"collect_executor": executor})
            coll = GnocchiCollector(conf, metrics)
            try:
                assert coll.green is (executor == "greenpool")
                jobs = [(m, s) for m in coll.metrics for s in SCOPES]
                if executor == "greenpool":
                    pool = eventlet.GreenPool(len(jobs))
                    got = list(pool.imap(lambda j: coll.retrieve(j[0], j[1], begin, end), jobs))
                    assert proxy.max_active > 1, "queries were serialised"
                else:
                    got = [coll.retrieve(m, s, begin, end) for m, s in jobs]
            finally:
                coll.close()
            results[executor] = [sorted(map(repr, points)) for points in got]
    assert results["greenpool"] == results["threads"]
    assert sum(map(len, results["threads"])) == 18   # 5 scopes x 2 vms, 4 without memory


@pytest.mark.parametrize("compress, header", [(None, "identity"), (True, "gzip")])
def test_collector_compress_replies_sets_accept_encoding(tmp_path, compress, header):
    """[collector_gnocchi] compress_replies (default off) decides the
    Accept-Encoding of the collector's requests; the Gnocchi fetcher's
    client keeps asking for gzip."""
    from cloudkitty_proc import gnocchi_client

    path = tmp_path / "metrics.yml"
    path.write_text(yaml.safe_dump(METRICS))
    metrics = load_metrics_conf(str(path), extra_args_schema=GNOCCHI_EXTRA_ARGS)
    group = {"gnocchi_auth_type": "basic", "gnocchi_user": "admin",
             "gnocchi_endpoint": "http://127.0.0.1:9"}
    if compress is not None:
        group["compress_replies"] = compress
    coll = GnocchiCollector(make_conf(collector_gnocchi=group), metrics)
    try:
        assert coll._client.transport().headers["Accept-Encoding"] == header
    finally:
        coll.close()
    client = gnocchi_client.GnocchiClient(
        gnocchi_client.GnocchiAuth("http://127.0.0.1:9", dict, lambda: None),
        group="fetcher_gnocchi", green=False, timeout=1, size=1, cafile=None, insecure=False)
    assert client.transport().headers["Accept-Encoding"] == "gzip"
