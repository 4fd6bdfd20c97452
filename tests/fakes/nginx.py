"""nginx from Debian in the foreground, with a test's own configuration.

Usage::

    from tests.fakes.nginx import running_nginx

    with running_nginx(tmp_path, servers, ports=[port, ...]) as base:
        ...

``servers`` is the text of the ``server { ... }`` blocks (inside ``http``);
nginx runs with ``daemon off``, its pid, logs and temporary files under
``tmp_path``, and an access log ``access.log`` whose lines are
``<connection serial> <connection requests> <status> <Content-Encoding> <request>``
(:func:`access_log` parses it). The context waits until every port in
``ports`` accepts connections and, on exit, stops nginx by its PID
(SIGQUIT, then SIGKILL after 10 s).

``nginx`` missing -> the test is skipped (fails with
CLOUDKITTY_PROC_REQUIRE_SERVICES=1), via tests.conftest.need_binary.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import need_binary

START_TIMEOUT = 30.0

LOG_FORMAT = ("log_format ckp '$connection $connection_requests $status "
              "\"$sent_http_content_encoding\" \"$request\"';")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def running_nginx(work: Path, servers: str, ports: list[int]) -> Iterator[Path]:
    """Start nginx with ``servers``; yield its work directory."""
    nginx = need_binary("nginx", package="nginx")
    work = Path(work)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = work / "nginx.conf"
    conf.write_text(f"""{user}daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{ worker_connections 256; }}
http {{
    {LOG_FORMAT}
    access_log {work}/access.log ckp;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
{servers}
}}
""")
    log = open(work / "nginx.out", "wb")
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(work)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(_listening(p) for p in ports):
            if proc.poll() is not None or time.monotonic() > deadline:
                logs = [work / "nginx.out", work / "error.log"]
                text = "".join(p.read_text(errors="replace") for p in logs if p.exists())
                raise RuntimeError(f"nginx did not start (exit {proc.poll()}):\n{text}")
            time.sleep(0.05)
        yield work
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


def access_log(work: Path) -> list[tuple[int, int, int, str, str]]:
    """(connection serial, request number on it, status, Content-Encoding,
    request line) of each request nginx logged so far."""
    out = []
    path = Path(work) / "access.log"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        conn, number, status, rest = line.split(" ", 3)
        encoding, _, request = rest.partition('" "')
        out.append((int(conn), int(number), int(status), encoding.strip('"'),
                    request.rstrip('"')))
    return out
