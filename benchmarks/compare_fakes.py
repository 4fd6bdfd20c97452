#!/usr/bin/env python3
"""The two fake Prometheus servers under the same W1-shaped load.

Why the benchmarks keep a server of their own (``fake_prometheus.py``)
instead of the tests' fake (``tests/fakes/prometheus.py``): this script
runs each as a subprocess, answering with the same renderer
(``fake_prometheus.ReplyGenerator``) after the same latency, and sends
both the queries of one W1 run (20 scopes x 24 hours x 5 metrics) over
``--connections`` keep-alive connections. Printed per server: queries/s
against the bound (connections / latency), the server's CPU per query
(user + system, from /proc via psutil) and the reply time seen by the
client (median, p90).

    python benchmarks/compare_fakes.py [--repeat 3] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import pathlib
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

import psutil

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent

SCOPES, PERIODS = 20, 24
METRICS = ("instance_up", "volume_bytes", "image_bytes", "cpu_util", "requests_count")
BEGIN = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def serve_tests_fake(latency: float, series: int) -> None:
    """The tests' fake, rendering with the benchmark's generator."""
    sys.path[:0] = [str(REPO), str(HERE)]
    import fake_prometheus

    from tests.fakes.prometheus import FakePrometheus

    gen = fake_prometheus.ReplyGenerator(series=series)

    def reply(handler):
        params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(handler.path).query))
        return 200, gen.render(params["query"], fake_prometheus.parse_time(params.get("time")))

    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)   # the server's threads inherit it
    with FakePrometheus(reply, delay=latency) as fake:
        print("listening on", fake.url, flush=True)
        signal.sigwait(stop)


def targets() -> list[str]:
    out = []
    for s in range(SCOPES):
        for p in range(PERIODS):
            end = (BEGIN + datetime.timedelta(hours=p + 1)).strftime("%Y-%m-%dT%H:%M:%SZ")
            for m in METRICS:
                q = (f'max(max_over_time({m}{{project_id="scope-{s:05d}"}}[3600s])) '
                     "by (id, project_id, user_id, flavor_name)")
                out.append("/api/v1/query?" + urllib.parse.urlencode({"query": q, "time": end}))
    return out


def measure(cmd: list[str], connections: int) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("listening on"):
            raise RuntimeError(f"{cmd[1]}: did not start: {line!r}")
        host, port = line.split()[-1].removeprefix("http://").split(":")
        server = psutil.Process(proc.pid)
        work = targets()
        lock = threading.Lock()
        times: list[float] = []

        def client() -> None:
            conn = http.client.HTTPConnection(host, int(port))
            while True:
                with lock:
                    if not work:
                        break
                    target = work.pop()
                t0 = time.perf_counter()
                conn.request("GET", target)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 or not body.startswith(b'{"status":"success"'):
                    raise RuntimeError(f"bad reply {resp.status}: {body[:200]!r}")
                times.append(time.perf_counter() - t0)
            conn.close()

        cpu0, wall0 = server.cpu_times(), time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall, cpu1 = time.perf_counter() - wall0, server.cpu_times()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    times.sort()
    return {"queries": len(times), "queries_per_s": round(len(times) / wall, 1),
            "cpu_ms_per_query": round(1000 * cpu / len(times), 3),
            "reply_ms_median": round(1000 * statistics.median(times), 2),
            "reply_ms_p90": round(1000 * times[int(0.9 * len(times))], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--series", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--serve-tests-fake", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    latency = args.latency_ms / 1000
    if args.serve_tests_fake:
        serve_tests_fake(latency, args.series)
        return 0
    servers = {
        "benchmarks/fake_prometheus.py": [
            sys.executable, str(HERE / "fake_prometheus.py"), "--port", "0",
            "--latency-ms", str(args.latency_ms), "--series", str(args.series)],
        "tests/fakes/prometheus.py": [
            sys.executable, __file__, "--serve-tests-fake",
            "--latency-ms", str(args.latency_ms), "--series", str(args.series)],
    }
    print(f"bound: {args.connections / latency:.0f} queries/s" if latency else "no latency")
    for _ in range(args.repeat):
        for name, cmd in servers.items():
            print(f"{name:32} {measure(cmd, args.connections)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
