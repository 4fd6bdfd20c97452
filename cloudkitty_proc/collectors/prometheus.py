"""``prometheus`` collector: CloudKitty's Prometheus collector, reworked.

For a metric definition, a scope and a period [begin, end) it sends
CloudKitty's query (see :func:`cloudkitty_proc.collectors._promql.build_query`)
as an instant query at ``time=end``::

    GET <prometheus_url>/api/v1/query?query=...&time=2026-01-01T01:00:00Z

and returns one (labels, value) pair per item of the reply.

I/O is green without monkey patching: ``requests`` is imported through
``eventlet.import_patched`` (together with urllib3, which does the socket
work, see :func:`_green_requests`), so concurrent queries from the worker's
GreenPool overlap. Each collector keeps one ``requests.Session`` (a pool of
keep-alive connections sized for ``[orchestrator] max_greenthreads``).

Errors (all :class:`~cloudkitty_proc.exceptions.CollectError`, naming the
URL without credentials, the metric and the scope):

* timeouts (kind ``timeout``), connection failures (``connection``) and HTTP
  5xx (``http``) are retried ``[collector_prometheus] retries`` times with
  exponential backoff capped at ``max_backoff`` seconds (green sleeps);
* HTTP 4xx (``http``), a reply that is not Prometheus' JSON, a
  ``"status": "error"`` reply or a result that is not an instant vector
  (``malformed``) fail at once.

An empty result is no data (``[]``), not an error.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import threading
import urllib.parse
import warnings
from collections.abc import Iterable
from typing import Any

import tenacity
from oslo_config import cfg

from cloudkitty_proc.collectors import _promql
from cloudkitty_proc.collectors.base import BaseCollector, RawSeries
from cloudkitty_proc.exceptions import CollectError
from cloudkitty_proc.metrics_conf import PROMQL_EXTRA_ARGS, MetricDef, MetricsConf

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
# eventlet is imported lazily, in the worker: the master process validates
# metrics.yml with this module's schema and must never load eventlet.

LOG = logging.getLogger(__name__)

_GREEN_REQUESTS: Any = None
_GREEN_LOCK = threading.Lock()
_REPATCHED = ("requests", "urllib3")


def _is_repatched(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _REPATCHED)


def _green_requests():
    """``requests`` with green sockets, imported once per process.

    ``eventlet.import_patched("requests")`` re-imports only ``requests``
    and its sub-modules; urllib3, which opens and reads the sockets, is
    taken from ``sys.modules`` when something imported it before (plain
    ``import requests`` anywhere in the process does), and then every
    query blocks the whole process. So urllib3 is set aside and re-imported
    under the patch too, and afterwards ``sys.modules`` is put back as it
    was: the rest of the process keeps the plain modules.
    """
    global _GREEN_REQUESTS
    if _GREEN_REQUESTS is not None:
        return _GREEN_REQUESTS
    with _GREEN_LOCK:
        if _GREEN_REQUESTS is None:
            saved = {n: m for n, m in sys.modules.items() if _is_repatched(n)}
            for name in saved:
                del sys.modules[name]
            import eventlet

            try:
                module = eventlet.import_patched("requests")
            finally:
                for name in [n for n in sys.modules if _is_repatched(n)]:
                    del sys.modules[name]
                sys.modules.update(saved)
            _GREEN_REQUESTS = module
    return _GREEN_REQUESTS


def _green_sleep(seconds: float) -> None:
    import eventlet

    eventlet.sleep(seconds)


def safe_url(url: str) -> str:
    """``url`` without user:password@ (safe for logs and errors)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


class _Retryable(Exception):
    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


