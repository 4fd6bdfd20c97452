#!/usr/bin/env python3
"""Catch-up benchmark: the real daemon (``cloudkitty-proc --oneshot``)
against the fake Prometheus of ``benchmarks/fake_prometheus.py``.

Workloads (``--workload``; every size can be overridden by its own flag):

====  ======  =======  =======  ======  =======
name  scopes  periods  metrics  series  latency
====  ======  =======  =======  ======  =======
W1        20       24        5      10    20 ms   pool usage (latency bound)
W2        20       24        5     200     0 ms   CPU path (datapoints/s)
W3    10,000        2        5       2     0 ms   memory (RSS growth)
W1r       20       24        5      10     real   a real Prometheus, per-scope load
W4r    1,000        6        5       2     real   a real Prometheus, many scopes
====  ======  =======  =======  ======  =======

With ``--prometheus real`` (the default for W1r and W4r) the collector asks
a real Prometheus server (``/usr/bin/prometheus``, 2.x) holding the
workload's samples, backfilled once per spec with ``promtool`` and cached
(``real_prometheus.py``); after the daemon, a minimal client sends the same
queries as fast as it can over as many connections as the daemon has
queries in flight: its scope-periods/s is the bound the daemon is compared
to, and Prometheus' own CPU per scope-period is printed for both.

One run: start the fake Prometheus (a subprocess by default, so that its CPU
is not the daemon's), write a config (prometheus collector, ``source``
fetcher with the scopes, a [begin, end) window of ``periods`` hours,
hashmap rules for the 5 usage types, SQLite in the work directory unless
``--db``), ``cloudkitty-proc-manage db upgrade``, then
``cloudkitty-proc --oneshot`` with ``[orchestrator] max_workers``,
``max_threads`` and ``collect_executor`` from the flags. While it runs,
the worker processes are sampled every 0.2 s (RSS, VmHWM, CPU) and the
committed periods are counted in the database.

Printed per run: periods/s and rated datapoints/s (over the processing window,
first query -> last commit, and over the whole command), CPU seconds of the
process tree and CPU ms per period, per worker peak RSS and RSS after 10 % of
the periods vs at the end, queries served with the maximum and mean number in
flight, and the ratio to the latency bound
``max_threads / (metrics x latency)`` periods/s per worker (x workers).
With ``--floor`` (default for W2) the floor is measured in-process: time to
json-parse the same replies and insert the same rows into the same kind of
database, in one transaction per period.

Examples::

    python benchmarks/run_catchup.py --workload W1 --workers 1
    python benchmarks/run_catchup.py --workload W1 --workers 2
    python benchmarks/run_catchup.py --workload W2 --workers 1      # + floor
    python benchmarks/run_catchup.py --workload W3 --scopes 2000
    python benchmarks/run_catchup.py --workload W1 --compare        # greenpool
        # vs threads x max_threads 8,16,32 (--compare-greenthreads ...)
    python benchmarks/run_catchup.py --workload W2 --profile py-spy  # top CPU
        # costs of the worker (needs `pip install py-spy`; SVG + raw stacks in
        # --profile-out)
    python benchmarks/run_catchup.py --workload W1 --json results.jsonl
    python benchmarks/run_catchup.py --suite                        # issue 6
        # acceptance: W1 x1, W1 x2, W2 x1 + floor, W3 x1, against the targets
    python benchmarks/run_catchup.py --workload W2 --storage influxdb
        # the influxdb backend (a private influxd, tests/influxdb_server.py;
        # states in SQLite), then the same run on the sql backend: the ratio,
        # and InfluxDB's HTTP requests per period
    python benchmarks/run_catchup.py --workload W1r --repeat 2      # real Prometheus
    python benchmarks/run_catchup.py --workload W4r --workers 2 --max-scopes-per-query 200
    python benchmarks/run_catchup.py --workload W4r --code /tmp/base --compress
        # the daemon from another tree (git worktree add /tmp/base <commit>)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import re
import resource
import shutil
import signal
import statistics
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import fake_prometheus  # noqa: E402
import real_prometheus  # noqa: E402

try:
    import psutil
except ImportError:  # pragma: no cover
    sys.exit("run_catchup.py needs psutil (pip install psutil)")

UTC = datetime.timezone.utc
BEGIN = datetime.datetime(2026, 1, 1, tzinfo=UTC)

WORKLOADS: dict[str, dict[str, Any]] = {
    "W1": {"scopes": 20, "periods": 24, "series": 10, "latency_ms": 20.0},
    "W2": {"scopes": 20, "periods": 24, "series": 200, "latency_ms": 0.0},
    "W3": {"scopes": 10_000, "periods": 2, "series": 2, "latency_ms": 0.0},
    # real Prometheus (--prometheus real is their default)
    "W1r": {"scopes": 20, "periods": 24, "series": 10, "latency_ms": 0.0},
    "W4r": {"scopes": 1_000, "periods": 6, "series": 2, "latency_ms": 0.0},
}
REAL_WORKLOADS = {"W1r", "W4r"}

# The 5 metrics of etc/cloudkitty-proc/metrics.yml (copied: the benchmark
# must not change when the sample does).
METRICS_YML = """\
metrics:
  instance_up:
    unit: instance
    alt_name: instance
    groupby: [id, user_id]
    metadata: [flavor_name]
    mutate: NUMBOOL
    extra_args: {aggregation_method: max}
  volume_size_bytes:
    unit: GiB
    alt_name: volume.size
    factor: 1/1073741824
    groupby: [id, user_id]
    metadata: [volume_type]
    extra_args: {aggregation_method: max}
  image_size_bytes:
    unit: MiB
    alt_name: image.size
    factor: 1/1048576
    groupby: [id]
    metadata: [disk_format]
    extra_args: {aggregation_method: max}
  ip_floating_up:
    unit: ip
    alt_name: ip.floating
    groupby: [id]
    metadata: [state]
    mutate: NUMBOOL
    extra_args: {aggregation_method: max}
  cpu_utilization_ratio:
    unit: ratio
    alt_name: cpu.util
    groupby: [id]
    extra_args: {aggregation_method: avg}
"""

#: (metric, usage type, unit, groupby, metadata, aggregation) as above, for
#: the floor measurement (same queries, same rows)
METRICS = [
    ("instance_up", "instance", "instance", ["id", "user_id"], ["flavor_name"], "max"),
    ("volume_size_bytes", "volume.size", "GiB", ["id", "user_id"], ["volume_type"], "max"),
    ("image_size_bytes", "image.size", "MiB", ["id"], ["disk_format"], "max"),
    ("ip_floating_up", "ip.floating", "ip", ["id"], ["state"], "max"),
    ("cpu_utilization_ratio", "cpu.util", "ratio", ["id"], [], "avg"),
]
SCOPE_KEY = "project_id"

# Hashmap rules: every usage type has a service (flat, rate, field mappings
# and thresholds), so every point goes through the rating engine.
RULES_YML = """\
hashmap:
  services:
    instance:
      mappings:
        - {cost: "0.002", group: support}
        - {cost: "1.05", type: rate, group: compute, start: "2026-01-01T12:00:00Z"}
      fields:
        flavor_name:
          mappings:
            - {value: m1.tiny, cost: "0.010", group: compute}
            - {value: m1.small, cost: "0.025", group: compute}
            - {value: m1.medium, cost: "0.050", group: compute}
            - {value: m1.large, cost: "0.100", group: compute}
            - {value: m1.xlarge, cost: "0.200", group: compute}
            - {value: c1.large, cost: "0.150", group: compute}
            - {value: m1.large, cost: "0.080", group: compute, scope: p-00001}
    volume.size:
      fields:
        volume_type:
          mappings:
            - {value: ssd, cost: "0.00020", group: storage}
            - {value: hdd, cost: "0.00005", group: storage}
            - {value: nvme, cost: "0.00030", group: storage}
      thresholds:
        - {level: "500", cost: "0.9", type: rate, group: storage}
        - {level: "2048", cost: "0.8", type: rate, group: storage}
    image.size:
      mappings:
        - {cost: "0.00000014", group: storage}
      fields:
        disk_format:
          mappings:
            - {value: qcow2, cost: "0.5", type: rate, group: storage}
    ip.floating:
      mappings:
        - {cost: "0.005", group: network}
      fields:
        state:
          mappings:
            - {value: down, cost: "2", type: rate, group: network}
    cpu.util:
      mappings:
        - {cost: "0.001", group: compute}
      thresholds:
        - {level: "0.8", cost: "0.002", group: compute}
