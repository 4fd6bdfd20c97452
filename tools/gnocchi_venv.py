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

import importlib.util
import sys
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
cache_dir = _ck.cache_dir


def venv_path() -> Path:
    return _ck.cache_dir() / VENV_NAME


def bin_path(name: str, venv: Path | None = None) -> Path:
    """The path of executable ``name`` inside the venv."""
    return (venv or venv_path()) / "bin" / name


def marker_text() -> str:
    """What the marker of an up-to-date venv holds."""
    return _ck.marker_for(REQUIREMENTS)


def is_current(venv: Path | None = None) -> bool:
    """True if the venv exists, was built with today's requirement list and
    has every executable the tests run."""
    return _ck.venv_is_current(venv or venv_path(), REQUIREMENTS, EXECUTABLES)


def build(venv: Path) -> None:
    """(Re)create the venv at ``venv`` and install REQUIREMENTS into it."""
    _ck.build_venv(venv, REQUIREMENTS, EXECUTABLES)


def ensure_venv(rebuild: bool = False,
                log: Callable[[str], None] | None = print) -> Path:
    """Build the venv unless an up-to-date one exists; return its path
    (``log``: one line, reused or built, and how long it took)."""
    return _ck.ensure(venv_path(), "gnocchi", lambda v: is_current(v), lambda v: build(v),
                      rebuild, log)


def main(argv: list[str] | None = None) -> int:
    return _ck.run_main(argv, __doc__, "gnocchi", ensure_venv)


if __name__ == "__main__":
    sys.exit(main())
