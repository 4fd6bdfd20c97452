"""A private Keystone 30.0.0 for the tests (../shared/CLOUDKITTY-DROPIN.md §5.4).

Usage: the ``keystone_server`` fixture of tests/conftest.py (one server for
the session), or directly::

    from tests.keystone_server import running_keystone

    with running_keystone(tmp_dir) as ks:
        project = ks.create_project()
        ks.grant(ks.ensure_role("rating"), ks.admin_user_id, project)
        ks.set_project_enabled(project, False)
        cred_id, secret = ks.create_application_credential(user, password, project)
        ks.stop(); ks.start()          # down, then up again on the same port

What it does:

1. Keystone from PyPI in its own virtualenv (tools/keystone_venv.py, cached);
   Keystone is never imported into the test process;
2. a template, built once and cached beside the venv
   (``keystone-template-30.0.0``): a SQLite database after ``keystone-manage
   db_sync`` and ``bootstrap`` (user ``admin``, password ADMIN_PASSWORD,
   project ``admin``, roles admin/member/reader, region RegionOne, the
   identity endpoints at a placeholder URL), fernet token, receipt and
   credential keys (``fernet_setup``, ``credential_setup``); about 6.5 s,
   all of it keystone-manage start-up;
3. per server: a copy of the template in its directory, ``keystone.conf``
   (SQLite, key repositories, a policy file for set_policy(), bcrypt at 4 rounds so that password checks
   are quick, Keystone's in-process memory cache, which cuts a request from
   about 110 ms to 10 ms, log file), Keystone's WSGI app under tools/keystone_wsgi_server.py
   (threaded wsgiref, the venv's python) on a free 127.0.0.1 port, then the
   identity endpoints moved to that port through the API: about 3 s;
4. on exit: SIGTERM to the PID it started, SIGKILL after 10 s.

Projects, users, roles, grants and application credentials are created
through Keystone's REST API (urllib: independent of the code under test).
A missing venv (not buildable) is a missing service: the test is skipped,
or fails when CLOUDKITTY_PROC_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import importlib.util
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import service_unavailable

ROOT = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = ROOT / "tools" / "keystone_wsgi_server.py"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0
ADMIN_PASSWORD = "ks-admin-Secret-8c1f"
#: the identity endpoints' URL in the template, replaced at each start
PLACEHOLDER_URL = "http://127.0.0.1:9/v3"
#: bump when the template's content changes
TEMPLATE_FORMAT = 1
KEY_DIRS = ("fernet-keys", "fernet-receipts", "credential-keys")


def _load_venv_tool():
    spec = importlib.util.spec_from_file_location("keystone_venv",
                                                  ROOT / "tools" / "keystone_venv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


venv_tool = _load_venv_tool()


def keystone_venv() -> Path:
    """Keystone's venv, built here if missing (.ci/run builds it up front);
    its failure is a missing service."""
    try:
        return venv_tool.ensure_venv(log=None)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        service_unavailable("Keystone venv", str(exc).splitlines()[0])


def child_env(config: Path | None = None) -> dict[str, str]:
    """Environment of Keystone's processes: none of our PYTHONPATH, no OS_*
    credentials, no warnings on stderr."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OS_") and k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONWARNINGS"] = "ignore"
    if config is not None:
        env["OS_KEYSTONE_CONFIG_FILES"] = str(config)
    return env


def write_config(work: Path) -> Path:
    config = work / "keystone.conf"
    config.write_text(f"""\
[DEFAULT]
log_file = {work}/keystone.log
use_stderr = false

[database]
connection = sqlite:///{work}/keystone.sqlite

[fernet_tokens]
key_repository = {work}/fernet-keys

[fernet_receipts]
key_repository = {work}/fernet-receipts

[credential]
key_repository = {work}/credential-keys

[identity]
password_hash_rounds = 4

[cache]
enabled = true
backend = dogpile.cache.memory

[oslo_policy]
policy_file = {work}/policy.yaml
""")
    (work / "policy.yaml").write_text("{}\n")
    return config