class PrometheusCollector(BaseCollector):
    extra_args_schema = PROMQL_EXTRA_ARGS

    def __init__(self, conf: cfg.ConfigOpts, metrics: MetricsConf) -> None:
        super().__init__(conf, metrics)
        group = conf.collector_prometheus
        self.url = group.prometheus_url.rstrip("/")
        self.safe_url = safe_url(self.url)
        self.timeout = group.timeout
        self.retries = group.retries
        self.max_backoff = group.max_backoff
        requests = _green_requests()
        self._requests = requests
        session = requests.Session()
        # One keep-alive connection per concurrent query of the worker.
        pool_size = max(10, conf.orchestrator.max_greenthreads)
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        if group.prometheus_user:
            session.auth = (group.prometheus_user, group.prometheus_password or "")
        if group.cafile:
            session.verify = group.cafile
        else:
            session.verify = not group.insecure
        session.headers["Accept"] = "application/json"
        self._session = session

    # -- public API ---------------------------------------------------------

    def fetch(self, metric: MetricDef, scope_id: str,
              begin: datetime.datetime, end: datetime.datetime) -> Iterable[RawSeries]:
        query = _promql.build_query(metric, self.scope_key, scope_id,
                                    _promql.period_seconds(begin, end))
        params = {"query": query, "time": _promql.rfc3339(end)}
        try:
            data = self._get_with_retries("/api/v1/query", params,
                                          f"scope {scope_id}, metric {metric.label}")
        except _Retryable as exc:   # retries exhausted
            raise CollectError(exc.message, metric=metric.label, scope_id=scope_id,
                               kind=exc.kind) from None
        except CollectError as exc:
            raise CollectError(str(exc), metric=metric.label, scope_id=scope_id,
                               kind=exc.kind) from None
        return self._vector(data, metric, scope_id, query)

    def check(self) -> None:
        """Query ``/api/v1/status/buildinfo`` once (no retry).

        Raises CollectError("cannot reach Prometheus at <url>: <reason>").
        """
        try:
            self._get("/api/v1/status/buildinfo", None)
        except (_Retryable, CollectError) as exc:
            reason = exc.message if isinstance(exc, _Retryable) else str(exc)
            prefix = f"GET {self.safe_url}/api/v1/status/buildinfo: "
            if reason.startswith(prefix):
                reason = reason[len(prefix):]
            raise CollectError(f"cannot reach Prometheus at {self.safe_url}: {reason}",
                               kind=exc.kind) from None

    def close(self) -> None:
        self._session.close()

    # -- HTTP ---------------------------------------------------------------

    def _get_with_retries(self, path: str, params: dict[str, str], context: str) -> dict:
        attempts = self.retries + 1

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            LOG.warning("%s: %s; retry %d/%d in %.1f s", context, exc, state.attempt_number,
                        self.retries, state.next_action.sleep if state.next_action else 0)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_exponential(multiplier=0.5, max=self.max_backoff),
            retry=tenacity.retry_if_exception_type(_Retryable),
            sleep=_green_sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(self._get, path, params)
        except _Retryable as exc:
            if attempts > 1:
                exc.message += f" (after {attempts} attempts)"
            raise

    def _get(self, path: str, params: dict[str, str] | None) -> dict:
        requests = self._requests
        where = f"GET {self.safe_url}{path}"
        try:
            resp = self._session.get(self.url + path, params=params, timeout=self.timeout)
        except requests.exceptions.Timeout as exc:
            raise _Retryable(f"{where}: timed out after {self.timeout:g} s "
                             f"({type(exc).__name__})", "timeout") from None
        except requests.exceptions.ConnectionError as exc:
            raise _Retryable(f"{where}: connection failed: {_reason(exc)}",
                             "connection") from None
        except requests.exceptions.RequestException as exc:
            raise CollectError(f"{where}: {_reason(exc)}", kind="connection") from None
        status = resp.status_code
        body = resp.content
        if status >= 500:
            raise _Retryable(f"{where}: HTTP {status} {resp.reason}: {_excerpt(body)}", "http")
        if status >= 400:
            detail = _error_detail(body)
            msg = f"{where}: HTTP {status} {resp.reason}: {detail}"
            if params and "query" in params:
                msg += f" (query: {params['query']})"
            raise CollectError(msg, kind="http")
        try:
            data = resp.json()
        except ValueError:
            raise CollectError(f"{where}: reply is not JSON: {_excerpt(body)}",
                               kind="malformed") from None
        if not isinstance(data, dict):
            raise CollectError(f"{where}: reply is not a JSON object: {_excerpt(body)}",
                               kind="malformed")
        if data.get("status") != "success":
            msg = (f"{where}: Prometheus answered status {data.get('status')!r}: "
                   f"{data.get('errorType', '')}: {data.get('error', '')}")
            if params and "query" in params:
                msg += f" (query: {params['query']})"
            raise CollectError(msg, kind="malformed")
        return data

    def _vector(self, data: dict, metric: MetricDef, scope_id: str,
                query: str) -> list[RawSeries]:
        where = f"GET {self.safe_url}/api/v1/query"

        def bad(what: str) -> CollectError:
            return CollectError(f"{where}: {what} (query: {query})", metric=metric.label,
                                scope_id=scope_id, kind="malformed")

        payload = data.get("data")
        if not isinstance(payload, dict):
            raise bad("reply has no 'data' object")
        rtype = payload.get("resultType")
        if rtype != "vector":
            raise bad(f"expected resultType 'vector', got {rtype!r}")
        result = payload.get("result")
        if not isinstance(result, list):
            raise bad("'data.result' is not a list")
        out: list[RawSeries] = []
        for item in result:
            try:
                labels = item["metric"]
                value = item["value"][1]
            except (TypeError, KeyError, IndexError):
                raise bad(f"malformed result item {str(item)[:200]!r}") from None
            if not isinstance(labels, dict) or not isinstance(value, str):
                raise bad(f"malformed result item {str(item)[:200]!r}")
            out.append((labels, value))
        return out


def _excerpt(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    if not text:
        return "(empty body)"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _error_detail(body: bytes) -> str:
    """Prometheus' {"errorType": ..., "error": ...} or the body itself."""
    try:
        data = json.loads(body)
    except ValueError:
        return _excerpt(body)
    if isinstance(data, dict) and "error" in data:
        return f"{data.get('errorType', 'error')}: {data['error']}"
    return _excerpt(body)


def _reason(exc: BaseException) -> str:
    """The innermost useful reason of a requests/urllib3 exception."""
    seen = set()
    cur: BaseException | None = exc
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
    # urllib3 messages look like "<urllib3.connection.HTTPConnection object at
    # 0x7f..>: Failed to establish a new connection: [Errno 111] Connection refused"
    if ">: " in best:
        best = best.split(">: ", 1)[1]
    return best
