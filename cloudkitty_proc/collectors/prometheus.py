"""``prometheus`` collector: CloudKitty's Prometheus collector, reworked.

For a metric definition, a scope and a period [begin, end) it sends
CloudKitty's query (see :func:`cloudkitty_proc.promql.build_query`)
as an instant query at ``time=end``::

    GET <prometheus_url>/api/v1/query?query=...&time=2026-01-01T01:00:00Z

and returns one (labels, value) pair per item of the reply.

HTTP: a small client of our own (:class:`_ConnectionPool`), not
``requests``: on the CPU-bound eventlet hub every query counts, and
requests' per-call machinery (request preparation, proxy environment lookup
on every call, URL re-encoding) cost about three times what the query
itself does. The standard library's ``http.client`` opens the connections
(TLS, proxy tunnels); the request head is written in one piece and the
reply parsed with ``httptools`` (llhttp): ``http.client``'s reply reading
(a buffered file per reply, the ``email`` package for its headers) cost
about 100 µs of the ~210 µs of CPU a query took. Each collector keeps a pool
of keep-alive connections sized ``max(10, [orchestrator] max_greenthreads)``;
the query text is encoded once per metric and scope, the ``time``
parameter once per period end, the request head (basic authentication
included) once per collector; replies may be gzip-encoded, chunked, or
delimited by the end of the connection, and their JSON is parsed with
``orjson`` (2-2.5x faster than ``json`` on Prometheus replies: 25 -> 10 µs
for 10 series, 420 -> 200 µs for 200).
TLS follows ``cafile`` / ``insecure``; HTTP(S) proxies are taken from the
environment (``http_proxy``, ``https_proxy``, ``all_proxy``, ``no_proxy``)
once, when the collector is built.

Green or not, by ``[orchestrator] collect_executor``:

* ``greenpool`` (default): ``http.client`` is imported through
  ``eventlet.import_patched`` (green ``socket`` and ``ssl``, no monkey
  patching, see :func:`_http_modules`), so concurrent queries from the
  worker's GreenPool overlap and waits (timeouts, retry backoff) are green;
* ``threads``: the plain ``http.client``, ``ssl`` and ``time.sleep``. Green
  sockets used from real threads would each run in a hub of their own
  thread, where a lost wake-up parks the thread for good (timeouts
  included).

Errors (all :class:`~cloudkitty_proc.exceptions.CollectError`, naming the
URL without credentials, the metric and the scope):

* timeouts (kind ``timeout``; ``timeout`` applies to the connection and to
  every read), connection failures (``connection``, TLS errors included),
  HTTP 5xx (``http``) and malformed replies (``malformed``: not
  Prometheus' JSON, a ``"status": "error"`` reply, a result that is not an
  instant vector, and, from :meth:`PrometheusCollector.retrieve`, a value
  that is not a finite number or is negative: a proxy or exporter hiccup)
  are retried ``[collector_prometheus] retries`` times with exponential
  backoff capped at ``max_backoff`` seconds (green sleeps with the
  GreenPool), then fail with " (after N attempts)";
* HTTP 4xx (``http``) fails at once.

A keep-alive connection that the server closed while it was idle is
replaced and the request sent again once, at once (not a retry).

An empty result is no data (``[]``), not an error.
"""

from __future__ import annotations

import base64
import datetime
import errno
import json
import logging
import os
import re
import threading
import time
import urllib.parse
import warnings
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import httptools
import orjson
import tenacity
from oslo_config import cfg

from cloudkitty_proc import __version__
from cloudkitty_proc import promql
from cloudkitty_proc.collectors.base import BaseCollector, RawSeries
from cloudkitty_proc.dataframe import DataPoint
from cloudkitty_proc.exceptions import CollectError
from cloudkitty_proc.log import safe_url
from cloudkitty_proc.metrics_conf import PROMQL_EXTRA_ARGS, MetricDef, MetricsConf

collector_prometheus_opts = [
    *promql.COMMON_OPTS,
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
]

OPTS = [("collector_prometheus", collector_prometheus_opts)]


warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
# eventlet is imported lazily, in the worker: the master process validates
# metrics.yml with this module's schema and must never load eventlet.

