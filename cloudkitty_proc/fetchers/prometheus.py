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

Runs on the worker's main thread (never in the collect pool): plain
``requests``, one Session per fetcher.
"""

from __future__ import annotations

import datetime

import requests
from oslo_config import cfg


from cloudkitty_proc import promql, utils
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
        self.url = group.prometheus_url.rstrip("/")
        self.safe_url = safe_url(self.url)
        self.timeout = group.timeout
        self.scope_attribute = group.scope_attribute
        filters = ""
        if group.filters:
            filters = "{" + ", ".join(f'{k}="{escape_label_value(str(v))}"'
                                      for k, v in group.filters.items()) + "}"
        self.query = f"max({group.metric}{filters}) by ({self.scope_attribute})"
        session = requests.Session()
        if group.prometheus_user:
            session.auth = (group.prometheus_user, group.prometheus_password or "")
        session.verify = group.cafile if group.cafile else not group.insecure
        session.headers["Accept"] = "application/json"
        self._session = session

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
            resp = self._session.get(self.url + "/api/v1/query", params=params,
                                     timeout=self.timeout)
        except requests.exceptions.Timeout:
            raise FetchError(f"{where}: timed out after {self.timeout:g} s") from None
        except requests.exceptions.RequestException as exc:
            raise FetchError(f"{where}: {_reason(exc)}") from None
        if resp.status_code != 200:
            raise FetchError(f"{where}: HTTP {resp.status_code} {resp.reason}: "
                             f"{_excerpt(resp.content)} (query: {self.query})")
        try:
            data = resp.json()
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
            raise FetchError(f"{where}: malformed reply: {_excerpt(resp.content)}") from None
        return sorted(s for s in scopes if s)

    def close(self) -> None:
        self._session.close()


def _excerpt(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    if not text:
        return "(empty body)"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    cur: BaseException | None = exc
    seen = set()
    best = str(exc)
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        reason = getattr(cur, "reason", None)
        if isinstance(reason, BaseException):
            cur = reason
            continue
        if cur.args and isinstance(cur.args[0], BaseException):
            cur = cur.args[0]
            continue
        best = str(cur)
        break
    if ">: " in best:
        best = best.split(">: ", 1)[1]
    return best
