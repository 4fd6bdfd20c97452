"""Records what CloudKitty 25.0.0's v2 storage drivers send (run by
``tools/cloudkitty_storage_golden.py`` with the CloudKitty venv's python;
see that tool for the formats). Never imported by cloudkitty_proc or its
tests: it imports CloudKitty, whose oslo.config options would clash with
ours.

    TZ=UTC <venv>/bin/python tools/ck_golden_driver.py \\
        --recorder tests/fakes/recording_http.py \\
        --fixtures tests/fixtures/cloudkitty_golden
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from oslo_config import cfg

from cloudkitty import dataframe
from cloudkitty.storage.v2 import elasticsearch as ck_es
from cloudkitty.storage.v2 import influx as ck_influx
from cloudkitty.storage.v2 import opensearch as ck_os
from cloudkitty.utils import tz as tzutils

CONF = cfg.CONF
DATABASE = "cloudkitty"
INDEX = "cloudkitty"
CLIENTS = ("cloudkitty", "influxdb", "requests", "urllib3", "oslo.config")
#: frame sizes whose /write request count is recorded
SIZES = (1, 499, 500, 501, 1000, 1001, 1201)


def load_recorder(path: Path):
    spec = importlib.util.spec_from_file_location("recording_http", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["recording_http"] = module
    spec.loader.exec_module(module)
    return module


def ck_frame(spec: dict) -> dataframe.DataFrame:
    """A CloudKitty frame as the processor pushes it: built from the dict
    form (``DataFrame.from_dict``, as ``persist_rating_data`` does)."""
    usage = {
        type_: [{"vol": {"unit": p["unit"], "qty": p["qty"]},
                 "rating": {"price": p["price"]},
                 "groupby": p["groupby"], "metadata": p["metadata"]}
                for p in points]
        for type_, points in spec["usage"].items()}
    return dataframe.DataFrame.from_dict({
        "period": {"begin": tzutils.dt_from_iso(spec["begin"]),
                   "end": tzutils.dt_from_iso(spec["end"])},
        "usage": usage})


def record(storage, server, rec, frames, spec) -> list[dict]:
    """init, one push per frame, then the two deletes, each with its requests."""
    scope_key = spec["scope_key"]
    operations = []

    def step(op: dict, call) -> None:
        server.take()
        call()
        op["requests"] = [rec.describe(r) for r in server.take()]
        operations.append(op)

    step({"op": "init"}, storage.init)
    for i, frame in enumerate(frames):
        step({"op": "push", "frame": i,
              "scope_id": spec["frames"][i]["scope_id"]},
             lambda f=frame, s=spec["frames"][i]["scope_id"]: storage.push([f], s))
    for kind in ("reset", "reprocess"):
        d = spec["deletes"][kind]
        begin = tzutils.dt_from_iso(d["begin"])
        end = tzutils.dt_from_iso(d["end"]) if d.get("end") else None
        step({"op": "delete", "kind": kind, "scope_id": d["scope_id"],
              "begin": d["begin"], "end": d.get("end")},
             lambda b=begin, e=end, s=d["scope_id"]: storage.delete(
                 begin=b, end=e, filters={scope_key: s}))
    return operations


def influx_request_counts(storage, server) -> list[dict]:
    """How many /write requests one push of an N-point frame makes."""
    start = tzutils.dt_from_iso("2026-02-01T00:00:00+00:00")
    end = tzutils.dt_from_iso("2026-02-01T01:00:00+00:00")
    counts = []
    for n in SIZES:
        frame = dataframe.DataFrame(start=start, end=end)
        frame.add_points([dataframe.DataPoint("instance", "1", "0.5",
                                              {"id": f"vm-{i}", "project_id": "p"}, {})
                          for i in range(n)], "instance")
        server.take()
        storage.push([frame], "p")
        writes = [r for r in server.take() if r.path == "/write"]
        counts.append({"points": n, "requests": len(writes),
                       "lines": [len([x for x in r.body.split(b"\n") if x])
                                 for r in writes]})
    return counts


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recorder", type=Path, required=True)
    parser.add_argument("--fixtures", type=Path, required=True)
    args = parser.parse_args()
    if os.environ.get("TZ") != "UTC":
        sys.exit("run with TZ=UTC (CloudKitty renders times in the local zone)")
    time.tzset()
    rec = load_recorder(args.recorder)
    spec = json.loads((args.fixtures / "frames.json").read_text())
    clients = {name: importlib.metadata.version(name) for name in CLIENTS}
    CONF([], project="cloudkitty", default_config_files=[], default_config_dirs=[])
    CONF.set_override("period", spec["period"], "collect")

    with rec.RecordingServer() as server:
        rec.influxdb_routes(server, [DATABASE])
        rec.search_routes(server, INDEX, "elasticsearch")
        config = {
            "influxdb": {"storage_influxdb": {
                "host": "127.0.0.1", "port": server.port, "database": DATABASE,
                "retention_policy": "autogen", "version": 1, "use_ssl": False}},
            "elasticsearch": {"storage_elasticsearch": {
                "host": server.url, "index_name": INDEX, "insecure": False,
                "use_datastream": False, "scroll_duration": 30}},
            "opensearch": {"storage_opensearch": {
                "host": server.url, "index_name": INDEX, "insecure": False,
                "use_datastream": False, "scroll_duration": 30}},
        }
        for backend in config.values():
            for group, options in backend.items():
                for name, value in options.items():
                    CONF.set_override(name, value, group)
        frames = [ck_frame(f) for f in spec["frames"]]
        drivers = {"influxdb": ck_influx.InfluxStorage,
                   "elasticsearch": ck_es.ElasticsearchStorage,
                   "opensearch": ck_os.OpenSearchStorage}
        for backend, cls in drivers.items():
            storage = cls(period=spec["period"])
            out = {"cloudkitty": clients["cloudkitty"], "clients": clients,
                   "config": {g: {k: v for k, v in o.items() if k != "port"}
                              for g, o in config[backend].items()},
                   "operations": record(storage, server, rec, frames, spec)}
            if backend == "influxdb":
                out["requests_per_push"] = influx_request_counts(storage, server)
            # the port is random: keep the host URL stable in the fixture
            text = json.dumps(out, indent=1, ensure_ascii=False, sort_keys=False)
            text = text.replace(server.url, "http://127.0.0.1:PORT")
            path = args.fixtures / f"{backend}.json"
            path.write_text(text + "\n")
            print(f"wrote {path} ({len(out['operations'])} operations)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
