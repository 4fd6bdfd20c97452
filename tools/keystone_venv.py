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

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path


def _load_sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: cache, lock, marker and build logic shared with the other venv tools
_ck = _load_sibling("cloudkitty_venv")

KEYSTONE_VERSION = "30.0.0"
VENV_NAME = f"venv-keystone-{KEYSTONE_VERSION}"

#: Keystone alone: its WSGI app is served by the standard library's wsgiref
#: (tools/keystone_wsgi_server.py), SQLite is its database.
REQUIREMENTS = (f"keystone=={KEYSTONE_VERSION}",)

#: Executables a usable venv has (checked besides the marker).
EXECUTABLES = ("python", "keystone-manage")

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
    return _ck.ensure(venv_path(), "keystone", lambda v: is_current(v), lambda v: build(v),
                      rebuild, log)


def main(argv: list[str] | None = None) -> int:
    return _ck.run_main(argv, __doc__, "keystone", ensure_venv)


if __name__ == "__main__":
    sys.exit(main())
