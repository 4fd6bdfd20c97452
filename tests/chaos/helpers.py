"""Tools of the chaos suite: config fragments, the daemon's worker
processes, restarts of the real services, bounded waits. The Prometheus the
daemons query is the tests' fake, ``tests.fakes.prometheus.DatasetPrometheus``
(answers from the dataset, with latency and fault hooks).

Everything listens on and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil

from tests import daemon, datagen


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
