"""A private InfluxDB 1.x server (Debian package ``influxdb``) for the tests.

Usage: the fixtures of tests/conftest.py, ``influxdb_server`` (one server
for the session) and ``influxdb_database`` (a fresh database on it per
test, dropped afterwards); or directly::

    from tests.influxdb_server import running_influxdb

    with running_influxdb(tmp_dir) as server:
        server.create_database("ck")
        server.query("SELECT * FROM dataframes", db="ck")

What it does:

1. writes ``influxdb.conf`` in the directory (as CLOUDKITTY-DROPIN §5.1):
   reporting disabled, the RPC ``bind-address`` and the HTTP
   ``bind-address`` on free 127.0.0.1 ports, meta, data and WAL
   directories inside it, no ``_internal`` monitor database, quiet logs;
2. starts ``influxd -config <file>`` and waits (at most 60 s) until
   ``/ping`` answers 204 (a start racing another process for a port is
   retried on new ports);
3. on exit: SIGTERM to the PID it started, SIGKILL after 10 s.

``influxd`` missing -> the test is skipped (or fails when
CLOUDKITTY_PROC_REQUIRE_SERVICES=1), via tests.conftest.need_binary. Any
other failure raises RuntimeError with the server's log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import need_binary

START_TIMEOUT = 60.0
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class InfluxServer:
    """A running influxd: where it listens, and InfluxQL through its HTTP
    API (urllib, independent of the code under test)."""

    def __init__(self, port: int, rpc_port: int, pid: int) -> None:
        self.host = HOST
        self.port = port
        self.rpc_port = rpc_port
        self.pid = pid
        self.url = f"http://{HOST}:{port}"

    def query(self, statement: str, db: str | None = None, *, post: bool = False) -> list[dict]:
        """The ``results`` of one InfluxQL statement (times in ns); raises
        RuntimeError on an error reply."""
        params = {"q": statement, "epoch": "ns"}
        if db:
            params["db"] = db
        data = None
        if post:
            data = urllib.parse.urlencode(params).encode()
            url = self.url + "/query"
        else:
            url = self.url + "/query?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=data),
                                        timeout=30) as resp:
                reply = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"InfluxDB {statement!r}: HTTP {exc.code}: "
                               f"{exc.read()[:300]!r}") from None
        for result in reply.get("results", []):
            if "error" in result:
                raise RuntimeError(f"InfluxDB {statement!r}: {result['error']}")
        return reply["results"]

    def points(self, statement: str, db: str) -> list[dict]:
        """Every row of every series of the statement, as dicts (column ->
        value, the series' tags included)."""
        out = []
        for result in self.query(statement, db):
            for series in result.get("series", []):
                tags = series.get("tags") or {}
                for values in series.get("values", []):
                    out.append({**tags, **dict(zip(series["columns"], values))})
        return out

    def create_database(self, name: str | None = None) -> str:
        name = name or "ckp_" + uuid.uuid4().hex[:12]
        self.query(f'CREATE DATABASE "{name}"', post=True)
        return name

    def drop_database(self, name: str) -> None:
        self.query(f'DROP DATABASE "{name}"', post=True)

    def databases(self) -> set[str]:
        [result] = self.query("SHOW DATABASES")
        return {row[0] for s in result.get("series", []) for row in s.get("values", [])}


def write_config(work: Path, port: int, rpc_port: int) -> Path:
    config = work / "influxdb.conf"
    config.write_text(f"""\
reporting-disabled = true
bind-address = "{HOST}:{rpc_port}"

[meta]
  dir = "{work}/meta"
  logging-enabled = false

[data]
  dir = "{work}/data"
  wal-dir = "{work}/wal"
  query-log-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "{HOST}:{port}"
  log-enabled = false

[logging]
  level = "warn"

[continuous_queries]
  enabled = false
""")
    return config


@contextlib.contextmanager
def running_influxdb(tmp_path: str | os.PathLike) -> Iterator[InfluxServer]:
    """Start a private influxd under ``tmp_path``; yield it; stop it."""
    influxd = need_binary("influxd", package="influxdb")
    work = Path(tmp_path)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "influxd.log"
    last_error = ""
    for _attempt in range(3):
        port, rpc_port = _free_port(), _free_port()
        config = write_config(work, port, rpc_port)
        log = open(log_path, "ab")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([influxd, "-config", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work)
        try:
            server = InfluxServer(port, rpc_port, proc.pid)
            try:
                ready = _wait_ready(proc, server)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}:\n{_tail(log_path)}") from None
            if ready:
                try:
                    yield server
                finally:
                    _stop(proc)
                return
            last_error = _tail(log_path)
        finally:
            _stop(proc)
            log.close()
    raise RuntimeError(f"influxd did not start (3 attempts):\n{last_error}")


def _wait_ready(proc: subprocess.Popen, server: InfluxServer) -> bool:
    """True once /ping answers 204; False if influxd exited (a port taken
    meanwhile: the caller retries); RuntimeError after START_TIMEOUT."""
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(server.url + "/ping", timeout=2) as resp:
                if resp.status == 204:
                    return True
                last = f"/ping answered {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = f"/ping: {exc}"
        time.sleep(0.1)
    raise RuntimeError(f"influxd at {server.url} not ready after {START_TIMEOUT:g} s ({last})")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the influxd this module started (by its PID), SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
