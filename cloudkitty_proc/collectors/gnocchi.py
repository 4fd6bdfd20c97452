"""``gnocchi`` collector: CloudKitty's Gnocchi collector, reworked.

For a metric definition, a scope and a period [begin, end) it sends
CloudKitty 25.0.0's query (cloudkitty_proc/collectors/_gnocchi_reply.py)::

    POST <gnocchi_endpoint>/v1/aggregates?details=False&granularity=3600
         &groupby=<groupby...>&start=<begin>&stop=<end>&use_history=True
    {"operations": ["aggregate", "max", ["metric", "cpu", "max"]],
     "search": {"and": [{"=": {"type": "instance"}},
                        {"=": {"project_id": "<scope>"}}]},
     "resource_type": "instance"}

and builds CloudKitty's rows: one DataPoint per group of the reply, its
``groupby`` the group's attributes (the metric's ``groupby``, the scope key
and ``resource_key``, in Gnocchi's order: sorted; a null is ""), its
``metadata`` the current attributes of the group's resource, its quantity
converted as CloudKitty's Gnocchi collector does (a float's exact value
times ``factor`` plus ``offset`` in a 28-digit context, then ``mutate``;
not the Prometheus collector's 9 digits). The pipeline adds the four time
keys, as for every collector.

metrics.yml ``extra_args`` (CloudKitty's schema): ``resource_type``
(required), ``resource_key`` (``id``), ``aggregation_method`` (``max``),
``re_aggregation_method`` (``max``), ``force_granularity`` (3600; 0: none
sent), ``use_all_resource_revisions`` (true), ``custom_query`` ("").

Where it differs from CloudKitty's collector (the known problems):

* a 404 "Metric ... does not exist" (what Gnocchi answers when no resource
  of the scope has measures in the period, or lacks the metric) or a 400
  "Metrics not found" is no data: an empty list, not an error;
* a period finer than the granularity: every granule of the period is used,
  combined by ``re_aggregation_method`` (_gnocchi_reply.combine); CloudKitty
  uses the first granule only;
* ``use_all_resource_revisions: false`` needs ``revision_start`` in
  ``groupby`` (CloudKitty fails every period with a KeyError without it):
  refused at start-up;
* metadata: the resources of the reply's groups are looked up by
  ``resource_key`` alone (pages of ids), not among every resource of the
  scope: a resource that moved to another scope keeps its metadata
  (CloudKitty drops its point).

Errors and retries are the Prometheus collector's: timeouts (kind
``timeout``), connection failures (``connection``), HTTP 5xx and 429
(``http``), malformed replies or values (``malformed``) are retried
``[collector_gnocchi] retries`` times with exponential backoff capped at
``max_backoff`` seconds, then fail the period (CollectError naming the URL,
the metric and the scope); other 4xx fail at once. Green I/O with the
GreenPool executor, plain with real threads.

Authentication (``gnocchi_auth_type``: keystone, basic, noauth) and the
endpoint: cloudkitty_proc/gnocchi_client.py. With keystone, Keystone's
calls (a token, the catalog) run through ``eventlet.tpool`` under the
GreenPool; a Keystone that cannot be reached fails the period as Gnocchi
would (kind ``connection``, retried).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Iterable
from typing import Any

import voluptuous as vol
from oslo_config import cfg

from cloudkitty_proc import gnocchi_client, http
from cloudkitty_proc.collectors import _gnocchi_reply as reply
from cloudkitty_proc.collectors.base import ZERO, BaseCollector, RawSeries
from cloudkitty_proc.dataframe import DataPoint
from cloudkitty_proc.exceptions import CollectError, ConfigError
from cloudkitty_proc.gnocchi_client import GnocchiError
from cloudkitty_proc.metrics_conf import MetricDef, MetricsConf

LOG = logging.getLogger(__name__)

GROUP = "collector_gnocchi"

collector_gnocchi_opts = [
    *gnocchi_client.common_opts(),
    cfg.IntOpt(
        "retries",
        default=3,
        min=0,
        help="Retries of a failed query (timeouts, 5xx, connection errors, "
        "malformed replies or values) with exponential backoff before the "
        "period is left for the next pass.",
    ),
    cfg.FloatOpt(
        "max_backoff",
        default=10.0,
        min=0,
        help="Upper bound in seconds of the wait between two retries.",
    ),
    cfg.BoolOpt(
        "compress_replies",
        default=False,
        help="Ask Gnocchi for gzip-compressed replies (Accept-Encoding: gzip). "
        "Off by default: compressing costs the server CPU time on every "
        "reply (gzip tripled Prometheus' CPU time per query, measured against "
        "Prometheus 2.42), and on loopback or a LAN the bytes are not what "
        "bounds a query. Worth it over a slow or metered link.",
    ),
]

OPTS = [(GROUP, collector_gnocchi_opts)]

_NONEMPTY = vol.All(str, vol.Length(min=1))

#: CloudKitty's GNOCCHI_EXTRA_SCHEMA (cloudkitty/collector/gnocchi.py)
GNOCCHI_EXTRA_ARGS = {
    vol.Required("resource_type"): _NONEMPTY,
    vol.Required("resource_key", default="id"): _NONEMPTY,
    vol.Required("aggregation_method", default="max"): vol.In(reply.AGGREGATION_METHODS),
    vol.Required("re_aggregation_method", default="max"):
        vol.In(reply.BASIC_AGGREGATION_METHODS),
    vol.Required("force_granularity", default=3600): vol.All(int, vol.Range(min=0)),
    vol.Required("use_all_resource_revisions", default=True): bool,
    vol.Required("custom_query", default=""): str,
}

#: resources asked per page (Gnocchi clamps it to its [api] max_limit)
PAGE_SIZE = 1000

_MISSING_METRIC = ("Metric ", " does not exist")


def _metric_missing(exc: GnocchiError) -> bool:
    """Gnocchi's "no such metric" answers: a 404 "Metric ['cpu'] does not
    exist" (gnocchiclient's MetricNotFound) or a 400 whose cause says
    "Metrics not found" (what CloudKitty also takes for no data)."""
    desc = exc.description
    if exc.status == 404 and isinstance(desc, str):
        return desc.startswith(_MISSING_METRIC[0]) and _MISSING_METRIC[1] in desc
    if exc.status == 400 and isinstance(desc, dict):
        return "Metrics not found" in str(desc.get("cause", ""))
    return False


def with_gnocchi_groupby(metrics: MetricsConf) -> MetricsConf:
    """The definitions with ``resource_key`` appended to ``groupby`` when
    missing (CloudKitty's ``check_configuration``). ConfigError for
    ``use_all_resource_revisions: false`` without ``revision_start`` in
    groupby."""
    out = []
    for metric in metrics:
        args = metric.extra_args
        groupby = metric.groupby
        if args["resource_key"] not in groupby:
            groupby = (*groupby, args["resource_key"])
        if not args["use_all_resource_revisions"] and "id" in groupby \
                and "revision_start" not in groupby:
            raise ConfigError(
                f"{metrics.path}: metric '{metric.name}': extra_args "
                "use_all_resource_revisions: false needs 'revision_start' in groupby (the "
                "revisions of a resource are told apart by it)")
        out.append(dataclasses.replace(metric, groupby=groupby))
    return MetricsConf(path=metrics.path, metrics=tuple(out))


class GnocchiCollector(BaseCollector):
    extra_args_schema = GNOCCHI_EXTRA_ARGS

    def __init__(self, conf: cfg.ConfigOpts, metrics: MetricsConf) -> None:
        super().__init__(conf, with_gnocchi_groupby(metrics))
        group = conf[GROUP]
        self.retries = group.retries
        self.max_backoff = group.max_backoff
        #: green I/O for the GreenPool executor, plain I/O for real threads
        self.green = conf.orchestrator.collect_executor != "threads"
        self._sleep = http.sleeper(self.green)
        self._client = gnocchi_client.GnocchiClient(
            gnocchi_client.auth_from_conf(conf, GROUP, green=self.green), group=GROUP,
            green=self.green, timeout=group.timeout, cafile=group.cafile,
            insecure=group.insecure, compress=group.compress_replies,
            size=max(group.http_pool_maxsize, conf.orchestrator.max_threads))
        # the groupby keys of each definition in Gnocchi's group order
        self._gkeys = {id(m): tuple(sorted(set(m.groupby))) for m in self.metrics}

    @property
    def safe_url(self) -> str:
        """Gnocchi's URL for messages (known after the first request when it
        comes from the Keystone catalog)."""
        return self._client.safe_url

    # -- public API ---------------------------------------------------------

    def retrieve(self, metric: MetricDef, scope_id: str,
                 begin: datetime.datetime, end: datetime.datetime) -> list[DataPoint]:
        if id(metric) not in self._gkeys:   # not one of self.metrics
            metric = with_gnocchi_groupby(MetricsConf(path="", metrics=(metric,))).metrics[0]
        context = f"scope {scope_id}, metric {metric.label}"
        try:
            rows = self._with_retries(lambda: self._rows(metric, scope_id, begin, end), context)
            if not rows:
                return []
            resources = {}
            if metric.metadata:
                resources = self._with_retries(lambda: self._resources(metric, rows), context)
        except GnocchiError as exc:
            raise CollectError(exc.message, metric=metric.label, scope_id=scope_id,
                               kind=exc.kind) from None
        return self._points(metric, scope_id, rows, resources)

    def fetch(self, metric: MetricDef, scope_id: str,
              begin: datetime.datetime, end: datetime.datetime) -> Iterable[RawSeries]:
        """The series of :meth:`retrieve` (groupby and metadata labels, the
        quantity as text); retrieve does not use it."""
        return [({**p.metadata, **p.groupby}, str(p.qty))
                for p in self.retrieve(metric, scope_id, begin, end)]

    def check(self) -> None:
        """``GET /v1/resource_type`` once (no retry); CollectError when
        Gnocchi cannot be reached or lacks a metric's resource_type."""
        try:
            types, _ = self._client.request("GET", "/v1/resource_type")
        except GnocchiError as exc:
            raise CollectError(f"cannot reach Gnocchi at {self.safe_url}: {exc.message}",
                               kind=exc.kind) from None
        names = {t.get("name") for t in types or [] if isinstance(t, dict)}
        missing = sorted({m.extra_args["resource_type"] for m in self.metrics} - names)
        if missing:
            raise CollectError(f"Gnocchi at {self.safe_url} has no resource type "
                               f"{', '.join(missing)} (metrics.yml extra_args resource_type)",
                               kind="http")

    def close(self) -> None:
        self._client.close()

    # -- the aggregates query -------------------------------------------------

    def _rows(self, metric: MetricDef, scope_id: str, begin: datetime.datetime,
              end: datetime.datetime) -> list[tuple[dict, Any]]:
        """(group, quantity) of each group of the period; [] for no data.
        Raises GnocchiError."""
        args = metric.extra_args
        body = {"operations": reply.operations(metric),
                "search": reply.search_filter(args["resource_type"], self.scope_key, scope_id),
                "resource_type": args["resource_type"]}
        try:
            data, _ = self._client.request("POST", "/v1/aggregates",
                                           reply.aggregates_params(metric, begin, end), body,
                                           hooks=(self.io_begin, self.io_done))
        except GnocchiError as exc:
            if _metric_missing(exc):
                LOG.debug("scope %s, metric %s: no measures (%s)", scope_id, metric.label,
                          exc.description)
                return []
            raise
        where = f"POST {self.safe_url}/v1/aggregates"
        re_agg = args["re_aggregation_method"]
        try:
            groups = reply.parse_groups(data)

            def value(granules: list) -> Any:
                return reply.combine(granules, re_agg)

            if args["use_all_resource_revisions"]:
                merged = [(group, value(granules)) for group, granules in groups]
            else:
                merged = reply.merge_revisions(groups, value)
            return [(group, reply.quantity(metric, number)) for group, number in merged]
        except (ValueError, TypeError, KeyError) as exc:
            raise GnocchiError(f"{where}: {exc}", "malformed", retryable=True) from None

    # -- metadata ---------------------------------------------------------------

    def _resources(self, metric: MetricDef, rows: list[tuple[dict, Any]]) -> dict[Any, dict]:
        """resource_key value -> the current attributes (metadata ones) of
        the resources of ``rows``, looked up in pages by their keys."""
        args = metric.extra_args
        key = args["resource_key"]
        wanted = list(dict.fromkeys(group.get(key) for group, _ in rows
                                    if group.get(key) is not None))
        path = f"/v1/search/resource/{args['resource_type']}"
        attrs = list(dict.fromkeys(("id", key, *metric.metadata)))
        found: dict[Any, dict] = {}
        for i in range(0, len(wanted), PAGE_SIZE):
            query = {"in": {key: wanted[i:i + PAGE_SIZE]}}
            marker = None
            while True:
                params: dict[str, Any] = {"attrs": attrs, "limit": str(PAGE_SIZE),
                                          "sort": "id:asc"}
                if marker:
                    params["marker"] = marker
                page, headers = self._client.request("POST", path, params, query,
                                                     hooks=(self.io_begin, self.io_done))
                if type(page) is not list or any(type(r) is not dict for r in page):
                    raise GnocchiError(f"POST {self.safe_url}{path}: expected a list of "
                                       f"resources, got {reply.excerpt(page)}", "malformed",
                                       retryable=True)
                for resource in page:
                    found[resource.get(key)] = resource
                if not page or not gnocchi_client.has_next_page(headers):
                    break
                marker = page[-1].get("id")
        return found

    def _points(self, metric: MetricDef, scope_id: str, rows: list[tuple[dict, Any]],
                resources: dict[Any, dict]) -> list[DataPoint]:
        text = reply.attribute_text
        gkeys = self._gkeys.get(id(metric)) or tuple(sorted(set(metric.groupby)))
        mkeys = metric.metadata
        key = metric.extra_args["resource_key"]
        points = []
        for group, qty in rows:
            groupby = {k: text(group.get(k)) for k in gkeys}
            metadata = {}
            if mkeys:
                resource = resources.get(group.get(key))
                if resource is None:
                    LOG.warning("scope %s, metric %s: resource %s=%s not found: its metadata "
                                "is empty", scope_id, metric.label, key, group.get(key))
                    resource = {}
                metadata = {k: text(resource.get(k)) for k in mkeys}
            points.append(DataPoint(metric.unit, qty, ZERO, groupby, metadata))
        return points

    def _with_retries(self, fn: Any, context: str) -> Any:
        return gnocchi_client.with_retries(fn, retries=self.retries,
                                           max_backoff=self.max_backoff,
                                           sleep=self._sleep, context=context)
