#!/usr/bin/env python3
"""The virtualenv holding CloudKitty 25.0.0's API, processor and CLI client.

The reference test stack (tests/cloudkitty_stack.py) runs the real
``cloudkitty-api`` (WSGI app), ``cloudkitty-dbsync``,
``cloudkitty-storage-init``, ``cloudkitty-processor`` and
``openstack rating ...`` from this virtualenv, as separate processes:
CloudKitty must never be imported into our own process (its oslo.config
options clash with cloudkitty_proc's).

Where: ``${CLOUDKITTY_PROC_CACHE:-$HOME/.cache/cloudkitty-proc}/venv-cloudkitty-api-25.0.0``
(another tool keeps its own venv beside it under a different name; this
module never touches it).

Idempotent: a marker file inside the venv holds the requirement list and the
Python version it was built for; it is written last, so a venv whose build
was interrupted, or whose requirements changed, is rebuilt from scratch
(``python -m venv --clear``). Concurrent callers serialise on a lock file
next to the venv.

As a script: ``python tools/cloudkitty_venv.py [--rebuild]`` builds or
reuses the venv and prints its path and how long it took. As a module:
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

CLOUDKITTY_VERSION = "25.0.0"
VENV_NAME = f"venv-cloudkitty-api-{CLOUDKITTY_VERSION}"

#: What the stack needs (CLOUDKITTY-DROPIN.md §5.2): the API and processor,
#: MariaDB's driver, the rating CLI, and keystonemiddleware (imported first by
#: the API server script, see tests/cloudkitty_api_server.py).
REQUIREMENTS = (
    f"cloudkitty=={CLOUDKITTY_VERSION}",
    "python-cloudkittyclient",
    "PyMySQL",
    "python-openstackclient",
    "keystonemiddleware",
)

#: Executables a usable venv has (checked besides the marker).
EXECUTABLES = ("python", "cloudkitty-dbsync", "cloudkitty-storage-init",
               "cloudkitty-processor", "openstack")

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


def marker_for(requirements: tuple[str, ...]) -> str:
    """What the marker of a venv up to date with ``requirements`` holds."""
    python = ".".join(map(str, sys.version_info[:3]))
    return f"# python {python}\n" + "".join(r + "\n" for r in requirements)


def venv_is_current(venv: Path, requirements: tuple[str, ...],
                    executables: tuple[str, ...]) -> bool:
    """True if ``venv`` exists, was built with ``requirements`` and has
    every one of ``executables`` in bin/ (the shared test of the venv tools:
    this one, tools/gnocchi_venv.py, tools/keystone_venv.py)."""
    try:
        if (venv / MARKER).read_text() != marker_for(requirements):
            return False
    except OSError:
        return False
    return all(bin_path(n, venv).exists() for n in executables)


def build_venv(venv: Path, requirements: tuple[str, ...],
               executables: tuple[str, ...]) -> None:
    """(Re)create ``venv`` and install ``requirements``; the marker last."""
    (venv / MARKER).unlink(missing_ok=True)
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], "python -m venv")
    _run([str(bin_path("python", venv)), "-m", "pip", "install", "-q",
          "--disable-pip-version-check", *requirements], "pip install")
    missing = [n for n in executables if not bin_path(n, venv).exists()]
    if missing:
        raise RuntimeError(f"{venv}: pip install left no {', '.join(missing)} in bin/")
    (venv / MARKER).write_text(marker_for(requirements))


def ensure(venv: Path, label: str, is_current_fn: Callable[[Path], bool],
           build_fn: Callable[[Path], None], rebuild: bool,
           log: Callable[[str], None] | None) -> Path:
    """Build ``venv`` (``build_fn``) unless ``is_current_fn`` says it is up to
    date, under a lock file beside it; ``log`` gets one line: reused or
    built, and how long that took."""
    started = time.monotonic()
    with _locked(venv.parent / (venv.name + ".lock")):
        if not rebuild and is_current_fn(venv):
            action = "reused"
        else:
            build_fn(venv)
            action = "built"
    if log:
        log(f"{label} venv {action}: {venv} ({time.monotonic() - started:.1f} s)")
    return venv


def run_main(argv: list[str] | None, doc: str, label: str,
             ensure_fn: Callable[..., Path]) -> int:
    """The command line of a venv tool: ``[--rebuild]``; 1 on failure."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true",
                        help="rebuild even if the venv is up to date")
    args = parser.parse_args(argv)
    try:
        ensure_fn(rebuild=args.rebuild)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"{label} venv: {exc}", file=sys.stderr)
        return 1
    return 0


# -- this venv ------------------------------------------------------------------

def marker_text() -> str:
    """What the marker of an up-to-date venv holds."""
    return marker_for(REQUIREMENTS)


def is_current(venv: Path | None = None) -> bool:
    """True if the venv exists, was built with today's requirement list and
    has every executable the stack runs."""
    return venv_is_current(venv or venv_path(), REQUIREMENTS, EXECUTABLES)


def build(venv: Path) -> None:
    """(Re)create the venv at ``venv`` and install REQUIREMENTS into it."""
    build_venv(venv, REQUIREMENTS, EXECUTABLES)


def ensure_venv(rebuild: bool = False,
                log: Callable[[str], None] | None = print) -> Path:
    """Build the venv unless an up-to-date one exists; return its path.

    ``log`` receives one line saying whether it was reused or built, and
    how long that took (None: silent).
    """
    return ensure(venv_path(), "cloudkitty", lambda v: is_current(v), lambda v: build(v),
                  rebuild, log)


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, __doc__, "cloudkitty", ensure_venv)


if __name__ == "__main__":
    sys.exit(main())
