"""Fault injection points for the crash tests (off unless asked for).

``CKP_FAULTS="before_commit:3"`` makes the 3rd pass through the point
``before_commit`` in a process SIGKILL that process; several specs are
separated by commas. Production never sets the variable; the check costs one
dict lookup.
"""

from __future__ import annotations

import os
import signal

_SPECS: dict[str, int] = {}
for _spec in filter(None, os.environ.get("CKP_FAULTS", "").split(",")):
    _name, _, _nth = _spec.partition(":")
    _SPECS[_name.strip()] = int(_nth or 1)
_COUNTS: dict[str, int] = {}


def point(name: str) -> None:
    if not _SPECS or name not in _SPECS:
        return
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if _COUNTS[name] == _SPECS[name]:
        os.kill(os.getpid(), signal.SIGKILL)
