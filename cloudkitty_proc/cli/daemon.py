"""``cloudkitty-proc``: the daemon.

The master process validates the configuration, checks the database schema
(then closes that connection), and hands over to a cotyledon
``ServiceManager`` running ``[orchestrator] max_workers`` Orchestrator
workers. It does no other I/O, opens no socket that survives the fork and
never imports eventlet.

``--oneshot``: each worker raises its flag in a shared byte array when a pass
found nothing due and nothing locked by another worker; when every flag is
up the master stops the workers, prints a summary and exits 0, or 1 if a
scope failed during the run.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time

from oslo_config import cfg

from cloudkitty_proc import plugins, report, telemetry, utils
from cloudkitty_proc.cli import common
from cloudkitty_proc.exceptions import ConfigError, SchemaError
from cloudkitty_proc.sdnotify import Notifier, watchdog_interval
from cloudkitty_proc.telemetry import Heartbeats

CONF = cfg.CONF

CLI_OPTS = [
    cfg.BoolOpt("oneshot", default=False,
                help="Process until no scope has a due period, print a summary "
                "and exit (0, or 1 if a scope ended in error)."),
]

MAX_FLAGS = 4096


def _check_storage() -> None:
    storage = plugins.load_storage(CONF)
    try:
        storage.check_schema()
    finally:
        storage.close()


def _watch_done(flags, manager_pid: int, stop: threading.Event) -> None:
    """Master thread (oneshot): SIGTERM ourselves once every worker is idle."""
    stable = 0
    while not stop.wait(0.2):
        workers = CONF.orchestrator.max_workers
        if workers and all(flags[i] == 1 for i in range(workers)):
            stable += 1
            if stable >= 2:
                os.kill(manager_pid, signal.SIGTERM)
                return
        else:
            stable = 0


def _supervise_systemd(notifier: Notifier, heartbeats: Heartbeats,
                       stop: threading.Event) -> None:
    """Master thread: READY=1 once every worker runs, then WATCHDOG=1 while
    workers show signs of life (a pass or a commit) recently enough."""
    started = time.time()
    while not stop.wait(0.2):
        workers = CONF.orchestrator.max_workers
        alive = heartbeats.last_alive(workers)
        if all(t >= started for t in alive):
            notifier.notify("READY=1", f"STATUS=rating with {workers} workers",
                            f"MAINPID={os.getpid()}")
            break
    interval = watchdog_interval()
    if interval is None:
        return
    # a worker beats after every pass and every commit; an idle worker
    # passes every poll_interval
    threshold = max(4 * interval, 2 * CONF.orchestrator.poll_interval + 30)
    while not stop.wait(interval):
        workers = CONF.orchestrator.max_workers
        newest = max(heartbeats.last_alive(workers), default=time.time())
        if workers == 0 or time.time() - newest < threshold:
            notifier.notify("WATCHDOG=1")


def run_daemon() -> int:
    import cotyledon

    from cloudkitty_proc.orchestrator import Orchestrator

    common.parse_args(None, "cloudkitty-proc", CLI_OPTS)
    from cloudkitty_proc import log as ckp_log
    ckp_log.setup(CONF)
    common.validate_all()
    try:
        _check_storage()
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None

    oneshot = CONF.oneshot
    workers = CONF.orchestrator.max_workers
    if workers > MAX_FLAGS:
        raise ConfigError(f"[orchestrator] max_workers: at most {MAX_FLAGS}")
    run_started = utils.utcnow().replace(microsecond=0)
    if oneshot and workers == 0:
        print("max_workers = 0: nothing to do", file=sys.stderr)
        return 0

    flags = multiprocessing.RawArray("b", MAX_FLAGS) if oneshot else None
    heartbeats = Heartbeats(MAX_FLAGS)
    # cotyledon would send READY=1 before any worker runs: we send it
    notifier = Notifier.take_from_env()
    manager = cotyledon.ServiceManager(
        graceful_shutdown_timeout=CONF.graceful_shutdown_timeout)
    sid = manager.add(Orchestrator, workers=max(workers, 1),
                      kwargs={"oneshot": oneshot, "done_flags": flags,
                              "run_started": run_started, "worker_count": max(workers, 1),
                              "heartbeats": heartbeats})
    if workers == 0:
        manager.reconfigure(sid, 0)
    if CONF.metrics.listen:
        from cloudkitty_proc.metrics_service import MetricsService, parse_listen
        try:
            parse_listen(CONF.metrics.listen)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        telemetry.prepare_multiprocess_dir(CONF.state_path)
        manager.add(MetricsService, workers=1, kwargs={"heartbeats": heartbeats})

    def on_reload() -> None:
        # cotyledon 2.2 does not reload the config in the master: do it,
        # then apply a changed worker count. Workers reload themselves.
        try:
            CONF.reload_config_files()
            common.validate_options()
        except (ConfigError, cfg.Error) as exc:
            print(f"error: reload refused: {exc}", file=sys.stderr)
            return
        manager.reconfigure(sid, CONF.orchestrator.max_workers)
        # cotyledon adjusts the worker count when it next looks at its
        # children, which a SIGCHLD triggers
        os.kill(os.getpid(), signal.SIGCHLD)

    manager.register_hooks(on_reload=on_reload,
                           on_terminate=lambda: notifier.notify("STOPPING=1"))
    stop_watch = threading.Event()
    if notifier.enabled:
        threading.Thread(target=_supervise_systemd, args=(notifier, heartbeats, stop_watch),
                         daemon=True, name="systemd-notify").start()
    if oneshot:
        threading.Thread(target=_watch_done, args=(flags, os.getpid(), stop_watch),
                         daemon=True, name="oneshot-watch").start()
    started = time.monotonic()
    try:
        manager.run()
    except SystemExit:
        pass
    finally:
        stop_watch.set()
    if not oneshot:
        return 0
    storage = plugins.load_storage(CONF)
    try:
        return report.print_oneshot_summary(storage, run_started,
                                            time.monotonic() - started)
    finally:
        storage.close()


def main(argv: list[str] | None = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.exit(common.run_cli(run_daemon))


if __name__ == "__main__":
    main()
