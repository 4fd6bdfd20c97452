"""``file`` collector: usage read from an OpenMetrics text file.

``[collector_file] path`` names a file in the format ``promtool tsdb
create-blocks-from openmetrics`` ingests (samples with timestamps in
seconds, ``# EOF`` at the end). The file is parsed once, when the collector
is built, into an index::

    metric name -> scope id -> [series (labels, timestamps, values)]

with each series' timestamps sorted, so a period is two bisections.

For a metric definition, a scope and a period [begin, end) the collector
answers what CloudKitty's Prometheus query answers on a server holding the
same samples::

    <agg>(<qf>(<agg>_over_time(<metric>{<scope_key>="<scope>"}[<period>s])))
        by (<groupby + metadata>)

(samples with begin <= t < end; ``agg`` = ``aggregation_method``; ``qf`` =
the optional ``query_function``), computed with Prometheus' own float
arithmetic and rendered as Prometheus renders values, so that both
collectors give identical quantities. The only difference is at the period
edges: Prometheus 2.x includes a sample lying exactly on ``end - period``,
this collector includes one lying on ``begin`` and not one on ``end``.
``range_function``, ``query_prefix`` and ``query_suffix`` (arbitrary PromQL)
are refused at start-up.

Threading: the index is read-only after ``__init__``; ``fetch()`` is pure
CPU and safe to call concurrently.
"""

from __future__ import annotations

import bisect
import datetime
from collections.abc import Iterable

from oslo_config import cfg

from cloudkitty_proc import promql, promql_eval
from cloudkitty_proc.collectors import _openmetrics
from cloudkitty_proc.collectors.base import BaseCollector, RawSeries
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.metrics_conf import PROMQL_EXTRA_ARGS, MetricDef, MetricsConf

collector_file_opts = [
    cfg.StrOpt(
        "path",
        help="OpenMetrics text file holding timestamped samples.",
    ),
]

OPTS = [("collector_file", collector_file_opts)]


_Series = tuple[dict[str, str], list[int], list[float]]


def _ms(dt: datetime.datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return round(dt.timestamp() * 1000)


class FileCollector(BaseCollector):
    extra_args_schema = PROMQL_EXTRA_ARGS

    def __init__(self, conf: cfg.ConfigOpts, metrics: MetricsConf) -> None:
        super().__init__(conf, metrics)
        path = conf.collector_file.path
        if not path:
            raise ConfigError("[collector_file] path is not set: the file collector "
                              "needs an OpenMetrics usage file")
        self.path = path
        for metric in metrics:
            for key in ("range_function", "query_prefix", "query_suffix"):
                if metric.extra_args.get(key):
                    raise ConfigError(
                        f"{metrics.path}: metric '{metric.name}': key 'extra_args.{key}': "
                        "not supported by the file collector (it only evaluates "
                        "aggregation_method and query_function)")
        parsed = _openmetrics.parse_file(path)
        self.samples = parsed.samples
        self._index = self._build_index(parsed)

    def _build_index(self, parsed: _openmetrics.OpenMetricsFile
                     ) -> dict[str, dict[str, list[_Series]]]:
        scope_key = self.scope_key
        ordered = sorted(parsed.series,
                         key=lambda s: (s.name, promql_eval.series_sort_key(s.name, s.labels)))
        index: dict[str, dict[str, list[_Series]]] = {}
        for s in ordered:
            labels = dict(s.labels)
            scope = labels.get(scope_key)
            if scope is None:
                continue
            index.setdefault(s.name, {}).setdefault(scope, []).append(
                (labels, s.timestamps, s.values))
        return index

    def scopes(self) -> list[str]:
        """Every scope id found in the file (handy for tests and tools)."""
        return sorted({scope for by_scope in self._index.values() for scope in by_scope})

    def fetch(self, metric: MetricDef, scope_id: str,
              begin: datetime.datetime, end: datetime.datetime) -> Iterable[RawSeries]:
        series = self._index.get(metric.name, {}).get(scope_id)
        if not series:
            return []
        lo_ms, hi_ms = _ms(begin), _ms(end)
        agg = metric.extra_args.get("aggregation_method", "max")
        over_time = promql_eval.OVER_TIME[agg]
        across = promql_eval.AGGREGATE[agg]
        qf_name = metric.extra_args.get("query_function")
        qf = promql_eval.QUERY_FUNCTIONS[qf_name] if qf_name else None
        keys = promql.grouping(metric)
        groups: dict[tuple[str, ...], list[float]] = {}
        for labels, timestamps, values in series:
            lo = bisect.bisect_left(timestamps, lo_ms)
            hi = bisect.bisect_left(timestamps, hi_ms, lo)
            if lo == hi:
                continue
            value = over_time(values[lo:hi])
            if qf is not None:
                value = qf(value)
            key = tuple(labels.get(k, "") for k in keys)
            groups.setdefault(key, []).append(value)
        return [({k: v for k, v in zip(keys, key) if v}, promql_eval.format_value(across(values)))
                for key, values in groups.items()]
