"""Runs CloudKitty 25.0.0's own GnocchiCollector and GnocchiFetcher and
prints what they return as JSON (run with the CloudKitty venv's python, see
tools/cloudkitty_venv.py). The reference of tests/functional/
test_gnocchi_collector.py; never imported by cloudkitty_proc or its tests
(CloudKitty's oslo.config options would clash with ours).

    TZ=UTC <venv>/bin/python tools/ck_gnocchi_driver.py SPEC.json

SPEC.json::

    {"endpoint": "http://127.0.0.1:8041", "user": "admin",
     "scope_key": "project_id", "period": 3600, "metrics_yml": "/path/metrics.yml",
     "scopes": ["p1", ...], "periods": [["2026-01-01T10:00:00+00:00", "...11:00..."], ...],
     "fetcher": {"resource_types": ["generic"], "scope_attribute": "project_id"}}

Output (stdout): {"rows": [{"metric": <CloudKitty's metric key>, "type":
<usage type>, "scope": ..., "begin": ..., "points": [{"unit", "qty" (text),
"price", "groupby" (object, CloudKitty's key order), "groupby_keys",
"metadata"}...] or "error": "<exception>"}...], "scopes": [fetcher's], "fetcher": {"rss_before_kib", "rss_peak_kib",
"traced_peak_kib", "seconds"} (memory and time of the fetcher's call)}.
``metrics_yml`` may be left out (the fetcher alone).
No data (NoDataCollected) is an empty list of points.
"""

from __future__ import annotations

import json
import os
import sys
import time
import tracemalloc

from oslo_config import cfg

from cloudkitty import collector as ck_collector
from cloudkitty import utils as ck_utils
from cloudkitty.collector import gnocchi as ck_gnocchi
from cloudkitty.fetcher import gnocchi as ck_fetcher
from cloudkitty.utils import tz as tzutils

CONF = cfg.CONF


def configure(spec: dict, path: str) -> None:
    """CloudKitty's options from ``spec``, in a cloudkitty.conf beside the
    spec file ``path``."""
    fetcher = spec.get("fetcher", {})
    text = f"""[collect]
collector = gnocchi
scope_key = {spec.get('scope_key', 'project_id')}
period = {spec.get('period', 3600)}
metrics_conf = {spec.get('metrics_yml') or '/nonexistent/metrics.yml'}
[collector_gnocchi]
gnocchi_auth_type = basic
gnocchi_user = {spec['user']}
gnocchi_endpoint = {spec['endpoint']}
[fetcher_gnocchi]
gnocchi_auth_type = basic
gnocchi_user = {spec['user']}
gnocchi_endpoint = {spec['endpoint']}
resource_types = {','.join(fetcher.get('resource_types', ['generic']))}
scope_attribute = {fetcher.get('scope_attribute', 'project_id')}
"""
    conf_path = os.path.join(os.path.dirname(os.path.abspath(path)), "cloudkitty.conf")
    with open(conf_path, "w") as fh:
        fh.write(text)
    CONF(["--config-file", conf_path], project="cloudkitty")


def point_dict(point) -> dict:
    return {"unit": point.unit, "qty": str(point.qty), "price": str(point.price),
            "groupby": dict(point.groupby), "groupby_keys": list(point.groupby.keys()),
            "metadata": dict(point.metadata)}


def main(path: str) -> None:
    with open(path) as fh:
        spec = json.load(fh)
    configure(spec, path)
    rows = []
    keys = []
    if spec.get("metrics_yml"):
        metrics = ck_utils.load_conf(spec["metrics_yml"])
        coll = ck_gnocchi.GnocchiCollector(period=spec["period"], conf=metrics)
        keys = list(coll.conf)
    for key in keys:
        for scope in spec["scopes"]:
            for begin_text, end_text in spec["periods"]:
                begin = tzutils.dt_from_iso(begin_text)
                end = tzutils.dt_from_iso(end_text)
                row = {"metric": key, "scope": scope, "begin": begin_text}
                try:
                    name, points = coll.retrieve(key, begin, end, project_id=scope)
                    row["type"] = name
                    row["points"] = [point_dict(p) for p in points]
                except ck_collector.NoDataCollected:
                    row["type"] = coll.conf[key].get("alt_name", key)
                    row["points"] = []
                except Exception as exc:  # noqa: BLE001 - reported to the test
                    row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
    out = {"rows": rows, "scopes": None}
    if spec.get("fetcher") is not None:
        fetcher = ck_fetcher.GnocchiFetcher()
        scopes, out["fetcher"] = measure(fetcher.get_tenants)
        out["scopes"] = sorted(scopes)
    json.dump(out, sys.stdout)


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def measure(call):
    """call()'s result and its figures: RSS before, peak RSS during (the
    kernel's VmHWM, reset first through /proc/self/clear_refs), tracemalloc's
    peak, seconds."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    rss = _status("VmRSS")
    tracemalloc.start()
    started = time.monotonic()
    result = call()
    seconds = time.monotonic() - started
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, {"rss_before_kib": rss, "rss_peak_kib": _status("VmHWM"),
                    "traced_peak_kib": traced // 1024, "seconds": seconds}


if __name__ == "__main__":
    main(sys.argv[1])
