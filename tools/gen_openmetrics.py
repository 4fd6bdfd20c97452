#!/usr/bin/env python3
"""Generate deterministic OpenMetrics usage data for cloudkitty_proc.

The output feeds both collectors:

* the ``file`` collector reads it directly (``[collector_file] path``);
* ``promtool tsdb create-blocks-from openmetrics FILE DIR`` turns it into
  Prometheus TSDB blocks for the ``prometheus`` collector.

Metric names and labels match ``etc/cloudkitty-proc/metrics.yml``::

    instance_up{project_id, id, user_id, flavor_name, host}     0/1
    cpu_utilization_ratio{project_id, id, host}                 [0, 1)
    volume_size_bytes{project_id, id, user_id, volume_type}     bytes
    image_size_bytes{project_id, id, disk_format}               bytes
    ip_floating_up{project_id, id, state}                       0/1

Samples sit at ``begin + step/2 + k*step`` and a sample that would fall
exactly on an hour boundary is dropped, so that a period [begin, end) of the
file collector and the range (end - period, end] of Prometheus hold the same
samples. The same arguments (and ``--seed``) always give the same bytes;
each project's data depends only on the seed and the project's position, so
adding projects does not change the existing ones.

Usage::

    tools/gen_openmetrics.py --projects 4 --begin 2026-01-01T00:00:00Z \\
        --hours 72 --step 300 --out etc/cloudkitty-proc/sample-usage.om
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys

PROJECT_NAMES = ("p-alpha", "p-beta", "p-gamma", "p-delta", "p-epsilon",
                 "p-zeta", "p-eta", "p-theta", "p-iota", "p-kappa")
FLAVORS = ("m1.tiny", "m1.small", "m1.large")
VOLUME_TYPES = ("ssd", "hdd")
DISK_FORMATS = ("raw", "qcow2")
HOSTS = ("cmp-1", "cmp-2", "cmp-3")

#: (name, type, unit or None, help) in output order.
FAMILIES = (
    ("instance_up", "gauge", None, "1 while the instance runs, 0 while it is stopped."),
    ("volume_size_bytes", "gauge", "bytes", "Size of the volume."),
    ("image_size_bytes", "gauge", "bytes", "Size of the image."),
    ("ip_floating_up", "gauge", None, "1 while the floating IP is active, 0 while down."),
    ("cpu_utilization_ratio", "gauge", "ratio", "CPU utilisation of the instance."),
)

HOUR_MS = 3_600_000


def project_ids(count: int) -> list[str]:
    return [PROJECT_NAMES[i] if i < len(PROJECT_NAMES) else f"p-{i:04d}"
            for i in range(count)]


def _fmt_value(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def _fmt_ts(ms: int) -> str:
    sec, rem = divmod(ms, 1000)
    return str(sec) if rem == 0 else f"{sec}.{rem:03d}".rstrip("0")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Project:
    """All series of one project: {family: [(labels, [(k, value), ...])]}."""

    def __init__(self, seed: int, index: int, pid: str, nsteps: int,
                 per_metric: int | None) -> None:
        self.rng = random.Random(f"{seed}:{index}:{pid}")
        self.pid = pid
        self.n = nsteps
        self.per_metric = per_metric
        self.series: dict[str, list[tuple[dict[str, str], list[tuple[int, float | int]]]]] = {
            name: [] for name, *_ in FAMILIES}
        self.users = [self._hex("u-") for _ in range(2)]
        self._instances()
        self._volumes()
        self._images()
        self._floating_ips()

    def _hex(self, prefix: str) -> str:
        return f"{prefix}{self.rng.getrandbits(32):08x}"

    def _count(self) -> int:
        return self.per_metric or self.rng.randint(1, 4)

    def _span(self, p_late_start: float, p_early_stop: float) -> tuple[int, int]:
        n, rng = self.n, self.rng
        start = 0
        if n > 2 and rng.random() < p_late_start:
            start = rng.randrange(1, max(2, n // 2))
        stop = n
        if n > 2 and rng.random() < p_early_stop:
            stop = rng.randrange(max(start + 1, n // 2), n)
        return start, max(stop, start + 1)

    def _add(self, family: str, labels: dict[str, str], points: list) -> None:
        if points:
            self.series[family].append((labels, points))

    def _instances(self) -> None:
        rng = self.rng
        for _ in range(self._count()):
            iid = self._hex("i-")
            user = rng.choice(self.users)
            flavor = rng.choice(FLAVORS)
            start, stop = self._span(0.3, 0.3)
            # A migration moves the instance to another host mid-life: the
            # host label changes, so the instance has two series.
            hosts = rng.sample(HOSTS, 2)
            migrate_at = rng.randrange(start, stop) if rng.random() < 0.3 else None
            # Stopped (value 0) for a while without disappearing.
            paused = None
            if rng.random() < 0.3:
                p0 = rng.randrange(start, stop)
                paused = (p0, min(stop, p0 + rng.randint(3, 30)))
            up: dict[str, list] = {}
            cpu: dict[str, list] = {}
            level = rng.random()
            for k in range(start, stop):
                host = hosts[1] if migrate_at is not None and k >= migrate_at else hosts[0]
                running = not (paused and paused[0] <= k < paused[1])
                up.setdefault(host, []).append((k, 1 if running else 0))
                level = min(0.9999, max(0.0, level + rng.uniform(-0.1, 0.1)))
                cpu.setdefault(host, []).append((k, round(level, 4) if running else 0))
            for host in hosts:
                self._add("instance_up", {"project_id": self.pid, "id": iid, "user_id": user,
                                          "flavor_name": flavor, "host": host},
                          up.get(host, []))
                self._add("cpu_utilization_ratio",
                          {"project_id": self.pid, "id": iid, "host": host},
                          cpu.get(host, []))

    def _volumes(self) -> None:
        rng = self.rng
        for _ in range(self._count()):
            vid = self._hex("v-")
            labels = {"project_id": self.pid, "id": vid, "user_id": rng.choice(self.users),
                      "volume_type": rng.choice(VOLUME_TYPES)}
            start, stop = self._span(0.2, 0.2)
            size = rng.choice((1, 5, 10, 20, 40, 80, 100, 250, 500))
            grow_at = rng.randrange(start, stop) if rng.random() < 0.3 else None
            points = []
            for k in range(start, stop):
                gib = size * 2 if grow_at is not None and k >= grow_at else size
                points.append((k, gib * 1073741824))
            self._add("volume_size_bytes", labels, points)

    def _images(self) -> None:
        rng = self.rng
        for _ in range(self._count()):
            labels = {"project_id": self.pid, "id": self._hex("img-"),
                      "disk_format": rng.choice(DISK_FORMATS)}
            start, stop = self._span(0.2, 0.1)
            size = rng.randint(10_000_000, 8_000_000_000)
            self._add("image_size_bytes", labels, [(k, size) for k in range(start, stop)])

    def _floating_ips(self) -> None:
        rng = self.rng
        for _ in range(self._count()):
            fid = self._hex("fip-")
            start, stop = self._span(0.2, 0.2)
            down = None
            if rng.random() < 0.4:
                d0 = rng.randrange(start, stop)
                down = (d0, min(stop, d0 + rng.randint(2, 40)))
            by_state: dict[str, list] = {}
            for k in range(start, stop):
                state = "down" if down and down[0] <= k < down[1] else "active"
                by_state.setdefault(state, []).append((k, 1 if state == "active" else 0))
            for state in ("active", "down"):
                self._add("ip_floating_up", {"project_id": self.pid, "id": fid, "state": state},
                          by_state.get(state, []))


def generate(out, *, projects: int, begin: datetime.datetime, hours: float,
             step: float, per_metric: int | None = None, seed: int = 1) -> int:
    """Write the OpenMetrics text to the file object ``out``; return the
    number of sample lines."""
    if begin.tzinfo is None:
        begin = begin.replace(tzinfo=datetime.timezone.utc)
    begin_ms = round(begin.timestamp() * 1000)
    step_ms = round(step * 1000)
    if step_ms <= 0:
        raise ValueError("--step must be positive")
    nsteps = int(hours * 3600 * 1000 // step_ms)
    if nsteps < 1:
        raise ValueError("the window (--hours) is shorter than one --step")
    times = [begin_ms + step_ms // 2 + k * step_ms for k in range(nsteps)]
    projs = [_Project(seed, i, pid, nsteps, per_metric)
             for i, pid in enumerate(project_ids(projects))]
    lines = 0
    write = out.write
    for family, mtype, unit, help_text in FAMILIES:
        write(f"# HELP {family} {help_text}\n# TYPE {family} {mtype}\n")
        if unit:
            write(f"# UNIT {family} {unit}\n")
        for proj in projs:
            for labels, points in proj.series[family]:
                head = family + "{" + ",".join(
                    f'{k}="{_escape(v)}"' for k, v in labels.items()) + "} "
                chunk = []
                for k, value in points:
                    ts = times[k]
                    if ts % HOUR_MS == 0:
                        continue  # never on a period edge
                    chunk.append(f"{head}{_fmt_value(value)} {_fmt_ts(ts)}\n")
                write("".join(chunk))
                lines += len(chunk)
    write("# EOF\n")
    return lines


def _parse_begin(text: str) -> datetime.datetime:
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    dt = datetime.datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.astimezone(datetime.timezone.utc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--projects", type=int, required=True, help="number of projects")
    parser.add_argument("--begin", required=True, type=_parse_begin,
                        help="ISO 8601 start (UTC if no offset), e.g. 2026-01-01T00:00:00Z")
    parser.add_argument("--hours", type=float, required=True, help="length of the window")
    parser.add_argument("--step", type=float, default=300, help="seconds between samples")
    parser.add_argument("--out", required=True, help="output file ('-' for stdout)")
    parser.add_argument("--series-per-metric", type=int, default=None, metavar="K",
                        help="resources per metric and project (default: random 1-4)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.projects < 1 or args.hours <= 0 or args.step <= 0:
        parser.error("--projects, --hours and --step must be positive")
    if args.series_per_metric is not None and args.series_per_metric < 1:
        parser.error("--series-per-metric must be at least 1")
    kwargs = dict(projects=args.projects, begin=args.begin, hours=args.hours,
                  step=args.step, per_metric=args.series_per_metric, seed=args.seed)
    if args.out == "-":
        generate(sys.stdout, **kwargs)
    else:
        with open(args.out, "w", encoding="utf-8", newline="\n") as fh:
            generate(fh, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