def _manage(venv: Path, config: Path, *args: str) -> None:
    cmd = [str(venv / "bin" / "keystone-manage"), "--config-file", str(config), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise RuntimeError(f"keystone-manage {args[0]} failed (exit {proc.returncode}):\n{tail}")


def template(venv: Path) -> Path:
    """The cached template directory (built under a lock if missing)."""
    base = venv_tool.cache_dir()
    path = base / f"keystone-template-{venv_tool.KEYSTONE_VERSION}"
    marker = path / "template-format"
    with open(base / (path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if marker.exists() and marker.read_text() == str(TEMPLATE_FORMAT):
                return path
            building = base / (path.name + ".building")
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir(parents=True)
            config = write_config(building)
            user = pwd.getpwuid(os.getuid()).pw_name
            group = grp.getgrgid(os.getgid()).gr_name
            owner = ("--keystone-user", user, "--keystone-group", group)
            _manage(venv, config, "db_sync")
            _manage(venv, config, "fernet_setup", *owner)
            _manage(venv, config, "credential_setup", *owner)
            _manage(venv, config, "bootstrap", "--bootstrap-password", ADMIN_PASSWORD,
                    "--bootstrap-admin-url", PLACEHOLDER_URL,
                    "--bootstrap-public-url", PLACEHOLDER_URL,
                    "--bootstrap-internal-url", PLACEHOLDER_URL,
                    "--bootstrap-region-id", "RegionOne")
            (building / "template-format").write_text(str(TEMPLATE_FORMAT))
            shutil.rmtree(path, ignore_errors=True)
            building.rename(path)
            return path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class KeystoneError(RuntimeError):
    """Keystone answered an error: ``status`` and the reply."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class KeystoneServer:
    """A running Keystone: its URLs, and its REST API as the admin."""

    def __init__(self, work: Path, venv: Path) -> None:
        self.work = work
        self.venv = venv
        self.config = work / "keystone.conf"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._admin_token: str | None = None
        self.admin_user_id = ""
        self.admin_project_id = ""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def auth_url(self) -> str:
        return self.url + "/v3"

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- process -------------------------------------------------------------------
    def start(self) -> None:
        """Start the server (on its former port after a stop) and wait for it."""
        port_file = self.work / "port"
        port_file.unlink(missing_ok=True)
        log = open(self.work / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        cmd = [str(self.venv / "bin" / "python"), str(SERVER_SCRIPT), str(port_file)]
        if self.port:
            cmd.append(str(self.port))
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.work,
                                     env=child_env(self.config))
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Keystone did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self._admin_token = None

    def stop(self) -> None:
        """SIGTERM the server this object started (by its PID), SIGKILL after 10 s."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for name in ("server.log", "keystone.log"):
            with contextlib.suppress(OSError):
                out += (self.work / name).read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out)

    # -- REST ----------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None,
                token: str | None = None) -> tuple[dict, dict]:
        """``method /v3<path>`` → (JSON reply or {}, headers); KeystoneError
        on an error status."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.auth_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token is not False:
            req.add_header("X-Auth-Token", token or self.admin_token())
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                return (json.loads(raw) if raw else {}), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            raise KeystoneError(exc.code, f"Keystone {method} {path}: HTTP {exc.code}: "
                                f"{exc.read()[:300]!r}") from None

    def token(self, auth: dict, scope: dict | None = None) -> tuple[str, dict]:
        """A token for an ``auth.identity`` body; (token id, token body)."""
        body = {"auth": {"identity": auth}}
        if scope is not None:
            body["auth"]["scope"] = scope
        reply, headers = self.request("POST", "/auth/tokens", body, token=False)
        return headers["X-Subject-Token"], reply["token"]

    def password_token(self, user_id: str, password: str,
                       project_id: str | None = None) -> tuple[str, dict]:
        scope = {"project": {"id": project_id}} if project_id else None
        return self.token({"methods": ["password"],
                           "password": {"user": {"id": user_id, "password": password}}},
                          scope)

    def admin_token(self) -> str:
        if self._admin_token is None:
            token, body = self.token(
                {"methods": ["password"], "password": {"user": {
                    "name": "admin", "domain": {"id": "default"},
                    "password": ADMIN_PASSWORD}}},
                {"project": {"name": "admin", "domain": {"id": "default"}}})
            self._admin_token = token
            self.admin_user_id = body["user"]["id"]
            self.admin_project_id = body["project"]["id"]
        return self._admin_token

    def move_endpoints(self) -> None:
        """Point the catalog's identity endpoints at this server's port."""
        reply, _ = self.request("GET", "/endpoints")
        for endpoint in reply["endpoints"]:
            if endpoint["url"] != self.auth_url:
                self.request("PATCH", f"/endpoints/{endpoint['id']}",
                             {"endpoint": {"url": self.auth_url}})

    def set_policy(self, rules: dict[str, str]) -> None:
        """Override Keystone's default policy rules (``{}``: none); Keystone
        reads the file again at its next request (oslo.policy watches its
        modification time)."""
        path = self.work / "policy.yaml"
        before = path.stat().st_mtime_ns
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rules) + "\n")      # JSON is YAML
        os.replace(tmp, path)
        if path.stat().st_mtime_ns == before:      # a coarse clock: make it differ
            os.utime(path, ns=(before + 1_000_000, before + 1_000_000))

    # -- objects -------------------------------------------------------------------
    def create_project(self, name: str | None = None, *, enabled: bool = True,
                       domain_id: str = "default", parent_id: str | None = None) -> str:
        project = {"name": name or "p-" + uuid.uuid4().hex[:10], "domain_id": domain_id,
                   "enabled": enabled}
        if parent_id:
            project["parent_id"] = parent_id
        reply, _ = self.request("POST", "/projects", {"project": project})
        return reply["project"]["id"]

    def set_project_enabled(self, project_id: str, enabled: bool) -> None:
        self.request("PATCH", f"/projects/{project_id}", {"project": {"enabled": enabled}})

    def projects(self) -> list[dict]:
        return self.request("GET", "/projects")[0]["projects"]

    def create_user(self, name: str | None = None, password: str | None = None, *,
                    domain_id: str = "default") -> str:
        user = {"name": name or "u-" + uuid.uuid4().hex[:10], "domain_id": domain_id}
        if password is not None:
            user["password"] = password
        reply, _ = self.request("POST", "/users", {"user": user})
        return reply["user"]["id"]

    def ensure_role(self, name: str) -> str:
        """The id of the global role ``name``, created if missing."""
        reply, _ = self.request("GET", f"/roles?name={name}")
        if reply["roles"]:
            return reply["roles"][0]["id"]
        try:
            reply, _ = self.request("POST", "/roles", {"role": {"name": name}})
        except KeystoneError as exc:
            if exc.status != 409:       # created meanwhile
                raise
            return self.ensure_role(name)
        return reply["role"]["id"]

    def grant(self, role_id: str, user_id: str, project_id: str, *,
              inherited: bool = False) -> None:
        """The role on the project, or (``inherited``) on its sub-projects
        only, through inheritance."""
        path = f"/projects/{project_id}/users/{user_id}/roles/{role_id}"
        if inherited:
            path = f"/OS-INHERIT{path}/inherited_to_projects"
        self.request("PUT", path)

    def revoke(self, role_id: str, user_id: str, project_id: str) -> None:
        self.request("DELETE", f"/projects/{project_id}/users/{user_id}/roles/{role_id}")

    def create_group(self, *, domain_id: str = "default") -> str:
        reply, _ = self.request("POST", "/groups", {"group": {
            "name": "g-" + uuid.uuid4().hex[:10], "domain_id": domain_id}})
        return reply["group"]["id"]

    def add_to_group(self, group_id: str, user_id: str) -> None:
        self.request("PUT", f"/groups/{group_id}/users/{user_id}")

    def grant_group(self, role_id: str, group_id: str, project_id: str) -> None:
        self.request("PUT", f"/projects/{project_id}/groups/{group_id}/roles/{role_id}")

    def create_domain(self) -> str:
        reply, _ = self.request("POST", "/domains", {"domain": {
            "name": "d-" + uuid.uuid4().hex[:10]}})
        return reply["domain"]["id"]

    def grant_domain(self, role_id: str, user_id: str, domain_id: str, *,
                     inherited: bool = False) -> None:
        """The role on the domain itself, or (``inherited``) on each of its
        projects through inheritance."""
        if inherited:
            self.request("PUT", f"/OS-INHERIT/domains/{domain_id}/users/{user_id}/roles/"
                         f"{role_id}/inherited_to_projects")
        else:
            self.request("PUT", f"/domains/{domain_id}/users/{user_id}/roles/{role_id}")

    def register_endpoints(self, service_type: str, url: str, *,
                           interfaces: tuple[str, ...] = ("public", "internal", "admin"),
                           region: str = "RegionOne") -> str:
        """A catalog service of ``service_type`` (e.g. ``metric``) with
        ``url`` as its endpoint of each interface; its id."""
        reply, _ = self.request("POST", "/services", {"service": {
            "type": service_type, "name": f"{service_type}-{uuid.uuid4().hex[:6]}"}})
        service = reply["service"]["id"]
        for interface in interfaces:
            self.request("POST", "/endpoints", {"endpoint": {
                "service_id": service, "interface": interface, "url": url,
                "region_id": region}})
        return service

    def create_application_credential(self, user_id: str, password: str, project_id: str,
                                      name: str | None = None) -> tuple[str, str]:
        """(id, secret) of a new application credential of ``user_id`` on
        ``project_id`` (created with the user's own token, as Keystone
        requires), with all the user's roles there."""
        token, _ = self.password_token(user_id, password, project_id)
        reply, _ = self.request(
            "POST", f"/users/{user_id}/application_credentials",
            {"application_credential": {"name": name or "ac-" + uuid.uuid4().hex[:10]}},
            token=token)
        cred = reply["application_credential"]
        return cred["id"], cred["secret"]


@contextlib.contextmanager
def running_keystone(tmp_path: str | os.PathLike) -> Iterator[KeystoneServer]:
    """Start a private Keystone under ``tmp_path``; yield it; stop it."""
    venv = keystone_venv()
    work = Path(tmp_path)
    work.mkdir(parents=True, exist_ok=True)
    source = template(venv)
    shutil.copy2(source / "keystone.sqlite", work / "keystone.sqlite")
    for name in KEY_DIRS:
        shutil.copytree(source / name, work / name, dirs_exist_ok=True)
    write_config(work)
    server = KeystoneServer(work, venv)
    server.start()
    try:
        try:
            server.move_endpoints()
        except (KeystoneError, OSError) as exc:
            raise RuntimeError(f"Keystone at {server.url} not usable: {exc}\n"
                               f"{server.log_tail()}") from None
        yield server
    finally:
        server.stop()
