"""The real-Prometheus mode of the catch-up runner (``run_catchup.py
--prometheus real``): the workload's samples backfilled into a Prometheus
2.x server, and the bound client.

* :func:`ensure_data` writes the workload as OpenMetrics (the runner's five
  metrics, the labels its ``metrics.yml`` groups by, values from
  ``fake_prometheus``'s deterministic generator), backfills it with
  ``promtool tsdb create-blocks-from openmetrics`` into a data directory
  cached per workload spec, so that a repeat does not backfill again.
* :class:`RealPrometheus` starts ``prometheus`` on that directory (no scrape
  job, a free loopback port, ``--storage.tsdb.retention.time=100y``), waits
  until it is ready, waits for a pending compaction, and checks that every
  hour holds all its samples before the daemon starts.
* :func:`run_bound` is the bound: a minimal client sending the queries the
  daemon sends, as fast as it can, over as many keep-alive connections as
  the daemon has queries in flight.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import http.client
import itertools
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import zlib
from typing import Any

import fake_prometheus

HOUR = 3600
#: bump when the generated samples change: the cache key includes it
DATA_VERSION = 1
#: a query whose urlencoded form is longer goes as a form POST (as the daemon)
MAX_GET_QUERY = 4096
START_TIMEOUT = 120.0
#: first compaction: Prometheus triggers it a minute after the start
COMPACTION_TIMEOUT = 300.0


# ---------------------------------------------------------------------------
# Queries (the daemon's two shapes)
# ---------------------------------------------------------------------------

def regex_escape(value: str) -> str:
    """``value`` as a literal in an RE2 alternation (metacharacters only)."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$" else c for c in value)