LOG = logging.getLogger(__name__)

_QUERY_PATH = "/api/v1/query"
#: query targets kept (one per metric and scope; cleared when full): the
#: scopes in hand need a few, and 10,000 scopes x 5 metrics cost 3 MB of RSS
QUERY_TARGET_CACHE = 512

#: period ends whose time parameter is kept (the periods queued ahead need
#: a few)
QUERY_TIME_CACHE = 256

#: bytes read from the socket at a time
RECV_SIZE = 256 * 1024
#: what http.client refuses in a request target
_BAD_TARGET = re.compile("[\x00-\x20\x7f]")

_GREEN_HTTP: tuple[Any, Any] | None = None
_GREEN_LOCK = threading.Lock()


def _http_modules(green: bool) -> tuple[Any, Any]:
    """(``http.client``, ``ssl``): green ones, or the standard modules.

    The green ``http.client`` is the standard library's module imported
    once per process by ``eventlet.import_patched``, which resolves its
    ``socket`` and ``ssl`` imports to ``eventlet.green`` modules for that
    import only; ``sys.modules`` keeps the plain ``http.client``, and so
    does the ``http`` package's ``client`` attribute (the import rebinds
    it: put back here, or every ``http.client.X`` in the process, e.g. in
    ``urllib.request``, would turn green).
    """
    import http
    import http.client
    import ssl

    if not green:
        return http.client, ssl
    global _GREEN_HTTP
    if _GREEN_HTTP is None:
        with _GREEN_LOCK:
            if _GREEN_HTTP is None:
                import eventlet
                from eventlet.green import ssl as green_ssl

                plain = http.client
                try:
                    module = eventlet.import_patched("http.client")
                finally:
                    http.client = plain
                _GREEN_HTTP = (module, green_ssl)
    return _GREEN_HTTP


def _green_sleep(seconds: float) -> None:
    import eventlet

    eventlet.sleep(seconds)


def _basic_auth(user: str, password: str) -> str:
    # As requests does: latin-1 first (RFC 7617's historical default).
    try:
        raw = f"{user}:{password}".encode("latin-1")
    except UnicodeEncodeError:
        raw = f"{user}:{password}".encode("utf-8")
    return "Basic " + base64.b64encode(raw).decode("ascii")


class _Retryable(Exception):
    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


