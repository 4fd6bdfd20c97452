"""``cloudkitty-proc``: the daemon.

The master process validates the configuration, checks the database schema
(then closes that connection), and hands over to a cotyledon
``ServiceManager`` running ``[orchestrator] max_workers`` Orchestrator
workers. It does no other I/O, opens no socket that survives the fork and
never imports eventlet.

Before forking, the master also builds (and closes) the collector and the
fetcher and checks the coordination URL's scheme, so a bad ``prometheus_url``,
``cafile``, proxy or collector file stops the start with one line naming it
instead of workers that fail forever. What only a worker can find (the
coordination backend down, a wrong password) is caught by the crash-loop
guard (``supervision.py``): after ``MAX_START_FAILURES`` failed worker starts
in a row the daemon stops, exit 1, with the workers' error.

``--oneshot``: each worker raises its idle flag (``supervision.RunStatus``)
when a pass found nothing due and nothing locked by another worker; when
every flag is up the master stops the workers, prints a summary and exits
0, or 1 if a scope failed during the run (errors that could not be stored
included).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from oslo_config import cfg

from cloudkitty_proc import config_check, data_period, leases, plugins, report, telemetry, utils
from cloudkitty_proc.cli import common
from cloudkitty_proc.dropin import config_compat
from cloudkitty_proc.exceptions import ConfigError, SchemaError
from cloudkitty_proc.log import mask_url
from cloudkitty_proc.sdnotify import Notifier, watchdog_interval
from cloudkitty_proc.supervision import MAX_START_FAILURES, MAX_WORKERS, RunStatus
from cloudkitty_proc.telemetry import Heartbeats

CONF = cfg.CONF

CLI_OPTS = [
    cfg.BoolOpt("oneshot", default=False,
                help="Process until no scope has a due period, print a summary "
                "and exit (0, or 1 if a scope ended in error)."),
]

MAX_FLAGS = MAX_WORKERS


def _check_storage() -> None:
    """The schema is current and the stored data has this period (recorded
    now if it is the first start)."""
    storage = plugins.load_storage(CONF)
    try:
        storage.check_schema()
        data_period.ensure(storage, CONF.collect.period)
    finally:
        storage.close()


def _check_plugins() -> None:
    """Build what the workers will build, without connecting: the collector
    (URL, CA file, proxies, collector file) and the fetcher; check the
    coordination URL's scheme. ConfigError naming the option."""
    for load in (plugins.load_collector, plugins.load_fetcher):
        try:
            plugin = load(CONF)
        except ConfigError:
            raise
        except ValueError as exc:  # a plugin refusing an option names it
            raise ConfigError(mask_url(str(exc))) from None
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(mask_url(f"{type(exc).__name__}: {exc}")) from None
        plugin.close()
    leases.check_url(CONF.orchestrator.coordination_url)


def _interactive() -> bool:
    """A person watches stderr and the log goes there: a progress display
    then replaces the line per committed period (``--debug`` keeps them;
    a log file, the journal or syslog keep their content)."""
    return (sys.stderr.isatty() and not CONF.log_file and not CONF.use_journal
            and not CONF.use_syslog and not CONF.debug)


