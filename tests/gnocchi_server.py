"""A real Gnocchi 4.7.1 on loopback, for the gnocchi collector and fetcher tests.

Usage (module-scoped: a start costs a few seconds)::

    from tests.gnocchi_server import running_gnocchi

    @pytest.fixture(scope="module")
    def gnocchi(tmp_path_factory):
        with running_gnocchi(tmp_path_factory.mktemp("gnocchi")) as server:
            yield server

    server.create_resource_type("instance", {"flavor_name": {"type": "string",
                                                              "required": False}})
    server.create_resource("instance", "vm-1", project_id="p1",
                           metrics={"cpu": "ck-hourly"}, flavor_name="m1.small")
    server.push_measures({"vm-1": {"cpu": [(ts, 1.0), ...]}})
    server.wait_processed()

What one server owns, all removed or stopped at the end (by PID):

* the venv of tools/gnocchi_venv.py (cached, shared; built here if missing,
  ``.ci/run`` builds it up front);
* a private PostgreSQL database on the shared server (tests.conftest's
  ``_make_pg_db``: created here, dropped at the end), Gnocchi's indexer,
  schema and default archive policies by ``gnocchi-upgrade``;
* ``<workdir>/gnocchi.conf``, file storage (incoming and aggregates) and
  file:// coordination under ``<workdir>``;
* the API (tools/gnocchi_api_server.py: wsgiref around Gnocchi's WSGI app,
  ``[api] auth_mode = basic``, user ``admin``) on a free port, and
  ``gnocchi-metricd`` (one worker, polling every second), each in a session
  of its own; logs in ``<workdir>/api.log`` and ``metricd.log``.

Gnocchi refuses (404 "Metric ... does not exist") an aggregates query with
``use_history`` for a period that ends before a resource's first revision,
i.e. before the resource was created (gnocchixyz/gnocchi#1392): test data
must be timestamped around now, not in the past (:func:`hour_floor`).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import importlib.util
import json as jsonlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import _make_pg_db, service_unavailable

ROOT = Path(__file__).resolve().parents[1]
API_SERVER = ROOT / "tools" / "gnocchi_api_server.py"
START_TIMEOUT = 60.0
PROCESS_TIMEOUT = 120.0
HOST = "127.0.0.1"
USER = "admin"
UTC = datetime.timezone.utc


def _load_venv_tool():
    spec = importlib.util.spec_from_file_location("gnocchi_venv",
                                                  ROOT / "tools" / "gnocchi_venv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


venv_tool = _load_venv_tool()


def gnocchi_venv() -> Path:
    """Gnocchi's venv, built here if missing; its failure is a missing
    service (a skip, or a failure under CLOUDKITTY_PROC_REQUIRE_SERVICES=1)."""
    try:
        return venv_tool.ensure_venv(log=None)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        service_unavailable("Gnocchi venv", str(exc).splitlines()[0])


def hour_floor(when: datetime.datetime | None = None) -> datetime.datetime:
    """The start of the UTC hour holding ``when`` (now by default)."""
    when = when or datetime.datetime.now(UTC)
    return when.replace(minute=0, second=0, microsecond=0)


def current_hour(margin: float = 90.0) -> datetime.datetime:
    """The start of the current UTC hour, after waiting for the next one
    when less than ``margin`` seconds are left: test data created "now"
    then lands in the hour returned."""
    now = datetime.datetime.now(UTC)
    left = (hour_floor(now) + datetime.timedelta(hours=1) - now).total_seconds()
    if left < margin:
        time.sleep(left + 0.5)
    return hour_floor()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def child_env() -> dict[str, str]:
    """Gnocchi's environment: UTC, none of our PYTHONPATH, no OS_* credentials."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OS_") and k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TZ"] = "UTC"
    return env


def render_conf(workdir: Path, indexer_url: str) -> str:
    return f"""[DEFAULT]
debug = false
coordination_url = file://{workdir}/locks
[indexer]
url = {indexer_url}
[storage]
driver = file
file_basepath = {workdir}/data
[incoming]
driver = file
file_basepath = {workdir}/incoming
[api]
auth_mode = basic
max_limit = 1000
[metricd]
workers = 1
metric_processing_delay = 1
metric_reporting_delay = 600
metric_cleanup_delay = 600
"""


