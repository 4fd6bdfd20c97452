"""Fixtures of the chaos suite.

Some tests restart PostgreSQL, Redis or RabbitMQ: ``services_guard`` (autouse)
starts again, after every test of this directory, whichever of them is down.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from tests.chaos import helpers
from tests.conftest import service_unavailable


@pytest.fixture(autouse=True)
def services_guard():
    yield
    helpers.ensure_services()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def etcd_url(tmp_path):
    """A private etcd server (Debian package ``etcd-server``) on loopback
    ports; its tooz URL ``etcd3+http://127.0.0.1:<port>``."""
    binary = shutil.which("etcd")
    if binary is None:
        service_unavailable("etcd", "'etcd' not on PATH (apt-get install etcd-server)")
    try:
        import etcd3gw  # noqa: F401
    except ImportError:
        service_unavailable("etcd", "the etcd3gw Python package is not installed "
                            "(pip install etcd3gw)")
    client, peer = _free_port(), _free_port()
    data = tmp_path / "etcd-data"
    log = open(tmp_path / "etcd.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [binary, "--name", "ckp-test", "--data-dir", str(data),
         "--listen-client-urls", f"http://127.0.0.1:{client}",
         "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"ckp-test=http://127.0.0.1:{peer}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not helpers.port_open(client):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                service_unavailable("etcd", "the server did not start: "
                                    + (tmp_path / "etcd.log").read_text()[-2000:])
            time.sleep(0.1)
        yield f"etcd3+http://127.0.0.1:{client}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