def promql_string(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def query_text(metric: str, agg: str, labels: list[str], scope_key: str,
               scopes: list[str], batched: bool) -> str:
    """Per scope: CloudKitty's ``<agg>(<agg>_over_time(<m>{key="s"}[3600s]))
    by (<labels>)``; batched: ``{key=~"s1|s2|..."}`` and ``by (key, <the
    other labels>)``."""
    if not batched:
        [scope] = scopes
        sel = f'{scope_key}="{promql_string(scope)}"'
        by = labels
    else:
        sel = f'{scope_key}=~"{promql_string("|".join(regex_escape(s) for s in scopes))}"'
        by = [scope_key, *(x for x in labels if x != scope_key)]
    return f"{agg}({agg}_over_time({metric}{{{sel}}}[3600s])) by ({', '.join(by)})"


def rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def worker_queries(metrics: list[tuple], scope_key: str, scopes: list[str], begin: float,
                   periods: int, per_query: int,
                   per_range: int = 1) -> list[tuple[str, dict, int]]:
    """(path, parameters, scope-periods it covers / metrics) of one
    worker's share, in the daemon's order: a scope (or a batch of scopes),
    its periods (chunks of ``per_range`` periods asked by one range query
    when batched), the metrics of a period or chunk."""
    out = []
    batched = per_query > 1
    chunk = per_range if batched else 1
    groups = [scopes[i:i + per_query] for i in range(0, len(scopes), per_query)]
    for group in groups:
        texts = [query_text(m, agg, labels, scope_key, group, batched)
                 for m, agg, labels in metrics]
        for first in range(0, periods, chunk):
            n = min(chunk, periods - first)
            ends = [rfc3339(begin + (p + 1) * HOUR) for p in range(first, first + n)]
            for text in texts:
                if n == 1:
                    out.append(("/api/v1/query", {"query": text, "time": ends[0]}, len(group)))
                else:
                    out.append(("/api/v1/query_range",
                                {"query": text, "start": ends[0], "end": ends[-1],
                                 "step": f"{HOUR}s"}, len(group) * n))
    return out


def encode_request(path: str, params: dict) -> tuple[str, str, bytes | None]:
    """(method, target, form body): GET, or a form POST when the urlencoded
    parameters exceed MAX_GET_QUERY bytes."""
    encoded = urllib.parse.urlencode(params)
    if len(encoded) > MAX_GET_QUERY:
        return "POST", path, encoded.encode()
    return "GET", f"{path}?{encoded}", None


# ---------------------------------------------------------------------------
# Data: OpenMetrics, backfill, cache
# ---------------------------------------------------------------------------

def block_duration_hours(begin: float, hours: int) -> int:
    """The smallest block range promtool accepts (2 h x 3^k) whose aligned
    block holds [begin, begin + hours): one block, nothing to compact."""
    for k in range(10):
        r = 2 * HOUR * 3 ** k
        if int(begin) // r == (int(begin) + hours * HOUR - 1) // r:
            return r // HOUR
    return 2 * 3 ** 9


def data_key(scopes: int, periods: int, series: int, interval: int, begin: float) -> str:
    spec = json.dumps({"v": DATA_VERSION, "scopes": scopes, "periods": periods,
                       "series": series, "interval": interval, "begin": begin},
                      sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def write_openmetrics(path: pathlib.Path, metrics: list[tuple], scope_key: str,
                      scopes: list[str], begin: float, periods: int, series: int,
                      interval: int) -> int:
    """The samples of the workload; returns how many. Each series (scope,
    metric, index) carries the labels the metric's query groups by, valued
    by ``fake_prometheus.label_value``; ``3600 / interval`` samples an hour
    at mid-interval times (never on an hour boundary: Prometheus 2.x range
    selectors include both ends), all equal to the hour's value from
    ``fake_prometheus.series_values``."""
    per_hour = HOUR // interval
    n = 0
    with open(path, "w", buffering=1 << 20) as fh:
        for metric, _agg, labels in metrics:
            fh.write(f"# TYPE {metric} gauge\n")
            others = [x for x in labels if x != scope_key]
            for scope in scopes:
                heads = []
                for i in range(series):
                    lab = {scope_key: scope}
                    for label in others:
                        lab[label] = fake_prometheus.label_value(label, metric, scope, i)
                    heads.append(metric + "{" + ",".join(
                        f'{k}="{promql_string(v)}"' for k, v in sorted(lab.items())) + "} ")
                for h in range(periods):
                    t0 = begin + h * HOUR
                    values = fake_prometheus.series_values(metric, scope, series, t0 + HOUR)
                    for k in range(per_hour):
                        ts = f" {int(t0 + k * interval + interval // 2)}\n"
                        fh.writelines(head + v + ts for head, v in zip(heads, values))
                    n += series * per_hour
        fh.write("# EOF\n")
    return n


def cache_root(workdir: str | None) -> pathlib.Path:
    if workdir:
        return pathlib.Path(workdir) / "bench-prom"
    return pathlib.Path.home() / ".cache" / "cloudkitty-proc" / "bench-prom"


@contextlib.contextmanager
def locked(path: pathlib.Path):
    """An exclusive flock on ``path``: one runner at a time uses a data
    directory (Prometheus runs on it directly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_data(root: pathlib.Path, key: str, *, metrics, scope_key, scopes, begin,
                periods, series, interval, log=print) -> pathlib.Path:
    """The cached data directory of the spec, backfilled if missing (call
    with the lock held)."""
    data = root / key
    if (data / "backfill.json").exists():
        return data
    staging = root / f"{key}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    om = staging / "workload.om"
    t0 = time.monotonic()
    samples = write_openmetrics(om, metrics, scope_key, scopes, begin, periods, series,
                                interval)
    t1 = time.monotonic()
    block_h = block_duration_hours(begin, periods)
    proc = subprocess.run(
        ["promtool", "tsdb", "create-blocks-from", "openmetrics", "--quiet",
         f"--max-block-duration={block_h}h", str(om), str(staging / "data")],
        capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"promtool create-blocks-from openmetrics failed "
                           f"(exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    t2 = time.monotonic()
    size = om.stat().st_size
    om.unlink()
    blocks = [p.name for p in (staging / "data").iterdir() if (p / "meta.json").exists()]
    info = {"samples": samples, "series": len(scopes) * len(metrics) * series,
            "openmetrics_bytes": size, "generate_s": round(t1 - t0, 2),
            "promtool_s": round(t2 - t1, 2), "block_hours": block_h, "blocks": blocks,
            "scopes": len(scopes), "periods": periods, "series_per_query": series,
            "interval": interval, "begin": begin}
    (staging / "backfill.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(data, ignore_errors=True)
    staging.rename(data)
    log(f"  backfilled {samples:,} samples ({size / 1e6:.0f} MB of OpenMetrics, "
        f"{info['generate_s']} s to write, {info['promtool_s']} s promtool) into "
        f"{len(blocks)} block(s) of {block_h} h: {data}")
    return data


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (every thread), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(rest[11]) + int(rest[12])) / _CLK_TCK


def scrape_metrics(url: str) -> dict[str, float]:
    """Prometheus' own /metrics: ``name{labels}`` -> value."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


class RealPrometheus:
    """``prometheus`` on a cached data directory, for one run."""

    def __init__(self, data: pathlib.Path, workdir: pathlib.Path) -> None:
        self.data = data
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.pid = 0
        self.compaction: dict[str, Any] = {}
        self._log = None

    def start(self) -> "RealPrometheus":
        exe = shutil.which("prometheus") or "/usr/bin/prometheus"
        config = self.workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1h\nscrape_configs: []\n")
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = self.workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, f"--config.file={config}", f"--storage.tsdb.path={self.data / 'data'}",
             "--storage.tsdb.retention.time=100y", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=info"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self.pid = self.proc.pid
        return self

    def _tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n"
                                   f"{self._tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"prometheus at {self.url} not ready after {START_TIMEOUT:g} s "
                           f"({last}):\n{self._tail()}")

    def wait_compaction(self, log=print) -> None:
        """Wait for the first compaction when one may be pending.

        The backfill writes one block (``block_duration_hours``), which the
        compactor never touches: it leaves the newest block alone and there
        is no other. With more than one block loaded (a workload spanning a
        block boundary) Prometheus merges them in its first compaction
        cycle, which its TSDB loop starts a minute after the start; a run
        measured meanwhile would pay for it. So: wait until
        ``prometheus_tsdb_compactions_triggered_total`` is >= 1 and then
        until ``prometheus_tsdb_blocks_loaded`` and
        ``prometheus_tsdb_compactions_total`` have not moved for 3 s. The
        data directory is the cache's own, so this happens once."""
        m = scrape_metrics(self.url)
        blocks = m.get("prometheus_tsdb_blocks_loaded", 0)
        self.compaction = {"blocks_at_start": blocks, "waited_s": 0.0}
        if blocks <= 1:
            return
        log(f"  {blocks:g} blocks loaded: waiting for Prometheus' first compaction "
            "(about a minute after its start)")
        t0 = time.monotonic()
        deadline = t0 + COMPACTION_TIMEOUT
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            m = scrape_metrics(self.url)
            state = (m.get("prometheus_tsdb_blocks_loaded"),
                     m.get("prometheus_tsdb_compactions_total"))
            if state != last:
                last, since = state, time.monotonic()
            if (m.get("prometheus_tsdb_compactions_triggered_total", 0) >= 1
                    and time.monotonic() - since >= 3):
                break
            time.sleep(0.5)
        self.compaction.update(waited_s=round(time.monotonic() - t0, 1),
                               blocks_after=last[0] if last else None,
                               compactions=last[1] if last else None)

    def query(self, promql: str, ts: float) -> list:
        params = urllib.parse.urlencode({"query": promql, "time": rfc3339(ts)})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=120) as resp:
            data = json.loads(resp.read())
        if data.get("status") != "success":
            raise RuntimeError(f"{promql}: {data}")
        return data["data"]["result"]

    def verify(self, metric_names: list[str], begin: float, periods: int,
               series_per_hour: int, samples_per_series: int) -> None:
        """Every hour holds all its samples: per hour, the number of series
        with samples in it and the number of samples (``count`` and ``sum``
        of ``count_over_time`` over the five metrics) against the spec."""
        sel = '{__name__=~"' + "|".join(metric_names) + '"}'
        for h in range(periods):
            end = begin + (h + 1) * HOUR
            got = []
            for agg in ("count", "sum"):
                res = self.query(f"{agg}(count_over_time({sel}[3600s]))", end)
                got.append(int(float(res[0]["value"][1])) if res else 0)
            want = [series_per_hour, series_per_hour * samples_per_series]
            if got != want:
                raise RuntimeError(
                    f"prometheus {self.url}: hour {rfc3339(end - HOUR)} holds {got[0]:,} series "
                    f"/ {got[1]:,} samples, expected {want[0]:,} / {want[1]:,} "
                    f"(data directory {self.data})")

    def cpu_seconds(self) -> float | None:
        return proc_cpu_seconds(self.pid) if self.pid else None

    def query_requests(self) -> float | None:
        try:
            m = scrape_metrics(self.url)
        except OSError:
            return None
        return sum(v for k, v in m.items()
                   if k.startswith("prometheus_http_requests_total{")
                   and 'handler="/api/v1/query"' in k)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


