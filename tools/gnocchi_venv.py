#!/usr/bin/env python3
"""The virtualenv holding Gnocchi 4.7.1 (API, metricd, indexer upgrade).

tests/gnocchi_server.py runs Gnocchi from it as separate processes: the API
under tools/gnocchi_api_server.py (the wheel's ``gnocchi-api`` needs uwsgi),
``gnocchi-metricd`` and ``gnocchi-upgrade``. Gnocchi is never imported into
our own process (its oslo.config options would clash with ours).

Where: ``${CLOUDKITTY_PROC_CACHE:-$HOME/.cache/cloudkitty-proc}/venv-gnocchi-4.7.1``,
next to the CloudKitty venv of tools/cloudkitty_venv.py (whose cache, lock
and marker logic this reuses: the marker holds the requirement list and the
Python version and is written last, so an interrupted or outdated build is
redone from scratch; concurrent callers serialise on a lock file).

As a script: ``python tools/gnocchi_venv.py [--rebuild]`` builds or reuses
the venv and prints its path and how long it took. As a module:
``ensure_venv()`` returns the venv's directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _load_sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ck = _load_sibling("cloudkitty_venv")

GNOCCHI_VERSION = "4.7.1"
#: "-keystone": the venv holds keystonemiddleware (``[api] auth_mode =
#: keystone``); a new name rather than a rebuild of the former venv, which
#: worktrees without it would otherwise rebuild back and forth
VENV_NAME = f"venv-gnocchi-{GNOCCHI_VERSION}-keystone"

#: Gnocchi with its PostgreSQL indexer and file storage drivers
#: (CLOUDKITTY-DROPIN.md §5.3) and keystonemiddleware (its ``keystone``
#: extra: ``[api] auth_mode = keystone`` against the test Keystone); nothing
#: else: the tests talk HTTP to it.
REQUIREMENTS = (f"gnocchi[postgresql,file,keystone]=={GNOCCHI_VERSION}",)

#: Executables a usable venv has (checked besides the marker).
EXECUTABLES = ("python", "gnocchi-upgrade", "gnocchi-metricd")

MARKER = _ck.MARKER


def venv_path() -> Path:
    return _ck.cache_dir() / VENV_NAME


def bin_path(name: str, venv: Path | None = None) -> Path:
    """The path of executable ``name`` inside the venv."""
    return (venv or venv_path()) / "bin" / name


def marker_text() -> str:
    python = ".".join(map(str, sys.version_info[:3]))
    return f"# python {python}\n" + "".join(r + "\n" for r in REQUIREMENTS)


def is_current(venv: Path | None = None) -> bool:
    """True if the venv exists, was built with today's requirement list and
    has every executable the tests run."""
    venv = venv or venv_path()
    try:
        if (venv / MARKER).read_text() != marker_text():
            return False
    except OSError:
        return False
    return all(bin_path(n, venv).exists() for n in EXECUTABLES)


def build(venv: Path) -> None:
    """(Re)create the venv at ``venv`` and install REQUIREMENTS into it."""
    (venv / MARKER).unlink(missing_ok=True)
    _ck._run([sys.executable, "-m", "venv", "--clear", str(venv)], "python -m venv")
    _ck._run([str(bin_path("python", venv)), "-m", "pip", "install", "-q",
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
    with _ck._locked(venv.parent / (VENV_NAME + ".lock")):
        if not rebuild and is_current(venv):
            action = "reused"
        else:
            build(venv)
            action = "built"
    if log:
        log(f"gnocchi venv {action}: {venv} ({time.monotonic() - started:.1f} s)")
    return venv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true",
                        help="rebuild even if the venv is up to date")
    args = parser.parse_args(argv)
    try:
        ensure_venv(rebuild=args.rebuild)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"gnocchi venv: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
