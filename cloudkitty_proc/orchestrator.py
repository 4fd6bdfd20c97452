"""The cotyledon Service: one worker process.

``Orchestrator.run`` sets a worker up (plugins, collect executor, tooz
coordinator), settles the garbage collector, starts the worker's RPC server
when ``[DEFAULT] transport_url`` is set, and runs ``Worker.loop``
(worker.py) until stopped; then it closes everything it opened.

Threads: cotyledon calls ``Orchestrator.run`` on a thread of its own; every
I/O object (storage, collector, executor, coordinator) is created and used
on that thread only. ``terminate`` and ``reload`` are called from signal
threads: they only set events that the run thread acts on between periods.
With ``[DEFAULT] transport_url`` set, the worker's RPC server
(``messaging.py``; ``dropin/rpc.py`` in the drop-in mode) runs its handlers
on oslo.messaging's threads with objects of their own; they too only set events (wake, reload). A reload is
applied at a safe point: between scopes (no lease held ahead then) or
between passes.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import threading
import time

import cotyledon
from oslo_config import cfg

from cloudkitty_proc import config_check, data_period, plugins, schedule
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.executor import make_executor
from cloudkitty_proc.leases import CoordinationError, start_coordinator
from cloudkitty_proc.log import mask_url
from cloudkitty_proc.supervision import RunStatus, start_backoff
from cloudkitty_proc.telemetry import Heartbeats, Telemetry
from cloudkitty_proc.worker import Worker

LOG = logging.getLogger(__name__)


def pool_size(conf: cfg.ConfigOpts) -> int:
    """Concurrent queries of one worker: max_threads, within its share
    of [orchestrator] max_host_queries."""
    size = conf.orchestrator.max_threads
    cap = conf.orchestrator.max_host_queries
    if cap:
        size = min(size, max(1, cap // max(conf.orchestrator.max_workers, 1)))
    return size


#: collections of the youngest generation happen every this many net
#: allocations (CPython's default is 700): a period allocates thousands of
#: short-lived objects, nearly none of them in reference cycles
GC_THRESHOLD0 = 10_000


def _settle_gc() -> None:
    """Once a worker is set up: move every object alive now (modules,
    plugins, SQLAlchemy, eventlet: ~10^5 objects) out of the cyclic
    garbage collector's reach, and collect the young generation less
    often. A full collection scanned them all (70 ms, every thread of the
    worker stopped: each query in flight waited for it); the young ones
    took 0.2 ms per W1 period. Objects created later are collected as
    usual. No collection first: at this point one found nothing to free
    and took 60-80 ms of the worker's start."""
    gc.freeze()
    _t0, t1, t2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, t1, t2)


