"""A real Prometheus server holding the samples of an OpenMetrics file.

Usage (a module-scoped fixture, since a start costs a second or two)::

    from tests.prometheus_server import running_prometheus

    @pytest.fixture(scope="module")
    def prometheus(tmp_path_factory):
        om = tmp_path_factory.mktemp("om") / "usage.om"
        ...write om...
        with running_prometheus(om, tmp_path_factory.mktemp("prom")) as url:
            yield url          # "http://127.0.0.1:<port>"

What it does:

1. ``promtool tsdb create-blocks-from openmetrics <file> <dir>/data``
   (backfill: the samples become TSDB blocks, 2 h each);
2. ``prometheus --storage.tsdb.path=<dir>/data
   --storage.tsdb.retention.time=100y --web.listen-address=127.0.0.1:<port>
   --config.file=<dir>/prometheus.yml`` (no scrape job). The data is
   usually old, so the retention flag matters: with the default 15 days
   Prometheus may delete backfilled blocks at start-up;
3. waits (at most 60 s) until ``/-/ready`` answers 200 and a probe query at
   the first sample's timestamp returns data (proves the blocks are loaded
   and were not deleted);
4. on exit: SIGTERM, then SIGKILL after 10 s.

``promtool``/``prometheus`` missing -> the test is skipped (or fails when
CLOUDKITTY_PROC_REQUIRE_SERVICES=1), via tests.conftest.need_binary. Any
other failure raises RuntimeError with the tool's output.
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
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import need_binary

START_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_sample(om_file: Path) -> tuple[str, float]:
    """(metric name, timestamp in s) of the first sample line of the file."""
    with open(om_file, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("#") or not line.strip():
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            rest = line.rsplit("}", 1)[-1].split() if "{" in line else line.split()[1:]
            if len(rest) >= 2:
                return name, float(rest[1])
    raise RuntimeError(f"{om_file}: no sample with a timestamp")


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def create_blocks(om_file: Path, data_dir: Path) -> None:
    """Backfill ``om_file`` into ``data_dir`` with promtool."""
    promtool = need_binary("promtool")
    proc = subprocess.run(
        [promtool, "tsdb", "create-blocks-from", "openmetrics", str(om_file), str(data_dir)],
        capture_output=True, text=True, timeout=START_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"promtool create-blocks-from openmetrics {om_file} failed "
                           f"(exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@contextlib.contextmanager
def running_prometheus(om_file: str | os.PathLike, tmp_path: str | os.PathLike) -> Iterator[str]:
    """Start Prometheus on the samples of ``om_file``; yield its base URL."""
    om_file = Path(om_file)
    work = Path(tmp_path)
    prometheus = need_binary("prometheus")
    need_binary("promtool")
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    create_blocks(om_file, data_dir)
    blocks = sorted(p.name for p in data_dir.iterdir() if (p / "meta.json").exists())
    if not blocks:
        raise RuntimeError(f"promtool wrote no block from {om_file} into {data_dir}")

    config = work / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1h\nscrape_configs: []\n")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work / "prometheus.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [prometheus,
         f"--config.file={config}",
         f"--storage.tsdb.path={data_dir}",
         "--storage.tsdb.retention.time=100y",
         f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        _wait_ready(proc, url, om_file, log_path)
        yield url
    finally:
        _stop(proc)
        log.close()


def _wait_ready(proc: subprocess.Popen, url: str, om_file: Path, log_path: Path) -> None:
    name, ts = _first_sample(om_file)
    probe = url + "/api/v1/query?" + urllib.parse.urlencode(
        {"query": f"count({name})", "time": repr(ts)})
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode} at start-up:\n"
                               f"{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=2) as resp:
                ready = resp.status == 200
        except (urllib.error.URLError, OSError) as exc:
            ready, last = False, f"/-/ready: {exc}"
        if ready:
            try:
                data = _get_json(probe)
                if data.get("status") == "success" and data["data"]["result"]:
                    return
                last = f"probe query {probe} returned no data: {data}"
            except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
                last = f"probe query: {exc}"
        time.sleep(0.1)
    raise RuntimeError(f"prometheus at {url} not ready after {START_TIMEOUT:g} s "
                       f"({last}):\n{_tail(log_path)}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