"""


def scope_names(n: int) -> list[str]:
    return [f"p-{i:05d}" for i in range(n)]


def iso(dt: datetime.datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------
# Run parameters and results
# ---------------------------------------------------------------------------

@dataclass
class RunSpec:
    workload: str
    scopes: int
    periods: int
    series: int
    latency_ms: float
    workers: int = 1
    greenthreads: int = 16
    executor: str = "greenpool"
    lookahead: int | None = None
    max_periods_per_lock: int | None = None
    db: str | None = None
    log_level: str = "INFO"
    extra_conf: str = ""
    storage: str = "sql"
    #: "fake" (fake_prometheus.py) or "real" (a Prometheus server)
    prometheus: str = "fake"
    #: options written only when given (an older tree lacks them)
    max_scopes_per_query: int | None = None
    max_periods_per_query: int | None = None
    lease_partitions: int | None = None
    compress: bool = False
    #: run the daemon from this source tree (PYTHONPATH and cwd)
    code: str | None = None
    #: real mode: seconds between two samples of a series
    sample_interval: int = 300
    #: real mode: run the bound client after the daemon
    bound_client: bool = True

    @property
    def metrics(self) -> int:
        return len(METRICS)

    @property
    def total_periods(self) -> int:
        return self.scopes * self.periods

    @property
    def total_points(self) -> int:
        return self.scopes * self.periods * self.metrics * self.series

    @property
    def label(self) -> str:
        extra = f" la={self.lookahead}" if self.lookahead else ""
        if self.storage != "sql":
            extra += f" {self.storage}"
        if self.prometheus != "fake":
            extra += f" prom={self.prometheus}"
        if self.max_scopes_per_query is not None:
            extra += f" q={self.max_scopes_per_query}"
        if self.max_periods_per_query is not None:
            extra += f" qp={self.max_periods_per_query}"
        if self.lease_partitions is not None:
            extra += f" lp={self.lease_partitions}"
        if self.compress:
            extra += " gzip"
        if self.code:
            extra += f" code={os.path.basename(os.path.normpath(self.code))}"
        return (f"{self.workload} {self.scopes}x{self.periods}x{self.metrics}x{self.series} "
                f"{self.latency_ms:g}ms w={self.workers} {self.executor} "
                f"G={self.greenthreads}{extra}")

    def bound(self) -> float | None:
        """Latency bound in periods/s for all workers (None at 0 ms)."""
        if self.latency_ms <= 0:
            return None
        return self.greenthreads / (self.metrics * self.latency_ms / 1000.0) * self.workers


@dataclass
class ProcTrack:
    pid: int
    name: str
    first_seen: float
    samples: list = field(default_factory=list)   # (wall time, rss, hwm, cpu)
    peak_rss: int = 0
    at10: tuple | None = None                      # (rss, hwm, peak_rss) at 10 %

    def last(self):
        return self.samples[-1] if self.samples else (0, 0, 0, 0.0)


# ---------------------------------------------------------------------------
# Fake Prometheus (subprocess or thread)
# ---------------------------------------------------------------------------

class ServerHandle:
    def __init__(self, mode: str, latency_ms: float, series: int) -> None:
        self.mode = mode
        self.proc: subprocess.Popen | None = None
        self.fake: fake_prometheus.FakePrometheus | None = None
        if mode == "inproc":
            self.fake = fake_prometheus.FakePrometheus(latency_ms=latency_ms,
                                                       series=series).start()
            self.url = self.fake.url
            return
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "fake_prometheus.py"), "--port", "0",
             "--latency-ms", str(latency_ms), "--series", str(series)],
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"fake Prometheus did not start: {line!r}")
        self.url = line.split()[-1]
        self.ps = psutil.Process(self.proc.pid)

    def stats(self) -> dict:
        if self.fake is not None:
            return self.fake.stats()
        import urllib.request
        with urllib.request.urlopen(self.url + "/_stats", timeout=10) as resp:
            return json.load(resp)

    def trace(self) -> list:
        """(start, end, scope) of every query served (``--trace``)."""
        if self.fake is not None:
            return list(self.fake.stats_.trace)
        import urllib.request
        with urllib.request.urlopen(self.url + "/_trace", timeout=30) as resp:
            return json.load(resp)["queries"]

    def cpu_seconds(self) -> float | None:
        if self.proc is None:
            return None
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.fake is not None:
            self.fake.stop()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


class RealServerHandle:
    """A real Prometheus on the workload's cached data (``--prometheus
    real``): the data directory is locked for the run (Prometheus runs on it
    directly), backfilled first if missing; then the server is started,
    ready, past any pending compaction, and every hour is checked to hold
    all its samples. The counters the fake server keeps are not available:
    the window starts at the first worker's "started" log line, and
    ``queries`` is Prometheus' own /api/v1/query request counter."""

    def __init__(self, spec: RunSpec, args: argparse.Namespace, workdir: pathlib.Path) -> None:
        root = real_prometheus.cache_root(args.workdir)
        key = real_prometheus.data_key(spec.scopes, spec.periods, spec.series,
                                       spec.sample_interval, BEGIN.timestamp())
        self._lock = contextlib.ExitStack()
        self.prom: real_prometheus.RealPrometheus | None = None
        try:
            self._lock.enter_context(real_prometheus.locked(root / f"{key}.lock"))
            t0 = time.monotonic()
            self.data = real_prometheus.ensure_data(
                root, key, metrics=bound_metrics(), scope_key=SCOPE_KEY,
                scopes=scope_names(spec.scopes), begin=BEGIN.timestamp(),
                periods=spec.periods, series=spec.series, interval=spec.sample_interval)
            self.prom = real_prometheus.RealPrometheus(self.data, workdir).start()
            self.prom.wait_ready()
            self.prom.wait_compaction()
            self.prom.verify([m[0] for m in METRICS], BEGIN.timestamp(), spec.periods,
                             spec.scopes * spec.metrics * spec.series,
                             3600 // spec.sample_interval)
            self.setup_s = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        self.url = self.prom.url
        self.pid = self.prom.pid
        self.compaction = self.prom.compaction
        self._requests0 = self.prom.query_requests()

    def stats(self) -> dict:
        n = self.prom.query_requests()
        return {"queries": (n - self._requests0) if n is not None else None,
                "max_active": None, "busy_seconds": None, "first_query_at": None}

    def trace(self) -> list:
        return []

    def cpu_seconds(self) -> float | None:
        return self.prom.cpu_seconds() if self.prom is not None else None

    def stop(self) -> None:
        if self.prom is not None:
            self.prom.stop()
        self._lock.close()


def bound_metrics() -> list[tuple[str, str, list[str]]]:
    """(metric, aggregation, ``by`` labels in the daemon's order) of the
    five metrics."""
    return [(m, agg, list(dict.fromkeys([*gb, SCOPE_KEY, *md])))
            for m, _u, _unit, gb, md, agg in METRICS]


#: a worker's "started" line in daemon.log (oslo.log's default format)
_STARTED_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) .*\bworker \S+ started \(")


def first_worker_start(log: pathlib.Path) -> float | None:
    """time.time() of the first worker's "worker ... started" log line
    (local time, as logging writes it), or None."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    times = []
    for line in text.splitlines():
        m = _STARTED_RE.match(line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
            times.append(t + int(m.group(2)) / 1000)
    return min(times) if times else None


#: [collect] max_scopes_per_query's default in cloudkitty_proc/conf.py
DAEMON_SCOPES_PER_QUERY = 200
#: [collect] max_periods_per_query's default
DAEMON_PERIODS_PER_QUERY = 6


def run_bound_client(spec: RunSpec, server: RealServerHandle) -> dict:
    """The bound: the daemon's queries from a minimal client (one process
    per worker, max_threads keep-alive connections each), as fast as it
    can; Prometheus' CPU over it."""
    # not given: the daemon's default (an older tree run with --code that
    # queries per scope needs --max-scopes-per-query 1 for a fair bound)
    per_query = spec.max_scopes_per_query or DAEMON_SCOPES_PER_QUERY
    scopes = scope_names(spec.scopes)
    shares = [scopes[i::spec.workers] for i in range(spec.workers)]
    per_range = spec.max_periods_per_query or DAEMON_PERIODS_PER_QUERY
    per_worker = [real_prometheus.worker_queries(bound_metrics(), SCOPE_KEY, share,
                                                 BEGIN.timestamp(), spec.periods, per_query,
                                                 per_range)
                  for share in shares]
    cpu0 = server.cpu_seconds()
    b = real_prometheus.run_bound(server.url, per_worker, spec.greenthreads, spec.compress)
    cpu1 = server.cpu_seconds()
    sp = b["scope_queries"] / spec.metrics
    b.update(scope_periods=sp, per_query=per_query, per_range=per_range,
             scope_periods_per_s=sp / b["elapsed_s"] if b["elapsed_s"] else None,
             prom_cpu_s=(cpu1 - cpu0) if cpu0 is not None else None)
    b["prom_cpu_ms_per_scope_period"] = (b["prom_cpu_s"] / sp * 1000
                                         if b["prom_cpu_s"] is not None and sp else None)
    return b


# ---------------------------------------------------------------------------
# Config and commands
# ---------------------------------------------------------------------------

def write_config(spec: RunSpec, workdir: pathlib.Path, prom_url: str) -> pathlib.Path:
    state = workdir / "state"
    state.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.yml").write_text(METRICS_YML)
    (workdir / "rating.yml").write_text(RULES_YML)
    db = spec.db or f"sqlite:///{workdir / 'state' / 'bench.sqlite'}"
    end = BEGIN + datetime.timedelta(hours=spec.periods)
    orch = [f"max_workers = {spec.workers}", f"max_threads = {spec.greenthreads}",
            f"collect_executor = {spec.executor}", "poll_interval = 1"]
    if spec.lookahead:
        orch.append(f"lookahead_periods = {spec.lookahead}")
    if spec.max_periods_per_lock:
        orch.append(f"max_periods_per_lock = {spec.max_periods_per_lock}")
    if spec.lease_partitions is not None:
        orch.append(f"lease_partitions = {spec.lease_partitions}")
    text = "\n".join([
        "[DEFAULT]",
        f"state_path = {state}",
        "host = bench",
        "graceful_shutdown_timeout = 60",
        f"log_file = {workdir / 'daemon.log'}",
        f"default_log_levels = cloudkitty_proc={spec.log_level},tooz=WARN,stevedore=WARN,"
        "urllib3=WARN,requests=WARN,cotyledon=INFO,alembic=WARN,sqlalchemy=WARN",
        "[orchestrator]", *orch,
        "[collect]",
        *([f"max_scopes_per_query = {spec.max_scopes_per_query}"]
          if spec.max_scopes_per_query is not None else []),
        *([f"max_periods_per_query = {spec.max_periods_per_query}"]
          if spec.max_periods_per_query is not None else []),
        "collector = prometheus",
        "period = 3600",
        "wait_periods = 1",
        f"begin = {iso(BEGIN)}",
        f"end = {iso(end)}",
        f"metrics_conf = {workdir / 'metrics.yml'}",
        f"scope_key = {SCOPE_KEY}",
        "[collector_prometheus]",
        f"prometheus_url = {prom_url}",
        "timeout = 60",
        *(["compress_replies = true"] if spec.compress else []),
        "[fetcher]",
        "backend = source",
        "[fetcher_source]",
        "sources = " + ",".join(scope_names(spec.scopes)),
        "[database]",
        f"connection = {db}",
        "[rating]",
        "processors = hashmap",
        "[hashmap]",
        f"rules_file = {workdir / 'rating.yml'}",
        "",
    ]) + textwrap.dedent(spec.extra_conf)
    path = workdir / "bench.conf"
    path.write_text(text)
    return path


