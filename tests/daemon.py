"""Run the real commands (``cloudkitty-proc``, ``cloudkitty-proc-manage``)
as subprocesses, the way an operator does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, *, db_url: str, scopes: list[str], begin: str, end: str,
                 metrics_yml: str, om_path: Path | None = None, workers: int = 2,
                 collector: str = "file", processors: str = "noop",
                 rules_yml: str | None = None, extra: str = "", name: str = "ckp.conf",
                 transport_url: str | None = None, rpc_topic: str | None = None,
                 host: str = "testhost") -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    metrics = tmp_path / "metrics.yml"
    metrics.write_text(metrics_yml)
    rules_line = ""
    if rules_yml is not None:
        rules = tmp_path / "rating.yml"
        rules.write_text(rules_yml)
        rules_line = f"rules_file = {rules}"
    text = textwrap.dedent(f"""\
        [DEFAULT]
        state_path = {state}
        host = {host}
        graceful_shutdown_timeout = 20
        {f"transport_url = {transport_url}" if transport_url else ""}
        {f"rpc_topic = {rpc_topic}" if rpc_topic else ""}
        [orchestrator]
        max_workers = {workers}
        poll_interval = 1
        [collect]
        collector = {collector}
        period = 3600
        wait_periods = 2
        begin = {begin}
        end = {end}
        metrics_conf = {metrics}
        [collector_file]
        path = {om_path or ''}
        [fetcher_source]
        sources = {','.join(scopes)}
        [database]
        connection = {db_url}
        [rating]
        processors = {processors}
        [hashmap]
        {rules_line}
        """) + textwrap.dedent(extra)
    path = tmp_path / name
    path.write_text(text)
    return path


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.pop("CKP_FAULTS", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def manage(conf: Path, *args: str, check: bool = True, timeout: float = 120,
           env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "cloudkitty_proc.cli.manage", "--config-file", str(conf), *args],
        capture_output=True, text=True, timeout=timeout, env=_env(env), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"manage {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def run_oneshot(conf: Path, *, env: dict | None = None, timeout: float = 300,
                extra_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cloudkitty_proc.cli.daemon", "--config-file", str(conf),
         "--oneshot", *extra_args],
        capture_output=True, text=True, timeout=timeout, env=_env(env), cwd=REPO)


def start_daemon(conf: Path, *, env: dict | None = None, log: Path | None = None,
                 extra_args: tuple[str, ...] = ()) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "cloudkitty_proc.cli.daemon", "--config-file", str(conf),
         *extra_args],
        stdout=out, stderr=subprocess.STDOUT, env=_env(env), cwd=REPO)


def export(conf: Path, *args: str) -> list[dict]:
    proc = manage(conf, "export", *args)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def status(conf: Path) -> dict:
    return json.loads(manage(conf, "status", "--json").stdout)


def stop_daemon(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM the daemon and wait for it (SIGKILL after ``timeout``)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def wait_until(predicate, *, timeout: float = 60, interval: float = 0.2,
               what: str = "condition"):
    """Poll ``predicate()`` until it returns a true value; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def workers_of(master_pid: int) -> list[psutil.Process]:
    """The Orchestrator worker processes of one daemon (its children)."""
    try:
        children = psutil.Process(master_pid).children()
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped
                continue
            if "orchestrator" in " ".join(child.cmdline()) or "orchestrator" in child.name():
                out.append(child)
        except psutil.Error:
            continue
    return out
