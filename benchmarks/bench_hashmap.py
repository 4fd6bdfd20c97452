#!/usr/bin/env python3
"""Throughput of the hashmap rating processor (one process, one core).

Builds a rules file with 50+ mappings and 10+ thresholds over several
groups (some per scope, some with validity windows that start or end in
the middle of the rated day), then rates ``--points`` datapoints (default
1,000,000) of 5 usage types (one without rules) in 8 scopes over 24 hourly
periods, in frames of ``--frame-size`` points, through
``HashMapProcessor.process`` exactly as a worker does. Prints datapoints/s
and the total time. Target: >= 200,000 datapoints/s.

    python benchmarks/bench_hashmap.py [--points N] [--frame-size N]
                                       [--profile] [--seed N]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import decimal
import os
import pathlib
import pstats
import random
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from oslo_config import cfg  # noqa: E402

from cloudkitty_proc import conf as ckp_conf  # noqa: E402
from cloudkitty_proc.dataframe import DataFrame, DataPoint  # noqa: E402
from cloudkitty_proc.rating.hashmap import HashMapProcessor  # noqa: E402

D = decimal.Decimal
UTC = datetime.timezone.utc
BEGIN = datetime.datetime(2026, 1, 1, tzinfo=UTC)
HOUR = datetime.timedelta(hours=1)
PERIODS = 24
SCOPES = [f"p-{i:02d}" for i in range(8)]
FLAVORS = [f"m1.{s}" for s in ("tiny", "small", "medium", "large", "xlarge")] + \
          [f"c1.{s}" for s in ("small", "large", "xlarge")]
VOLUME_TYPES = ["ssd", "hdd", "nvme", "archive"]
AZS = ["az1", "az2", "az3"]
DISK_FORMATS = ["raw", "qcow2", "vmdk", "iso"]
STATES = ["active", "down"]


def _iso(hours: int) -> str:
    return (BEGIN + hours * HOUR).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_rules() -> dict:
    """A rules document with many mappings, thresholds, groups, per-scope
    overrides and validity windows."""
    rnd = random.Random(42)

    def cost(lo: float, hi: float) -> str:
        return f"{rnd.uniform(lo, hi):.5f}"

    instance_flavors = []
    for i, flavor in enumerate(FLAVORS):
        instance_flavors.append({"value": flavor, "cost": cost(0.01, 0.5), "group": "compute"})
        # a new price list from hour 12 for half of the flavors
        if i % 2 == 0:
            instance_flavors[-1]["end"] = _iso(12)
            instance_flavors.append({"value": flavor, "cost": cost(0.01, 0.5),
                                     "group": "compute", "start": _iso(12)})
        # negotiated prices for two scopes
        for scope in SCOPES[:2]:
            instance_flavors.append({"value": flavor, "cost": cost(0.01, 0.4),
                                     "group": "compute", "scope": scope})
        instance_flavors.append({"value": flavor, "cost": cost(0.001, 0.01), "group": "licence"})
    instance = {
        "mappings": [
            {"cost": "0.002", "group": "support"},
            {"cost": "1.05", "type": "rate", "group": "compute", "start": _iso(6)},
            {"cost": "0.9", "type": "rate", "group": "compute", "scope": SCOPES[2]},
        ],
        "thresholds": [
            {"level": "1", "cost": "0.001", "group": "support"},
            {"level": "2", "cost": "1.1", "type": "rate", "group": "compute"},
        ],
        "fields": {
            "flavor_name": {"mappings": instance_flavors},
            "az": {"mappings": [
                {"value": az, "cost": cost(0.9, 1.2), "type": "rate", "group": "compute"}
                for az in AZS]},
            "vcpus": {"thresholds": [
                {"level": "4", "cost": "0.01", "group": "compute"},
                {"level": "8", "cost": "1.2", "type": "rate", "group": "compute"},
                {"level": "8", "cost": "1.3", "type": "rate", "group": "compute",
                 "scope": SCOPES[1]},
            ]},
        },
    }
    volume = {
        "thresholds": [
            {"level": "100", "cost": "0.95", "type": "rate", "group": "storage"},
            {"level": "500", "cost": "0.9", "type": "rate", "group": "storage"},
            {"level": "2000", "cost": "0.8", "type": "rate", "group": "storage",
             "end": _iso(18)},
            {"level": "1000", "cost": "0.5", "group": "backup"},
        ],
        "fields": {
            "volume_type": {"mappings": [
                *({"value": t, "cost": cost(0.00002, 0.0003), "group": "storage"}
                  for t in VOLUME_TYPES),
                *({"value": t, "cost": cost(0.00001, 0.0001), "group": "backup"}
                  for t in VOLUME_TYPES),
                {"value": "ssd", "cost": "0.00015", "group": "storage", "scope": SCOPES[3]},
                {"value": "ssd", "cost": "0.00012", "group": "storage", "scope": SCOPES[3],
                 "start": _iso(20)},
            ]},
            "az": {"mappings": [
                {"value": az, "cost": cost(0.95, 1.05), "type": "rate", "group": "storage"}
                for az in AZS]},
        },
    }
    # the two ssd overrides of SCOPES[3] overlap from hour 20: make the first
    # end there
    volume["fields"]["volume_type"]["mappings"][-2]["end"] = _iso(20)
    image = {
        "mappings": [{"cost": "0.00000014", "group": "storage"}],
        "fields": {
            "disk_format": {"mappings": [
                {"value": f, "cost": cost(0.3, 1.0), "type": "rate", "group": "storage"}
                for f in DISK_FORMATS]},
            "size_class": {"thresholds": [
                {"level": "10", "cost": "0.00000001", "group": "storage"},
                {"level": "100", "cost": "0.00000002", "group": "storage"},
            ]},
        },
    }
    ip = {
        "mappings": [{"cost": "0.005", "group": "network"},
                     {"cost": "0.004", "group": "network", "scope": SCOPES[4]}],
        "fields": {"state": {"mappings": [
            {"value": "down", "cost": "2", "type": "rate", "group": "network"},
            {"value": "active", "cost": "1", "type": "rate", "group": "network",
             "start": _iso(3), "end": _iso(9)},
        ]}},
    }
    return {"hashmap": {"services": {
        "instance": instance, "volume.size": volume, "image.size": image,
        "ip.floating": ip}}}


def count_rules(doc: dict) -> tuple[int, int, set]:
    mappings = thresholds = 0
    groups = set()
    for service in doc["hashmap"]["services"].values():
        lists = [("m", service.get("mappings", [])), ("t", service.get("thresholds", []))]
        for field in service.get("fields", {}).values():
            lists += [("m", field.get("mappings", [])), ("t", field.get("thresholds", []))]
        for kind, items in lists:
            for item in items:
                groups.add(item.get("group", "_DEFAULT_"))
                if kind == "m":
                    mappings += 1
                else:
                    thresholds += 1
    return mappings, thresholds, groups


def build_pool(rnd: random.Random, scope: str, per_type: int) -> dict[str, list[DataPoint]]:
    """Points of one scope (the same resources every period)."""
    pool: dict[str, list[DataPoint]] = {t: [] for t in
                                        ("instance", "volume.size", "image.size",
                                         "ip.floating", "cpu.util")}
    users = [f"u-{rnd.getrandbits(32):08x}" for _ in range(5)]
    for i in range(per_type):
        user = rnd.choice(users)
        gb = {"id": f"{scope}-i{i}", "user_id": user, "project_id": scope}
        pool["instance"].append(DataPoint(
            "instance", D(rnd.choice(("1", "1", "1", "0", "2", "3"))), D(0), gb,
            {"flavor_name": rnd.choice(FLAVORS), "az": rnd.choice(AZS),
             "vcpus": str(rnd.choice((1, 2, 4, 8, 16)))}))
        pool["cpu.util"].append(DataPoint(
            "ratio", D(f"{rnd.random():.4f}"), D(0), gb, {}))
        pool["volume.size"].append(DataPoint(
            "GiB", D(rnd.choice((1, 10, 20, 50, 100, 250, 500, 1000, 1500, 3000))
                     + rnd.randint(0, 9)), D(0),
            {"id": f"{scope}-v{i}", "project_id": scope},
            {"volume_type": rnd.choice(VOLUME_TYPES), "az": rnd.choice(AZS)}))
        size = rnd.randint(10, 40000)
        pool["image.size"].append(DataPoint(
            "MiB", D(size), D(0), {"id": f"{scope}-img{i}", "project_id": scope},
            {"disk_format": rnd.choice(DISK_FORMATS), "size_class": str(size // 100)}))
        pool["ip.floating"].append(DataPoint(
            "ip", D(1), D(0), {"id": f"{scope}-ip{i}", "project_id": scope},
            {"state": rnd.choice(STATES)}))
    return pool


def build_frames(n_points: int, frame_size: int, seed: int) -> list[DataFrame]:
    rnd = random.Random(seed)
    types = ("instance", "volume.size", "image.size", "ip.floating", "cpu.util")
    per_type = max(1, frame_size // len(types))
    n_frames = max(1, n_points // (per_type * len(types)))
    frames_per_slot = max(1, -(-n_frames // (PERIODS * len(SCOPES))))
    pools = {s: build_pool(rnd, s, per_type * frames_per_slot) for s in SCOPES}
    frames = []
    for k in range(n_frames):
        period = k % PERIODS
        scope = SCOPES[(k // PERIODS) % len(SCOPES)]
        chunk = (k // (PERIODS * len(SCOPES))) % frames_per_slot
        begin = BEGIN + period * HOUR
        pts = {t: pools[scope][t][chunk * per_type:(chunk + 1) * per_type] for t in types}
        frames.append(DataFrame(scope, begin, begin + HOUR, pts))
    return frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--frame-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true",
                        help="run under cProfile and print the top functions")
    args = parser.parse_args(argv)

    doc = build_rules()
    mappings, thresholds, groups = count_rules(doc)
    assert mappings >= 50 and thresholds >= 10 and len(groups) >= 3

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rating.yml")
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(doc, fh, sort_keys=False)
        conf = cfg.ConfigOpts()
        ckp_conf.register_opts(conf)
        conf.set_override("rules_file", path, group="hashmap")
        t0 = time.perf_counter()
        proc = HashMapProcessor(conf)
        load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    frames = build_frames(args.points, args.frame_size, args.seed)
    build_s = time.perf_counter() - t0
    n = sum(len(f) for f in frames)
    n_rated = n - sum(len(f.points("cpu.util")) for f in frames)

    print(f"rules: {mappings} mappings, {thresholds} thresholds, {len(groups)} groups "
          f"({', '.join(sorted(groups))}); loaded in {load_s * 1000:.1f} ms")
    print(f"data: {n:,} datapoints in {len(frames)} frames, {len(SCOPES)} scopes, "
          f"{PERIODS} periods, 5 usage types (cpu.util unrated); built in {build_s:.1f} s")

    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    total = D(0)
    for frame in frames:
        proc.process(frame)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    if profiler:
        profiler.disable()
    for frame in frames:
        total += frame.total_price()

    print(f"rated {n:,} datapoints in {elapsed:.3f} s (CPU {cpu:.3f} s): "
          f"{n / elapsed:,.0f} datapoints/s on one core "
          f"(target >= 200,000/s)")
    print(f"  of which {n_rated:,} of usage types with rules: "
          f"{n_rated / elapsed:,.0f} rated datapoints/s; "
          f"{elapsed / len(frames) * 1000:.2f} ms per frame of {n // len(frames)}")
    print(f"sum of prices: {total}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