def code_dir(spec: RunSpec) -> pathlib.Path:
    """The source tree the daemon runs from (``--code``, else this one)."""
    return pathlib.Path(spec.code).resolve() if spec.code else REPO


def _env(spec: RunSpec) -> dict:
    # ``python -m`` puts its working directory first on sys.path: the
    # commands also run with cwd = this tree
    env = dict(os.environ)
    env.pop("CKP_FAULTS", None)
    env["PYTHONPATH"] = str(code_dir(spec)) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def db_url_of(spec: RunSpec, workdir: pathlib.Path) -> str:
    return spec.db or f"sqlite:///{workdir / 'state' / 'bench.sqlite'}"


def prepare_db(spec: RunSpec, conf: pathlib.Path, workdir: pathlib.Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cloudkitty_proc.cli.manage", "--config-file", str(conf),
         "db", "upgrade"], capture_output=True, text=True, env=_env(spec),
        cwd=code_dir(spec))
    if proc.returncode != 0:
        raise RuntimeError(f"db upgrade failed:\n{proc.stdout}\n{proc.stderr}")
    if spec.db:  # a shared server database: start from empty tables
        import sqlalchemy as sa
        engine = sa.create_engine(spec.db)
        with engine.begin() as conn:
            for table in ("rated_data", "rated_period", "scope_state"):
                conn.execute(sa.text(f"DELETE FROM {table}"))
        engine.dispose()


class Progress:
    """Committed periods, counted in the database (cheap read-only queries)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._sqlite = None
        self._engine = None
        if url.startswith("sqlite:///"):
            self._path = url[len("sqlite:///"):]
        else:
            import sqlalchemy as sa
            self._engine = sa.create_engine(url, pool_size=1)

    def committed(self) -> int:
        try:
            if self._engine is not None:
                import sqlalchemy as sa
                with self._engine.connect() as c:
                    return c.execute(sa.text("SELECT count(*) FROM rated_period")).scalar()
            if self._sqlite is None:
                self._sqlite = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True,
                                               timeout=5, check_same_thread=False)
            return self._sqlite.execute("SELECT count(*) FROM rated_period").fetchone()[0]
        except Exception:
            return -1

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._engine is not None:
            self._engine.dispose()


def read_results(url: str) -> dict:
    import sqlalchemy as sa
    engine = sa.create_engine(url)
    with engine.connect() as c:
        periods, first, last, points = c.execute(sa.text(
            "SELECT count(*), min(committed_at), max(committed_at), sum(points) "
            "FROM rated_period")).one()
        rows = c.execute(sa.text("SELECT count(*) FROM rated_data")).scalar()
        errors = c.execute(sa.text(
            "SELECT count(*) FROM scope_state WHERE last_error IS NOT NULL")).scalar()
        spans = c.execute(sa.text(
            "SELECT worker, count(*), min(committed_at), max(committed_at) "
            "FROM rated_period GROUP BY worker")).all()
    engine.dispose()
    workers = {w: n for w, n, _first, _last in spans}

    def ts(v):
        if v is None:
            return None
        if isinstance(v, str):
            v = datetime.datetime.fromisoformat(v)
        return v.replace(tzinfo=UTC).timestamp()

    return {"periods": periods, "points": points or 0, "rows": rows, "errors": errors,
            "first_commit": ts(first), "last_commit": ts(last), "per_worker": workers,
            "worker_commits": {w: (ts(a), ts(b)) for w, _n, a, b in spans}}


def influx_stats(server) -> dict:
    """InfluxDB's HTTP counters (``/debug/vars``) and influxd's CPU seconds."""
    import urllib.request
    with urllib.request.urlopen(server.url + "/debug/vars", timeout=10) as resp:
        data = json.load(resp)
    values = next(v["values"] for k, v in data.items() if k.startswith("httpd"))
    t = psutil.Process(server.pid).cpu_times()
    return {"requests": values["req"], "writes": values["writeReq"],
            "queries": values["queryReq"], "points_written": values["pointsWrittenOK"],
            "cpu_s": t.user + t.system}


def cpu_reference() -> float:
    """Milliseconds for a fixed CPU mix (json, Decimal, dicts: the worker's
    kind of work), best of 3, measured just before a run. This machine's
    speed drifts (shared host; up to 2x between hours): figures measured at
    different times compare only together with it."""
    import decimal as _d
    payload = json.dumps({"data": {"result": [
        {"metric": {"id": f"r{i}", "project_id": "p", "flavor_name": "m1.small"},
         "value": [1767225600, str(i * 1.5)]} for i in range(200)]}})
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(40):
            rows = json.loads(payload)["data"]["result"]
            total = _d.Decimal(0)
            for item in rows:
                labels = {k: str(v) for k, v in item["metric"].items()}
                total += _d.Decimal(item["value"][1]) * _d.Decimal("0.01")
                json.dumps(labels, sort_keys=True)
        best = min(best, time.process_time() - t0)
    return best * 1000


def code_version(tree: pathlib.Path = REPO) -> str:
    """HEAD plus a hash of the uncommitted changes under cloudkitty_proc/
    (read-only git commands), so a figure can be tied to the code it ran."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD", "--", "cloudkitty_proc"], cwd=tree,
                              capture_output=True, timeout=10).stdout
        if not head:
            return "unknown (not a git tree)"
        return f"{head}+{zlib.crc32(diff):08x}" if diff else head
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------

def run_one(spec: RunSpec, args: argparse.Namespace) -> dict:
    base = pathlib.Path(args.workdir) if args.workdir else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="ckp-bench-", dir=base))
    real = spec.prometheus == "real"
    if real:
        server = RealServerHandle(spec, args, workdir)
    else:
        server = ServerHandle(args.server, spec.latency_ms, spec.series)
    result: dict[str, Any] = {"spec": spec.__dict__ | {"label": spec.label},
                              "workdir": str(workdir), "code": code_version(code_dir(spec)),
                              "cpu_ref_ms": cpu_reference()}
    if real:
        result["prometheus"] = {"setup_s": server.setup_s, "compaction": server.compaction,
                                "data": str(server.data)}
    #: (time.time(), Prometheus CPU seconds), sampled with the workers
    prom_cpu: list[tuple[float, float]] = []
    profiler: subprocess.Popen | None = None
    influx = getattr(args, "influx_server", None) if spec.storage == "influxdb" else None
    try:
        if influx is not None:
            influx_db = influx.create_database()
            spec = dataclasses.replace(spec, extra_conf=spec.extra_conf + textwrap.dedent(f"""
                [storage]
                backend = influxdb
                [storage_influxdb]
                host = {influx.host}
                port = {influx.port}
                database = {influx_db}
                """))
            influx0 = influx_stats(influx)
        conf = write_config(spec, workdir, server.url)
        prepare_db(spec, conf, workdir)
        url = db_url_of(spec, workdir)
        progress = Progress(url)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        srv_cpu0 = server.cpu_seconds()
        out = open(workdir / "daemon.out", "w")  # noqa: SIM115
        t_start = time.time()
        m0 = time.monotonic()
        daemon = psutil.Popen(
            [sys.executable, "-m", "cloudkitty_proc.cli.daemon", "--config-file", str(conf),
             "--oneshot"], stdout=out, stderr=subprocess.STDOUT, env=_env(spec),
            cwd=code_dir(spec))
        tracks: dict[int, ProcTrack] = {}
        master = ProcTrack(daemon.pid, "master", time.time())
        ten_pct = max(1, spec.total_periods // 10)
        t10 = None
        prog_samples: list[tuple[float, int]] = []
        stall: dict[str, Any] = {"count": -1, "since": time.time(), "at": None, "stacks": None}
        stop = threading.Event()

        def sample() -> None:
            nonlocal profiler, t10
            last_progress = 0.0
            while not stop.is_set():
                now = time.time()
                procs = [(master, daemon)]
                try:
                    kids = daemon.children(recursive=True)
                except psutil.Error:
                    kids = []
                for kid in kids:
                    tr = tracks.get(kid.pid)
                    if tr is None:
                        try:
                            name = kid.name()
                        except psutil.Error:
                            name = "?"
                        tr = tracks[kid.pid] = ProcTrack(kid.pid, name, now)
                        if args.profile == "py-spy" and profiler is None:
                            profiler = start_py_spy(kid.pid, workdir, args)
                    procs.append((tr, kid))
                for tr, ps in procs:
                    try:
                        with ps.oneshot():
                            rss = ps.memory_info().rss
                            ct = ps.cpu_times()
                        if rss == 0:  # a zombie: the worker has exited
                            continue
                        tr.samples.append((now, rss, _hwm(ps.pid), ct.user + ct.system))
                        tr.peak_rss = max(tr.peak_rss, rss)
                    except psutil.Error:
                        pass
                if real:
                    c = server.cpu_seconds()
                    if c is not None:
                        prom_cpu.append((now, c))
                if now - last_progress >= 0.5:
                    last_progress = now
                    done = progress.committed()
                    prog_samples.append((now, done))
                    if t10 is None and done >= ten_pct:
                        t10 = now
                        for tr in tracks.values():
                            s = tr.last()
                            tr.at10 = (s[1], s[2], tr.peak_rss)
                    if done != stall["count"]:
                        stall["count"], stall["since"] = done, now
                    elif (args.stall_timeout and done < spec.total_periods
                          and now - stall["since"] > args.stall_timeout
                          and stall["at"] is None):
                        # no commit for stall_timeout s: keep the evidence, stop it
                        stall["at"] = done
                        stall["stacks"] = dump_stacks(list(tracks), workdir)
                        try:
                            daemon.send_signal(signal.SIGTERM)
                        except psutil.Error:
                            pass
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = daemon.wait(timeout=args.timeout)
        except psutil.TimeoutExpired:
            daemon.send_signal(signal.SIGTERM)
            rc = daemon.wait(90)
            result["timeout"] = True
        if stall["at"] is not None:
            result["stalled"] = {"periods": stall["at"], "stacks": stall["stacks"]}
        wall = time.monotonic() - m0
        stop.set()
        sampler.join()
        out.close()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if profiler is not None:
            try:
                profiler.wait(60)
            except subprocess.TimeoutExpired:
                profiler.terminate()
        progress.close()
        srv = server.stats()
        srv_cpu1 = server.cpu_seconds()
        if args.trace:
            trace = server.trace()
            result["occupancy"] = occupancy(trace, spec.greenthreads * spec.workers)

        db = read_results(url)
        if influx is not None:
            influx1 = influx_stats(influx)
            result["influx"] = {k: influx1[k] - influx0[k] for k in influx1}
            [count] = influx.query("SELECT count(qty) FROM dataframes", db=influx_db)
            values = [s["values"][0][1] for s in count.get("series", [])]
            result["influx"]["points_stored"] = values[0] if values else 0
            db["rows"] = db["points"]  # no rated_data rows: the period records count them
            influx.drop_database(influx_db)
        result.update(rc=rc, wall=wall, started_at=t_start, server=srv, db=db,
                      t10=t10)
        result["cpu_tree"] = ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime))
        result["server_cpu"] = (srv_cpu1 - srv_cpu0) if srv_cpu0 is not None else None
        first_q = srv.get("first_query_at")
        if real:
            first_q = first_worker_start(workdir / "daemon.log")
            srv["first_query_at"] = first_q
        last_c = db["last_commit"]
        window = (last_c - first_q) if (first_q and last_c) else None
        result["window"] = window
        # worker CPU inside the window (startup imports excluded)
        wk = []
        for tr in sorted(tracks.values(), key=lambda t: t.pid):
            if not tr.samples:
                continue
            cpu_end = tr.samples[-1][3]
            cpu_start = 0.0
            if first_q:
                before = [s for s in tr.samples if s[0] <= first_q]
                cpu_start = before[-1][3] if before else 0.0
            # RSS when 10 %, 20 %, ... of the periods were committed
            deciles = []
            for d in range(1, 11):
                need = spec.total_periods * d / 10
                at = next((t for t, n in prog_samples if n >= need), None)
                if at is None:
                    deciles.append(None)
                    continue
                before = [smp for smp in tr.samples if smp[0] <= at]
                deciles.append(before[-1][1] if before else None)
            wk.append({
                "pid": tr.pid, "name": tr.name, "rss_deciles": deciles,
                "cpu": cpu_end, "cpu_window": cpu_end - cpu_start,
                "peak_rss": tr.peak_rss, "hwm_end": max(s[2] for s in tr.samples),
                "rss_end": tr.samples[-1][1],
                "rss_10": tr.at10[0] if tr.at10 else None,
                "hwm_10": tr.at10[1] if tr.at10 else None,
                "peak_10": tr.at10[2] if tr.at10 else None,
            })
        result["workers"] = wk
        if real:
            # Prometheus' CPU over the window: the last sample before its
            # start to the first one after its end (it idles outside)
            pw = None
            if first_q and last_c and prom_cpu:
                before = [c for t, c in prom_cpu if t <= first_q] or [prom_cpu[0][1]]
                after = [c for t, c in prom_cpu if t >= last_c] or [prom_cpu[-1][1]]
                pw = after[0] - before[-1]
            result["prometheus"]["cpu_window_s"] = pw
            if spec.bound_client and rc == 0:
                print("  bound client ...", flush=True)
                result["bound"] = run_bound_client(spec, server)
        result["master"] = {"peak_rss": master.peak_rss,
                            "cpu": master.samples[-1][3] if master.samples else None}
        tail = (workdir / "daemon.out").read_text().strip().splitlines()
        result["daemon_tail"] = tail[-12:]
        if profiler is not None:
            result["profile"] = analyse_profile(workdir, args, spec, db["periods"])
        return result
    finally:
        server.stop()
        if profiler is not None and profiler.poll() is None:
            profiler.terminate()
        if not args.keep and "stalled" not in result:
            shutil.rmtree(workdir, ignore_errors=True)


