#!/usr/bin/env python3
"""The virtualenv holding Keystone 30.0.0, for the tests' identity server.

tests/keystone_server.py runs ``keystone-manage`` and Keystone's WSGI
application (under tools/keystone_wsgi_server.py) from this virtualenv, as
separate processes: Keystone is never imported into our own process (its
oslo.config options would clash with cloudkitty_proc's).

Where: ``${CLOUDKITTY_PROC_CACHE:-$HOME/.cache/cloudkitty-proc}/venv-keystone-30.0.0``
(beside the CloudKitty venvs, which this module never touches).

Idempotent like tools/cloudkitty_venv.py: a marker file inside the venv holds
the requirement list and the Python version it was built for; it is written
last, so a venv whose build was interrupted, or whose requirements changed,
is rebuilt from scratch (``python -m venv --clear``). Concurrent callers
serialise on a lock file next to the venv.

As a script: ``python tools/keystone_venv.py [--rebuild]`` builds or reuses
the venv and prints its path and how long it took. As a module:
``ensure_venv()`` returns the venv's directory.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

KEYSTONE_VERSION = "30.0.0"
VENV_NAME = f"venv-keystone-{KEYSTONE_VERSION}"

#: Keystone alone: its WSGI app is served by the standard library's wsgiref
#: (tools/keystone_wsgi_server.py), SQLite is its database.
REQUIREMENTS = (f"keystone=={KEYSTONE_VERSION}",)

#: Executables a usable venv has (checked besides the marker).
EXECUTABLES = ("python", "keystone-manage")

MARKER = "cloudkitty-proc-requirements.txt"
PIP_TIMEOUT = 1800


def cache_dir() -> Path:
    """``$CLOUDKITTY_PROC_CACHE``, or ``~/.cache/cloudkitty-proc``."""
    env = os.environ.get("CLOUDKITTY_PROC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cloudkitty-proc"


def venv_path() -> Path:
    return cache_dir() / VENV_NAME


def bin_path(name: str, venv: Path | None = None) -> Path:
    """The path of executable ``name`` inside the venv."""
    return (venv or venv_path()) / "bin" / name


def marker_text() -> str:
    """What the marker of an up-to-date venv holds."""
    python = ".".join(map(str, sys.version_info[:3]))
    return f"# python {python}\n" + "".join(r + "\n" for r in REQUIREMENTS)


def is_current(venv: Path | None = None) -> bool:
    """True if the venv exists, was built with today's requirement list and
    has every executable the server needs."""
    venv = venv or venv_path()
    try:
        if (venv / MARKER).read_text() != marker_text():
            return False
    except OSError:
        return False
    return all(bin_path(n, venv).exists() for n in EXECUTABLES)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def build(venv: Path) -> None:
    """(Re)create the venv at ``venv`` and install REQUIREMENTS into it."""
    (venv / MARKER).unlink(missing_ok=True)
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], "python -m venv")
    _run([str(bin_path("python", venv)), "-m", "pip", "install", "-q",
          "--disable-pip-version-check", *REQUIREMENTS], "pip install")
    missing = [n for n in EXECUTABLES if not bin_path(n, venv).exists()]
    if missing:
        raise RuntimeError(f"{venv}: pip install left no {', '.join(missing)} in bin/")
    (venv / MARKER).write_text(marker_text())


def ensure_venv(rebuild: bool = False,
                log: Callable[[str], None] | None = print) -> Path:
    """Build the venv unless an up-to-date one exists; return its path.

    ``log`` receives one line saying whether it was reused or built, and
    how long that took (None: silent).
    """
    venv = venv_path()
    started = time.monotonic()
    with _locked(venv.parent / (VENV_NAME + ".lock")):
        if not rebuild and is_current(venv):
            action = "reused"
        else:
            build(venv)
            action = "built"
    if log:
        log(f"keystone venv {action}: {venv} ({time.monotonic() - started:.1f} s)")
    return venv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true",
                        help="rebuild even if the venv is up to date")
    args = parser.parse_args(argv)
    try:
        ensure_venv(rebuild=args.rebuild)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"keystone venv: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
