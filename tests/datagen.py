"""Generated usage data with its expected rated rows, computed independently.

The expected rows are derived from the generator's own model (which series
exists in which hour, and its per-hour maximum), not from any collector
code, so a test comparing them with the daemon's export checks the whole
pipeline. Values are chosen so that conversions are exact.
"""

from __future__ import annotations

import datetime
import decimal
import random
from collections import Counter
from dataclasses import dataclass

UTC = datetime.timezone.utc
HOUR = 3600
MIB_PER_GIB = 1024

METRICS_YML = """\
metrics:
  instance_up:
    unit: instance
    alt_name: instance
    groupby: [id]
    metadata: [flavor_name]
    mutate: NUMBOOL
    extra_args: {aggregation_method: max}
  volume_size_mebibytes:
    unit: GiB
    alt_name: volume.size
    factor: 1/1024
    groupby: [id]
    metadata: [volume_type]
    extra_args: {aggregation_method: max}
  requests_count:
    unit: request
    groupby: [id]
    extra_args: {aggregation_method: sum}
"""

FLAVORS = ("m1.tiny", "m1.small", "m1.large")


@dataclass
class Dataset:
    scopes: list[str]
    begin: datetime.datetime
    hours: int
    openmetrics: str
    #: (scope, begin iso, type, id) -> (unit, qty Decimal, metadata dict)
    expected: dict[tuple[str, str, str, str], tuple[str, decimal.Decimal, dict]]

    @property
    def end(self) -> datetime.datetime:
        return self.begin + datetime.timedelta(hours=self.hours)

    def expected_keys(self) -> Counter:
        return Counter(self.expected)


def _iso(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, UTC).isoformat()


def generate(n_scopes: int = 10, hours: int = 24, *, seed: int = 7,
             begin: datetime.datetime = datetime.datetime(2026, 1, 1, tzinfo=UTC),
             samples_per_hour: int = 4, empty_scope_hours: set[tuple[int, int]] | None = None,
             scope_prefix: str = "proj-") -> Dataset:
    """``empty_scope_hours``: (scope index, hour) pairs with no sample at all."""
    rnd = random.Random(seed)
    b0 = int(begin.timestamp())
    scopes = [f"{scope_prefix}{i:03d}" for i in range(n_scopes)]
    empty = empty_scope_hours or set()
    series: dict[str, list[tuple[str, list[tuple[int, str]]]]] = {
        "instance_up": [], "volume_size_mebibytes": [], "requests_count": []}
    expected = {}
    step = HOUR // samples_per_hour
    for si, scope in enumerate(scopes):
        for k in range(rnd.randint(1, 3)):  # instances
            rid = f"{scope}-vm{k}"
            flavor = rnd.choice(FLAVORS)
            first = rnd.randint(0, hours // 3)
            last = rnd.randint(first, hours - 1)
            samples = []
            for h in range(first, last + 1):
                if (si, h) in empty:
                    continue
                for j in range(samples_per_hour):
                    samples.append((b0 + h * HOUR + j * step + step // 2, "1"))
                expected[(scope, _iso(b0 + h * HOUR), "instance", rid)] = (
                    "instance", decimal.Decimal("1.0"), {"flavor_name": flavor})
            labels = f'id="{rid}",project_id="{scope}",flavor_name="{flavor}"'
            series["instance_up"].append((labels, samples))
        for k in range(rnd.randint(1, 2)):  # volumes, resized once
            rid = f"{scope}-vol{k}"
            vtype = rnd.choice(("ssd", "hdd"))
            sizes = [rnd.choice((10, 20, 50, 100)) for _ in range(2)]
            switch = rnd.randint(0, hours - 1)
            samples = []
            for h in range(hours):
                if (si, h) in empty:
                    continue
                hour_max = 0
                for j in range(samples_per_hour):
                    size = sizes[0] if h * samples_per_hour + j < switch * samples_per_hour + 2 else sizes[1]
                    hour_max = max(hour_max, size)
                    samples.append((b0 + h * HOUR + j * step + step // 2, str(size * MIB_PER_GIB)))
                expected[(scope, _iso(b0 + h * HOUR), "volume.size", rid)] = (
                    "GiB", decimal.Decimal(hour_max), {"volume_type": vtype})
            labels = f'id="{rid}",project_id="{scope}",volume_type="{vtype}"'
            series["volume_size_mebibytes"].append((labels, samples))
        rid = f"{scope}-api"
        samples = []
        for h in range(hours):
            if (si, h) in empty or rnd.random() < 0.2:
                continue  # some hours without requests: no row
            total = 0
            for j in range(samples_per_hour):
                v = rnd.randint(0, 50)
                total += v
                samples.append((b0 + h * HOUR + j * step + step // 2, str(v)))
            expected[(scope, _iso(b0 + h * HOUR), "requests_count", rid)] = (
                "request", decimal.Decimal(total), {})
        series["requests_count"].append((f'id="{rid}",project_id="{scope}"', samples))

    lines = []
    for name, items in series.items():
        lines.append(f"# TYPE {name} gauge")
        for labels, samples in items:
            for ts, value in samples:
                lines.append(f"{name}{{{labels}}} {value} {ts}")
    lines.append("# EOF")
    return Dataset(scopes=scopes, begin=begin, hours=hours,
                   openmetrics="\n".join(lines) + "\n", expected=expected)


def export_keys(records: list[dict]) -> Counter:
    return Counter((r["scope_id"], r["begin"], r["type"], r["groupby"]["id"]) for r in records)


def check_export(ds: Dataset, records: list[dict]) -> list[str]:
    """Differences between the export and the expected rows (empty: equal)."""
    problems = []
    got = export_keys(records)
    want = ds.expected_keys()
    dup = [k for k, n in got.items() if n > 1]
    if dup:
        problems.append(f"{len(dup)} rows exported more than once, e.g. {dup[:3]}")
    missing = set(want) - set(got)
    if missing:
        problems.append(f"{len(missing)} expected rows missing, e.g. {sorted(missing)[:3]}")
    extra = set(got) - set(want)
    if extra:
        problems.append(f"{len(extra)} unexpected rows, e.g. {sorted(extra)[:3]}")
    for r in records:
        key = (r["scope_id"], r["begin"], r["type"], r["groupby"]["id"])
        if key not in ds.expected:
            continue
        unit, qty, metadata = ds.expected[key]
        if r["unit"] != unit or decimal.Decimal(r["qty"]) != qty or r["metadata"] != metadata:
            problems.append(f"row {key}: got unit={r['unit']} qty={r['qty']} "
                            f"metadata={r['metadata']}, want {unit} {qty} {metadata}")
            if len(problems) > 10:
                break
        b = datetime.datetime.fromisoformat(r["begin"])
        e = datetime.datetime.fromisoformat(r["end"])
        if e - b != datetime.timedelta(hours=1):
            problems.append(f"row {key}: end {r['end']} is not begin + 1 h")
    return problems