def occupancy(trace: list, pool: int) -> dict:
    """How full the pools kept the server, from the query trace: the share
    of the window spent at each number of queries in flight, and the gaps
    at scope changes (last reply of a scope to the first query of the
    next one begun after it; meaningful with one worker)."""
    if not trace:
        return {}
    events = sorted([(q[0], 1) for q in trace] + [(q[1], -1) for q in trace])
    level, last, spent = 0, events[0][0], collections.Counter()
    for t, step in events:
        spent[level] += t - last
        level, last = level + step, t
    total = sum(spent.values()) or 1.0
    bands = collections.OrderedDict()
    for name, lo, hi in (("full", pool, 10 ** 9), (f"{pool * 3 // 4}-{pool - 1}", pool * 3 // 4, pool - 1),
                         (f"1-{pool * 3 // 4 - 1}", 1, pool * 3 // 4 - 1), ("0", 0, 0)):
        bands[name] = sum(v for k, v in spent.items() if lo <= k <= hi) / total
    first: dict = {}
    last_end: dict = {}
    by_conn: dict = collections.defaultdict(list)
    for t0, t1, scope, conn in trace:
        by_conn[conn].append((t0, t1))
        first[scope] = min(first.get(scope, t0), t0)
        last_end[scope] = max(last_end.get(scope, t1), t1)
    order = sorted(first, key=first.get)
    gaps = [first[b] - last_end[a] for a, b in zip(order, order[1:])]
    # client side of a keep-alive connection: reply sent -> next request
    turns = sorted(b[0] - a[1] for qs in by_conn.values()
                   for a, b in zip(sorted(qs), sorted(qs)[1:]))
    return {
            "turn_ms": ({"median": turns[len(turns) // 2] * 1000,
                         "p90": turns[len(turns) * 9 // 10] * 1000,
                         "mean": statistics.mean(turns) * 1000} if turns else None),"window": total, "bands": bands,
            "mean_level": sum(k * v for k, v in spent.items()) / total,
            "scope_changes": len(gaps),
            "scope_gap_ms": (statistics.mean(gaps) * 1000 if gaps else None)}


def dump_stacks(pids: list[int], workdir: pathlib.Path) -> list[str]:
    """py-spy dump (non-blocking) of each worker, for a stalled run."""
    exe = shutil.which("py-spy")
    out = []
    for pid in pids:
        path = workdir / f"stall-stacks-{pid}.txt"
        if exe is None:
            path.write_text("py-spy not installed: no stacks\n")
        else:
            with open(path, "w") as fh:
                subprocess.run([exe, "dump", "--pid", str(pid), "--nonblocking"],
                               stdout=fh, stderr=subprocess.STDOUT, timeout=60)
        out.append(str(path))
    return out


# ---------------------------------------------------------------------------
# Profiling (py-spy)
# ---------------------------------------------------------------------------

def start_py_spy(pid: int, workdir: pathlib.Path, args: argparse.Namespace) -> subprocess.Popen:
    exe = shutil.which("py-spy")
    if exe is None:
        sys.exit("--profile py-spy: py-spy not found (pip install py-spy)")
    out = workdir / f"worker-{pid}.collapsed"
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", str(args.profile_rate), "--format", "raw",
         "--threads", "--idle", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=open(workdir / "py-spy.log", "w"))  # noqa: SIM115


#: (category, substrings of a frame), checked from the leaf up: the first
#: frame of a stack that matches one decides its category.
CATEGORIES = [
    ("logging", ("logging/__init__", "oslo_log", "log.py:")),
    ("json parse", ("json/decoder", "json/__init__.py", "models.py:json")),
    ("http (requests/urllib3/socket)", ("urllib3/", "requests/", "http/client",
                                        "socket.py", "ssl.py", "eventlet/green")),
    ("collector convert (DataPoint)", ("collectors/base", "metrics_conf", "promql.py",
                                       "promql_eval.py")),
    ("collector (prometheus)", ("collectors/prometheus", "collectors/_prometheus")),
    ("rating (hashmap)", ("rating/",)),
    ("storage (sqlalchemy/sqlite)", ("sqlalchemy/", "storage/sql", "sqlite3")),
    ("tooz / locks", ("tooz/", "fasteners", "oslo_concurrency")),
    ("eventlet hub / greenlet", ("eventlet/hubs", "eventlet/greenthread", "eventlet/greenpool",
                                 "eventlet/event", "greenlet")),
    ("thread pool", ("concurrent/futures", "threading.py")),
    ("orchestrator", ("orchestrator.py", "cloudkitty_proc/worker.py", "cloudkitty_proc/pipeline.py",
                      "cloudkitty_proc/lookahead.py", "cloudkitty_proc/leases.py",
                      "cloudkitty_proc/schedule.py")),
    ("imports / startup", ("<frozen importlib", "importlib/")),
]


#: leaf functions that are blocked waits, not CPU: py-spy's idle detection
#: misses some of them in this VM (they are excluded from the percentages)
IDLE_LEAVES = {"Condition.wait", "Event.wait", "SignalManager._wait_forever",
               "Connection._recv", "Hub.do_poll", "Thread.join", "Thread._wait_for_tstate_lock",
               "Semaphore.acquire", "SimpleQueue.get", "Queue.get", "EpollSelector.select",
               "PollSelector.select", "sleep"}


def _parse_collapsed(path: pathlib.Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        frames_part, _, count = line.rpartition(" ")
        if not frames_part:
            continue
        frames = frames_part.split(";")
        stacks.append((frames, int(count)))
    return stacks


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py:123)"
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    parts = loc.split("/")
    loc = "/".join(parts[-2:]) if len(parts) > 1 else loc
    return f"{name} ({loc})"


def _func_key(frame: str) -> str:
    name, _, loc = frame.partition(" (")
    file = loc.rsplit(":", 1)[0]
    parts = file.split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


def analyse_profile(workdir: pathlib.Path, args: argparse.Namespace, spec: RunSpec,
                    periods: int) -> dict:
    files = sorted(workdir.glob("worker-*.collapsed"))
    if not files:
        log = (workdir / "py-spy.log")
        return {"error": log.read_text()[-2000:] if log.exists() else "no profile"}
    stacks = _parse_collapsed(files[0])
    outdir = pathlib.Path(args.profile_out or ".")
    outdir.mkdir(parents=True, exist_ok=True)
    tag = f"{spec.workload}-w{spec.workers}-{spec.executor}-g{spec.greenthreads}"
    raw_copy = outdir / f"profile-{tag}.collapsed"
    shutil.copy(files[0], raw_copy)
    svg = outdir / f"profile-{tag}.svg"
    busy = [(f, c) for f, c in stacks if f and f[-1].split(" (", 1)[0] not in IDLE_LEAVES]
    write_flamegraph(busy, svg, title=f"cloudkitty-proc worker (busy samples), {spec.label}")
    total = sum(c for _, c in stacks) or 1
    by_thread: collections.Counter = collections.Counter()
    self_cost: collections.Counter = collections.Counter()
    incl_cost: collections.Counter = collections.Counter()
    cats: collections.Counter = collections.Counter()
    idle = 0
    for frames, count in stacks:
        thread = frames[0] if frames and frames[0].startswith("thread (") else "?"
        body = frames[1:] if thread != "?" else frames
        if not body or body[-1].split(" (", 1)[0] in IDLE_LEAVES:
            idle += count
            continue
        by_thread[thread] += count
        self_cost[_func_key(body[-1])] += count
        for key in {_func_key(f) for f in body}:
            incl_cost[key] += count
        cat = "other"
        for f in reversed(body):
            hit = next((c for c, subs in CATEGORIES if any(s in f for s in subs)), None)
            if hit is not None:
                cat = hit
                break
        cats[cat] += count
    total = (total - idle) or 1
    # wall time of the worker's run thread (idle samples included: --idle)
    run_stacks = [(f, c) for f, c in stacks if f and "_service_run" in f[0]]
    run_total = sum(c for _, c in run_stacks) or 1
    run_wall: collections.Counter = collections.Counter()
    for frames, count in run_stacks:
        leaf = frames[-1].split(" (", 1)[0]
        joined = ";".join(frames)
        if leaf in IDLE_LEAVES:
            what = "idle: waiting for replies (pool not full or latency)"
        elif "GreenThread.main" in joined or "_spawn_n_impl" in joined:
            what = "green threads: HTTP + JSON + DataPoints (hub)"
        elif "commit_period" in joined:
            what = "storage.commit_period (hub blocked)"
        elif "/rating/" in joined:
            what = "rating chain (hub blocked)"
        elif "log" in leaf.lower() or "logging/" in joined:
            what = "logging"
        elif "get_states" in joined or "get_state" in joined:
            what = "state reads"
        elif "tooz" in joined:
            what = "tooz lock"
        elif "importlib" in joined:
            what = "startup (imports)"
        else:
            what = "other (orchestrator, executor, frames)"
        run_wall[what] += count
    rate = args.profile_rate
    per = (lambda n: n / rate * 1000 / periods) if periods else (lambda n: 0.0)
    return {
        "samples": total, "idle_samples": idle, "rate": rate, "svg": str(svg),
        "collapsed": str(raw_copy),
        "threads": [(t, n, per(n)) for t, n in by_thread.most_common(8)],
        "run_thread_wall": [(w, n, n / run_total, per(n)) for w, n in run_wall.most_common()],
        "categories": [(c, n, n / total, per(n)) for c, n in cats.most_common()],
        "self": [(k, n, n / total, per(n)) for k, n in self_cost.most_common(args.profile_top)],
        "inclusive": [(k, n, n / total, per(n))
                      for k, n in incl_cost.most_common(args.profile_top * 2)],
    }


def write_flamegraph(stacks: list[tuple[list[str], int]], path: pathlib.Path,
                     title: str = "") -> None:
    """A small static SVG flame graph from collapsed stacks."""
    root: dict = {"n": 0, "c": {}}
    for frames, count in stacks:
        node = root
        node["n"] += count
        for f in frames:
            node = node["c"].setdefault(f, {"n": 0, "c": {}})
            node["n"] += count
    width, row = 1600.0, 16
    total = root["n"] or 1
    rects: list[str] = []
    depth_max = [0]

    def walk(node: dict, x: float, depth: int) -> None:
        depth_max[0] = max(depth_max[0], depth)
        for name, child in sorted(node["c"].items()):
            w = child["n"] / total * width
            if w >= 0.5:
                label = _short(name)
                def esc_(t: str) -> str:
                    return (t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                            .replace('"', "&quot;"))
                esc = esc_(label)
                hue = 20 + (zlib.crc32(name.split(" (")[0].encode()) % 40)
                text = esc if w > 7 * len(label) else esc_(label[:max(0, int(w / 7) - 1)])
                rects.append(
                    f'<g><title>{esc} ({child["n"]} samples, {child["n"] / total:.1%})</title>'
                    f'<rect x="{x:.1f}" y="{{Y{depth}}}" width="{w:.1f}" height="{row - 1}" '
                    f'fill="hsl({hue},90%,60%)"/>'
                    f'<text x="{x + 2:.1f}" y="{{T{depth}}}" font-size="11">{text}</text></g>')
                walk(child, x, depth + 1)
            x += w

    walk(root, 0.0, 0)
    height = (depth_max[0] + 2) * row + 20
    body = "\n".join(rects)
    for d in range(depth_max[0] + 1):
        y = height - (d + 1) * row - 4
        body = body.replace(f"{{Y{d}}}", str(y)).replace(f"{{T{d}}}", str(y + 12))
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
        f'font-family="monospace"><text x="4" y="14" font-size="13">{title} '
        f'({total} samples)</text>\n{body}\n</svg>\n')


# ---------------------------------------------------------------------------
# The floor: json-parse the same replies + insert the same rows
# ---------------------------------------------------------------------------

def build_query(metric: str, agg: str, scope: str, labels: list[str]) -> str:
    return (f'{agg}({agg}_over_time({metric}{{{SCOPE_KEY}="{scope}"}}[3600s])) '
            f'by ({", ".join(labels)})')


def split_labels(labels: dict, groupby: list[str], metadata: list[str],
                 scope: str) -> tuple[dict, dict]:
    """A series' groupby and metadata dicts, as the collector builds them."""
    gb = {k: labels.get(k, "") for k in groupby}
    gb[SCOPE_KEY] = scope
    return gb, {k: labels.get(k, "") for k in metadata}


def measure_floor(spec: RunSpec, workdir_base: str | None) -> dict:
    """The floor of the CPU path, in-process, one period at a time (as the
    daemon streams): json.loads of the same replies (stdlib json, as
    requests' ``Response.json``), building rows shaped like ``rated_data``
    (groupby/metadata as sorted-key JSON, as the storage does) and inserting
    them into the same kind of database with SQLAlchemy Core executemany in
    one transaction per period; plus, on SQLite, the same insert with raw
    sqlite3 executemany (one statement execution a row); and the floor
    with the daemon's own libraries: orjson to parse and to write the
    label JSON, rows as tuples, and raw multi-row INSERTs of 64 rows (then
    32, 16, ... 1), as the daemon commits on SQLite. Rendering the replies
    is not timed."""
    import orjson
    import sqlalchemy as sa

    sys.path.insert(0, str(REPO))
    from cloudkitty_proc.storage import models

    gen = fake_prometheus.ReplyGenerator(series=spec.series, cache_size=1 << 16)
    scopes = scope_names(spec.scopes)
    queries = []
    for metric, usage, unit, groupby, metadata, agg in METRICS:
        labels = list(dict.fromkeys([*groupby, SCOPE_KEY, *metadata]))
        queries.append((metric, agg, labels, usage, unit, groupby, metadata))

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="ckp-floor-", dir=workdir_base))
    remote = bool(spec.db and not spec.db.startswith("sqlite"))
    if remote:
        engine = sa.create_engine(spec.db)
        table = models.rated_data.to_metadata(sa.MetaData(), name="bench_floor_rated_data")
        table.drop(engine, checkfirst=True)
        table.create(engine)
        kind = engine.dialect.name
        con = None
    else:
        engine = sa.create_engine(f"sqlite:///{tmp / 'floor.sqlite'}")

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi, _rec):
            dbapi.isolation_level = None
            dbapi.execute("PRAGMA journal_mode = WAL")
            dbapi.execute("PRAGMA synchronous = NORMAL")

        @sa.event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        table = models.rated_data
        models.metadata.create_all(engine, tables=[table])
        kind = "sqlite"
        con = sqlite3.connect(tmp / "floor-raw.sqlite", isolation_level=None)
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA synchronous = NORMAL")
        con.execute('CREATE TABLE rated_data (id INTEGER PRIMARY KEY, scope_id TEXT, '
                    '"begin" TEXT, "end" TEXT, type TEXT, unit TEXT, qty TEXT, price TEXT, '
                    'groupby TEXT, metadata TEXT)')
        con.execute('CREATE INDEX ix ON rated_data (scope_id, "begin", type)')
        con_multi = sqlite3.connect(tmp / "floor-multi.sqlite", isolation_level=None)
        for statement in ("PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL",
                          *(sql for (sql,) in con.execute(
                              "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"))):
            con_multi.execute(statement)
    raw_sql = ('INSERT INTO rated_data (scope_id, "begin", "end", type, unit, qty, price, '
               'groupby, metadata) VALUES (?,?,?,?,?,?,?,?,?)')
    # 64 rows per INSERT, then 32, 16, ... for the rest of a period
    multi_sql = {k: raw_sql.replace("(?,?,?,?,?,?,?,?,?)", ", ".join(["(?,?,?,?,?,?,?,?,?)"] * k))
                 for k in (64, 32, 16, 8, 4, 2, 1)}
    chain = itertools.chain.from_iterable
    ins = table.insert()
    loads = json.loads
    dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
    oloads = orjson.loads

    def odumps(labels, _opt=orjson.OPT_SORT_KEYS, _dumps=orjson.dumps):
        return _dumps(labels, option=_opt).decode()

    clock = time.perf_counter
    t_parse = t_rows = t_insert = t_raw = t_multi = t_oparse = t_orows = 0.0
    n = periods = 0
    try:
        for scope in scopes:
            for p in range(spec.periods):
                b = BEGIN + datetime.timedelta(hours=p)
                e = b + datetime.timedelta(hours=1)
                bodies = [gen.render(build_query(metric, agg, scope, labels), e.timestamp())
                          for metric, agg, labels, *_ in queries]
                t0 = clock()
                results = [loads(body.decode("utf-8"))["data"]["result"] for body in bodies]
                t1 = clock()
                bn, en = b.replace(tzinfo=None), e.replace(tzinfo=None)
                rows = []
                for (_m, _a, _l, usage, unit, groupby, metadata), result in zip(queries, results):
                    for item in result:
                        gb, md = split_labels(item["metric"], groupby, metadata, scope)
                        rows.append({"scope_id": scope, "begin": bn, "end": en, "type": usage,
                                     "unit": unit, "qty": item["value"][1], "price": "0",
                                     "groupby": dumps(gb), "metadata": dumps(md)})
                t2 = clock()
                with engine.begin() as conn:
                    conn.execute(ins, rows)
                t3 = clock()
                if con is not None:
                    bs, es = str(bn), str(en)
                    con.execute("BEGIN IMMEDIATE")
                    con.executemany(raw_sql, [(r["scope_id"], bs, es, r["type"], r["unit"],
                                               r["qty"], r["price"], r["groupby"], r["metadata"])
                                              for r in rows])
                    con.execute("COMMIT")
                t4 = clock()
                # the same with the daemon's libraries: orjson, rows as tuples
                results = [oloads(body)["data"]["result"] for body in bodies]
                t5 = clock()
                bs, es = str(bn), str(en)
                tuples = []
                for (_m, _a, _l, usage, unit, groupby, metadata), result in zip(queries, results):
                    for item in result:
                        gb, md = split_labels(item["metric"], groupby, metadata, scope)
                        tuples.append((scope, bs, es, usage, unit, item["value"][1], "0",
                                       odumps(gb), odumps(md)))
                t6 = clock()
                if con is not None:
                    con_multi.execute("BEGIN IMMEDIATE")
                    i, size = 0, 64
                    while i < len(tuples):
                        while len(tuples) - i < size:
                            size //= 2
                        con_multi.execute(multi_sql[size], list(chain(tuples[i:i + size])))
                        i += size
                    con_multi.execute("COMMIT")
                t7 = clock()
                t_parse += t1 - t0
                t_rows += t2 - t1
                t_insert += t3 - t2
                t_raw += t4 - t3
                t_oparse += t5 - t4
                t_orows += t6 - t5
                t_multi += t7 - t6
                n += len(rows)
                periods += 1
    finally:
        if remote:
            table.drop(engine)
        engine.dispose()
        if con is not None:
            con.close()
            con_multi.close()
        shutil.rmtree(tmp, ignore_errors=True)
    total = t_parse + t_rows + t_insert
    raw_total = (t_parse + t_rows + t_raw) if con is not None else None
    multi_total = (t_oparse + t_orows + t_multi) if con is not None else None
    return {"points": n, "periods": periods, "db": kind,
            "parse_s": t_parse, "rows_s": t_rows, "insert_s": t_insert,
            "raw_insert_s": t_raw if con is not None else None,
            "total_s": total, "points_per_s": n / total if total else None,
            "raw_points_per_s": (n / raw_total) if raw_total else None,
            "orjson_parse_s": t_oparse, "orjson_rows_s": t_orows,
            "multi_insert_s": t_multi if con is not None else None,
            "multi_points_per_s": (n / multi_total) if multi_total else None}


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

