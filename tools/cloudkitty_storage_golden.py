#!/usr/bin/env python3
"""Golden request payloads from CloudKitty 25.0.0's own v2 storage drivers.

What it is for: ``tests/unit/test_storage_golden.py`` checks that our point
stores (``cloudkitty_proc.storage.influx`` / ``.elasticsearch`` /
``.opensearch``) send what CloudKitty's drivers send for the same frames,
without CloudKitty in our process. This tool records what CloudKitty sends
and writes it to ``tests/fixtures/cloudkitty_golden/``; the test only reads
those committed files.

Regenerate (PyPI needed the first time only)::

    python tools/cloudkitty_storage_golden.py            # venv + fixtures
    python tools/cloudkitty_storage_golden.py --venv-only

1. A virtualenv with ``cloudkitty==25.0.0`` (which brings the ``influxdb``
   and ``influxdb-client`` clients, ``requests``, oslo.config, ...) is made,
   or reused when its python already imports CloudKitty 25.0.0, at
   ``${CLOUDKITTY_PROC_CACHE:-$HOME/.cache/cloudkitty-proc}/venv-cloudkitty-25.0.0``
   (the path the other CloudKitty-side tools use, so CI can cache it).
2. ``tools/ck_golden_driver.py`` runs with that venv's python (``TZ=UTC``).
   It starts ``tests/fakes/recording_http.py`` (loaded by file path: it is
   stdlib only), configures CloudKitty's options in-process
   (``[storage_influxdb]``, ``[storage_elasticsearch]``,
   ``[storage_opensearch]``, ``[collect] period``) to point at it, and for
   each backend records the requests made by ``init()`` (what
   ``cloudkitty-storage-init`` does), ``push([frame], scope_id)`` once per
   frame (as the processor does, after its ``as_dict``/``from_dict`` round
   trip), ``delete(begin=T, end=None, filters={scope_key: id})`` (what
   ``reset_state`` does) and ``delete(begin=B, end=E, filters={scope_key:
   id})`` (the reprocessor's clean-up, here with zone-aware datetimes).

Input: ``tests/fixtures/cloudkitty_golden/frames.json``::

    {"scope_key": "project_id", "period": 3600,
     "frames": [{"scope_id": ..., "begin": ISO, "end": ISO,
                 "usage": {type: [{"unit", "qty", "price", "groupby",
                                   "metadata"}, ...]}}, ...],
     "deletes": {"reset": {"scope_id", "begin"},
                 "reprocess": {"scope_id", "begin", "end"}}}

``qty`` and ``price`` are strings (exact decimals); ``frames`` is in push
order.

Output: ``tests/fixtures/cloudkitty_golden/{influxdb,elasticsearch,
opensearch}.json``::

    {"cloudkitty": "25.0.0", "clients": {dist: version},
     "config": {option: value}, "operations": [
        {"op": "init"} | {"op": "push", "frame": i} |
        {"op": "delete", "kind": "reset"|"reprocess", "scope_id",
         "begin", "end"},
        "requests": [{"method", "path", "query": {name: [values]},
                      "headers": {lower-case name: value},
                      "body": text | null,
                      "json": parsed JSON body (if it is JSON),
                      "ndjson": [parsed line, ...] (if it is NDJSON),
                      "lines": [line protocol line, ...] (InfluxDB writes)}]
     ]}

``influxdb.json`` also has ``"requests_per_push"``: for frames of N points,
how many ``/write`` requests CloudKitty's driver sends and how many lines
each carries.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

CLOUDKITTY_VERSION = "25.0.0"
ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tools" / "ck_golden_driver.py"
RECORDER = ROOT / "tests" / "fakes" / "recording_http.py"
FIXTURES = ROOT / "tests" / "fixtures" / "cloudkitty_golden"


def venv_dir() -> Path:
    """Where the CloudKitty virtualenv lives (shared with other tools)."""
    cache = os.environ.get("CLOUDKITTY_PROC_CACHE") or str(
        Path.home() / ".cache" / "cloudkitty-proc")
    return Path(cache) / f"venv-cloudkitty-{CLOUDKITTY_VERSION}"


def _venv_ok(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run(
        [str(python), "-c",
         "import importlib.metadata as m, cloudkitty.storage.v2.influx, "
         "cloudkitty.storage.v2.elasticsearch, cloudkitty.storage.v2.opensearch; "
         "print(m.version('cloudkitty'))"],
        capture_output=True, text=True, env={**os.environ, "TZ": "UTC"})
    return probe.returncode == 0 and probe.stdout.strip() == CLOUDKITTY_VERSION


def ensure_venv() -> Path:
    """The venv's python, building the venv first when it is missing or broken."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    if _venv_ok(python):
        print(f"reusing {venv}", file=sys.stderr)
        return python
    started = time.monotonic()
    print(f"building {venv} (cloudkitty=={CLOUDKITTY_VERSION}) ...", file=sys.stderr)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
                   check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q",
                    f"cloudkitty=={CLOUDKITTY_VERSION}"], check=True)
    if not _venv_ok(python):
        sys.exit(f"{venv}: cloudkitty {CLOUDKITTY_VERSION} installed but its storage "
                 "drivers do not import (see the output above)")
    print(f"built {venv} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv-only", action="store_true",
                        help="build or check the venv, record nothing")
    parser.add_argument("--out", type=Path, default=FIXTURES,
                        help="fixtures folder (frames.json is read from it)")
    args = parser.parse_args()
    python = ensure_venv()
    if args.venv_only:
        return 0
    env = {**os.environ, "TZ": "UTC", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(python), str(DRIVER), "--recorder", str(RECORDER), "--fixtures",
         str(args.out)], env=env, cwd=str(ROOT)).returncode


if __name__ == "__main__":
    sys.exit(main())
