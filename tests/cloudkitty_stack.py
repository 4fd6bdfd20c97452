"""A real CloudKitty 25.0.0 deployment on loopback, for the drop-in tests.

The reference the drop-in mode (issue 18) is compared with: CloudKitty's own
API, schema, CLI and processor, each a separate process run from the venv of
tools/cloudkitty_venv.py (CloudKitty is never imported here: its oslo.config
options clash with cloudkitty_proc's). See ../shared/CLOUDKITTY-DROPIN.md §5.2.

Usage::

    from tests.cloudkitty_stack import cloudkitty_stack, cloudkitty_venv  # noqa: F401 (fixture)

    def test_x(cloudkitty_venv, tmp_path):
        with cloudkitty_stack(tmp_path, influx_host=h, influx_port=p, influx_database="ck",
                              prometheus_url=url, metrics_yml=text,
                              scopes=["p1"]) as stack:
            stack.call("PUT", "/v2/rating/modules/hashmap", json={"enabled": True})
            stack.sql("SELECT * FROM modules_state")
            stack.rating("summary", "get")         # openstack rating ... (cloudkitty-noauth)
            stack.start_processor()                # the real cloudkitty-processor

What one stack owns, all removed or stopped at the end (by PID, by name):

* a MariaDB database and user ``ckstack_<hex>`` (127.0.0.1:3306, created with
  the admin URL of tests.conftest.MYSQL_URL), schema by ``cloudkitty-dbsync
  upgrade``; ``cloudkitty-storage-init`` run once;
* a RabbitMQ vhost and user of the same name (``rabbitmqctl``);
* ``<workdir>/cloudkitty.conf`` (noauth, storage v2 influxdb on the caller's
  server, collector prometheus, fetcher source or prometheus, file://
  coordination, policy file, api_paste.ini), ``metrics.yml``;
* the API (tools/cloudkitty_api_server.py) on a free port, and optionally
  ``cloudkitty-processor``; logs in ``<workdir>/api.log``, ``processor.log``.

The InfluxDB server belongs to the caller (the stack only runs ``CREATE
DATABASE``, idempotent). Every child runs with TZ=UTC: CloudKitty computes
period starts and time tags in local time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json as jsonlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cloudkitty_conf import API_PASTE_INI, POLICY_YAML, build_conf, render_conf
from tests.conftest import MYSQL_URL, _port_open, service_unavailable

ROOT = Path(__file__).resolve().parents[1]
API_SERVER = ROOT / "tools" / "cloudkitty_api_server.py"
START_TIMEOUT = 90.0
HOST = "127.0.0.1"


def _load_venv_tool():
    spec = importlib.util.spec_from_file_location("cloudkitty_venv",
                                                  ROOT / "tools" / "cloudkitty_venv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


venv_tool = _load_venv_tool()


def require_services() -> None:
    """Skip (or fail under CLOUDKITTY_PROC_REQUIRE_SERVICES=1) unless MariaDB,
    RabbitMQ and rabbitmqctl are there."""
    if not _port_open(HOST, 3306):
        service_unavailable("MariaDB", "nothing listens on 127.0.0.1:3306")
    if not _port_open(HOST, 5672):
        service_unavailable("RabbitMQ", "nothing listens on 127.0.0.1:5672")
    if not shutil.which("rabbitmqctl"):
        service_unavailable("rabbitmqctl", "not on PATH (apt-get install rabbitmq-server)")


@pytest.fixture(scope="session")
def cloudkitty_venv() -> Path:
    """CloudKitty 25.0.0's venv, built here if missing (.ci/run builds it
    up front); its failure is a missing service."""
    require_services()
    try:
        return venv_tool.ensure_venv(log=None)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        service_unavailable("CloudKitty venv", str(exc).splitlines()[0])


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
    """The environment of every CloudKitty process: UTC, none of our
    PYTHONPATH, no OS_* credentials."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OS_") and k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TZ"] = "UTC"
    return env


# -- shared services -------------------------------------------------------

def _rabbitmqctl(*args: str, check: bool = True) -> None:
    proc = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")


@contextlib.contextmanager
def rabbit_vhost(name: str, password: str) -> Iterator[str]:
    """A RabbitMQ vhost and user ``name`` with all permissions on it; yield
    the transport URL; delete both afterwards."""
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("add_user", name, password)
        try:
            _rabbitmqctl("set_permissions", "-p", name, name, ".*", ".*", ".*")
            yield f"rabbit://{name}:{password}@{HOST}:5672/{name}"
        finally:
            _rabbitmqctl("delete_user", name, check=False)
    finally:
        _rabbitmqctl("delete_vhost", name, check=False)