class _TransportError(Exception):
    """A request that got no complete reply: ``kind`` is ``timeout`` or
    ``connection``; the message says why (no URL)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


class _ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one Prometheus server.

    ``get(target)`` takes an idle connection (or opens one), sends
    ``GET target`` with the precomputed headers and returns (status, reason,
    body). At most ``size`` idle connections are kept; more concurrent
    requests open extra connections, closed after use. Safe to use from
    green threads and from real threads (``list.pop`` / ``append`` are
    atomic).
    """

    def __init__(self, url: str, *, green: bool, timeout: float, size: int,
                 user: str | None, password: str | None, cafile: str | None,
                 insecure: bool) -> None:
        client, ssl = _http_modules(green)
        self._client = client
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"[collector_prometheus] prometheus_url {safe_url(url)!r}: "
                             "expected http(s)://host[:port][/path]")
        self.https = scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.size = size
        self._idle: list[Any] = []
        self._closed = False

        headers = {
            "Accept": "application/json",
            "Accept-Encoding": "gzip",
            "User-Agent": f"cloudkitty-proc/{__version__}",
        }
        if user:
            headers["Authorization"] = _basic_auth(user, password or "")
        elif parts.username is not None:
            # Credentials in the URL, as requests used them.
            headers["Authorization"] = _basic_auth(
                urllib.parse.unquote(parts.username),
                urllib.parse.unquote(parts.password or ""))

        self._context = None
        if self.https:
            if cafile:
                context = ssl.create_default_context(cafile=cafile)
            else:
                context = ssl.create_default_context()
                if insecure:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                else:
                    # requests trusted certifi's bundle: keep trusting it,
                    # on top of the system's store.
                    try:
                        import certifi

                        context.load_verify_locations(certifi.where())
                    except (ImportError, OSError):
                        pass
            self._context = context

        # Proxies from the environment, as requests found them (once here,
        # not per query).
        self._proxy: tuple[str, int] | None = None
        self._tunnel_headers: dict[str, str] | None = None
        self._absolute = ""
        proxy = self._environ_proxy(scheme, parts)
        if proxy is not None:
            pparts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
            if pparts.scheme.lower() != "http" or not pparts.hostname:
                raise ValueError(f"proxy {safe_url(proxy)!r} from the environment: only "
                                 "http:// proxies are supported")
            self._proxy = (pparts.hostname, pparts.port or 80)
            proxy_auth = None
            if pparts.username is not None:
                proxy_auth = _basic_auth(urllib.parse.unquote(pparts.username),
                                         urllib.parse.unquote(pparts.password or ""))
            if self.https:
                self._tunnel_headers = ({"Proxy-Authorization": proxy_auth}
                                        if proxy_auth else {})
            else:
                # Plain HTTP through a proxy: absolute URIs.
                netloc = f"[{self.host}]" if ":" in self.host else self.host
                self._absolute = f"http://{netloc}:{self.port}"
                if proxy_auth:
                    headers["Proxy-Authorization"] = proxy_auth
        # the request head after its request line, built once
        default_port = 443 if self.https else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != default_port:
            host = f"{host}:{self.port}"
        lines = [f"Host: {host}"] + [f"{name}: {value}" for name, value in headers.items()]
        self._head_tail = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        base = self._absolute + self.prefix
        if _BAD_TARGET.search(base) or not base.isascii():
            raise ValueError(f"[collector_prometheus] prometheus_url {safe_url(url)!r}: "
                             "the path has spaces, control or non-ASCII characters; "
                             "percent-encode them")

    @staticmethod
    def _environ_proxy(scheme: str, parts: urllib.parse.SplitResult) -> str | None:
        import urllib.request

        proxies = urllib.request.getproxies_environment()
        proxy = proxies.get(scheme) or proxies.get("all")
        if not proxy:
            return None
        host = parts.hostname or ""
        hostport = f"{host}:{parts.port}" if parts.port else host
        if (urllib.request.proxy_bypass_environment(host, proxies)
                or urllib.request.proxy_bypass_environment(hostport, proxies)):
            return None
        return proxy

    def target(self, path: str, query: str | None) -> str:
        """The request target of ``path`` (relative to the base URL)."""
        target = self._absolute + self.prefix + path
        return f"{target}?{query}" if query else target

    def _connect(self) -> Any:
        client = self._client
        host, port = self._proxy or (self.host, self.port)
        if self.https:
            conn = client.HTTPSConnection(host, port, timeout=self.timeout,
                                          context=self._context)
            if self._proxy is not None:
                conn.set_tunnel(self.host, self.port, headers=self._tunnel_headers)
        else:
            conn = client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            conn.connect()
        except TimeoutError:
            conn.close()
            raise _TransportError(f"timed out after {self.timeout:g} s (ConnectTimeout)",
                                  "timeout") from None
        except Exception as exc:
            conn.close()
            raise _TransportError(f"connection failed: {_connect_reason(exc)}",
                                  "connection") from None
        return conn

    def get(self, target: str) -> tuple[int, str, bytes]:
        """(status, reason, body) of ``GET target``; raises _TransportError."""
        client = self._client
        try:
            conn = self._idle.pop()
        except IndexError:
            pass
        else:
            try:
                return self._exchange(conn, target)
            except (ConnectionError, client.BadStatusLine) as exc:
                # The server closed the idle keep-alive connection before
                # this request (RemoteDisconnected, reset, broken pipe):
                # a new connection, once, at once.
                LOG.debug("%s: keep-alive connection lost (%s), reconnecting",
                          self.host, type(exc).__name__)
            except (client.HTTPException, OSError) as exc:
                raise _TransportError(f"connection failed: {_read_reason(exc)}",
                                      "connection") from None
        conn = self._connect()
        try:
            return self._exchange(conn, target)
        except (client.HTTPException, OSError) as exc:
            raise _TransportError(f"connection failed: {_read_reason(exc)}",
                                  "connection") from None

    def _exchange(self, conn: Any, target: str) -> tuple[int, str, bytes]:
        """One request on ``conn``, which goes back to the pool, or is
        closed (error, ``Connection: close``, pool full or closed).

        ``http.client`` opens the connection (TLS, proxy tunnel); the
        request is written and the reply parsed here, with httptools: the
        standard library's reply parsing (a buffered file per reply, the
        ``email`` package for the headers) was half of a query's CPU.

        Raises _TransportError for a timeout or a reply cut short or
        malformed; before the first byte of the reply, ``http.client``'s
        RemoteDisconnected or BadStatusLine (a stale connection).
        """
        client = self._client
        sock = conn.sock
        reply = _Reply()
        parser = httptools.HttpResponseParser(reply)
        ok = False
        first = True   # nothing of the reply read yet
        try:
            sock.sendall(b"GET " + target.encode("ascii") + b" HTTP/1.1\r\n" + self._head_tail)
            while True:
                if reply.complete:
                    if not _interim(parser.get_status_code()):
                        break
                    reply.complete = False   # the final reply follows
                data = sock.recv(RECV_SIZE)
                if not data:
                    if first:
                        raise client.RemoteDisconnected(
                            "Remote end closed connection without response")
                    if reply.until_close:
                        break  # a body delimited by the end of the connection
                    raise _TransportError("connection failed: Connection aborted: the "
                                          "reply was cut short", "connection")
                try:
                    parser.feed_data(data)
                except httptools.HttpParserError as exc:
                    if first and not reply.headers_done:
                        raise client.BadStatusLine(repr(bytes(data[:80]))) from None
                    raise _TransportError(f"connection failed: malformed HTTP reply: {exc}",
                                          "connection") from None
                first = False
            ok = reply.keep_alive(parser.get_http_version())
        except TimeoutError:
            raise _TransportError(f"timed out after {self.timeout:g} s (ReadTimeout)",
                                  "timeout") from None
        except (ConnectionError, OSError) as exc:
            if first and isinstance(exc, ConnectionError):
                raise   # a stale keep-alive connection: get() reconnects
            raise _TransportError(f"connection failed: {_read_reason(exc)}",
                                  "connection") from None
        finally:
            if ok and not self._closed and len(self._idle) < self.size:
                self._idle.append(conn)
            else:
                conn.close()
        body = b"".join(reply.body)
        if reply.encoding:
            body = _decode(body, reply.encoding)
        return parser.get_status_code(), reply.status.decode("latin-1"), body

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _interim(code: int) -> bool:
    """An interim reply (1xx but 101), which ``http.client`` skips too."""
    return 100 <= code < 200 and code != 101


