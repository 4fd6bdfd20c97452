"""A small OpenMetrics text parser (the subset Prometheus' backfill reads).

Reads what ``promtool tsdb create-blocks-from openmetrics`` ingests::

    # HELP volume_size_bytes Size of the volume.
    # TYPE volume_size_bytes gauge
    # UNIT volume_size_bytes bytes
    volume_size_bytes{project_id="p1",id="v-1"} 10737418240 1767225750
    # EOF

and returns the samples grouped by series, the way Prometheus would store
them: a series is its metric name plus its labels (labels with an empty
value are dropped, as the TSDB does); timestamps are seconds in the file
(float allowed) and milliseconds in the result, converted as Prometheus
does (``int64(ts * 1000)``). Exemplars (``# {...} v ts`` after a sample) are
ignored. Any malformed line raises :class:`ConfigError` naming the file and
the line number.

This is a private helper of the file collector (not a plugin).
"""

from __future__ import annotations

import dataclasses
import math
import re

from cloudkitty_proc.exceptions import ConfigError

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE_RE = re.compile(
    r"(" + _NAME + r")"
    r'(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?'   # label block, quotes respected
    r"[ \t]+([^ \t#]\S*)"                     # value
    r"(?:[ \t]+([^ \t#]\S*))?"                # timestamp
    r"[ \t]*(?:#.*)?$")                       # exemplar
_LABEL_RE = re.compile(
    r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\]|\\.)*)"[ \t]*(,|$)')
_DESCRIPTOR_RE = re.compile(r"# (HELP|TYPE|UNIT) (" + _NAME + r")(?: (.*))?$")
_ESCAPE_RE = re.compile(r"\\(.)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
METRIC_TYPES = frozenset(("counter", "gauge", "histogram", "gaugehistogram",
                          "stateset", "info", "summary", "unknown"))

Labels = tuple[tuple[str, str], ...]
"""Labels of a series, sorted by name, without ``__name__``."""


@dataclasses.dataclass
class Series:
    name: str
    labels: Labels
    timestamps: list[int]   # milliseconds, ascending
    values: list[float]


@dataclasses.dataclass
class OpenMetricsFile:
    path: str
    series: list[Series]
    types: dict[str, str]   # metric family -> type

    @property
    def samples(self) -> int:
        return sum(len(s.timestamps) for s in self.series)


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return _ESCAPE_RE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(0)), value)


def _parse_labels(block: str) -> Labels:
    """``{a="x",b="y"}`` -> (("a", "x"), ("b", "y")); raises ValueError."""
    inner = block[1:-1]
    out: dict[str, str] = {}
    pos, end = 0, len(inner)
    while pos < end:
        m = _LABEL_RE.match(inner, pos)
        if m is None:
            if not inner[pos:].strip():
                break
            raise ValueError(f"invalid label at {inner[pos:pos + 30]!r}")
        name = m.group(1)
        if name in out:
            raise ValueError(f"duplicate label {name!r}")
        out[name] = _unescape(m.group(2))
        pos = m.end()
        if m.group(3) == "" and pos < end:
            raise ValueError("expected ',' between labels")
    if "__name__" in out:
        raise ValueError("label __name__ is not allowed in a label block")
    return tuple(sorted((k, v) for k, v in out.items() if v != ""))


def _parse_float(text: str) -> float:
    # Go's strconv.ParseFloat (Prometheus) refuses "1_000"; Python accepts it.
    if "_" in text:
        raise ValueError(text)
    return float(text)


