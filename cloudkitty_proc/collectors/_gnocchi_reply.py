"""What the gnocchi collector sends to Gnocchi and makes of its replies.

Pure functions, no I/O (cloudkitty_proc/collectors/gnocchi.py does the
requests):

* :func:`operations`, :func:`search_filter`, :func:`aggregates_params`:
  CloudKitty 25.0.0's aggregates query (``cloudkitty/collector/gnocchi.py``
  ``get_aggregation_api_arguments``, ``build_query_parameters``,
  ``generate_aggregation_operation``), item for item;
* :func:`parse_groups`: the groups of a reply, checked;
* :func:`merge_revisions`: ``use_all_resource_revisions: false``
  (``filter_unnecessary_measurements``);
* :func:`combine`: the value of a group for the period, from every granule
  (CloudKitty takes the first granule only);
* :func:`quantity`: CloudKitty's Gnocchi unit conversion and mutate.
"""

from __future__ import annotations

import datetime
import decimal
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from cloudkitty_proc.metrics_conf import MAX_QUANTITY, MIN_QUANTITY, MetricDef

#: Gnocchi's basic aggregation methods (gnocchi/rest/aggregates/operations.py
#: AGG_MAP), and their rate: forms
BASIC_METHODS = ("mean", "sum", "last", "max", "min", "std", "median", "first", "count")
BASIC_AGGREGATION_METHODS = (*BASIC_METHODS, *(f"rate:{m}" for m in BASIC_METHODS))
#: what an archive policy may compute besides: percentiles
AGGREGATION_METHODS = (*BASIC_AGGREGATION_METHODS, *(f"{i}pct" for i in range(1, 100)),
                       *(f"rate:{i}pct" for i in range(1, 100)))

#: CloudKitty's Gnocchi conversion runs in Python's default decimal context
_CK_CONTEXT = decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN)

Granule = tuple[str, float, Any]
"""(timestamp, granularity in seconds, value) as Gnocchi sends them."""


class MalformedReply(ValueError):
    """A reply that is not what Gnocchi sends (retried like any malformed one)."""


# -- the query ----------------------------------------------------------------

def operations(metric: MetricDef) -> Any:
    """``(aggregate RE (metric NAME AGG))``, or the ``custom_query`` with its
    placeholders replaced (a string, which Gnocchi parses)."""
    args = metric.extra_args
    agg, re_agg = args["aggregation_method"], args["re_aggregation_method"]
    custom = args.get("custom_query")
    if custom:
        return (custom.replace("RE_AGGREGATION_METHOD", re_agg)
                .replace("AGGREGATION_METHOD", agg).replace("METRIC_NAME", metric.name))
    return ["aggregate", re_agg, ["metric", metric.name, agg]]


def search_filter(resource_type: str, scope_key: str, scope_id: str) -> dict:
    """The resources of ``resource_type`` whose ``scope_key`` is the scope."""
    return {"and": [{"=": {"type": resource_type}}, {"=": {scope_key: scope_id}}]}


def aggregates_params(metric: MetricDef, begin: datetime.datetime,
                      end: datetime.datetime) -> dict[str, Any]:
    """The query string of ``POST /v1/aggregates`` (gnocchiclient's keys,
    values and order: details, granularity, groupby, start, stop,
    use_history)."""
    args = metric.extra_args
    granularity = args["force_granularity"]
    start = begin
    if args["re_aggregation_method"].startswith("rate:"):
        # a rate needs the granule before the period too (CloudKitty)
        start = begin - datetime.timedelta(seconds=granularity)
    params: dict[str, Any] = {"details": "False"}
    if granularity > 0:
        params["granularity"] = str(granularity)
    params["groupby"] = list(metric.groupby)
    params["start"] = start.isoformat()
    params["stop"] = end.isoformat()
    params["use_history"] = "True"
    return params


# -- the reply ----------------------------------------------------------------

def parse_groups(data: Any) -> list[tuple[dict, list[Granule]]]:
    """(group, granules) of each item of an aggregates reply with groupby;
    the items without granules are left out. MalformedReply otherwise."""
    if type(data) is not list:
        raise MalformedReply(f"expected a list of groups, got {excerpt(data)}")
    out = []
    for item in data:
        try:
            group = item["group"]
            granules = item["measures"]["measures"]["aggregated"]
        except (TypeError, KeyError):
            raise MalformedReply(f"malformed group {excerpt(item)}") from None
        if type(group) is not dict or type(granules) is not list:
            raise MalformedReply(f"malformed group {excerpt(item)}")
        for granule in granules:
            if type(granule) is not list or len(granule) != 3:
                raise MalformedReply(f"malformed measure {excerpt(granule)} in group "
                                     f"{excerpt(group)}")
        if granules:
            out.append((group, granules))
    return out


