"""Tools of the chaos suite: a Prometheus played from an OpenMetrics file
(with latency and fault hooks), the daemon's worker processes, restarts of
the real services, bounded waits.

Everything listens on and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import datetime
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import uuid
from collections import defaultdict
from pathlib import Path

import psutil

from tests import daemon, datagen

UTC = datetime.timezone.utc


# --------------------------------------------------------------------------
# A Prometheus answering from an OpenMetrics file
# --------------------------------------------------------------------------

_SELECTOR = re.compile(r'(\w+)\{project_id="((?:[^"\\]|\\.)*)"\}\[(\d+)s\]')


def _make_conf(**groups):
    from oslo_config import cfg

    import cloudkitty_proc.conf as ckconf

    conf = cfg.ConfigOpts()
    ckconf.register_opts(conf)
    conf([], project="cloudkitty-proc", default_config_files=[])
    for group, options in groups.items():
        for name, value in options.items():
            conf.set_override(name, value, group)
    return conf


class Query:
    """One instant query as the fake server understood it."""

    __slots__ = ("metric", "scope", "begin", "end", "attempt")

    def __init__(self, metric: str, scope: str, begin: datetime.datetime,
                 end: datetime.datetime, attempt: int) -> None:
        self.metric = metric
        self.scope = scope
        self.begin = begin
        self.end = end
        self.attempt = attempt  # 1 for the first request of this query

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.scope, self.begin.isoformat(), self.metric)


class FilePrometheus:
    """``/api/v1/query`` answered with what the file collector computes for
    the same samples (so the export can be checked with datagen), plus:

    * ``delay``: seconds every query takes (a slow backend);
    * ``fault(query) -> action``: ``None`` (answer normally),
      ``("reply", status, body)``, ``("sleep", seconds)`` (then answer),
      ``("hold", event)`` (answer once the event is set) or ``("close",)``
      (hang up without a reply).

    ``requests[key]`` lists the arrival times (monotonic) of every request
    of one query (scope, period begin, metric name).
    """

    def __init__(self, om_path: Path, metrics_yml: Path, *, delay: float = 0.0,
                 fault=None) -> None:
        from cloudkitty_proc.collectors.file import FileCollector
        from cloudkitty_proc.metrics_conf import PROMQL_EXTRA_ARGS, load_metrics_conf

        mconf = load_metrics_conf(str(metrics_yml), scope_key="project_id",
                                  extra_args_schema=PROMQL_EXTRA_ARGS)
        self._file = FileCollector(_make_conf(collector_file={"path": str(om_path)}), mconf)
        self._metrics = {m.name: m for m in mconf}
        self.delay = delay
        self.fault = fault
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        self.total = 0
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                parsed = urllib.parse.urlsplit(self.path)
                if parsed.path == "/api/v1/status/buildinfo":
                    return self._send(200, {"status": "success", "data": {"version": "fake"}})
                params = dict(urllib.parse.parse_qsl(parsed.query))
                query = fake._parse(params)
                if query is None:
                    return self._send(400, {"status": "error", "errorType": "bad_data",
                                            "error": f"cannot parse {params!r}"})
                action = fake.fault(query) if fake.fault else None
                if fake.delay:
                    time.sleep(fake.delay)
                if action is not None:
                    if action[0] == "reply":
                        return self._send(action[1], action[2])
                    if action[0] == "sleep":
                        time.sleep(action[1])
                    elif action[0] == "hold":
                        action[1].wait(120)
                    elif action[0] == "close":
                        self.close_connection = True
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        return None
                self._send(200, fake._answer(query))
                return None

            def _send(self, status, body):
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:  # the client timed out and hung up
                    self.close_connection = True

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], OSError):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        daemon=True, name="file-prometheus")

    def _parse(self, params: dict) -> Query | None:
        m = _SELECTOR.search(params.get("query", ""))
        if m is None or "time" not in params or m.group(1) not in self._metrics:
            return None
        end = datetime.datetime.fromisoformat(params["time"].replace("Z", "+00:00"))
        begin = end - datetime.timedelta(seconds=int(m.group(3)))
        scope = m.group(2).replace('\\"', '"').replace("\\\\", "\\")
        with self.lock:
            key = (scope, begin.isoformat(), m.group(1))
            self.requests[key].append(time.monotonic())
            self.total += 1
            attempt = len(self.requests[key])
        return Query(m.group(1), scope, begin, end, attempt)

    def _answer(self, query: Query) -> dict:
        metric = self._metrics[query.metric]
        series = self._file.fetch(metric, query.scope, query.begin, query.end)
        ts = query.end.timestamp()
        return {"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": dict(labels), "value": [ts, value]} for labels, value in series]}}

    def __enter__(self) -> FilePrometheus:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def ini(*parts: str) -> str:
    """Config file fragments, each dedented on its own, joined."""
    return "\n".join(textwrap.dedent(p) for p in parts)


def prometheus_collector_conf(url: str, *, timeout: float = 30, retries: int = 3,
                              max_backoff: float = 1.0) -> str:
    return f"""
    [collector_prometheus]
    prometheus_url = {url}
    timeout = {timeout}
    retries = {retries}
    max_backoff = {max_backoff}
    """


# --------------------------------------------------------------------------
# Daemons and their workers
# --------------------------------------------------------------------------

def redis_coordination(redis_url: str, lock_timeout: int) -> str:
    """A redis tooz URL with a namespace of its own (stale keys of another
    test never block this one)."""
    ns = "ckp-chaos-" + uuid.uuid4().hex[:8]
    return f"{redis_url}?lock_timeout={lock_timeout}&namespace={ns}"


def prepare(tmp_path: Path, db_url: str, ds: datagen.Dataset, *, name: str = "ckp.conf",
            workers: int = 2, host: str = "testhost", extra: str = "",
            collector: str = "file", transport_url: str | None = None,
            rpc_topic: str | None = None, begin: str | None = None, end: str | None = None,
            scopes: list[str] | None = None) -> Path:
    """The usage file, metrics.yml and a config file in ``tmp_path``."""
    om = tmp_path / "usage.om"
    if not om.exists():
        om.write_text(ds.openmetrics)
    return daemon.write_config(
        tmp_path, db_url=db_url, scopes=scopes or ds.scopes,
        begin=begin or ds.begin.isoformat(), end=end or ds.end.isoformat(),
        metrics_yml=datagen.METRICS_YML, om_path=om, workers=workers, collector=collector,
        extra=extra, name=name, host=host, transport_url=transport_url,
        rpc_topic=rpc_topic)


workers_of = daemon.workers_of


def wait_workers(master_pid: int, count: int, timeout: float = 60) -> list[psutil.Process]:
    return daemon.wait_until(lambda: (w := workers_of(master_pid)) and len(w) >= count and w,
                             timeout=timeout, what=f"{count} workers of {master_pid}")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a daemon started by a test and every process under it (a
    cleanup after a failed assertion)."""
    try:
        parent = psutil.Process(proc.pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGCONT)
            p.kill()
        except psutil.Error:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def state_of(conf: Path) -> dict[str, dict]:
    return {s["scope_id"]: s for s in daemon.status(conf)["scopes"]}


