"""The keystone fetcher and keystoneauth1 sessions against a real Keystone 30.0.0.

The server is tests/keystone_server.py's (its own virtualenv, SQLite,
fernet keys); each test builds its own world (a fetcher user with the admin
role on its service project, and projects with and without the rating
role), so the tests share the server but not their expectations. The
reference is CloudKitty 25.0.0's own KeystoneFetcher, run in a separate
process from its virtualenv on the same Keystone.
"""

from __future__ import annotations

import datetime
import decimal
import json
import logging
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc import keystone_auth
from cloudkitty_proc.dataframe import DataPoint
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.executor import make_executor
from cloudkitty_proc.fetchers.base import FetchError
from cloudkitty_proc.fetchers.keystone import KeystoneFetcher
from cloudkitty_proc.leases import start_coordinator
from cloudkitty_proc.metrics_conf import parse_metrics
from cloudkitty_proc.rating.noop import NoopProcessor
from cloudkitty_proc.storage.sql import SQLStorage
from cloudkitty_proc.worker import Worker
from tests.conftest import service_unavailable
from tests.keystone_server import child_env

pytestmark = pytest.mark.service

ROOT = Path(__file__).resolve().parents[2]
UTC = datetime.timezone.utc
PASSWORD = "fetcher-Pw-7d2e51"


@dataclass
class World:
    """A fetcher user and the projects whose fate the fetcher decides."""

    user_id: str
    username: str
    service: str                     # the user's admin project (no rating role)
    rated: list[str] = field(default_factory=list)        # rating, enabled
    rated_disabled: str = ""         # rating, disabled
    unrated: str = ""                # no role at all
    member_only: str = ""            # another role, not rating
    other_user: str = ""             # rating granted to another user
    via_group: str = ""              # rating through a group of the user
    inherited: str = ""              # rating inherited from its domain
    parent: str = ""                 # rating granted to its sub-projects only
    child: str = ""                  # rating inherited from its parent


def make_world(ks) -> World:
    rating = ks.ensure_role("rating")
    admin = ks.ensure_role("admin")
    member = ks.ensure_role("member")
    username = "ck-" + uuid.uuid4().hex[:10]
    user = ks.create_user(username, PASSWORD)
    w = World(user, username, ks.create_project())
    ks.grant(admin, user, w.service)
    w.rated = [ks.create_project(), ks.create_project()]
    for p in w.rated:
        ks.grant(rating, user, p)
    w.rated_disabled = ks.create_project()
    ks.grant(rating, user, w.rated_disabled)
    ks.set_project_enabled(w.rated_disabled, False)
    w.unrated = ks.create_project()
    w.member_only = ks.create_project()
    ks.grant(member, user, w.member_only)
    w.other_user = ks.create_project()
    ks.grant(rating, ks.create_user(password="x-Pw-1"), w.other_user)
    w.via_group = ks.create_project()
    group = ks.create_group()
    ks.add_to_group(group, user)
    ks.grant_group(rating, group, w.via_group)
    domain = ks.create_domain()
    w.inherited = ks.create_project(domain_id=domain)
    ks.grant_domain(rating, user, domain, inherited=True)
    ks.grant_domain(rating, user, domain)
    w.parent = ks.create_project()
    w.child = ks.create_project(parent_id=w.parent)
    ks.grant(rating, user, w.parent, inherited=True)
    return w


def password_auth(ks, w: World) -> dict:
    return {"auth_type": "password", "auth_url": ks.auth_url, "username": w.username,
            "user_domain_id": "default", "password": PASSWORD, "project_id": w.service}