class _Reply:
    """httptools' callbacks for one reply."""

    __slots__ = ("status", "encoding", "body", "headers_done", "complete", "until_close",
                 "connection", "_sized")

    def __init__(self) -> None:
        self.on_message_begin()

    def on_message_begin(self) -> None:
        # also after an interim (1xx) reply: the final one starts afresh
        self.status = b""
        self.encoding: str | None = None
        self.body: list[bytes] = []
        self.headers_done = False
        self.complete = False
        self.until_close = False   # no Content-Length, not chunked: read to the end
        self.connection = b""      # the Connection header, lower case
        self._sized = False

    def on_status(self, status: bytes) -> None:
        self.status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-encoding":
            self.encoding = value.decode("latin-1")
        elif name in (b"content-length", b"transfer-encoding"):
            self._sized = True
        elif name == b"connection":
            self.connection = value.lower()

    def keep_alive(self, version: str) -> bool:
        """The connection may carry the next request (RFC 9112 9.3)."""
        if not self.complete or self.until_close:
            return False
        if version == "1.1":
            return b"close" not in self.connection
        return b"keep-alive" in self.connection

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.until_close = not self._sized

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _DecodeError(ValueError):
    pass


def _decode(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    try:
        if encoding in ("gzip", "x-gzip"):
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise _DecodeError(f"cannot decode the {encoding} reply: {exc}") from None
    return body


def _connect_reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if name.startswith("SSL") or name == "CertificateError":
        return f"TLS: {exc}"
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0 and exc.strerror == errno.errorcode.get(code):
        # eventlet's green sockets say "[Errno 111] ECONNREFUSED"
        return f"Failed to establish a new connection: [Errno {code}] {os.strerror(code)}"
    return f"Failed to establish a new connection: {exc}"


def _read_reason(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    if name.startswith("SSL"):
        return f"TLS: {text}"
    return f"Connection aborted: {name}: {text}" if text else f"Connection aborted: {name}"


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
        #: green I/O for the GreenPool executor, plain I/O for real threads
        self.green = conf.orchestrator.collect_executor != "threads"
        self._sleep = _green_sleep if self.green else time.sleep
        self._query_where = f"GET {self.safe_url}{_QUERY_PATH}"
        # One keep-alive connection per concurrent query of the worker.
        self._pool = _ConnectionPool(
            self.url, green=self.green, timeout=self.timeout,
            size=max(10, conf.orchestrator.max_greenthreads),
            user=group.prometheus_user, password=group.prometheus_password,
            cafile=group.cafile, insecure=group.insecure)
        # (id(metric), scope, period seconds) -> (metric, query, target up to
        # "time="): a scope's query text is the same every period
        self._targets: dict[tuple[int, str, int], tuple[MetricDef, str, str]] = {}
        # period end -> (time parameter, its URL encoding): every metric of
        # a period asks for the same time
        self._times: dict[datetime.datetime, tuple[str, str]] = {}

    # -- public API ---------------------------------------------------------

    def fetch(self, metric: MetricDef, scope_id: str,
              begin: datetime.datetime, end: datetime.datetime) -> Iterable[RawSeries]:
        return self._collect(metric, scope_id, begin, end, False)

    def retrieve(self, metric: MetricDef, scope_id: str,
                 begin: datetime.datetime, end: datetime.datetime) -> list[DataPoint]:
        """As BaseCollector.retrieve, but a reply with a value that is not
        a finite number, or a negative one, is retried like any malformed
        reply."""
        return self._collect(metric, scope_id, begin, end, True)

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
        self._pool.close()

    # -- one query ------------------------------------------------------------

    def _collect(self, metric: MetricDef, scope_id: str, begin: datetime.datetime,
                 end: datetime.datetime, points: bool) -> Any:
        query, time_text, target = self._query_target(metric, scope_id, begin, end)
        params = {"query": query, "time": time_text}

        def once() -> Any:
            series = self._vector(self._get(_QUERY_PATH, params, target), query)
            if not points:
                return series
            try:
                return self.to_points(metric, scope_id, series)
            except CollectError as exc:   # a value that is not a quantity
                msg = str(exc)
                prefix = f"scope {scope_id}, metric {metric.label}: "
                if msg.startswith(prefix):
                    msg = msg[len(prefix):]
                # The message the file collector gives, retried.
                raise _Retryable(msg, exc.kind) from None

        try:
            return self._with_retries(once, f"scope {scope_id}, metric {metric.label}")
        except (_Retryable, CollectError) as exc:   # retries exhausted, or 4xx
            message = exc.message if isinstance(exc, _Retryable) else str(exc)
            raise CollectError(message, metric=metric.label, scope_id=scope_id,
                               kind=exc.kind) from None

    def _query_target(self, metric: MetricDef, scope_id: str, begin: datetime.datetime,
                      end: datetime.datetime) -> tuple[str, str, str]:
        """(query, time parameter, request target) of one instant query;
        the target is ``urlencode({"query": ..., "time": ...})``'s."""
        period = promql.period_seconds(begin, end)
        key = (id(metric), scope_id, period)
        hit = self._targets.get(key)
        if hit is None or hit[0] is not metric:
            query = promql.build_query(metric, self.scope_key, scope_id, period)
            prefix = self._pool.target(_QUERY_PATH, urllib.parse.urlencode({"query": query}))
            if len(self._targets) >= QUERY_TARGET_CACHE:
                self._targets.clear()
            hit = self._targets[key] = (metric, query, prefix + "&time=")
        times = self._times.get(end)
        if times is None:
            time_text = promql.rfc3339(end)
            if len(self._times) >= QUERY_TIME_CACHE:
                self._times.clear()
            times = self._times[end] = (time_text, urllib.parse.quote_plus(time_text))
        return hit[1], times[0], hit[2] + times[1]

    def _with_retries(self, fn: Callable[[], Any], context: str) -> Any:
        attempts = self.retries + 1
        try:
            # The first attempt outside tenacity: nothing to set up for the
            # queries that succeed (nearly all of them).
            return fn()
        except _Retryable as exc:
            if attempts == 1:
                raise
            first: list[_Retryable] = [exc]

        def attempt() -> Any:
            if first:
                raise first.pop()   # attempt 1, already made
            return fn()

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            LOG.warning("%s: %s; retry %d/%d in %.1f s", context, exc, state.attempt_number,
                        self.retries, state.next_action.sleep if state.next_action else 0)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_exponential(multiplier=0.5, max=self.max_backoff),
            retry=tenacity.retry_if_exception_type(_Retryable),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _Retryable as exc:
            exc.message += f" (after {attempts} attempts)"
            raise

    # -- HTTP ---------------------------------------------------------------

    def _get(self, path: str, params: dict[str, str] | None,
             target: str | None = None) -> dict:
        """The JSON object of a ``"status": "success"`` reply (``target``:
        the request target of ``path`` and ``params``, when already built).

        Raises _Retryable (timeout, connection, 5xx, malformed reply) or
        CollectError (4xx).
        """
        where = f"GET {self.safe_url}{path}"
        if target is None:
            target = self._pool.target(path, urllib.parse.urlencode(params) if params else None)
        self.io_begin()
        try:
            status, reason, body = self._pool.get(target)
        except _TransportError as exc:
            raise _Retryable(f"{where}: {exc.message}", exc.kind) from None
        except _DecodeError as exc:
            raise _Retryable(f"{where}: {exc}", "malformed") from None
        finally:
            # the exchange is over: the next query may start while this
            # reply is parsed
            self.io_done()
        if status >= 500:
            raise _Retryable(f"{where}: HTTP {status} {reason}: {_excerpt(body)}", "http")
        if status >= 400:
            detail = _error_detail(body)
            msg = f"{where}: HTTP {status} {reason}: {detail}"
            if params and "query" in params:
                msg += f" (query: {params['query']})"
            raise CollectError(msg, kind="http")
        try:
            data = orjson.loads(body)
        except ValueError:   # orjson.JSONDecodeError is one
            raise _Retryable(f"{where}: reply is not JSON: {_excerpt(body)}",
                             "malformed") from None
        if type(data) is not dict:
            raise _Retryable(f"{where}: reply is not a JSON object: {_excerpt(body)}",
                             "malformed")
        if data.get("status") != "success":
            msg = (f"{where}: Prometheus answered status {data.get('status')!r}: "
                   f"{data.get('errorType', '')}: {data.get('error', '')}")
            if params and "query" in params:
                msg += f" (query: {params['query']})"
            raise _Retryable(msg, "malformed")
        return data

    def _vector(self, data: dict, query: str) -> list[RawSeries]:
        """The (labels, raw value) items of an instant vector reply;
        _Retryable("malformed") for anything else."""

        def bad(what: str) -> _Retryable:
            return _Retryable(f"{self._query_where}: {what} (query: {query})", "malformed")

        payload = data.get("data")
        if type(payload) is not dict:
            raise bad("reply has no 'data' object")
        rtype = payload.get("resultType")
        if rtype != "vector":
            raise bad(f"expected resultType 'vector', got {rtype!r}")
        result = payload.get("result")
        if type(result) is not list:
            raise bad("'data.result' is not a list")
        out: list[RawSeries] = []
        append = out.append
        for item in result:
            try:
                labels = item["metric"]
                value = item["value"][1]
            except (TypeError, KeyError, IndexError):
                raise bad(f"malformed result item {str(item)[:200]!r}") from None
            if type(labels) is not dict or type(value) is not str:
                raise bad(f"malformed result item {str(item)[:200]!r}")
            append((labels, value))
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