# --------------------------------------------------------------------------
# The real services: restarts, and a guard that leaves them running
# --------------------------------------------------------------------------

def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def wait_port(port: int, up: bool, timeout: float) -> None:
    daemon.wait_until(lambda: port_open(port) == up, timeout=timeout, interval=0.2,
                      what=f"port {port} {'open' if up else 'closed'}")


def _run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _pg_version() -> str:
    return sorted(os.listdir("/etc/postgresql"))[0]


def start_redis() -> None:
    _run("redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
         "--save", "", "--appendonly", "no")
    wait_port(6379, True, 30)


def restart_redis() -> float:
    """``redis-cli shutdown nosave`` then a new redis-server (every key,
    hence every tooz lock, is lost). Returns the seconds it took."""
    t0 = time.monotonic()
    _run("redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave", timeout=30)
    wait_port(6379, False, 30)
    start_redis()
    return time.monotonic() - t0


def start_postgres() -> None:
    _run("pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", "start")
    wait_port(5432, True, 60)


def restart_postgres() -> float:
    t0 = time.monotonic()
    proc = _run("pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main",
                "restart")
    if proc.returncode != 0:
        raise AssertionError(f"PostgreSQL restart failed: {proc.stdout}{proc.stderr}")
    wait_port(5432, True, 60)
    return time.monotonic() - t0


def start_rabbitmq() -> None:
    if _run("rabbitmqctl", "start_app", timeout=180).returncode != 0:
        subprocess.Popen(["rabbitmq-server", "-detached"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(5672, True, 120)


def restart_rabbitmq() -> float:
    t0 = time.monotonic()
    stop = _run("rabbitmqctl", "stop_app", timeout=180)
    if stop.returncode != 0:
        raise AssertionError(f"rabbitmqctl stop_app failed: {stop.stdout}{stop.stderr}")
    start_rabbitmq()
    return time.monotonic() - t0


def ensure_services() -> list[str]:
    """Start whichever of PostgreSQL, Redis and RabbitMQ is down (they
    were up when the suite started: other tests and CI need them)."""
    started = []
    if not port_open(5432) and shutil.which("pg_ctlcluster"):
        start_postgres()
        started.append("postgresql")
    if not port_open(6379) and shutil.which("redis-server"):
        start_redis()
        started.append("redis")
    if not port_open(5672) and shutil.which("rabbitmqctl"):
        start_rabbitmq()
        started.append("rabbitmq")
    return started


_RPC_STATUS = """
import json, sys
from cloudkitty_proc import messaging
from cloudkitty_proc.cli import common
messaging.register_opts(common.CONF)
common.parse_args(["--config-file", sys.argv[1]], "rpc-status")
print(json.dumps(messaging.call(common.CONF, "status", timeout=float(sys.argv[2]))))
"""


def rpc_status(conf: Path, timeout: float = 15) -> dict | None:
    """A worker's reply to the ``status`` RPC call, None when none answered."""
    proc = subprocess.run([sys.executable, "-c", _RPC_STATUS, str(conf), str(timeout)],
                          capture_output=True, text=True, timeout=timeout + 30,
                          env=daemon._env(), cwd=daemon.REPO)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])