def parse_text(text: str, path: str = "<openmetrics>", *,
               require_timestamps: bool = True) -> OpenMetricsFile:
    """Parse OpenMetrics text. Raises ConfigError naming ``path`` and line."""
    series_by_key: dict[tuple[str, Labels], Series] = {}
    by_prefix: dict[str, Series] = {}      # raw "name{...}" -> series
    labels_cache: dict[str, Labels] = {}
    types: dict[str, str] = {}
    seen_eof = False
    sample_match = _SAMPLE_RE.match
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()                         # the final newline

    def fail(lineno: int, what: str) -> ConfigError:
        line = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
        shown = line if len(line) <= 120 else line[:117] + "..."
        return ConfigError(f"{path}: line {lineno}: {what}: {shown!r}")

    for lineno, line in enumerate(lines, 1):
        if seen_eof:
            raise fail(lineno, "content after '# EOF'")
        if not line:
            raise fail(lineno, "empty line (not allowed in OpenMetrics)")
        if line[0] == "#":
            if line == "# EOF":
                seen_eof = True
                continue
            m = _DESCRIPTOR_RE.match(line)
            if m is None:
                raise fail(lineno, "expected '# HELP', '# TYPE', '# UNIT' or '# EOF'")
            if m.group(1) == "TYPE":
                mtype = (m.group(3) or "").strip()
                if mtype not in METRIC_TYPES:
                    raise fail(lineno, f"unknown metric type {mtype!r}")
                if m.group(2) in types:
                    raise fail(lineno, f"second TYPE line for {m.group(2)!r}")
                types[m.group(2)] = mtype
            continue
        m = sample_match(line)
        if m is None:
            raise fail(lineno, "malformed sample line "
                       "(expected: name{label=\"value\",...} value timestamp)")
        prefix_end = m.end(2) if m.group(2) is not None else m.end(1)
        prefix = line[:prefix_end]
        series = by_prefix.get(prefix)
        if series is None:
            name = m.group(1)
            block = m.group(2)
            if block is None:
                labels: Labels = ()
            else:
                labels = labels_cache.get(block)  # type: ignore[assignment]
                if labels is None:
                    try:
                        labels = _parse_labels(block)
                    except ValueError as exc:
                        raise fail(lineno, str(exc)) from None
                    labels_cache[block] = labels
            key = (name, labels)
            series = series_by_key.get(key)
            if series is None:
                series = series_by_key[key] = Series(name, labels, [], [])
            by_prefix[prefix] = series
        try:
            value = _parse_float(m.group(3))
        except ValueError:
            raise fail(lineno, f"invalid value {m.group(3)!r}") from None
        ts_text = m.group(4)
        if ts_text is None:
            if require_timestamps:
                raise fail(lineno, "sample without a timestamp")
            continue
        try:
            ts = _parse_float(ts_text)
        except ValueError:
            raise fail(lineno, f"invalid timestamp {ts_text!r}") from None
        if not math.isfinite(ts):
            raise fail(lineno, f"invalid timestamp {ts_text!r}")
        series.timestamps.append(int(ts * 1000))
        series.values.append(value)

    if not seen_eof:
        raise ConfigError(f"{path}: line {len(lines)}: missing '# EOF' at the end "
                          "(the file is truncated or not OpenMetrics)")
    out = list(series_by_key.values())
    for s in out:
        _sort_series(s, path)
    return OpenMetricsFile(path=path, series=out, types=types)


def _sort_series(s: Series, path: str) -> None:
    ts = s.timestamps
    if all(a < b for a, b in zip(ts, ts[1:])):
        return
    pairs = sorted(zip(ts, s.values), key=lambda p: p[0])
    out_ts: list[int] = []
    out_v: list[float] = []
    for t, v in pairs:
        if out_ts and out_ts[-1] == t:
            same = out_v[-1] == v or (math.isnan(v) and math.isnan(out_v[-1]))
            if same:
                continue
            labels = ",".join(f'{k}="{val}"' for k, val in s.labels)
            raise ConfigError(f"{path}: series {s.name}{{{labels}}} has two different "
                              f"values at timestamp {t / 1000:g}")
        out_ts.append(t)
        out_v.append(v)
    s.timestamps, s.values = out_ts, out_v


def parse_file(path: str, *, require_timestamps: bool = True) -> OpenMetricsFile:
    """Read and parse an OpenMetrics file. Raises ConfigError."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: usage file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not an OpenMetrics file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read usage file: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: line {lineno}: not valid UTF-8") from None
    return parse_text(text, path, require_timestamps=require_timestamps)