@contextlib.contextmanager
def mariadb_database(name: str, password: str) -> Iterator[str]:
    """A MariaDB database and user ``name``@127.0.0.1 owning it; yield the
    SQLAlchemy URL; drop both afterwards."""
    import sqlalchemy as sa
    admin = sa.create_engine(MYSQL_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
            c.exec_driver_sql(f"CREATE USER '{name}'@'{HOST}' IDENTIFIED BY '{password}'")
            c.exec_driver_sql(f"GRANT ALL ON {name}.* TO '{name}'@'{HOST}'")
        yield f"mysql+pymysql://{name}:{password}@{HOST}:3306/{name}?charset=utf8mb4"
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
            c.exec_driver_sql(f"DROP USER IF EXISTS '{name}'@'{HOST}'")
        admin.dispose()


def influx_create_database(host: str, port: int, database: str) -> None:
    """``CREATE DATABASE`` on the caller's InfluxDB 1.x (a no-op if it exists);
    cloudkitty-storage-init only checks the retention policy."""
    data = urllib.parse.urlencode({"q": f'CREATE DATABASE "{database}"'}).encode()
    with urllib.request.urlopen(f"http://{host}:{port}/query", data=data, timeout=30) as resp:
        reply = jsonlib.loads(resp.read())
    errors = [r["error"] for r in reply.get("results", []) if "error" in r]
    if errors:
        raise RuntimeError(f"InfluxDB {host}:{port} CREATE DATABASE {database}: {errors[0]}")


# -- the stack -------------------------------------------------------------

@dataclass
class ApiReply:
    status: int
    body: object          # parsed JSON, or the text when not JSON
    text: str


@dataclass
class CloudKittyStack:
    """A running deployment: where it answers, and helpers to drive it."""

    name: str
    workdir: Path
    venv: Path
    conf_path: Path
    conf: dict[str, dict[str, object]]
    db_url: str
    transport_url: str
    api_url: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    _processor: subprocess.Popen | None = None
    _engine: object = None

    # the venv's executables
    def run_tool(self, tool: str, *args: str, timeout: float = 300) -> str:
        """Run ``<venv>/bin/<tool> --config-file <conf> args``; its stdout,
        RuntimeError with its output on failure."""
        cmd = [str(venv_tool.bin_path(tool, self.venv)), "--config-file", str(self.conf_path),
               *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=child_env(), cwd=self.workdir)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed (exit {proc.returncode}):\n"
                               + "\n".join((proc.stdout + proc.stderr).splitlines()[-30:]))
        return proc.stdout

    def openstack(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``openstack --os-auth-type cloudkitty-noauth --os-endpoint <api> args``
        from the venv (not checked)."""
        cmd = [str(venv_tool.bin_path("openstack", self.venv)),
               "--os-auth-type", "cloudkitty-noauth", "--os-endpoint", self.api_url, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=child_env(), cwd=self.workdir)

    def rating(self, *args: str, json: bool = True):
        """``openstack rating args`` (with ``-f json`` unless json=False): the
        parsed output (or the text); RuntimeError when it fails."""
        full = ["rating", *args, *(["-f", "json"] if json else [])]
        proc = self.openstack(*full)
        if proc.returncode != 0:
            raise RuntimeError(f"openstack {' '.join(full)} failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-1000:]}")
        return jsonlib.loads(proc.stdout) if json else proc.stdout

    # the API over HTTP
    def request(self, method: str, path: str, *, json: object = None,
                params: dict | Sequence[tuple[str, object]] | None = None,
                timeout: float = 60) -> ApiReply:
        """One HTTP call to the API (``path`` like ``/v2/summary``); any status."""
        url = self.api_url + path
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        data = None if json is None else jsonlib.dumps(json).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        text = raw.decode("utf-8", "replace")
        try:
            body = jsonlib.loads(text) if text else None
        except ValueError:
            body = text
        return ApiReply(status, body, text)

    def call(self, method: str, path: str, *, expect: Sequence[int] = (200, 201, 202, 204),
             **kwargs) -> object:
        """``request``, asserting the status; the parsed body."""
        reply = self.request(method, path, **kwargs)
        if reply.status not in expect:
            raise AssertionError(f"{method} {path} -> HTTP {reply.status} (expected "
                                 f"{list(expect)}): {reply.text[:1000]}\n"
                                 f"api.log:\n{_tail(self.workdir / 'api.log', 20)}")
        return reply.body

    # the database, read from our process
    def sql(self, statement: str, **params) -> list[dict]:
        """Rows of one SQL statement on the stack's MariaDB database."""
        import sqlalchemy as sa
        if self._engine is None:
            self._engine = sa.create_engine(self.db_url, pool_pre_ping=True)
        with self._engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(sa.text(statement), params)]

    # the real processor
    @property
    def processor_pid(self) -> int | None:
        return self._processor.pid if self._processor and self._processor.poll() is None else None

    def start_processor(self) -> int:
        """Start ``cloudkitty-processor --config-file <conf>``; its PID."""
        if self.processor_pid:
            raise RuntimeError(f"cloudkitty-processor already runs (pid {self.processor_pid})")
        self._processor = _spawn([str(venv_tool.bin_path("cloudkitty-processor", self.venv)),
                                  "--config-file", str(self.conf_path)],
                                 self.workdir / "processor.log", self.workdir)
        return self._processor.pid

    def stop_processor(self) -> None:
        if self._processor is not None:
            _stop(self._processor)
            self._processor = None

    def processor_log(self, lines: int = 40) -> str:
        return _tail(self.workdir / "processor.log", lines)

    def processor_errors(self) -> list[str]:
        """The ERROR lines the processor logged so far (oslo.log format)."""
        try:
            text = (self.workdir / "processor.log").read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if " ERROR " in line]