class Orchestrator(cotyledon.Service):
    """One worker process. See the module docstring for the threads."""

    name = "cloudkitty-proc-orchestrator"

    def __init__(self, worker_id: int, oneshot: bool = False, status: RunStatus | None = None,
                 run_started: datetime.datetime | None = None, worker_count: int = 1,
                 heartbeats: Heartbeats | None = None, quiet_periods: bool = False) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id
        self.conf = cfg.CONF
        self.oneshot = oneshot
        self.status = status
        self.run_started = run_started
        self.worker_count = worker_count
        self.heartbeats = heartbeats
        #: an interactive --oneshot: per-period lines at DEBUG (the master
        #: shows a progress display instead)
        self.quiet_periods = quiet_periods
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._wake = threading.Event()
        self._reload = threading.Event()
        #: +1 after every reload (the RPC quote endpoint follows it)
        self.rules_generation = 0
        self._rpc = None
        self.worker: Worker | None = None
        self._coordinator = None
        self._executor = None
        if status is not None:
            status.set_idle(worker_id, False)

    @property
    def worker_name(self) -> str:
        return f"{self.conf.host}-{self.worker_id}"

    def run(self) -> None:
        """Runs on a thread cotyledon spawned; returns when stopped."""
        conf = self.conf
        try:
            storage = plugins.load_storage(conf)
            # a worker respawned after a reload must not rate in another period
            data_period.ensure(storage, conf.collect.period)
            collector = plugins.load_collector(conf)
            fetcher = plugins.load_fetcher(conf)
            chain = plugins.load_rating_chain(conf)
            self._executor = make_executor(conf.orchestrator.collect_executor,
                                           pool_size(conf))
            # waits for the database's write lock let green threads run
            storage.sleep = self._executor.sleep
            # a point store's HTTP requests too (green sockets)
            storage.green = conf.orchestrator.collect_executor != "threads"
            self._coordinator = start_coordinator(
                conf, f"{self.worker_name}-{os.getpid()}")
        except Exception as exc:  # noqa: BLE001 - whatever it is, this worker cannot run
            self._cannot_start(exc)
        if self.status is not None:
            self.status.started()
        self.worker = Worker(
            conf, self.worker_name, storage=storage, collector=collector,
            fetcher=fetcher, rating_chain=chain, coordinator=self._coordinator,
            executor=self._executor, oneshot=self.oneshot, run_started=self.run_started,
            stop_event=self._stop, wake_event=self._wake, safe_point=self._safe_point,
            reload_pending=self._reload.is_set,
            telemetry=Telemetry(self.worker_id, self.heartbeats, bool(conf.metrics.listen)),
            worker_index=self.worker_id,
            worker_count=self.worker_count,
            on_unrecorded=(None if self.status is None
                           else lambda: self.status.add_unrecorded(self.worker_id)))
        if self.quiet_periods:
            self.worker.pipeline.period_log_level = logging.DEBUG
        LOG.info("worker %s started (%s executor, %d concurrent queries)", self.worker_name,
                 self._executor.name, self._executor.size)
        _settle_gc()
        try:
            self._start_rpc()
            self.worker.loop(on_idle=self._on_idle)
        finally:
            self._stop_rpc()
            self._shutdown_resources()
            self._finished.set()

    def _cannot_start(self, exc: BaseException) -> None:
        """Setup failed: tell the master (its crash-loop guard stops the
        daemon after supervision.MAX_START_FAILURES of these in a row),
        wait a little longer each time, and exit: cotyledon respawns us."""
        message = str(exc) if isinstance(exc, (ConfigError, CoordinationError)) else \
            f"{type(exc).__name__}: {exc}"
        message = mask_url(message)
        LOG.error("worker %s cannot start: %s", self.worker_name, message)
        failures = self.status.start_failed(message) if self.status is not None else 1
        self._stop.wait(start_backoff(failures))
        os._exit(2)

    def _start_rpc(self) -> None:
        """When [DEFAULT] transport_url is set: this worker's RPC server,
        ours (messaging.py) or, in the drop-in mode, CloudKitty's target
        (dropin/rpc.py). Its handlers run on oslo.messaging's threads and
        reach this worker only through the wake and reload events."""
        # workers only: the master process loads neither oslo.messaging nor eventlet
        try:
            if self.conf.cloudkitty_proc.mode == "cloudkitty":
                from cloudkitty_proc.dropin import rpc as dropin_rpc

                self._rpc = dropin_rpc.start_server(
                    self.conf, self.worker_name, wake=self._wake.set,
                    request_reload=self.reload)
                return
            from cloudkitty_proc import messaging

            self._rpc = messaging.start_server(
                self.conf, self.worker_name, wake=self._wake.set,
                request_reload=self.reload, rules_generation=lambda: self.rules_generation)
        except Exception as exc:  # a bad transport_url must not stop rating
            LOG.error("worker %s: no RPC server: %s", self.worker_name, mask_url(exc))

    def _stop_rpc(self) -> None:
        rpc, self._rpc = self._rpc, None
        if rpc is not None:
            rpc.stop()

    def _safe_point(self) -> None:
        if self._reload.is_set():
            self._reload.clear()
            self._apply_reload()

    def _on_idle(self, idle: bool) -> None:
        self._safe_point()
        if self.status is not None:
            self.status.set_idle(self.worker_id, idle)

    def _apply_reload(self) -> None:
        """At a safe point between passes: re-read config files and rules.
        Invalid new rules or metrics keep the ones in force."""
        assert self.worker is not None
        try:
            # the files are checked on a copy first: a bad value leaves this
            # worker on the configuration in force, as it leaves the master
            config_check.check_files(self.conf)
            self.conf.reload_config_files()
        except Exception as exc:
            LOG.error("worker %s: config reload refused, keeping the current one: %s",
                      self.worker_name, mask_url(exc))
            return
        for processor in self.worker.rating_chain:
            try:
                processor.reload()
            except Exception as exc:
                LOG.error("worker %s: %s rules not reloaded, keeping the current ones: %s",
                          self.worker_name, type(processor).__name__, exc)
        try:
            collector = plugins.load_collector(self.conf)
        except ConfigError as exc:
            LOG.error("worker %s: metrics not reloaded, keeping the current ones: %s",
                      self.worker_name, exc)
        else:
            old, self.worker.collector = self.worker.collector, collector
            old.close()
        if self.conf.collect.period != self.worker.period:
            LOG.error("worker %s: [collect] period cannot change without a restart "
                      "(states are aligned to %d s); keeping it", self.worker_name,
                      self.worker.period)
        try:
            self.worker.begin = schedule.first_period(self.conf)
            self.worker.end = schedule.end_bound(self.conf)
        except ValueError as exc:
            LOG.error("worker %s: [collect] begin/end not reloaded: %s", self.worker_name, exc)
        self.rules_generation += 1
        LOG.info("worker %s reloaded its configuration", self.worker_name)

    def _shutdown_resources(self) -> None:
        if self.worker is not None:
            for obj in (self.worker.collector, self.worker.fetcher, self.worker.storage):
                try:
                    obj.close()
                except Exception:  # noqa: S110
                    pass
        if self._executor is not None:
            try:
                self._executor.close()
            except Exception:  # noqa: S110
                pass
        if self._coordinator is not None:
            try:
                self._coordinator.stop()  # frees every lock at once
            except Exception:  # noqa: S110
                pass

    def terminate(self) -> None:
        """Signal thread: stop after the period in flight, within
        graceful_shutdown_timeout (cotyledon kills us after that)."""
        # -- chaos suite (issue 5): bounded stop; the lock of an abandoned
        # period is freed at once, not when its lease ends
        timeout = max(self.conf.graceful_shutdown_timeout, 1)
        # return before cotyledon's own alarm (os._exit at ``timeout``)
        deadline = time.monotonic() + max(timeout - 2.0, timeout / 2.0)
        self._stop.set()
        self._wake.set()
        self._stop_rpc()  # no new request; the ones in flight finish
        if self._finished.wait(max(deadline - time.monotonic(), 0.1)):
            return
        LOG.warning("worker %s: the period in flight did not finish within %.0f s; "
                    "abandoning it (nothing of it is stored) and freeing the scope "
                    "locks", self.worker_name, timeout)
        coordinator = self._coordinator
        if coordinator is not None:
            try:
                coordinator.stop()
            except Exception as exc:  # noqa: BLE001 - exiting anyway
                LOG.warning("worker %s: stopping the coordinator failed: %s",
                            self.worker_name, mask_url(exc))
        # -- end chaos suite

    def reload(self) -> None:
        """Signal thread (SIGHUP) or RPC thread (reload_rules): applied by
        the run thread between passes (cotyledon's oslo_config glue reloads
        the master only)."""
        self._reload.set()
        self._wake.set()