MB = 1024 * 1024


def summarize(r: dict, spec: RunSpec) -> dict:
    db, srv = r["db"], r["server"]
    window = r["window"] or r["wall"]
    periods = db["periods"]
    s = {
        "label": spec.label, "rc": r["rc"], "periods": periods,
        "expected_periods": spec.total_periods, "points": db["rows"],
        "expected_points": spec.total_points, "errors": db["errors"],
        "wall_s": r["wall"], "window_s": r["window"],
        "periods_per_s": periods / window if window else None,
        "periods_per_s_wall": periods / r["wall"],
        "points_per_s": db["rows"] / window if window else None,
        "points_per_s_wall": db["rows"] / r["wall"],
        "cpu_tree_s": r["cpu_tree"],
        "cpu_workers_window_s": sum(w["cpu_window"] for w in r["workers"]),
        "queries": srv["queries"], "max_inflight": srv["max_active"],
        "mean_inflight": ((srv["busy_seconds"] / window)
                          if window and srv["busy_seconds"] is not None else None),
        "server_cpu_s": r["server_cpu"], "per_worker_periods": db["per_worker"],
        "worker_commits": db["worker_commits"],
        "code": r.get("code"), "stalled": r.get("stalled"),
        "cpu_ref_ms": r.get("cpu_ref_ms"),
    }
    s["cpu_ms_per_period_tree"] = s["cpu_tree_s"] / periods * 1000 if periods else None
    s["cpu_ms_per_period_worker"] = (s["cpu_workers_window_s"] / periods * 1000
                                     if periods else None)
    bound = spec.bound()
    s["prometheus"] = spec.prometheus
    if spec.prometheus == "real":
        prom, b = r.get("prometheus") or {}, r.get("bound")
        pw = prom.get("cpu_window_s")
        s["prom_cpu_window_s"] = pw
        s["prom_cpu_ms_per_period"] = pw / periods * 1000 if pw is not None and periods else None
        s["prom_setup_s"] = prom.get("setup_s")
        s["prom_compaction"] = prom.get("compaction")
        s["bound"] = b
        bound = b["scope_periods_per_s"] if b else None
    s["bound_periods_per_s"] = bound
    s["ratio_to_bound"] = (s["periods_per_s"] / bound) if (bound and s["periods_per_s"]) else None
    s["workers"] = [{
        "pid": w["pid"], "peak_rss_mb": w["peak_rss"] / MB, "hwm_end_mb": w["hwm_end"] / MB,
        "rss_end_mb": w["rss_end"] / MB,
        "rss_10_mb": w["rss_10"] / MB if w["rss_10"] else None,
        "hwm_10_mb": w["hwm_10"] / MB if w["hwm_10"] else None,
        "growth": (w["hwm_end"] / w["hwm_10"]) if w["hwm_10"] else None,
        "cpu_s": w["cpu"], "cpu_window_s": w["cpu_window"],
        "rss_deciles_mb": [round(x / MB, 1) if x else None for x in w["rss_deciles"]],
    } for w in r["workers"]]
    return s


