"""PromQL helpers shared by the ``prometheus`` collector, the ``file``
collector and the ``prometheus`` fetcher: the query text and the server URL.

Not a plugin: plugins never import each other, so what they share lives
here (the evaluation of queries on samples, used by the file collector
alone, is in :mod:`cloudkitty_proc.promql_eval`).

* :data:`COMMON_OPTS`: the HTTP options of the Prometheus collector and
  fetcher groups; :func:`base_url` normalises ``prometheus_url``.
* :func:`build_query` writes CloudKitty's query for a metric definition;
  :func:`build_batch_query` the same query for several scopes at once
  (where :func:`batchable` allows it).
* :func:`rfc3339` and :func:`period_seconds`: a query's time parameter and
  range.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence

from oslo_config import cfg

from cloudkitty_proc.metrics_conf import MetricDef

#: HTTP options shared by the Prometheus collector and fetcher groups.
COMMON_OPTS = [
    cfg.StrOpt(
        "prometheus_url",
        default="http://127.0.0.1:9090",
        help="Prometheus server URL. CloudKitty's form, ending in /api/v1 "
        "(http://host:9090/api/v1, as kolla-ansible sets it), is accepted "
        "too: a trailing /api/v1 is dropped.",
    ),
    cfg.StrOpt(
        "prometheus_user",
        help="User name for HTTP basic authentication.",
    ),
    cfg.StrOpt(
        "prometheus_password",
        secret=True,
        help="Password for HTTP basic authentication.",
    ),
    cfg.StrOpt(
        "cafile",
        help="CA bundle used to verify the server certificate.",
    ),
    cfg.BoolOpt(
        "insecure",
        default=False,
        help="Do not verify the server certificate.",
    ),
    cfg.FloatOpt(
        "timeout",
        default=60.0,
        min=0.1,
        help="Timeout in seconds of one HTTP request.",
    ),
]


_UTC = datetime.timezone.utc


# --------------------------------------------------------------------------
# The query
# --------------------------------------------------------------------------

def escape_label_value(value: str) -> str:
    """A value for ``label="..."`` in PromQL."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def grouping(metric: MetricDef) -> list[str]:
    """The ``by (...)`` labels: groupby (scope key included) + metadata."""
    return list(dict.fromkeys((*metric.groupby, *metric.metadata)))


def build_query(metric: MetricDef, scope_key: str, scope_id: str, period: int) -> str:
    """CloudKitty's Prometheus query, unchanged::

        <agg>(<qf>(<agg>_over_time(<metric>{<scope_key>="<scope>"}[<period>s]))) by (<labels>)

    where ``<rf>(...)`` replaces ``<agg>_over_time(...)`` when a
    ``range_function`` is set, ``<qf>(...)`` is only there when a
    ``query_function`` is set, and ``query_prefix`` / ``query_suffix`` are
    joined with a space when non-empty.
    """
    args = metric.extra_args
    matcher = f'{scope_key}="{escape_label_value(scope_id)}"'
    query = _aggregated(metric, matcher, period, grouping(metric))
    if args.get("query_prefix"):
        query = f"{args['query_prefix']} {query}"
    if args.get("query_suffix"):
        query = f"{query} {args['query_suffix']}"
    return query


def batchable(metric: MetricDef) -> bool:
    """Whether :func:`build_batch_query` may ask ``metric`` for several
    scopes at once: not when it has a ``query_prefix`` or ``query_suffix``,
    free text that may depend on the per-scope shape of the query (a binary
    operation matching on the scope label, a ``topk``...)."""
    args = metric.extra_args
    return not (args.get("query_prefix") or args.get("query_suffix"))


#: RE2 metacharacters, as Go's regexp.QuoteMeta escapes them
_RE2_SPECIAL = frozenset("\\.+*?()|[]{}^$")


#: one RE2 metacharacter (a regex substitution: a C loop, not a Python one)
_RE2_META = re.compile("[" + re.escape("".join(sorted(_RE2_SPECIAL))) + "]")


def quote_meta(text: str) -> str:
    """``text`` as an RE2 regular expression matching it literally (Go's
    ``regexp.QuoteMeta``)."""
    return _RE2_META.sub(r"\\\g<0>", text)


def build_batch_query(metric: MetricDef, scope_key: str, scope_ids: Sequence[str],
                      period: int) -> str:
    """:func:`build_query` for several scopes in one query::

        <agg>(<agg>_over_time(<metric>{<scope_key>=~"<s1>|<s2>|..."}[<period>s])) by (<scope_key>, <labels>)

    Each scope id is escaped for RE2 (:func:`quote_meta`), then for the
    PromQL string; Prometheus anchors ``=~`` matchers, so exactly these
    scopes are selected. The ids are kept in the order given. ``by`` starts
    with the scope key, so every item of the reply names its scope; the
    groups of one scope are those of its own query. Only for a
    :func:`batchable` metric (prefix and suffix are not written).
    """
    regex = "|".join(quote_meta(scope_id) for scope_id in scope_ids)
    labels = [scope_key, *(label for label in grouping(metric) if label != scope_key)]
    return _aggregated(metric, f'{scope_key}=~"{escape_label_value(regex)}"', period, labels)


def _aggregated(metric: MetricDef, matcher: str, period: int, labels: Sequence[str]) -> str:
    """``<agg>(<qf>(<agg>_over_time(<metric>{<matcher>}[<period>s]))) by
    (<labels>)``, the range function and query function of the metric's
    extra_args applied (build_query's shape, prefix and suffix aside)."""
    args = metric.extra_args
    agg = args.get("aggregation_method", "max")
    query = f"{metric.name}{{{matcher}}}[{period}s]"
    range_function = args.get("range_function")
    if range_function:
        query = f"{range_function}({query})"
    else:
        query = f"{agg}_over_time({query})"
    query_function = args.get("query_function")
    if query_function:
        query = f"{query_function}({query})"
    return f"{agg}({query}) by ({', '.join(labels)})"


def rfc3339(dt: datetime.datetime) -> str:
    """Aware datetime -> ``2026-01-01T01:00:00Z`` (UTC)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_UTC)
    dt = dt.astimezone(_UTC)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def period_seconds(begin: datetime.datetime, end: datetime.datetime) -> int:
    return int((end - begin).total_seconds())


def base_url(url: str) -> str:
    """``prometheus_url`` without a trailing ``/`` nor CloudKitty's ``/api/v1``
    suffix (its collector appends only ``/query``), so both forms work."""
    url = url.rstrip("/")
    if url.endswith("/api/v1"):
        url = url[:-len("/api/v1")].rstrip("/")
    return url