def _spawn(cmd: list[str], log_path: Path, cwd: Path) -> subprocess.Popen:
    """Start a child in its own process group (cotyledon's workers included),
    output appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, env=child_env(),
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group this module started (its leader's PID),
    SIGKILL after 15 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)   # leftover workers of the group
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _start_api(stack: CloudKittyStack) -> subprocess.Popen:
    """Serve the API on a free port (retried on a port race); wait until
    ``GET /`` answers 200."""
    log_path = stack.workdir / "api.log"
    python = str(venv_tool.bin_path("python", stack.venv))
    for _attempt in range(3):
        port = _free_port()
        stack.api_url = f"http://{HOST}:{port}"
        proc = _spawn([python, str(API_SERVER), str(port), "--config-file", str(stack.conf_path)],
                      log_path, stack.workdir)
        deadline, last = time.monotonic() + START_TIMEOUT, "no answer yet"
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if stack.request("GET", "/", timeout=5).status == 200:
                    return proc
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        _stop(proc)
        if "Address already in use" not in _tail(log_path, 10):
            raise RuntimeError(f"cloudkitty API at {stack.api_url} did not answer within "
                               f"{START_TIMEOUT:g} s ({last}):\n{_tail(log_path)}")
    raise RuntimeError(f"cloudkitty API: no free port after 3 attempts:\n{_tail(log_path)}")


@contextlib.contextmanager
def cloudkitty_stack(workdir: str | os.PathLike, *, influx_host: str, influx_port: int,
                     influx_database: str, prometheus_url: str, metrics_yml: str,
                     scopes: Sequence[str] | None = None, fetcher_metric: str | None = None,
                     period: int = 3600, wait_periods: int = 2, processor: bool = False,
                     extra_conf: dict[str, dict[str, object]] | None = None,
                     venv: Path | None = None) -> Iterator[CloudKittyStack]:
    """Bring a CloudKitty 25.0.0 deployment up under ``workdir``; yield it.

    ``scopes`` selects the source fetcher with those scope ids;
    ``fetcher_metric`` the prometheus fetcher on that metric (scope
    attribute ``project_id``). ``metrics_yml`` is the text of metrics.yml.
    ``processor`` starts cloudkitty-processor once the API answers.
    """
    require_services()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    venv = venv or venv_tool.ensure_venv(log=None)
    timings["venv"] = time.monotonic() - t0
    name = "ckstack_" + uuid.uuid4().hex[:10]
    password = uuid.uuid4().hex
    with contextlib.ExitStack() as stack_cm:
        t = time.monotonic()
        db_url = stack_cm.enter_context(mariadb_database(name, password))
        transport_url = stack_cm.enter_context(rabbit_vhost(name, password))
        influx_create_database(influx_host, influx_port, influx_database)
        timings["services"] = time.monotonic() - t
        conf = build_conf(work, name=name, db_url=db_url, transport_url=transport_url,
                          influx_host=influx_host, influx_port=influx_port,
                          influx_database=influx_database, prometheus_url=prometheus_url,
                          scopes=scopes, fetcher_metric=fetcher_metric, period=period,
                          wait_periods=wait_periods, extra=extra_conf)
        (work / "api_paste.ini").write_text(API_PASTE_INI)
        (work / "policy.yaml").write_text(POLICY_YAML)
        (work / "metrics.yml").write_text(metrics_yml)
        (work / "locks").mkdir(exist_ok=True)
        conf_path = work / "cloudkitty.conf"
        conf_path.write_text(render_conf(conf))
        stack = CloudKittyStack(name=name, workdir=work, venv=venv, conf_path=conf_path,
                                conf=conf, db_url=db_url, transport_url=transport_url,
                                timings=timings)
        stack_cm.callback(stack.stop_processor)
        t = time.monotonic()
        stack.run_tool("cloudkitty-dbsync", "upgrade")
        stack.run_tool("cloudkitty-storage-init")
        timings["schema"] = time.monotonic() - t
        t = time.monotonic()
        stack_cm.callback(_stop, _start_api(stack))
        timings["api"] = time.monotonic() - t
        if processor:
            stack.start_processor()
        timings["total"] = time.monotonic() - t0

        @stack_cm.callback
        def _dispose():
            if stack._engine is not None:
                stack._engine.dispose()
        yield stack