def fmt(v, spec=",.1f", none="-"):
    return none if v is None else format(v, spec)


def print_run(s: dict, r: dict, spec: RunSpec) -> None:
    ok = (s["rc"] == 0 and s["periods"] == s["expected_periods"]
          and s["points"] == s["expected_points"])
    print(f"\n=== {s['label']} === (code {r.get('code')})")
    if r.get("stalled"):
        print(f"  !! STALLED: no commit for --stall-timeout s after {r['stalled']['periods']} "
              f"periods; stacks: {', '.join(r['stalled']['stacks'] or [])}; work directory "
              f"kept: {r['workdir']}")
    if not ok:
        print(f"  !! rc={s['rc']} periods {s['periods']}/{s['expected_periods']} "
              f"points {s['points']}/{s['expected_points']} errors={s['errors']}")
        for line in r.get("daemon_tail", []):
            print("     |", line)
    if s.get("cpu_ref_ms"):
        print(f"  machine        CPU reference {s['cpu_ref_ms']:.1f} ms before the run (a fixed "
              "json/Decimal mix, best of 3; lower = faster machine right now)")
    print(f"  periods        {s['periods']:,} committed ({s['expected_periods']:,} expected), "
          f"{s['points']:,} rated datapoints stored")
    start = ("first worker started" if s.get("prometheus") == "real" else "first query")
    print(f"  wall           {s['wall_s']:.2f} s whole command; processing window "
          f"({start} -> last commit) {fmt(s['window_s'], '.2f')} s")
    print(f"  periods/s      {fmt(s['periods_per_s'])} (window)   "
          f"{fmt(s['periods_per_s_wall'])} (wall)")
    print(f"  datapoints/s   {fmt(s['points_per_s'], ',.0f')} (window)   "
          f"{fmt(s['points_per_s_wall'], ',.0f')} (wall)")
    if s.get("prometheus") == "real":
        print_real(s, spec)
    elif s["bound_periods_per_s"]:
        print(f"  latency bound  {s['bound_periods_per_s']:,.1f} periods/s "
              f"(= {spec.greenthreads} / ({spec.metrics} x {spec.latency_ms:g} ms) x "
              f"{spec.workers} worker(s)); ratio "
              f"{fmt(s['ratio_to_bound'] and s['ratio_to_bound'] * 100, '.1f')} %")
    print(f"  CPU            {s['cpu_tree_s']:.2f} s process tree "
          f"({fmt(s['cpu_ms_per_period_tree'], '.2f')} ms/period incl. startup); workers "
          f"in window {s['cpu_workers_window_s']:.2f} s "
          f"({fmt(s['cpu_ms_per_period_worker'], '.2f')} ms/period)")
    if s.get("prometheus") == "real":
        print(f"  queries        {fmt(s['queries'], ',.0f')} answered by Prometheus "
              f"(its /api/v1/query counter); its CPU over the whole run "
              f"{fmt(s['server_cpu_s'], '.2f')} s")
    else:
        print(f"  queries        {s['queries']:,} served; in flight max {s['max_inflight']}, "
              f"mean {fmt(s['mean_inflight'], '.1f')} (pool size {spec.greenthreads} x "
              f"{spec.workers}); fake server CPU {fmt(s['server_cpu_s'], '.2f')} s")
    if len(s["per_worker_periods"]) > 1:
        print("  per worker     " + ", ".join(f"{k}: {v}" for k, v in
                                              sorted(s["per_worker_periods"].items())))
        spans = [v for v in s["worker_commits"].values() if None not in v]
        if len(spans) > 1:
            # how much of the window only some of the workers were working
            firsts, lasts = [a for a, _ in spans], [b for _, b in spans]
            print(f"  worker skew    first commits {(max(firsts) - min(firsts)) * 1000:.0f} ms "
                  f"apart, last commits {(max(lasts) - min(lasts)) * 1000:.0f} ms apart "
                  "(the window includes both)")
    for w in s["workers"]:
        print(f"  worker {w['pid']:>7}  peak RSS {w['peak_rss_mb']:.1f} MB (VmHWM "
              f"{w['hwm_end_mb']:.1f}); after 10 % of periods RSS {fmt(w['rss_10_mb'])} / "
              f"VmHWM {fmt(w['hwm_10_mb'])} MB; at end RSS {w['rss_end_mb']:.1f} MB; "
              f"end/10% peak {fmt(w['growth'], '.3f')}; CPU {w['cpu_s']:.2f} s")
        print("                  RSS MB at 10 %, 20 %, ... 100 % of periods: "
              + " ".join(fmt(x) for x in w["rss_deciles_mb"]))
    occ = r.get("occupancy")
    if occ:
        print("  occupancy      share of the window by queries in flight: "
              + ", ".join(f"{k}: {v * 100:.1f} %" for k, v in occ["bands"].items())
              + f"; scope changes {occ['scope_changes']}, mean gap "
              f"{fmt(occ['scope_gap_ms'], '.1f')} ms (last reply -> next scope's first query)")
        if occ.get("turn_ms"):
            t = occ["turn_ms"]
            print(f"  client turn    reply sent -> next request on the connection: median "
                  f"{t['median']:.2f} ms, p90 {t['p90']:.2f} ms, mean {t['mean']:.2f} ms")
    prof = r.get("profile")
    if prof:
        print_profile(prof)


