"""CloudKitty's default sources end to end (issue 19, acceptance 2): the
2-worker daemon with ``collector = gnocchi`` (``gnocchi_auth_type =
keystone``) and ``fetcher = keystone``, against a real Gnocchi 4.7.1 in
``[api] auth_mode = keystone`` and a real Keystone 30.0.0.

The world: a rating user with the admin role on its service project (Gnocchi
then lets it read every project's resources, as CloudKitty's user does);
five projects where it has the ``rating`` role, one where it has no role,
one where it has the role but the project is disabled. Every project has two
instances with three metrics measured three times a minute over eight
minutes that ended at least two minutes ago (``period = 60``); the
resources are backdated (Gnocchi's history query refuses periods before a
resource's first revision). Gnocchi's keystone-mode API
(tests.gnocchi_server.keystone_api: its own keystonemiddleware, no token
cache) is found through the Keystone catalog (service type ``metric``,
interface ``internal``, a region of this test's own).
"""

from __future__ import annotations

import datetime
import decimal
import logging
import textwrap
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from oslo_config import cfg

import cloudkitty_proc.conf as ckconf
from cloudkitty_proc.collectors.gnocchi import GNOCCHI_EXTRA_ARGS, GnocchiCollector
from cloudkitty_proc.exceptions import CollectError
from cloudkitty_proc.metrics_conf import load_metrics_conf
from tests import daemon
from tests.gnocchi_server import backdate_resources, keystone_api, plugin_env, running_gnocchi

pytestmark = pytest.mark.service

UTC = datetime.timezone.utc
MINUTE = datetime.timedelta(minutes=1)
PERIODS = 8
PASSWORD = "gnocchi-rater-Pw-41c9"
POLICY = "ck-minute"
METRICS = ("cpu", "memory.usage", "disk.root.size")
METRICS_YML = textwrap.dedent(f"""\
    metrics:
      cpu:
        unit: instance
        groupby: [id, project_id]
        extra_args: {{resource_type: instance, aggregation_method: mean,
                      force_granularity: 60}}
      memory.usage:
        unit: MiB
        groupby: [id, project_id]
        metadata: [flavor_name]
        extra_args: {{resource_type: instance, aggregation_method: max,
                      force_granularity: 60}}
      disk.root.size:
        unit: GiB
        groupby: [id, project_id]
        extra_args: {{resource_type: instance, aggregation_method: mean,
                      force_granularity: 60}}
    """)
assert all(m in METRICS_YML for m in METRICS)


@dataclass
class World:
    user: str
    username: str
    service: str               # the user's admin project (no rating role)
    auth_url: str
    region: str
    gnocchi_url: str           # the keystone-mode API, as in the catalog
    begin: datetime.datetime
    rated: list[str] = field(default_factory=list)
    unrated: str = ""
    disabled: str = ""
    #: (scope, begin ISO, type, resource id) -> expected quantity
    expected: dict = field(default_factory=dict)


def value(metric: str, n_resource: int, minute: int) -> decimal.Decimal:
    """The one value of a resource's metric during a minute (three equal
    measures: mean and max both give it)."""
    base = {"cpu": 1, "memory.usage": 512, "disk.root.size": 20}[metric]
    return decimal.Decimal(base + n_resource * 3 + minute)


@pytest.fixture(scope="module")
def world(keystone_server, tmp_path_factory):
    ks = keystone_server
    admin, rating = ks.ensure_role("admin"), ks.ensure_role("rating")
    username = "gk-" + uuid.uuid4().hex[:8]
    user = ks.create_user(username, PASSWORD)
    service = ks.create_project()
    ks.grant(admin, user, service)
    region = "R-" + uuid.uuid4().hex[:8]
    ks.request("POST", "/regions", {"region": {"id": region}})
    with running_gnocchi(tmp_path_factory.mktemp("gnocchi")) as server, \
            keystone_api(server, ks) as url:
        ks.register_endpoints("metric", url, region=region)
        now = datetime.datetime.now(UTC)
        # eight complete minutes, the last ending at least two minutes ago
        begin = now.replace(second=0, microsecond=0) - (PERIODS + 2) * MINUTE
        w = World(user, username, service, ks.auth_url, region, url, begin)
        w.rated = [ks.create_project() for _ in range(5)]
        for p in w.rated:
            ks.grant(rating, user, p)
        w.unrated = ks.create_project()
        w.disabled = ks.create_project()
        ks.grant(rating, user, w.disabled)
        ks.set_project_enabled(w.disabled, False)
        server.create_archive_policy(POLICY, [{"granularity": "1m", "timespan": "1 day"}],
                                     methods=("mean", "max", "min", "sum", "last", "count"))
        server.create_resource_type("instance", {
            "flavor_name": {"type": "string", "required": False}})
        measures = {}
        for project in [*w.rated, w.unrated, w.disabled]:
            for n in range(2):
                res = server.create_resource(
                    "instance", f"vm-{project[:8]}-{n}", project_id=project,
                    metrics={m: POLICY for m in METRICS}, flavor_name=f"m1.f{n}")
                measures[res["id"]] = {
                    m: [(begin + k * MINUTE + s * datetime.timedelta(seconds=1),
                         float(value(m, n, k))) for k in range(PERIODS) for s in (5, 25, 45)]
                    for m in METRICS}
                for k in range(PERIODS):
                    start = (begin + k * MINUTE).isoformat()
                    for m in METRICS:
                        w.expected[(project, start, m, res["id"])] = value(m, n, k)
        server.push_measures(measures)
        backdate_resources(server, begin - datetime.timedelta(hours=1))
        server.wait_processed()
        yield w