def _show_progress(heartbeats: Heartbeats, stop: threading.Event) -> None:
    """Master thread (interactive --oneshot): periods committed so far."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.completed:,} periods committed"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("rating", total=None)
        while not stop.wait(0.2):
            progress.update(task, completed=heartbeats.total_committed())


def _watch_done(status: RunStatus, manager_pid: int, stop: threading.Event) -> None:
    """Master thread (oneshot): SIGTERM ourselves once every worker is idle."""
    stable = 0
    while not stop.wait(0.2):
        try:
            workers = CONF.orchestrator.max_workers
        except Exception:  # noqa: BLE001 - a bad reloaded value: keep watching
            continue
        if status.all_idle(workers):
            stable += 1
            if stable >= 2:
                os.kill(manager_pid, signal.SIGTERM)
                return
        else:
            stable = 0


def _watch_starts(status: RunStatus, manager_pid: int, stop: threading.Event,
                  crashed: threading.Event) -> None:
    """Master thread: stop the daemon when workers keep failing to start."""
    while not stop.wait(0.5):
        if status.start_failures() >= MAX_START_FAILURES:
            print(f"error: workers failed to start {status.start_failures()} times in a "
                  f"row, stopping: {status.last_start_error()}", file=sys.stderr)
            crashed.set()
            os.kill(manager_pid, signal.SIGTERM)
            return


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
    config_compat.log_at_start(CONF)  # once, in the master
    common.validate_all()
    try:
        _check_storage()
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None
    _check_plugins()

    oneshot = CONF.oneshot
    workers = CONF.orchestrator.max_workers
    if workers > MAX_FLAGS:
        raise ConfigError(f"[orchestrator] max_workers: at most {MAX_FLAGS}")
    run_started = utils.utcnow().replace(microsecond=0)
    if oneshot and workers == 0:
        print("max_workers = 0: nothing to do", file=sys.stderr)
        return 0

    status = RunStatus(MAX_FLAGS)
    heartbeats = Heartbeats(MAX_FLAGS)
    # cotyledon would send READY=1 before any worker runs: we send it
    notifier = Notifier.take_from_env()
    manager = cotyledon.ServiceManager(
        graceful_shutdown_timeout=CONF.graceful_shutdown_timeout)
    interactive = oneshot and _interactive()
    sid = manager.add(Orchestrator, workers=max(workers, 1),
                      kwargs={"oneshot": oneshot, "status": status,
                              "run_started": run_started, "worker_count": max(workers, 1),
                              "heartbeats": heartbeats, "quiet_periods": interactive})
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
            config_check.check_files(CONF)  # on a copy: refused, nothing changes
            CONF.reload_config_files()
        except (ConfigError, cfg.Error) as exc:
            print(f"error: reload refused, keeping the configuration in force: "
                  f"{mask_url(exc)}", file=sys.stderr)
            return
        manager.reconfigure(sid, CONF.orchestrator.max_workers)
        # cotyledon adjusts the worker count when it next looks at its
        # children, which a SIGCHLD triggers
        os.kill(os.getpid(), signal.SIGCHLD)

    manager.register_hooks(on_reload=on_reload,
                           on_terminate=lambda: notifier.notify("STOPPING=1"))
    stop_watch = threading.Event()
    crashed = threading.Event()
    threading.Thread(target=_watch_starts, args=(status, os.getpid(), stop_watch, crashed),
                     daemon=True, name="start-watch").start()
    if notifier.enabled:
        threading.Thread(target=_supervise_systemd, args=(notifier, heartbeats, stop_watch),
                         daemon=True, name="systemd-notify").start()
    if oneshot:
        threading.Thread(target=_watch_done, args=(status, os.getpid(), stop_watch),
                         daemon=True, name="oneshot-watch").start()
    progress = None
    if interactive:
        progress = threading.Thread(target=_show_progress, args=(heartbeats, stop_watch),
                                    daemon=True, name="progress")
        progress.start()
    started = time.monotonic()
    try:
        manager.run()
    except SystemExit:
        pass
    finally:
        stop_watch.set()
        if progress is not None:
            progress.join(5)  # the display cleared before the summary
    if crashed.is_set():
        return 1
    if not oneshot:
        return 0
    storage = plugins.load_storage(CONF)
    try:
        code = report.print_oneshot_summary(storage, run_started,
                                            time.monotonic() - started)
    finally:
        storage.close()
    if status.unrecorded():
        print(f"error: {status.unrecorded()} failure(s) could not be stored in the "
              "database (see the log)", file=sys.stderr)
        return 1
    return code


def main(argv: list[str] | None = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.exit(common.run_cli(run_daemon))


if __name__ == "__main__":
    main()