def print_real(s: dict, spec: RunSpec) -> None:
    """The real-Prometheus figures of a run: Prometheus' CPU, the bound."""
    periods = s["periods"] or 0
    comp = s.get("prom_compaction") or {}
    print(f"  prometheus     ready and verified in {fmt(s.get('prom_setup_s'), '.1f')} s "
          f"({fmt(comp.get('blocks_at_start'), 'g')} block(s) loaded"
          + (f", waited {comp['waited_s']} s for the first compaction" if comp.get("waited_s")
             else "") + ")")
    print(f"  CPU per scope-period  workers {fmt(s['cpu_ms_per_period_worker'], '.2f')} ms, "
          f"Prometheus {fmt(s.get('prom_cpu_ms_per_period'), '.2f')} ms "
          f"({fmt(s.get('prom_cpu_window_s'), '.2f')} s in the window, {periods:,} scope-periods)")
    b = s.get("bound")
    if not b:
        print("  bound          not measured")
        return
    shape = ("per scope" if b["per_query"] == 1 else
             f"batches of {b['per_query']} scopes x {b['per_range']} periods")
    print(f"  bound          {fmt(b['scope_periods_per_s'])} scope-periods/s: a minimal client, "
          f"{spec.workers} process(es) x {spec.greenthreads} keep-alive connections, "
          f"{b['queries']:,} queries ({shape}, {'gzip' if spec.compress else 'identity'}), "
          f"{b['elapsed_s']:.2f} s, {b['bytes'] / 1e6:.1f} MB read, {b['series']:,} series"
          + (f", {b['errors']} errors" if b["errors"] else ""))
    print(f"                 Prometheus CPU under it {fmt(b['prom_cpu_ms_per_scope_period'], '.2f')} "
          f"ms per scope-period; daemon / bound = "
          f"{fmt(s['ratio_to_bound'] and s['ratio_to_bound'] * 100, '.1f')} %")


def print_profile(prof: dict) -> None:
    if "error" in prof:
        print(f"  profile: FAILED: {prof['error']}")
        return
    print(f"  profile        {prof['samples']} busy samples ({prof.get('idle_samples', 0)} "
          f"blocked-wait samples excluded) at {prof['rate']} Hz "
          f"-> {prof['svg']}, {prof['collapsed']}")
    print("    by thread:")
    for t, n, ms in prof["threads"]:
        print(f"      {n:7d}  {ms:7.2f} ms/period  {t}")
    if prof.get("run_thread_wall"):
        print("    run thread wall time (idle included):")
        for w, n, frac, ms in prof["run_thread_wall"]:
            print(f"      {frac:6.1%}  {ms:7.2f} ms/period  {w}")
    print("    CPU by category (leaf-most matching frame, idle excluded):")
    for c, n, frac, ms in prof["categories"]:
        print(f"      {frac:6.1%}  {ms:7.2f} ms/period  {c}")
    print("    top self:")
    for k, n, frac, ms in prof["self"]:
        print(f"      {frac:6.1%}  {ms:7.2f} ms/period  {k}")
    print("    top inclusive:")
    for k, n, frac, ms in prof["inclusive"]:
        print(f"      {frac:6.1%}  {ms:7.2f} ms/period  {k}")


def print_floor(f: dict, measured_pps: float | None) -> None:
    print(f"\n=== floor ({f['points']:,} datapoints, {f['periods']} periods, {f['db']}) ===")
    multi = f.get("multi_points_per_s")
    print(f"  json.loads of the same replies   {f['parse_s']:.3f} s"
          + (f"   (orjson.loads: {f['orjson_parse_s']:.3f} s)" if multi else ""))
    print(f"  build rows (groupby/metadata JSON) {f['rows_s']:.3f} s"
          + (f"   (orjson, tuples: {f['orjson_rows_s']:.3f} s)" if multi else ""))
    print(f"  insert, SQLAlchemy executemany, 1 tx/period  {f['insert_s']:.3f} s")
    if f["raw_insert_s"] is not None:
        print(f"  insert, raw sqlite3 executemany, 1 tx/period {f['raw_insert_s']:.3f} s")
    if multi:
        print(f"  insert, raw sqlite3 64-row INSERTs, 1 tx/period {f['multi_insert_s']:.3f} s")
    print(f"  floor, stdlib json + SQLAlchemy: {f['total_s']:.3f} s = {f['points_per_s']:,.0f} "
          "datapoints/s" + (f"; stdlib json + raw sqlite3 executemany: "
                            f"{f['raw_points_per_s']:,.0f}/s" if f["raw_points_per_s"] else ""))
    if multi:
        print(f"  floor with the daemon's libraries (orjson, raw sqlite3 64-row INSERTs, "
              f"as the daemon on SQLite): {multi:,.0f} datapoints/s")
    if measured_pps:
        line = f"  measured daemon / floor: {measured_pps / f['points_per_s']:.1%} (SQLAlchemy)"
        if f["raw_points_per_s"]:
            line += f", {measured_pps / f['raw_points_per_s']:.1%} (raw sqlite3 executemany)"
        if multi:
            line += f", {measured_pps / multi:.1%} (the daemon's libraries)"
        print(line)