def write_conf(path: Path, auth: dict, *, section: str | None = "ks_auth",
               **fetcher: object) -> Path:
    """A configuration file: the auth options in ``[section]`` named by
    ``auth_section``, or (section None) in ``[fetcher_keystone]`` itself."""
    lines = ["[fetcher_keystone]"] + [f"{k} = {v}" for k, v in fetcher.items()]
    if section:
        lines += [f"auth_section = {section}", f"[{section}]"]
    lines += [f"{k} = {v}" for k, v in auth.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def load_conf(path: Path) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    ckp_conf.register_opts(conf)
    conf(["--config-file", str(path)], project="cloudkitty-proc", default_config_files=[])
    return conf


def fetcher_for(tmp_path, auth, **kw) -> KeystoneFetcher:
    return KeystoneFetcher(load_conf(write_conf(tmp_path / "ckp.conf", auth, **kw)))


@pytest.fixture
def world(keystone_server) -> World:
    return make_world(keystone_server)


# -- the scope list -------------------------------------------------------------
def test_only_projects_where_the_user_has_the_rating_role(keystone_server, world, tmp_path):
    fetcher = fetcher_for(tmp_path, password_auth(keystone_server, world))
    scopes = fetcher.get_scopes()
    assert sorted(scopes) == sorted([*world.rated, world.rated_disabled])
    assert len(scopes) == len(set(scopes))
    # a project gains the role: listed at the next call; loses it: gone
    rating = keystone_server.ensure_role("rating")
    keystone_server.grant(rating, world.user_id, world.unrated)
    assert world.unrated in fetcher.get_scopes()
    keystone_server.revoke(rating, world.user_id, world.rated[0])
    assert sorted(fetcher.get_scopes()) == sorted(
        [world.rated[1], world.rated_disabled, world.unrated])
    fetcher.close()


def test_one_listing_and_cloudkittys_per_project_requests_agree(keystone_server, world,
                                                                 tmp_path):
    fetcher = fetcher_for(tmp_path, password_auth(keystone_server, world))
    every = [p["id"] for p in keystone_server.projects()]
    at_once = fetcher.rated_projects(world.user_id, every)
    one_by_one = fetcher.rated_projects_one_by_one(world.user_id, every)
    assert at_once == one_by_one == {*world.rated, world.rated_disabled}


def test_forbidden_role_assignment_listing_falls_back_to_cloudkittys_requests(
        keystone_server, world, tmp_path, caplog):
    fetcher = fetcher_for(tmp_path, password_auth(keystone_server, world))
    keystone_server.set_policy({"identity:list_role_assignments": "!"})
    try:
        with pytest.raises(Exception, match="HTTP 403"):      # the policy is in force
            keystone_server.request("GET", f"/role_assignments?user.id={world.user_id}")
        caplog.set_level(logging.WARNING)
        for _ in range(2):
            assert sorted(fetcher.get_scopes()) == sorted([*world.rated, world.rated_disabled])
    finally:
        keystone_server.set_policy({})
    warnings = [r.getMessage() for r in caplog.records if "forbidden" in r.getMessage()]
    assert len(warnings) == 1 and "project by project" in warnings[0]


def test_ignore_disabled_tenants(keystone_server, world, tmp_path):
    fetcher = fetcher_for(tmp_path, password_auth(keystone_server, world),
                          ignore_disabled_tenants=True)
    assert sorted(fetcher.get_scopes()) == sorted(world.rated)
    keystone_server.set_project_enabled(world.rated[0], False)
    keystone_server.set_project_enabled(world.rated_disabled, True)
    assert sorted(fetcher.get_scopes()) == sorted([world.rated[1], world.rated_disabled])


def test_ignore_rating_role_lists_every_project(keystone_server, world, tmp_path):
    auth = password_auth(keystone_server, world)
    every = fetcher_for(tmp_path, auth, ignore_rating_role=True).get_scopes()
    projects = keystone_server.projects()
    assert sorted(every) == sorted(p["id"] for p in projects)
    assert {world.unrated, world.member_only, world.service, world.inherited} <= set(every)
    enabled = fetcher_for(tmp_path, auth, ignore_rating_role=True,
                          ignore_disabled_tenants=True).get_scopes()
    assert sorted(enabled) == sorted(p["id"] for p in projects if p["enabled"])
    assert world.rated_disabled not in enabled


def test_application_credential_gives_the_same_scopes(keystone_server, world, tmp_path):
    cred_id, secret = keystone_server.create_application_credential(
        world.user_id, PASSWORD, world.service)
    auth = {"auth_type": "v3applicationcredential", "auth_url": keystone_server.auth_url,
            "application_credential_id": cred_id, "application_credential_secret": secret}
    fetcher = fetcher_for(tmp_path, auth, section=None)
    assert sorted(fetcher.get_scopes()) == sorted([*world.rated, world.rated_disabled])
    wrong = fetcher_for(tmp_path, {**auth, "application_credential_secret": "not-" + secret},
                        section=None)
    with pytest.raises(FetchError) as err:
        wrong.get_scopes()
    assert "401" in str(err.value) and secret not in str(err.value)


def test_auth_options_in_the_fetcher_group_itself(keystone_server, world, tmp_path):
    fetcher = fetcher_for(tmp_path, password_auth(keystone_server, world), section=None)
    assert sorted(fetcher.get_scopes()) == sorted([*world.rated, world.rated_disabled])


# -- errors -------------------------------------------------------------------------
def test_wrong_password_is_one_line_without_the_password(keystone_server, world, tmp_path):
    bad = "Wrong-Pw-" + uuid.uuid4().hex
    fetcher = fetcher_for(tmp_path, {**password_auth(keystone_server, world), "password": bad})
    with pytest.raises(FetchError) as err:
        fetcher.get_scopes()
    text = str(err.value)
    assert "\n" not in text and bad not in text
    assert "HTTP 401" in text and "[ks_auth] auth_type = password" in text
    assert keystone_server.auth_url + "/auth/tokens" in text


def test_keystone_unreachable_is_one_line(tmp_path, free_port):
    auth = {"auth_type": "password", "auth_url": f"http://u:Url-Secret-1@127.0.0.1:{free_port}/v3",
            "username": "ck", "user_domain_id": "default", "password": "Pw-Secret-2",
            "project_name": "service", "project_domain_id": "default"}
    fetcher = fetcher_for(tmp_path, auth)
    with pytest.raises(FetchError) as err:
        fetcher.get_scopes()
    text = str(err.value)
    assert "\n" not in text and "Url-Secret-1" not in text and "Pw-Secret-2" not in text
    assert "Unable to establish connection" in text and "Connection refused" in text


@pytest.mark.parametrize("version", ["2", "2.0", "v2.0"])
def test_keystone_v2_is_refused(tmp_path, version):
    auth = {"auth_type": "password", "auth_url": "http://127.0.0.1:5000/v3"}
    with pytest.raises(ConfigError, match=r"\[fetcher_keystone\] keystone_version = .*v2 API "
                       r"is not supported"):
        fetcher_for(tmp_path, auth, keystone_version=version)


@pytest.mark.parametrize("version, ok", [("3", True), ("v3", True), ("3.14", True),
                                         ("4", False), ("three", False)])
def test_keystone_version_3_only(tmp_path, version, ok):
    auth = {"auth_type": "password", "auth_url": "http://127.0.0.1:5000/v3"}
    if ok:
        fetcher_for(tmp_path, auth, keystone_version=version).close()
    else:
        with pytest.raises(ConfigError, match="set 3"):
            fetcher_for(tmp_path, auth, keystone_version=version)


@pytest.mark.parametrize("auth, message", [
    ({}, r"\[ks_auth\] auth_type is not set"),
    ({"auth_type": "nosuch"}, "auth_type = nosuch: no such keystoneauth1 auth type"),
    ({"auth_type": "password"}, "auth_type = password: missing auth_url"),
])
def test_bad_auth_configuration_names_the_group(tmp_path, auth, message):
    with pytest.raises(ConfigError, match=message):
        fetcher_for(tmp_path, auth)


# -- secrets never logged -------------------------------------------------------
def test_describe_masks_every_secret_of_the_group(tmp_path):
    auth = {"auth_type": "v3applicationcredential", "auth_url": "http://127.0.0.1:5000/v3",
            "application_credential_id": "ac1", "application_credential_secret": "Ac-Secret-3"}
    conf = load_conf(write_conf(tmp_path / "ckp.conf", auth))
    ks = keystone_auth.KeystoneSession(conf, "fetcher_keystone")
    text = ks.describe(ValueError("bad Ac-Secret-3 at\nhttp://u:Url-Pw@h/v3"))
    assert text == "bad *** at http://u:***@h/v3"
    assert ks.where == "[fetcher_keystone] auth_section = ks_auth: [ks_auth]"



def test_no_credential_in_debug_logs(keystone_server, world, tmp_path, caplog):
    cred_id, secret = keystone_server.create_application_credential(
        world.user_id, PASSWORD, world.service)
    bad = "Wrong-Pw-" + uuid.uuid4().hex
    caplog.set_level(logging.DEBUG)
    for name in ("keystoneauth", "keystoneauth1", "urllib3", "requests"):
        caplog.set_level(logging.DEBUG, logger=name)
    auth = password_auth(keystone_server, world)
    assert fetcher_for(tmp_path, auth).get_scopes()
    assert fetcher_for(tmp_path, {
        "auth_type": "v3applicationcredential", "auth_url": keystone_server.auth_url,
        "application_credential_id": cred_id,
        "application_credential_secret": secret}).get_scopes()
    with pytest.raises(FetchError):
        fetcher_for(tmp_path, {**auth, "password": bad}).get_scopes()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "GET" in text and "/v3/projects" in text      # keystoneauth did log its requests
    for value in (PASSWORD, secret, bad):
        assert value not in text


# -- green ------------------------------------------------------------------------
@pytest.mark.parametrize("green", [True, False])
def test_green_session_lets_the_pool_run_during_keystone_calls(keystone_server, world,
                                                               tmp_path, green):
    """green=True: the token request runs in a real thread and another green
    thread of the pool runs meanwhile; green=False blocks the hub until the
    call is over (what a fetcher on the run thread does)."""
    conf = load_conf(write_conf(tmp_path / "ckp.conf", password_auth(keystone_server, world)))
    ks = keystone_auth.KeystoneSession(conf, "fetcher_keystone", green=green)
    pool = make_executor("greenpool", 4)
    events = []

    def authenticate():
        events.append("auth started")
        headers = ks.auth_headers()
        events.append("auth done")
        return headers

    first = pool.submit(authenticate)
    other = pool.submit(lambda: events.append("other green thread ran"))
    assert first.result()["X-Auth-Token"]
    other.result()
    pool.close()
    expected_other = 1 if green else 2
    assert events.index("other green thread ran") == expected_other, events
    assert ks.user_id() == world.user_id
    assert ks.endpoint(service_type="identity", interface="public").rstrip("/") == \
        keystone_server.auth_url
    ks.close()


# -- in the worker: Keystone down, then back --------------------------------------
class OnePointCollector:
    """One point per metric and period (the subject is the scope list)."""

    metrics = parse_metrics({"metrics": {"m1": {"unit": "u", "groupby": ["id"]}}})

    def retrieve(self, metric, scope_id, begin, end):
        return [DataPoint("u", decimal.Decimal(1), decimal.Decimal(0),
                          {"id": "r1", "project_id": scope_id}, {})]

    def close(self):
        pass


def test_worker_keeps_its_scopes_while_keystone_is_down(keystone_server, world, tmp_path,
                                                        caplog):
    conf = load_conf(write_conf(tmp_path / "ckp.conf", password_auth(keystone_server, world)))
    begin = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    conf.set_override("state_path", str(tmp_path))
    conf.set_override("begin", begin.isoformat(), group="collect")
    conf.set_override("end", (begin + datetime.timedelta(hours=2)).isoformat(), group="collect")
    conf.set_override("connection", f"sqlite:///{tmp_path}/db.sqlite", group="database")
    conf.set_override("coordination_url", f"file://{tmp_path}/locks", group="orchestrator")
    storage = SQLStorage(conf)
    storage.upgrade()
    fetcher = KeystoneFetcher(conf)
    worker = Worker(conf, "w0", storage=storage, collector=OnePointCollector(),
                    fetcher=fetcher, rating_chain=[NoopProcessor(conf)],
                    coordinator=start_coordinator(conf, "w0-test"),
                    executor=make_executor("threads", 2), oneshot=True)
    expected = sorted([*world.rated, world.rated_disabled])
    try:
        first = worker.run_pass()
        assert first.committed == 2 * len(expected) and not first.pending
        assert sorted(storage.get_states()) == expected
        rating = keystone_server.ensure_role("rating")
        keystone_server.grant(rating, world.user_id, world.unrated)
        keystone_server.stop()
        caplog.set_level(logging.ERROR)
        down = worker.run_pass()
        assert down.pending and down.committed == 0
        errors = [r.getMessage() for r in caplog.records
                  if "cannot list scopes" in r.getMessage()]
        assert len(errors) == 1 and f"using the {len(expected)} known ones" in errors[0]
        assert PASSWORD not in errors[0]
    finally:
        keystone_server.start()
    back = worker.run_pass()
    assert back.committed == 2 and not back.pending       # the project rated meanwhile
    assert set(storage.get_states()) == {*expected, world.unrated}
    fetcher.close()
    storage.close()


# -- the reference: CloudKitty 25.0.0's own fetcher -------------------------------
@pytest.fixture(scope="module")
def cloudkitty_python() -> Path:
    from tests.cloudkitty_stack import venv_tool
    try:
        return venv_tool.ensure_venv(log=None) / "bin" / "python"
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        service_unavailable("CloudKitty venv", str(exc).splitlines()[0])


def test_same_scopes_as_cloudkittys_keystone_fetcher(keystone_server, world, tmp_path,
                                                     cloudkitty_python):
    path = write_conf(tmp_path / "cloudkitty.conf", password_auth(keystone_server, world))
    proc = subprocess.run([str(cloudkitty_python), str(ROOT / "tools" / "ck_keystone_fetcher.py"),
                           str(path)], capture_output=True, text=True, timeout=300,
                          env={**child_env(), "TZ": "UTC"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reference["False,False"] == sorted([*world.rated, world.rated_disabled])
    for key, scopes in reference.items():
        disabled, role = (v == "True" for v in key.split(","))
        fetcher = fetcher_for(tmp_path, password_auth(keystone_server, world),
                              ignore_disabled_tenants=disabled, ignore_rating_role=role)
        assert sorted(fetcher.get_scopes()) == scopes, key