class GnocchiError(RuntimeError):
    """A request to the test server did not answer as expected."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class GnocchiServer:
    """A running Gnocchi (see the module docstring) and helpers to fill it."""

    url: str
    venv: Path
    workdir: Path
    conf_path: Path
    indexer_url: str
    api: subprocess.Popen | None = None
    metricd: subprocess.Popen | None = None

    # -- HTTP ---------------------------------------------------------------

    def call(self, method: str, path: str, json: Any = None,
             params: Mapping[str, Any] | None = None, user: str = USER,
             timeout: float = 60) -> Any:
        """One request as ``user`` (basic auth, no password); the decoded JSON
        reply (None for an empty body). GnocchiError on a status >= 400."""
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        data = jsonlib.dumps(json).encode() if json is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization",
                       "Basic " + base64.b64encode(f"{user}:".encode()).decode())
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            raise GnocchiError(exc.code, f"{method} {path}: HTTP {exc.code}: "
                               f"{exc.read().decode(errors='replace')[:500]}") from None
        return jsonlib.loads(body) if body else None

    # -- fixtures -----------------------------------------------------------

    def create_archive_policy(self, name: str, definition: list[dict],
                              methods: Iterable[str] = ("mean", "max", "min", "sum", "last",
                                                        "count", "rate:max")) -> dict:
        """An archive policy (``definition``: [{"granularity": "1h",
        "timespan": "30 days"}, ...]); an existing one is kept."""
        try:
            return self.call("POST", "/v1/archive_policy",
                             {"name": name, "back_window": 0, "definition": definition,
                              "aggregation_methods": list(methods)})
        except GnocchiError as exc:
            if exc.status != 409:
                raise
            return self.call("GET", f"/v1/archive_policy/{name}")

    def create_resource_type(self, name: str, attributes: Mapping[str, dict]) -> dict:
        """A resource type with ``attributes`` ({"flavor_name": {"type":
        "string", "required": False}}); an existing one is kept."""
        try:
            return self.call("POST", "/v1/resource_type",
                             {"name": name, "attributes": dict(attributes)})
        except GnocchiError as exc:
            if exc.status != 409:
                raise
            return self.call("GET", f"/v1/resource_type/{name}")

    def create_resource(self, resource_type: str, resource_id: str, *,
                        project_id: str | None, metrics: Mapping[str, str] = (),
                        **attributes: Any) -> dict:
        """A resource with one metric per ``metrics`` item (metric name ->
        archive policy name); its id in replies is Gnocchi's UUID (uuid5 of a
        non-UUID ``resource_id``, kept as ``original_resource_id``)."""
        body = {"id": resource_id, "project_id": project_id, "user_id": "u-test",
                "metrics": {name: {"archive_policy_name": policy}
                            for name, policy in dict(metrics).items()},
                **attributes}
        return self.call("POST", f"/v1/resource/{resource_type}", body)

    def update_resource(self, resource_type: str, resource_id: str, **attributes: Any) -> dict:
        """PATCH attributes: a new revision of the resource starts now."""
        return self.call("PATCH", f"/v1/resource/{resource_type}/{resource_id}", attributes)

    def push_measures(self, measures: Mapping[str, Mapping[str, Iterable[tuple]]]) -> None:
        """{resource id: {metric name: [(datetime, value), ...]}} in one batch."""
        body = {rid: {metric: [{"timestamp": ts.isoformat(), "value": value}
                               for ts, value in points]
                      for metric, points in by_metric.items()}
                for rid, by_metric in measures.items()}
        self.call("POST", "/v1/batch/resources/metrics/measures", body)

    def wait_processed(self, timeout: float = PROCESS_TIMEOUT) -> float:
        """Wait until metricd has aggregated every measure pushed (the status
        reports no measure left to process); return the seconds waited."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            status = self.call("GET", "/v1/status", params={"details": "false"})
            left = status["storage"]["summary"]["measures"]
            if left == 0:
                return time.monotonic() - started
            if self.metricd is not None and self.metricd.poll() is not None:
                raise RuntimeError(f"gnocchi-metricd exited with {self.metricd.returncode}:\n"
                                   f"{_tail(self.workdir / 'metricd.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"metricd left {left} measures unprocessed after "
                                   f"{timeout:.0f} s:\n{_tail(self.workdir / 'metricd.log')}")
            time.sleep(0.3)

    def aggregates(self, operations: Any, *, resource_type: str, search: Any,
                   groupby: Iterable[str], start: datetime.datetime,
                   stop: datetime.datetime, granularity: int | None = 3600,
                   use_history: bool = True) -> Any:
        params = {"start": start.isoformat(), "stop": stop.isoformat(),
                  "groupby": list(groupby), "use_history": str(use_history).lower()}
        if granularity:
            params["granularity"] = granularity
        return self.call("POST", "/v1/aggregates",
                         {"operations": operations, "resource_type": resource_type,
                          "search": search}, params=params)

    def manage(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run a Gnocchi console script of the venv with this server's config."""
        proc = subprocess.run([str(venv_tool.bin_path(args[0], self.venv)), "--config-file",
                               str(self.conf_path), *args[1:]],
                              capture_output=True, text=True, timeout=timeout,
                              env=child_env(), cwd=self.workdir)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return proc

    def python(self, script: str, *args: str, timeout: float = 600) -> str:
        """Run ``script`` (Python source) with the venv's python and this
        server's config file as its first argument; its standard output."""
        proc = subprocess.run([str(venv_tool.bin_path("python", self.venv)), "-c", script,
                               str(self.conf_path), *args],
                              capture_output=True, text=True, timeout=timeout,
                              env=child_env(), cwd=self.workdir)
        if proc.returncode != 0:
            raise RuntimeError(f"gnocchi venv python failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return proc.stdout


# -- processes ----------------------------------------------------------------

def _start(cmd: list[str], log_path: Path, cwd: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env=child_env(), start_new_session=True)
    finally:
        log.close()


def _stop(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """SIGTERM to the child's session (metricd forks its workers), then
    SIGKILL after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def _wait_api(server: GnocchiServer, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.api.poll() is not None:
            raise RuntimeError(f"the Gnocchi API exited with {server.api.returncode} at "
                               f"start-up:\n{_tail(log_path)}")
        if server.metricd is not None and server.metricd.poll() is not None:
            raise RuntimeError(f"gnocchi-metricd exited with {server.metricd.returncode} at "
                               f"start-up:\n{_tail(server.workdir / 'metricd.log')}")
        try:
            server.call("GET", "/v1/archive_policy", timeout=5)
            if server.metricd is not None:
                # 500 (tooz GroupNotCreated) until metricd has joined its group
                server.call("GET", "/v1/status", params={"details": "false"}, timeout=5)
            return
        except (OSError, GnocchiError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"the Gnocchi API did not answer within {START_TIMEOUT:.0f} s "
                       f"({last}):\n{_tail(log_path)}")


@contextlib.contextmanager
def running_gnocchi(workdir: str | os.PathLike, *, metricd: bool = True,
                    timings: dict | None = None) -> Iterator[GnocchiServer]:
    """Start Gnocchi (module docstring) in ``workdir``; yield the server.

    ``timings`` (if given) receives the seconds spent on ``venv``,
    ``upgrade`` and ``start`` (API answering, metricd started)."""
    workdir = Path(workdir)
    timings = {} if timings is None else timings
    t0 = time.monotonic()
    venv = gnocchi_venv()
    timings["venv"] = time.monotonic() - t0
    indexer_url, drop = _make_pg_db()
    try:
        conf_path = workdir / "gnocchi.conf"
        for sub in ("locks", "data", "incoming"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        conf_path.write_text(render_conf(workdir, indexer_url))
        port = _free_port()
        server = GnocchiServer(url=f"http://{HOST}:{port}", venv=venv, workdir=workdir,
                               conf_path=conf_path, indexer_url=indexer_url)
        t1 = time.monotonic()
        server.manage("gnocchi-upgrade", "--sacks-number", "8")
        timings["upgrade"] = time.monotonic() - t1
        t2 = time.monotonic()
        server.api = _start([str(venv_tool.bin_path("python", venv)), str(API_SERVER),
                             str(port), "--config-file", str(conf_path)],
                            workdir / "api.log", workdir)
        try:
            if metricd:
                server.metricd = _start(
                    [str(venv_tool.bin_path("gnocchi-metricd", venv)), "--config-file",
                     str(conf_path)], workdir / "metricd.log", workdir)
            _wait_api(server, workdir / "api.log")
            timings["start"] = time.monotonic() - t2
            yield server
        finally:
            _stop(server.metricd)
            _stop(server.api)
    finally:
        drop()


def _paste_ini(venv: Path) -> Path:
    [path] = venv.glob("lib/python3*/site-packages/gnocchi/rest/api-paste.ini")
    return path


@contextlib.contextmanager
def keystone_api(server: GnocchiServer, keystone: Any, *, user: str = "admin",
                 password: str | None = None, project: str = "admin") -> Iterator[str]:
    """A second Gnocchi API on ``server``'s indexer and storage with ``[api]
    auth_mode = keystone``: Gnocchi's own keystonemiddleware (auth_token)
    checks each request's X-Auth-Token against ``keystone``
    (tests/keystone_server.py), as the service ``user`` (the admin by
    default) of ``project``. ``server``'s own API stays in basic mode for
    the test helpers. Yields the API's URL; stops it at the end.

    keystonemiddleware reads its ``[keystone_authtoken]`` from the file the
    paste pipeline names (``oslo_config_file``, a copy of Gnocchi's
    api-paste.ini with it added), not from Gnocchi's configuration object."""
    if password is None:
        from tests.keystone_server import ADMIN_PASSWORD
        password = ADMIN_PASSWORD
    overlay = server.workdir / "gnocchi-keystone.conf"
    paste = server.workdir / "api-paste-keystone.ini"
    paste.write_text(_paste_ini(server.venv).read_text().replace(
        "oslo_config_project = gnocchi\n\n[app:healthcheck]",
        f"oslo_config_project = gnocchi\noslo_config_file = {overlay}\n\n[app:healthcheck]", 1))
    if f"oslo_config_file = {overlay}" not in paste.read_text():
        raise RuntimeError(f"{paste}: Gnocchi's api-paste.ini changed: cannot point "
                           "keystonemiddleware at its configuration")
    overlay.write_text(f"""[api]
auth_mode = keystone
paste_config = {paste}
[keystone_authtoken]
www_authenticate_uri = {keystone.auth_url}
auth_url = {keystone.auth_url}
auth_type = password
username = {user}
password = {password}
user_domain_id = default
project_name = {project}
project_domain_id = default
# every request's token checked with Keystone (no cache): a revoked token is
# refused at once, as the re-authentication test needs
token_cache_time = -1
""")
    port = _free_port()
    api = GnocchiServer(url=f"http://{HOST}:{port}", venv=server.venv, workdir=server.workdir,
                        conf_path=server.conf_path, indexer_url=server.indexer_url)
    log_path = server.workdir / "api-keystone.log"
    api.api = _start([str(venv_tool.bin_path("python", server.venv)), str(API_SERVER),
                      str(port), "--config-file", str(server.conf_path), "--config-file",
                      str(overlay)], log_path, server.workdir)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:   # without a token: 401 once keystonemiddleware answers
            if api.api.poll() is not None:
                raise RuntimeError(f"the keystone-mode Gnocchi API exited with "
                                   f"{api.api.returncode}:\n{_tail(log_path)}")
            try:
                urllib.request.urlopen(api.url + "/v1/resource_type", timeout=5).close()
                raise RuntimeError(f"the keystone-mode Gnocchi API at {api.url} answers "
                                   "without a token")
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    break
                last = f"HTTP {exc.code}"
            except OSError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the keystone-mode Gnocchi API did not answer ({last}):"
                                   f"\n{_tail(log_path)}")
            time.sleep(0.2)
        yield api.url
    finally:
        _stop(api.api)


# -- CloudKitty's own Gnocchi plugins, the reference ------------------------------

CK_DRIVER = ROOT / "tools" / "ck_gnocchi_driver.py"


def cloudkitty_python() -> Path:
    """The python of CloudKitty 25.0.0's venv (tools/cloudkitty_venv.py),
    built here if missing; its failure is a missing service."""
    try:
        venv = venv_tool._ck.ensure_venv(log=None)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        service_unavailable("CloudKitty venv", str(exc).splitlines()[0])
    return venv_tool._ck.bin_path("python", venv)


def run_cloudkitty_driver(spec: Mapping[str, Any], workdir: Path,
                          timeout: float = 300) -> dict:
    """What CloudKitty's GnocchiCollector (and GnocchiFetcher) return for
    ``spec`` (tools/ck_gnocchi_driver.py, run in CloudKitty's venv)."""
    path = workdir / "ck_spec.json"
    path.write_text(jsonlib.dumps(spec))
    proc = subprocess.run([str(cloudkitty_python()), str(CK_DRIVER), str(path)],
                          capture_output=True, text=True, timeout=timeout, env=child_env(),
                          cwd=workdir)
    if proc.returncode != 0:
        raise RuntimeError(f"ck_gnocchi_driver.py failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return jsonlib.loads(proc.stdout)


def bulk_generic_resources(server: GnocchiServer, project_ids: list[str | None]) -> float:
    """One ``generic`` resource per item of ``project_ids`` (None: a null
    project_id), written straight into the indexer's ``resource`` table in
    one INSERT (as Gnocchi writes a new generic resource: id, creator,
    started_at = revision_start = now, original_resource_id = the id; no
    history row). Through the API 20,000 resources take about 3 minutes
    (110/s with 4 threads), through Gnocchi's indexer API about 70 s; this
    takes a second. Returns the seconds it took."""
    import uuid

    import sqlalchemy as sa

    started = time.monotonic()
    ids = [str(uuid.uuid4()) for _ in project_ids]
    engine = sa.create_engine(server.indexer_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO resource (id, creator, started_at, revision_start, ended_at, "
                "user_id, project_id, original_resource_id, type) "
                "SELECT i::uuid, 'admin', now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC', "
                "NULL, 'u-bulk', p, i, 'generic' "
                "FROM unnest(%(ids)s::text[], %(projects)s::text[]) AS t(i, p)",
                {"ids": ids, "projects": list(project_ids)})
    finally:
        engine.dispose()
    return time.monotonic() - started


def backdate_resources(server: GnocchiServer, when: datetime.datetime) -> None:
    """Make every resource (of one revision) look created at ``when``:
    ``started_at`` and ``revision_start`` set in the indexer. Gnocchi's
    history query (``use_history``) then serves periods from ``when`` on,
    so that tests can rate past hours, as a daemon does."""
    import sqlalchemy as sa

    naive = when.astimezone(UTC).replace(tzinfo=None)
    engine = sa.create_engine(server.indexer_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE resource SET started_at = %(t)s, revision_start = %(t)s",
                                 {"t": naive})
    finally:
        engine.dispose()


def plugin_env(workdir: Path) -> dict[str, str]:
    """The environment of a cloudkitty-proc subprocess that must find the
    ``gnocchi`` collector and fetcher entry points. They are in setup.cfg;
    until the package is installed again (``pip install -e .``) its
    installed metadata lacks them: then a distribution holding just these
    entry points is written under ``workdir`` and put on PYTHONPATH."""
    from importlib import metadata

    have = {(ep.group, ep.name) for group in ("cloudkitty_proc.collectors",
                                              "cloudkitty_proc.fetchers")
            for ep in metadata.entry_points(group=group)}
    env = {"PYTHONPATH": str(ROOT)}
    if {("cloudkitty_proc.collectors", "gnocchi"), ("cloudkitty_proc.fetchers", "gnocchi")} \
            <= have:
        return env
    dist = workdir / "site" / "cloudkitty_proc_gnocchi_entry_points-0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\n"
                                   "Name: cloudkitty-proc-gnocchi-entry-points\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[cloudkitty_proc.collectors]\n"
        "gnocchi = cloudkitty_proc.collectors.gnocchi:GnocchiCollector\n"
        "[cloudkitty_proc.fetchers]\n"
        "gnocchi = cloudkitty_proc.fetchers.gnocchi:GnocchiFetcher\n")
    env["PYTHONPATH"] += os.pathsep + str(dist.parent)
    return env