def print_table(rows: list[dict]) -> None:
    print("\n=== summary ===")
    head = (f"{'run':<48} {'periods/s':>9} {'%bound':>7} {'dp/s':>9} {'wall s':>7} "
            f"{'window s':>8} {'CPU s':>7} {'ms/per':>7} {'inflight':>9} {'RSS MB':>7} "
            f"{'end/10%':>7} ok {'cpu ref':>7} {'prom ms':>7}")
    print(head)
    for s in rows:
        ok = (s["rc"] == 0 and s["periods"] == s["expected_periods"]
              and s["points"] == s["expected_points"])
        rss = max((w["peak_rss_mb"] for w in s["workers"]), default=None)
        growth = max((w["growth"] or 0 for w in s["workers"]), default=None)
        print(f"{s['label']:<48} {fmt(s['periods_per_s']):>9} "
              f"{fmt(s['ratio_to_bound'] and s['ratio_to_bound'] * 100, '.1f'):>7} "
              f"{fmt(s['points_per_s'], ',.0f'):>9} {s['wall_s']:>7.2f} "
              f"{fmt(s['window_s'], '.2f'):>8} {s['cpu_tree_s']:>7.2f} "
              f"{fmt(s['cpu_ms_per_period_worker'], '.2f'):>7} "
              f"{fmt(s['max_inflight'], 'd'):>4}/{fmt(s['mean_inflight'], '.1f'):>4} "
              f"{fmt(rss):>7} {fmt(growth, '.3f'):>7} {'yes' if ok else 'NO ':<3}"
              f"{fmt(s.get('cpu_ref_ms'), '.1f'):>7} "
              f"{fmt(s.get('prom_cpu_ms_per_period'), '.2f'):>7}")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def spec_from_args(args: argparse.Namespace, **over) -> RunSpec:
    w = dict(WORKLOADS[args.workload])
    for key in ("scopes", "periods", "series", "latency_ms"):
        val = getattr(args, key)
        if val is not None:
            w[key] = val
    kw = dict(workload=args.workload, workers=args.workers, greenthreads=args.greenthreads,
              executor=args.executor, lookahead=args.lookahead,
              max_periods_per_lock=args.max_periods_per_lock, db=args.db,
              log_level=args.log_level, storage=args.storage,
              prometheus=args.prometheus or ("real" if args.workload in REAL_WORKLOADS
                                             else "fake"),
              max_scopes_per_query=args.max_scopes_per_query,
              max_periods_per_query=args.max_periods_per_query,
              lease_partitions=args.lease_partitions, compress=args.compress,
              code=args.code, sample_interval=args.sample_interval,
              bound_client=args.bound, **w)
    kw.update(over)
    return RunSpec(**kw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Catch-up benchmark of cloudkitty-proc --oneshot against a fake Prometheus.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(__doc__.split("Examples::", 1)[1]))
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    ap.add_argument("--scopes", type=int)
    ap.add_argument("--periods", type=int, help="hourly periods per scope")
    ap.add_argument("--series", type=int, help="result items per query")
    ap.add_argument("--latency-ms", type=float, dest="latency_ms")
    ap.add_argument("--workers", type=int, default=1, help="[orchestrator] max_workers")
    ap.add_argument("--greenthreads", type=int, default=16,
                    help="[orchestrator] max_threads")
    ap.add_argument("--executor", choices=("greenpool", "threads"), default="greenpool",
                    help="[orchestrator] collect_executor")
    ap.add_argument("--lookahead", type=int, help="[orchestrator] lookahead_periods")
    ap.add_argument("--max-periods-per-lock", type=int)
    ap.add_argument("--db", help="SQLAlchemy URL (default: SQLite in the work directory); "
                    "its tables are emptied first")
    ap.add_argument("--storage", choices=("sql", "influxdb"), default="sql",
                    help="[storage] backend; influxdb starts a private influxd "
                    "(tests/influxdb_server.py) and runs each spec on sql too, for the ratio")
    ap.add_argument("--prometheus", choices=("fake", "real"),
                    help="fake: benchmarks/fake_prometheus.py (default, except for W1r and "
                    "W4r); real: a Prometheus server on the workload's backfilled samples "
                    "(cached under --workdir/bench-prom or ~/.cache/cloudkitty-proc/bench-prom), "
                    "then the bound client")
    ap.add_argument("--sample-interval", type=int, default=300,
                    help="real mode: seconds between two samples of a series (divides 3600)")
    ap.add_argument("--no-bound", dest="bound", action="store_false", default=True,
                    help="real mode: skip the bound client")
    ap.add_argument("--max-scopes-per-query", type=int,
                    help="[collect] max_scopes_per_query (default: not written, the "
                    "daemon's default); the bound client uses the same query shape")
    ap.add_argument("--max-periods-per-query", type=int,
                    help="[collect] max_periods_per_query (default: not written); 1: "
                    "instant queries, one per period; the bound client does the same")
    ap.add_argument("--lease-partitions", type=int,
                    help="[orchestrator] lease_partitions (default: not written)")
    ap.add_argument("--compress", action="store_true",
                    help="[collector_prometheus] compress_replies = true (default: not "
                    "written); the bound client asks for gzip too")
    ap.add_argument("--code", help="run the daemon from this source tree (PYTHONPATH and "
                    "working directory), e.g. a `git worktree add /tmp/base <commit>`")
    ap.add_argument("--log-level", default="INFO",
                    help="level of the cloudkitty_proc loggers (INFO logs each commit)")
    ap.add_argument("--server", choices=("subprocess", "inproc"), default="subprocess",
                    help="run the fake Prometheus as a subprocess (default) or a thread")
    ap.add_argument("--floor", dest="floor", action="store_true", default=None,
                    help="also measure the parse+insert floor (default for W2)")
    ap.add_argument("--no-floor", dest="floor", action="store_false")
    ap.add_argument("--floor-only", action="store_true")
    ap.add_argument("--suite", action="store_true",
                    help="the acceptance runs: W1 with 1 and 2 workers, W2 (+ floor), W3; "
                    "prints each figure against its target")
    ap.add_argument("--w3-scopes", type=int, help="scopes of W3 in --suite (default 10,000)")
    ap.add_argument("--compare", action="store_true",
                    help="run the matrix executors x greenthreads")
    ap.add_argument("--compare-executors", default="greenpool,threads")
    ap.add_argument("--compare-greenthreads", default="8,16,32")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--trace", action="store_true",
                    help="print how full the pool kept the server (query trace)")
    ap.add_argument("--profile", choices=("none", "py-spy"), default="none",
                    help="py-spy the first worker: flame graph SVG, collapsed stacks and "
                    "the top costs per period")
    ap.add_argument("--profile-rate", type=int, default=200)
    ap.add_argument("--profile-top", type=int, default=20)
    ap.add_argument("--profile-out",
                    default=os.path.join(tempfile.gettempdir(), "ckp-bench-profiles"))
    ap.add_argument("--workdir", help="parent of the per-run work directories")
    ap.add_argument("--keep", action="store_true", help="keep work directories (logs, DB)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--stall-timeout", type=float, default=120,
                    help="no commit for this many seconds: dump the workers' stacks "
                    "(py-spy), stop the daemon and keep its work directory (0: never)")
    ap.add_argument("--json", help="append one JSON line per run to this file")
    args = ap.parse_args(argv)
    if args.sample_interval <= 0 or 3600 % args.sample_interval:
        ap.error("--sample-interval must divide 3600")
    if args.code and not (pathlib.Path(args.code) / "cloudkitty_proc").is_dir():
        ap.error(f"--code {args.code}: no cloudkitty_proc/ there")

    specs: list[RunSpec] = []
    if args.suite:
        # the acceptance runs of issue 6 (same executor/greenthreads flags)
        args.workload = "W1"
        specs += [spec_from_args(args, workers=1), spec_from_args(args, workers=2)]
        args.workload = "W2"
        specs.append(spec_from_args(args, workers=1))
        args.workload = "W3"
        specs.append(spec_from_args(args, workers=1,
                                    **({"scopes": args.w3_scopes} if args.w3_scopes else {})))
    elif args.compare:
        for ex in args.compare_executors.split(","):
            for g in args.compare_greenthreads.split(","):
                specs.append(spec_from_args(args, executor=ex.strip(), greenthreads=int(g)))
    else:
        specs.append(spec_from_args(args))
    if args.storage != "sql" and not args.floor_only:
        # each run again on the sql backend, for the ratio
        specs = [s for sp in specs for s in (sp, dataclasses.replace(sp, storage="sql"))]
    if args.floor_only:
        specs = specs[:1]
    floor_specs = [sp for sp in specs if sp.workload == "W2"][:1]
    if args.floor or (args.floor is None and not floor_specs and args.floor_only):
        floor_specs = specs[:1]
    if args.floor is False:
        floor_specs = []

    summaries = []
    with contextlib.ExitStack() as stack:
        if args.storage == "influxdb" and not args.floor_only:
            sys.path.insert(0, str(REPO))
            from tests.influxdb_server import running_influxdb
            influx_dir = tempfile.mkdtemp(prefix="ckp-bench-influxd-", dir=args.workdir)
            if not args.keep:
                stack.callback(shutil.rmtree, influx_dir, ignore_errors=True)
            args.influx_server = stack.enter_context(running_influxdb(influx_dir))
        if not args.floor_only:
            run_all(specs, args, summaries)
    for fspec in floor_specs:
        f = measure_floor(fspec, args.workdir)
        best = max((s["points_per_s"] or 0 for s in summaries
                    if s["label"] == fspec.label), default=None)
        print_floor(f, best)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps({"floor": f, "spec": fspec.label}) + "\n")
    if args.suite:
        print_targets(summaries)
    bad = [s for s in summaries if s["rc"] != 0 or s["periods"] != s["expected_periods"]]
    return 1 if bad else 0


def run_all(specs: list[RunSpec], args: argparse.Namespace, summaries: list[dict]) -> None:
    """Run every spec (``--repeat`` times), print each, then the table."""
    for spec in specs:
        for _ in range(args.repeat):
            print(f"running {spec.label} ...", flush=True)
            r = run_one(spec, args)
            s = summarize(r, spec)
            s["influx"] = r.get("influx")
            summaries.append(s)
            print_run(s, r, spec)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps({"summary": s, "profile": r.get("profile"),
                                         "at": time.time()}, default=str) + "\n")
    if len(summaries) > 1:
        print_table(summaries)
    if args.storage != "sql":
        print_storage_ratio(summaries)


def print_storage_ratio(summaries: list[dict]) -> None:
    """Each influxdb run against the sql run of the same spec after it."""
    print("\n=== influxdb vs sql (SQLite) ===")
    for a, b in zip(summaries, summaries[1:]):
        if not a.get("influx") or b.get("influx") or "influxdb" not in a["label"].split():
            continue
        i, periods = a["influx"], a["periods"] or 1
        ratio = (a["points_per_s"] / b["points_per_s"]
                 if a["points_per_s"] and b["points_per_s"] else None)
        print(f"  {a['label']}: {fmt(a['points_per_s'], ',.0f')} datapoints/s vs "
              f"{fmt(b['points_per_s'], ',.0f')} on SQLite: ratio {fmt(ratio, '.2f')}")
        print(f"    InfluxDB: {i['requests']:,} HTTP requests ({i['writes']:,} writes, "
              f"{i['queries']:,} queries) = {i['requests'] / periods:.2f} per period; "
              f"{i['points_written']:,} points written, {i['points_stored']:,} stored; "
              f"influxd CPU {i['cpu_s']:.2f} s")


def print_targets(summaries: list[dict]) -> None:
    """Issue 6 acceptance figures against their targets."""
    print("\n=== issue 6 targets ===")
    for s in summaries:
        label = s["label"]
        if label.startswith("W1") and " w=1 " in label:
            got, want, what = s["periods_per_s"], 144.0, "periods/s"
        elif label.startswith("W1") and " w=2 " in label:
            got, want, what = s["periods_per_s"], 280.0, "periods/s"
        elif label.startswith("W2"):
            got, want, what = s["points_per_s"], 46_000.0, "rated+stored datapoints/s"
        elif label.startswith("W3"):
            growth = max((w["growth"] or 0 for w in s["workers"]), default=None)
            ok = growth is not None and growth <= 1.10
            print(f"  {'PASS' if ok else 'FAIL'}  {label}: peak RSS end / after 10 % = "
                  f"{fmt(growth, '.3f')} (target <= 1.100)")
            continue
        else:
            continue
        ok = got is not None and got >= want
        print(f"  {'PASS' if ok else 'FAIL'}  {label}: {fmt(got, ',.1f')} {what} "
              f"(target >= {want:,.0f}; {fmt(got and got / want * 100, '.0f')} %)")

if __name__ == "__main__":
    sys.exit(main())
