"""What workers report about themselves: Prometheus metrics and heartbeats.

Workers record events through a :class:`Telemetry` object (one per worker
process, created after the fork). Two sinks:

* prometheus-client counters and histograms in *multiprocess mode* (files in
  ``$PROMETHEUS_MULTIPROC_DIR``, which the master prepares before forking when
  ``[metrics] listen`` is set), aggregated by the metrics service at scrape
  time. With no ``listen`` the metrics are not created at all.
* two shared arrays of timestamps, one slot per worker id, created by the
  master before the fork: ``alive`` (the worker's loop turned) and
  ``progress`` (the worker committed a period). The master reads them for
  systemd's READY/WATCHDOG, the metrics service for ``/healthz``.

Everything here is cheap enough for the commit path: a few counter
increments per period, no I/O.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from typing import Any

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
MAX_WORKERS = 4096

PREFIX = "cloudkitty_proc_"


class Heartbeats:
    """Shared per-worker timestamps (created in the master, before fork)."""

    def __init__(self, size: int = MAX_WORKERS) -> None:
        self.alive = multiprocessing.RawArray("d", size)
        self.progress = multiprocessing.RawArray("d", size)
        #: periods committed by each worker (the --oneshot progress display)
        self.committed = multiprocessing.RawArray("q", size)
        self.size = size

    def beat(self, worker_id: int) -> None:
        self.alive[worker_id] = time.time()

    def progressed(self, worker_id: int) -> None:
        now = time.time()
        self.alive[worker_id] = now
        self.progress[worker_id] = now
        self.committed[worker_id] += 1

    def total_committed(self) -> int:
        return sum(self.committed)

    def reset(self, worker_id: int) -> None:
        self.alive[worker_id] = 0.0
        self.progress[worker_id] = 0.0

    def last_alive(self, workers: int) -> list[float]:
        return [self.alive[i] for i in range(min(workers, self.size))]

    def last_progress(self, workers: int) -> float:
        return max((self.progress[i] for i in range(min(workers, self.size))), default=0.0)


def prepare_multiprocess_dir(state_path: str) -> str:
    """Master, before the fork: a fresh directory for the metric files."""
    path = os.path.join(state_path, "prometheus-metrics")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.environ[ENV_DIR] = path
    return path


class Telemetry:
    """The worker side. ``Telemetry(None)`` records heartbeats only."""

    def __init__(self, worker_id: int, heartbeats: Heartbeats | None,
                 metrics_enabled: bool) -> None:
        self.worker_id = worker_id
        self.heartbeats = heartbeats
        self._m: dict[str, Any] | None = None
        if metrics_enabled and os.environ.get(ENV_DIR):
            self._m = _create_metrics()
        if heartbeats is not None:
            heartbeats.reset(worker_id)
            heartbeats.beat(worker_id)

    def beat(self) -> None:
        if self.heartbeats is not None:
            self.heartbeats.beat(self.worker_id)

    def period_committed(self, frame: Any, seconds: float) -> None:
        if self.heartbeats is not None:
            self.heartbeats.progressed(self.worker_id)
        m = self._m
        if m is None:
            return
        m["periods"].inc()
        m["period_seconds"].observe(seconds)
        total = 0
        for usage_type, points in frame.items():
            total += len(points)
            if points:
                m["price"].labels(usage_type).inc(float(sum(p.price for p in points)))
                m["points_by_type"].labels(usage_type).inc(len(points))
        m["points"].inc(total)

    def query(self, metric: str, seconds: float) -> None:
        if self._m is not None:
            self._m["query_seconds"].labels(metric).observe(seconds)

    def error(self, kind: str) -> None:
        if self._m is not None:
            self._m["errors"].labels(kind).inc()

    def lock_busy(self) -> None:
        if self._m is not None:
            self._m["lock_busy"].inc()

    def reprocessed(self) -> None:
        if self._m is not None:
            self._m["reprocessed"].inc()


def _create_metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Histogram

    return {
        "periods": Counter(PREFIX + "periods_rated", "Periods rated and committed."),
        "period_seconds": Histogram(
            PREFIX + "period_seconds", "Time from the first query of a period to its commit.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)),
        "points": Counter(PREFIX + "datapoints_rated", "Datapoints rated and stored."),
        "points_by_type": Counter(PREFIX + "type_datapoints_rated",
                                  "Datapoints rated and stored, by usage type.", ["type"]),
        "price": Counter(PREFIX + "rated_price",
                         "Sum of the prices rated, by usage type (float; the database "
                         "holds exact decimals).", ["type"]),
        "query_seconds": Histogram(
            PREFIX + "collector_query_seconds", "Collector query latency, by metric.",
            ["metric"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)),
        "errors": Counter(PREFIX + "errors", "Errors by kind (collect, http, malformed, "
                          "timeout, connection, rating, storage, stale).", ["kind"]),
        "lock_busy": Counter(PREFIX + "lock_busy",
                             "Scope locks found held by another worker (contention)."),
        "reprocessed": Counter(PREFIX + "periods_reprocessed",
                               "Periods re-rated by reprocessing tasks."),
    }
