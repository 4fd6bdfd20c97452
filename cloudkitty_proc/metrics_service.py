"""The metrics service: ``/metrics`` and ``/healthz`` over HTTP.

A cotyledon service of its own (one process), started by the master when
``[metrics] listen`` is set. It serves:

``/metrics``
    the workers' counters and histograms (prometheus-client multiprocess
    files), plus gauges read from the database at scrape time: per-scope
    lag, scopes in error, scopes with due work, reprocessing tasks, and
    each worker's last progress.
``/healthz``
    200 ``{"status": "ok", …}``, or 503 ``{"status": "stalled", …}`` when
    work is due but no worker committed a period for
    ``[metrics] stall_timeout`` seconds.

Threads: the HTTP server runs on the service's run thread; each request is
handled on a thread of its own, and every handler opens nothing but reads
the shared heartbeat array and a storage object that is safe across
threads (SQLAlchemy engines with a pool).
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from typing import Any

import cotyledon
from oslo_config import cfg

from cloudkitty_proc import plugins, schedule, utils
from cloudkitty_proc.conf import split_host_port
from cloudkitty_proc.telemetry import ENV_DIR, PREFIX, Heartbeats

LOG = logging.getLogger(__name__)


def parse_listen(value: str) -> tuple[str, int]:
    try:
        return split_host_port(value)
    except ValueError as exc:
        raise ValueError(f"[metrics] listen: {exc}") from None


class Health:
    """Work due and progress, computed from the database and heartbeats."""

    def __init__(self, conf: cfg.ConfigOpts, storage: Any, fetcher: Any,
                 heartbeats: Heartbeats | None) -> None:
        self.conf = conf
        self.storage = storage
        self.fetcher = fetcher
        self.heartbeats = heartbeats
        self.started = time.time()
        self._lock = threading.Lock()
        self._scopes: list[str] = []
        self._cache: tuple[float, dict] | None = None

    def snapshot(self) -> dict:
        with self._lock:
            if self._cache and time.monotonic() - self._cache[0] < 2.0:
                return self._cache[1]
            try:
                self._scopes = self.fetcher.get_scopes()
            except Exception as exc:  # keep the last known list
                LOG.warning("metrics: cannot list scopes: %s", exc)
            period = self.conf.collect.period
            states = self.storage.get_states(self._scopes) if self._scopes else {}
            extra = self.storage.get_states(None)
            states.update({k: v for k, v in extra.items() if k not in states})
            now = utils.utcnow()
            begin = schedule.first_period(self.conf)
            end = schedule.end_bound(self.conf)
            due = [sid for sid in self._scopes
                   if schedule.is_due(schedule.next_start(states.get(sid), period, begin),
                                      now, period, self.conf.collect.wait_periods, end)]
            workers = self.conf.orchestrator.max_workers
            hb = self.heartbeats
            last_progress = hb.last_progress(workers) if hb else 0.0
            snap = {
                "now": now, "period": period, "states": states, "due": due,
                "workers": workers,
                "alive": hb.last_alive(workers) if hb else [],
                "progress": [hb.progress[i] for i in range(workers)] if hb else [],
                "last_progress": last_progress,
                "tasks": self._tasks(),
            }
            self._cache = (time.monotonic(), snap)
            return snap

    def _tasks(self) -> dict[str, int]:
        lister = getattr(self.storage, "list_tasks", None)
        if lister is None:
            return {}
        counts: dict[str, int] = {}
        try:
            for task in lister():
                state = getattr(task, "state", None) or task.get("state")
                counts[state] = counts.get(state, 0) + 1
        except Exception as exc:  # noqa: BLE001
            LOG.warning("metrics: cannot list reprocess tasks: %s", exc)
        return counts

    def health(self) -> tuple[bool, dict]:
        snap = self.snapshot()
        stall = self.conf.metrics.stall_timeout
        since = time.time() - max(snap["last_progress"], self.started)
        stalled = bool(snap["due"]) and since > stall
        body = {
            "status": "stalled" if stalled else "ok",
            "due_scopes": len(snap["due"]),
            "seconds_since_progress": round(since, 1),
            "stall_timeout": stall,
            "workers": snap["workers"],
            "workers_alive": sum(1 for t in snap["alive"] if t and time.time() - t < 2 * max(
                self.conf.orchestrator.poll_interval, 5)),
        }
        return not stalled, body


class DatabaseCollector:
    """prometheus-client collector of the gauges read from the database."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        snap = self.health.snapshot()
        now, period = snap["now"], snap["period"]
        lag = GaugeMetricFamily(PREFIX + "scope_lag_seconds",
                                "Seconds between now and the end of the last committed "
                                "period, by scope.", labels=["scope"])
        errors = 0
        for sid, st in sorted(snap["states"].items()):
            if st.last_processed is not None:
                end = st.last_processed.timestamp() + period
                lag.add_metric([sid], now.timestamp() - end)
            if st.last_error:
                errors += 1
        yield lag
        yield GaugeMetricFamily(PREFIX + "scopes_in_error", "Scopes whose last attempt "
                                "failed.", value=errors)
        yield GaugeMetricFamily(PREFIX + "scopes_due", "Scopes with a period due now.",
                                value=len(snap["due"]))
        prog = GaugeMetricFamily(PREFIX + "worker_last_progress_timestamp_seconds",
                                 "When each worker last committed a period.",
                                 labels=["worker"])
        for i, ts in enumerate(snap["progress"]):
            prog.add_metric([str(i)], ts)
        yield prog
        tasks = GaugeMetricFamily(PREFIX + "reprocess_tasks",
                                  "Reprocessing tasks by state.", labels=["state"])
        for state, count in sorted(snap["tasks"].items()):
            tasks.add_metric([str(state)], count)
        yield tasks


def make_handler(registry: Any, health: Health):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif path == "/healthz":
                    ok, info = health.health()
                    body = json.dumps(info).encode()
                    ctype, code = "application/json", 200 if ok else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
            except Exception as exc:  # the DB may be down: say so
                LOG.warning("metrics: %s failed: %s", path, exc)
                body = json.dumps({"status": "error", "error": str(exc)}).encode()
                ctype, code = "application/json", 503
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


class MetricsService(cotyledon.Service):
    name = "cloudkitty-proc-metrics"

    def __init__(self, worker_id: int, heartbeats: Heartbeats | None = None) -> None:
        super().__init__(worker_id)
        self.heartbeats = heartbeats
        self.conf = cfg.CONF
        self._server: http.server.ThreadingHTTPServer | None = None
        self._ready = threading.Event()

    def run(self) -> None:
        import os

        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        host, port = parse_listen(self.conf.metrics.listen)
        storage = plugins.load_storage(self.conf)
        fetcher = plugins.load_fetcher(self.conf)
        health = Health(self.conf, storage, fetcher, self.heartbeats)
        registry = CollectorRegistry()
        if os.environ.get(ENV_DIR):
            MultiProcessCollector(registry, path=os.environ[ENV_DIR])
        registry.register(DatabaseCollector(health))

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, port), make_handler(registry, health))
        LOG.info("metrics: serving /metrics and /healthz on http://%s:%d", host, port)
        self._ready.set()
        self._server.serve_forever(poll_interval=0.5)

    def terminate(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def reload(self) -> None:
        """SIGHUP: re-read the configuration in place (cotyledon's default
        would restart the service and drop scrapes in flight)."""
        try:
            self.conf.reload_config_files()
        except Exception as exc:  # noqa: BLE001
            LOG.error("metrics: config reload failed, keeping the current one: %s", exc)