# ---------------------------------------------------------------------------
# The bound client
# ---------------------------------------------------------------------------

def _client_process(host: str, port: int, queries: list, connections: int, gzip: bool,
                    go, conn_out, ) -> None:
    """One process of the bound client: ``connections`` threads, each with
    its keep-alive connection, take the next query of the shared list,
    read the whole reply, gunzip it if it is gzipped, parse its JSON."""
    try:
        import orjson
        loads = orjson.loads
    except ImportError:  # pragma: no cover
        loads = json.loads
    headers = {"Accept": "application/json", "Accept-Encoding": "gzip" if gzip else "identity",
               "User-Agent": "bench-bound"}
    form = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
    requests = [encode_request(path, params) + (n,) for path, params, n in queries]
    nxt = itertools.count()
    total = len(requests)
    conns = [http.client.HTTPConnection(host, port, timeout=300) for _ in range(connections)]
    for c in conns:
        c.connect()
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    counts = {"series": 0, "bytes": 0, "errors": 0, "scope_queries": 0}
    lock = threading.Lock()

    def run(c: http.client.HTTPConnection) -> None:
        series = nbytes = errors = scopes = 0
        while True:
            i = next(nxt)
            if i >= total:
                break
            method, target, body, n = requests[i]
            c.request(method, target, body=body, headers=form if body else headers)
            resp = c.getresponse()
            raw = resp.read()
            nbytes += len(raw)
            if resp.getheader("Content-Encoding") == "gzip":
                raw = zlib.decompress(raw, 47)
            data = loads(raw)
            if resp.status != 200 or data.get("status") != "success":
                errors += 1
            else:
                series += len(data["data"]["result"])
            scopes += n
        with lock:
            counts["series"] += series
            counts["bytes"] += nbytes
            counts["errors"] += errors
            counts["scope_queries"] += scopes

    threads = [threading.Thread(target=run, args=(c,)) for c in conns]
    go.wait()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts["end"] = time.time()
    counts["queries"] = total
    conn_out.send(counts)
    conn_out.close()


def run_bound(url: str, per_worker: list[list], connections: int, gzip: bool) -> dict:
    """Run the bound client: one process per daemon worker (its share of the
    queries), ``connections`` threads each. Returns the elapsed time (go ->
    last reply of every process) and the totals."""
    parts = urllib.parse.urlsplit(url)
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    procs, pipes = [], []
    for queries in per_worker:
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_client_process,
                        args=(parts.hostname, parts.port, queries, connections, gzip, go, w))
        p.start()
        w.close()
        procs.append(p)
        pipes.append(r)
    time.sleep(0.5)  # connected, threads waiting
    t0 = time.time()
    go.set()
    results = [r.recv() for r in pipes]
    for p in procs:
        p.join()
    elapsed = max(x["end"] for x in results) - t0
    out = {k: sum(x[k] for x in results) for k in ("series", "bytes", "errors", "queries",
                                                  "scope_queries")}
    out["elapsed_s"] = elapsed
    out["started_at"] = t0
    return out