def merge_revisions(groups: list[tuple[dict, Any]],
                    value: Callable[[Any], float]) -> list[tuple[dict, float]]:
    """``use_all_resource_revisions: false``: one entry per resource ``id``,
    with the attributes of its latest revision (greatest
    ``revision_start``) and the sum of its revisions' values (in reply
    order, as CloudKitty adds them). Without ``id`` in the groups: each
    group as it is (CloudKitty does the same)."""
    values = [(group, value(granules)) for group, granules in groups]
    if not values or "id" not in values[0][0]:
        return values
    latest: dict[Any, dict] = {}
    for group, _ in sorted(values, key=lambda gv: (gv[0]["id"], gv[0]["revision_start"])):
        latest[group["id"]] = group
    totals: dict[Any, float] = {}
    for group, number in values:
        totals[group["id"]] = totals.get(group["id"], 0) + number
    return [(latest[rid], totals[rid]) for rid in latest]


def _sum(values: Sequence[float]) -> float:
    return sum(values[1:], values[0])


#: how the granules of a period combine, by re_aggregation_method (rate:*:
#: the sum, the change over the period)
COMBINE: dict[str, Callable[[Sequence[float]], float]] = {
    "max": max,
    "min": min,
    "mean": lambda v: _sum(v) / len(v),
    "median": statistics.median,
    "sum": _sum,
    "count": _sum,
    "first": lambda v: v[0],
    "last": lambda v: v[-1],
    "std": lambda v: _sum(v) / len(v),
}


def combine(granules: list[Granule], re_aggregation_method: str) -> Any:
    """The value of a group for the period.

    One granule (``force_granularity`` = the period): its value, as
    CloudKitty. Several (a finer granularity, or none forced): those of the
    coarsest granularity returned, in time order, combined by
    ``re_aggregation_method`` (:data:`COMBINE`); CloudKitty takes the first
    granule alone."""
    if len(granules) == 1:
        return granules[0][2]
    coarsest = max(g[1] for g in granules)
    values = [g[2] for g in sorted(granules, key=lambda g: g[0]) if g[1] == coarsest]
    for v in values:
        if type(v) not in (int, float):
            raise MalformedReply(f"value {excerpt(v)} is not a number")
    method = re_aggregation_method
    how = COMBINE["sum"] if method.startswith("rate:") else COMBINE.get(method, COMBINE["mean"])
    return how(values)


def quantity(metric: MetricDef, value: Any) -> decimal.Decimal:
    """CloudKitty's ``_format_data``: ``Decimal(value) * Decimal(factor) +
    Decimal(offset)`` in Python's default context (28 digits: a float's
    exact binary value, so 0.1 gives 0.1000000000000000055511151231, as in
    CloudKitty), then mutate. ValueError for a value that is not a finite
    number, a negative quantity (unless a rate or a custom query may give
    one) or one out of the accepted range."""
    if type(value) not in (int, float):
        raise ValueError(f"value {excerpt(value)} is not a number")
    number = decimal.Decimal(value)
    if not number.is_finite():
        raise ValueError(f"value {value!r} is not a finite number")
    qty = metric.scale(number, _CK_CONTEXT)
    if qty < 0 and not may_be_negative(metric):
        raise ValueError(f"negative quantity {value!r} in reply")
    if qty and not MIN_QUANTITY <= abs(qty) <= MAX_QUANTITY:
        raise ValueError(f"{value!r} converts to {qty:.3e}, out of the accepted range of "
                         f"quantities (0 or {MIN_QUANTITY:.0e} to {MAX_QUANTITY:.0e} in "
                         "absolute value)")
    return qty


def may_be_negative(metric: MetricDef) -> bool:
    """A rate (a counter that went down) or arithmetic in a custom query
    can be negative; any other usage is not."""
    args = metric.extra_args
    return (args["aggregation_method"].startswith("rate:")
            or args["re_aggregation_method"].startswith("rate:")
            or bool(args.get("custom_query")))


def attribute_text(value: Any) -> str:
    """A resource attribute as a groupby or metadata value: None (null) is
    "", as a missing label is; others through ``str``."""
    if value is None:
        return ""
    return value if type(value) is str else str(value)


def excerpt(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
