"""``prometheus`` fetcher: the scopes are the values of a label in Prometheus.

As CloudKitty's Prometheus fetcher, one instant query::

    max(<metric>{<filters>}) by (<scope_attribute>)

(``[fetcher_prometheus] metric``, ``filters``, ``scope_attribute``) and the
scope ids are the distinct values of ``scope_attribute`` in the reply.

The query is evaluated now, as CloudKitty does, except when ``[collect]
end`` bounds processing to a window in the past: then it is evaluated at
that end, so that rating a window of history finds the scopes that existed
then (an instant query only sees series with a sample in the 5 minutes
before its evaluation time).

Runs on the worker's main thread (never in the collect pool): one plain
(not green) :class:`cloudkitty_proc.http.Transport` per fetcher.
"""

from __future__ import annotations

import datetime

import orjson
from oslo_config import cfg

from cloudkitty_proc import http, promql, utils
from cloudkitty_proc.promql import escape_label_value
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.fetchers.base import BaseFetcher, FetchError
from cloudkitty_proc.log import safe_url

fetcher_prometheus_opts = [
    *promql.COMMON_OPTS,
    cfg.StrOpt(
        "metric",
        help="Metric whose series carry the scope ids.",
    ),
    cfg.StrOpt(
        "scope_attribute",
        default="project_id",
        help="Label of that metric which holds the scope id.",
    ),
    cfg.DictOpt(
        "filters",
        default={},
        help="Label filters applied to the metric (key:value,...).",
    ),
]

OPTS = [("fetcher_prometheus", fetcher_prometheus_opts)]



class PrometheusFetcher(BaseFetcher):
    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        group = conf.fetcher_prometheus
        if not group.metric:
            raise ConfigError("[fetcher_prometheus] metric is not set: the prometheus "
                              "fetcher needs a metric whose series carry the scope ids")
        self.url = promql.base_url(group.prometheus_url)
        self.safe_url = safe_url(self.url)
        self.timeout = group.timeout
        self.scope_attribute = group.scope_attribute
        filters = ""
        if group.filters:
            filters = "{" + ", ".join(f'{k}="{escape_label_value(str(v))}"'
                                      for k, v in group.filters.items()) + "}"
        self.query = f"max({group.metric}{filters}) by ({self.scope_attribute})"
        self._http = http.Transport(
            self.url, option="[fetcher_prometheus] prometheus_url", green=False,
            timeout=self.timeout, size=1, user=group.prometheus_user,
            password=group.prometheus_password, cafile=group.cafile, insecure=group.insecure)

    def _eval_time(self) -> datetime.datetime | None:
        end = getattr(self.conf.collect, "end", None)
        if not end:
            return None
        try:
            at = utils.parse_time(end, what="[collect] end")
        except ValueError as exc:
            raise FetchError(str(exc)) from None
        return at if at < utils.utcnow() else None

    def get_scopes(self) -> list[str]:
        where = f"GET {self.safe_url}/api/v1/query"
        params = {"query": self.query}
        at = self._eval_time()
        if at is not None:
            params["time"] = at.strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            reply = self._http.get("/api/v1/query", params)
        except http.TransportError as exc:
            raise FetchError(f"{where}: {exc.message}") from None
        if reply.status != 200:
            raise FetchError(f"{where}: HTTP {reply.status} {reply.reason}: "
                             f"{_excerpt(reply.body)} (query: {self.query})")
        try:
            data = orjson.loads(reply.body)
            if data["status"] != "success":
                raise FetchError(f"{where}: Prometheus answered {data.get('errorType')}: "
                                 f"{data.get('error')} (query: {self.query})")
            result = data["data"]["result"]
            if data["data"]["resultType"] != "vector" or not isinstance(result, list):
                raise ValueError("not a vector")
            scopes = {str(item["metric"][self.scope_attribute])
                      for item in result if self.scope_attribute in item["metric"]}
        except FetchError:
            raise
        except (ValueError, KeyError, TypeError):
            raise FetchError(f"{where}: malformed reply: {_excerpt(reply.body)}") from None
        return sorted(s for s in scopes if s)

    def close(self) -> None:
        self._http.close()


def _excerpt(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    if not text:
        return "(empty body)"
    return text if len(text) <= limit else text[:limit - 3] + "..."