def ck_conf(tmp_path, w: World, *, workers: int = 2) -> Path:
    """cloudkitty-proc's configuration: CloudKitty's sections for the
    default sources, credentials through an auth_section."""
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    metrics = tmp_path / "metrics.yml"
    metrics.write_text(METRICS_YML)
    path = tmp_path / "ckp.conf"
    path.write_text(textwrap.dedent(f"""\
        [DEFAULT]
        state_path = {state}
        host = testhost
        graceful_shutdown_timeout = 20
        [orchestrator]
        max_workers = {workers}
        poll_interval = 1
        [collect]
        collector = gnocchi
        period = 60
        wait_periods = 1
        begin = {w.begin.isoformat()}
        end = {(w.begin + PERIODS * MINUTE).isoformat()}
        metrics_conf = {metrics}
        [fetcher]
        backend = keystone
        [fetcher_keystone]
        auth_section = ks_auth
        ignore_disabled_tenants = true
        [collector_gnocchi]
        gnocchi_auth_type = keystone
        auth_section = ks_auth
        interface = internal
        region_name = {w.region}
        retries = 1
        max_backoff = 0.2
        timeout = 20
        [ks_auth]
        auth_type = password
        auth_url = {w.auth_url}
        username = {w.username}
        password = {PASSWORD}
        user_domain_id = default
        project_domain_id = default
        project_id = {w.service}
        [database]
        connection = sqlite:///{tmp_path}/db.sqlite
        [rating]
        processors = noop
        """))
    return path


@pytest.fixture
def conf_path(tmp_path, world):
    return ck_conf(tmp_path, world)


def test_the_daemon_rates_the_keystone_projects_from_gnocchi_exactly_once(
        tmp_path, world, conf_path):
    env = plugin_env(tmp_path)
    daemon.manage(conf_path, "db", "upgrade", env=env)
    proc = daemon.run_oneshot(conf_path, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert PASSWORD not in out
    rows = daemon.export(conf_path)
    keys = Counter((r["scope_id"], r["begin"], r["type"], r["groupby"]["id"]) for r in rows)
    assert [k for k, n in keys.items() if n > 1] == []           # exactly once
    scopes = {r["scope_id"] for r in rows}
    assert scopes == set(world.rated)       # not the unrated nor the disabled project
    want = {k: q for k, q in world.expected.items() if k[0] in world.rated}
    assert len(want) == 5 * PERIODS * 3 * 2
    assert set(keys) == set(want)
    got = {(r["scope_id"], r["begin"], r["type"], r["groupby"]["id"]): decimal.Decimal(r["qty"])
           for r in rows}
    assert got == want
    totals = Counter()
    for (scope, _b, metric, _i), qty in got.items():
        totals[(scope, metric)] += qty
    for scope in world.rated:   # e.g. cpu: sum over 8 minutes of (1+k) + (4+k)
        assert totals[(scope, "cpu")] == sum(2 * k + 5 for k in range(PERIODS))
    assert {r["metadata"].get("flavor_name") for r in rows if r["type"] == "memory.usage"} \
        == {"m1.f0", "m1.f1"}
    states = {s["scope_id"]: s for s in daemon.status(conf_path)["scopes"]}
    end = (world.begin + (PERIODS - 1) * MINUTE).isoformat()
    assert {s: states[s]["last_processed"] for s in world.rated} == \
        {s: end for s in world.rated}
    assert world.unrated not in states and world.disabled not in states


def collector(tmp_path, conf_text: str) -> GnocchiCollector:
    """The collector of ``conf_text`` in this process (real threads)."""
    path = tmp_path / "direct.conf"
    path.write_text(conf_text)
    conf = cfg.ConfigOpts()
    ckconf.register_opts(conf)
    conf(["--config-file", str(path)], project="cloudkitty-proc", default_config_files=[])
    conf.set_override("collect_executor", "threads", "orchestrator")
    metrics_path = tmp_path / "metrics.yml"
    metrics = load_metrics_conf(str(metrics_path), scope_key="project_id",
                                extra_args_schema=GNOCCHI_EXTRA_ARGS)
    return GnocchiCollector(conf, metrics)


def test_a_revoked_token_is_replaced_and_credentials_are_not_logged(
        tmp_path, world, conf_path, keystone_server, caplog):
    """The collector authenticates again after Gnocchi's 401 (its token
    revoked in Keystone) and the period succeeds; a wrong password is one
    error line naming the auth section, without the password."""
    caplog.set_level(logging.DEBUG)
    coll = collector(tmp_path, conf_path.read_text())
    coll.check()                                     # token + catalog lookup
    assert coll.safe_url == world.gnocchi_url
    metric = next(m for m in coll.metrics if m.name == "cpu")
    scope = world.rated[0]
    period = (world.begin, world.begin + MINUTE)
    first = coll.retrieve(metric, scope, *period)
    token = coll._client.auth.headers()["X-Auth-Token"]
    _revoke(keystone_server, token)
    again = coll.retrieve(metric, scope, *period)
    assert coll._client.auth.headers()["X-Auth-Token"] != token
    assert sorted(p.qty for p in again) == sorted(p.qty for p in first) == [1, 4]
    coll.close()
    bad = collector(tmp_path, conf_path.read_text().replace(PASSWORD, "wrong-Pw-0"))
    with pytest.raises(CollectError) as err:
        bad.check()
    message = str(err.value)
    assert "auth_section = ks_auth" in message and "401" in message, message
    assert "wrong-Pw-0" not in message and PASSWORD not in caplog.text
    assert token not in caplog.text
    bad.close()


def _revoke(ks, token: str) -> None:
    """Revoke ``token`` in Keystone (as the admin)."""
    req = urllib.request.Request(ks.auth_url + "/auth/tokens", method="DELETE")
    req.add_header("X-Auth-Token", ks.admin_token())
    req.add_header("X-Subject-Token", token)
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 204
