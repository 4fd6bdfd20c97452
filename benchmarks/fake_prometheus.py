#!/usr/bin/env python3
"""A fake Prometheus for benchmarks: CloudKitty-shaped queries, fixed latency.

It answers the queries of the ``prometheus`` collector::

    <agg>(<agg>_over_time(<metric>{<scope_key>="<scope>"}[3600s])) by (<labels>)

(a ``range_function`` / ``query_function`` around the selector is accepted
too) with ``--series`` result items per query. Each item carries exactly the
``by (...)`` labels: ``id=r<i>``, the scope label = the scope of the query,
and plausible values for the other labels (flavor_name, volume_type,
disk_format, state, user_id, ...). Everything is derived from (metric,
scope, series index) and, for the values, the query time: two runs get the
same replies, byte for byte.

The server is one asyncio event loop (an ``asyncio.Protocol`` per HTTP/1.1
keep-alive connection, no task or thread per request): a query's reply is
rendered when its request has been read and written by a timer
``--latency-ms`` after that, so hundreds of queries can be waiting at once.
The loop uses ``select(2)`` (microsecond timeouts; epoll's are rounded up to
the millisecond, which made every reply ~0.5 ms late). The latency is thus
what the latency bound assumes: request read -> reply written.

Endpoints:

``GET|POST /api/v1/query``          the query above (``query``, ``time``)
``GET /api/v1/status/buildinfo``    what ``cloudkitty-proc-manage check`` asks
``GET /_stats``                     counters (JSON, see :meth:`Stats.as_dict`)
``GET /_trace``                     (start, end, scope, connection) of every query
``POST|GET /_reset``                zero the counters

A fetcher-style query without a selector (``max(instance_up) by
(project_id)``) returns one series per ``--scopes`` entry.

Standalone::

    python benchmarks/fake_prometheus.py --port 9099 --latency-ms 20 --series 10

prints ``listening on http://127.0.0.1:9099`` when ready, and its counters as
one JSON line on SIGINT/SIGTERM. In-process::

    with FakePrometheus(latency_ms=20, series=10) as fake:
        ... fake.url ... fake.stats()
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import functools
import json
import re
import selectors
import signal
import sys
import threading
import time
import urllib.parse
import zlib
from typing import Any

__all__ = ["FakePrometheus", "ReplyGenerator", "Stats", "parse_query", "parse_time"]

# ---------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SELECTOR_RE = re.compile(rf"(?P<metric>{_NAME})\s*\{{(?P<matchers>[^}}]*)\}}")
_MATCHER_RE = re.compile(r'(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*'
                         r'"(?P<value>(?:[^"\\]|\\.)*)"')
_BY_RE = re.compile(r"\bby\s*\((?P<labels>[^)]*)\)")
_BARE_RE = re.compile(rf"^\s*(?P<agg>{_NAME})\s*\(\s*(?P<metric>{_NAME})\s*\)")


class QueryError(ValueError):
    pass


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


@functools.lru_cache(maxsize=65536)
def parse_query(query: str) -> tuple[str, str | None, str | None, tuple[str, ...]]:
    """(metric, scope label, scope value, by-labels) of a collector query.

    The scope is the first ``label="value"`` matcher of the selector; a bare
    ``agg(metric) by (...)`` (the prometheus fetcher) has no scope.
    """
    by = _BY_RE.search(query)
    labels = tuple(x.strip() for x in by.group("labels").split(",") if x.strip()) if by else ()
    sel = _SELECTOR_RE.search(query)
    if sel is None:
        bare = _BARE_RE.match(query)
        if bare is None:
            raise QueryError(f"unsupported query: {query}")
        return bare.group("metric"), None, None, labels
    for m in _MATCHER_RE.finditer(sel.group("matchers")):
        if m.group("op") == "=":
            return sel.group("metric"), m.group("label"), _unescape(m.group("value")), labels
    return sel.group("metric"), None, None, labels


def parse_time(value: str | None) -> float:
    """Prometheus' ``time`` parameter: RFC 3339 or unix seconds; now if absent."""
    if not value:
        return time.time()
    try:
        return float(value)
    except ValueError:
        pass
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(f"cannot parse {value!r} to a valid timestamp") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()


def _ts_text(ts: float) -> str:
    return str(int(ts)) if ts == int(ts) else repr(round(ts, 3))


# ---------------------------------------------------------------------------
# Deterministic data
# ---------------------------------------------------------------------------

def _h(*parts: object) -> int:
    return zlib.crc32("\x00".join(map(str, parts)).encode())


LABEL_CHOICES = {
    "flavor_name": ("m1.tiny", "m1.small", "m1.medium", "m1.large", "m1.xlarge", "c1.large"),
    "volume_type": ("ssd", "hdd", "nvme"),
    "disk_format": ("raw", "qcow2", "vmdk", "iso"),
    "state": ("active", "active", "active", "down"),
    "az": ("az1", "az2", "az3"),
    "availability_zone": ("az1", "az2", "az3"),
    "status": ("active", "active", "shutoff"),
}


def label_value(label: str, metric: str, scope: str | None, index: int) -> str:
    """A plausible, stable value of ``label`` for series ``index``."""
    if label == "id":
        return f"r{index}"
    if label == "user_id":
        return f"u-{_h('user', scope, index % 5) % 100000:05d}"
    choices = LABEL_CHOICES.get(label)
    h = _h(label, metric, scope, index)
    if choices is not None:
        return choices[h % len(choices)]
    return f"{label}-{h % 4}"


GiB = 1 << 30
MiB = 1 << 20


@functools.lru_cache(maxsize=1 << 16)
def _stable_hash(metric: str, scope: str | None, index: int) -> int:
    return _h("v", metric, scope, index)


def series_value(metric: str, scope: str | None, index: int, ts: float) -> str:
    """The sample value of series ``index`` at ``ts`` (text, as Prometheus
    writes it). Sizes are stable per resource; usage varies per hour."""
    hour = int(ts // 3600)
    stable = _stable_hash(metric, scope, index)
    hourly = _h("t", metric, scope, index, hour)
    name = metric.lower()
    if name.endswith("_up"):
        return "0" if hourly % 10 == 0 else "1"
    if "bytes" in name:
        if "volume" in name:
            return str((1, 10, 20, 50, 100, 250, 500, 1000, 3000)[stable % 9] * GiB)
        return str((10 + stable % 40000) * MiB)
    if "ratio" in name or "util" in name:
        return format((hourly % 10000) / 10000, "g")
    return format((hourly % 100000) / 100, "g")


class ReplyGenerator:
    """Renders the JSON reply of a query. Pure and deterministic; the label
    part of each result item is cached per (metric, labels, scope)."""

    def __init__(self, series: int = 10, scopes: list[str] | None = None,
                 cache_size: int = 4096) -> None:
        self.series = series
        self.scopes = list(scopes or [])
        self._prefixes = functools.lru_cache(maxsize=cache_size)(self._make_prefixes)

    def _make_prefixes(self, metric: str, labels: tuple[str, ...], scope_label: str | None,
                       scope: str | None, n: int) -> tuple[str, ...]:
        out = []
        for i in range(n):
            lab = {}
            for label in labels:
                if label == scope_label:
                    lab[label] = scope
                else:
                    lab[label] = label_value(label, metric, scope, i)
            out.append('{"metric":' + json.dumps(lab, separators=(",", ":")) + ',"value":[')
        return tuple(out)

    def render(self, query: str, ts: float) -> bytes:
        return self.render_counted(query, ts)[0]

    def render_counted(self, query: str, ts: float) -> tuple[bytes, int]:
        """(reply, number of result items)."""
        metric, scope_label, scope, labels = parse_query(query)
        tstext = _ts_text(ts)
        if scope_label is None and labels:
            # the fetcher's "max(metric) by (project_id)": one series per scope
            key = labels[0]
            items = ['{"metric":' + json.dumps({key: s}) + f',"value":[{tstext},"1"]}}'
                     for s in self.scopes]
        else:
            prefixes = self._prefixes(metric, labels, scope_label, scope, self.series)
            items = [f'{p}{tstext},"{series_value(metric, scope, i, ts)}"]}}'
                     for i, p in enumerate(prefixes)]
        return ('{"status":"success","data":{"resultType":"vector","result":['
                + ",".join(items) + "]}}").encode(), len(items)


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=65536)
def _unquote(text: str) -> str:
    # a scope's query text comes back every period: decoded once
    return urllib.parse.unquote_plus(text)


def _parse_qs(query_string: str) -> dict:
    """``dict(urllib.parse.parse_qsl(query_string))``, with the decoding
    of each name and value cached (the query text was a tenth of the
    server's CPU)."""
    params = {}
    for pair in query_string.split("&"):
        name, eq, value = pair.partition("=")
        if not eq:
            continue          # parse_qsl drops a pair without "=" (blank)
        value = _unquote(value) if len(value) > 40 else urllib.parse.unquote_plus(value)
        if value:
            params[_unquote(name)] = value
    return params


class Stats:
    """Counters, updated on the event loop thread only."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.queries = 0            # /api/v1/query answered with 200
        self.other = 0              # every other request
        self.errors = 0             # 4xx replies
        self.active = 0             # queries in flight now
        self.max_active = 0
        self.busy_seconds = 0.0     # sum of query durations (in-flight time)
        self.bytes_sent = 0
        self.series_sent = 0
        self.connections = 0
        self.first_query_at: float | None = None   # time.time()
        self.last_query_at: float | None = None
        self.render_seconds = 0.0   # CPU spent building replies
        #: (start, end, scope, connection number) of every query,
        #: time.time(); GET /_trace
        self.trace: list[tuple[float, float, str | None, int]] = []

    def as_dict(self) -> dict:
        window = None
        if self.first_query_at is not None and self.last_query_at is not None:
            window = self.last_query_at - self.first_query_at
        return {
            "queries": self.queries, "other_requests": self.other, "errors": self.errors,
            "active": self.active, "max_active": self.max_active,
            "busy_seconds": round(self.busy_seconds, 6),
            "mean_active": (round(self.busy_seconds / window, 3) if window else None),
            "bytes_sent": self.bytes_sent, "series_sent": self.series_sent,
            "connections": self.connections,
            "first_query_at": self.first_query_at, "last_query_at": self.last_query_at,
            "render_seconds": round(self.render_seconds, 6),
        }


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}

BUILDINFO = {"status": "success", "data": {
    "version": "2.53.0-fake", "revision": "benchmark", "branch": "fake",
    "buildUser": "bench", "buildDate": "20260101-00:00:00", "goVersion": "go1.22"}}


class FakePrometheus:
    """The server. ``start()`` runs it on a daemon thread of this process
    (``serve()`` runs it on the caller's thread, for the command line)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, latency_ms: float = 0.0,
                 series: int = 10, scopes: list[str] | None = None) -> None:
        self.host = host
        self.port = port
        self.latency = max(latency_ms, 0.0) / 1000.0
        self.generator = ReplyGenerator(series=series, scopes=scopes)
        self.stats_ = Stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._connections: set[_HttpConnection] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ------------------------------------------------------
    async def _main(self, on_ready=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server = await self._loop.create_server(
            lambda: _HttpConnection(self), self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        if on_ready is not None:
            on_ready(self)
        async with self._server:
            await self._stopped.wait()
            for conn in list(self._connections):  # idle keep-alive connections
                conn.close()
            await asyncio.sleep(0)

    def serve(self, on_ready=None) -> None:
        # select(2) takes its timeout in microseconds; epoll (asyncio's
        # default) in milliseconds, rounded up: every reply came ~0.5 ms
        # late on average, which the latency bound does not include.
        loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        try:
            loop.run_until_complete(self._main(on_ready))
        finally:
            loop.close()

    def start(self) -> "FakePrometheus":
        self._thread = threading.Thread(target=self.serve, name="fake-prometheus", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake Prometheus did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "FakePrometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict:
        """A snapshot of the counters (thread-safe enough: ints and floats)."""
        return self.stats_.as_dict()

    def reset_stats(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.stats_.reset)

    # -- HTTP -------------------------------------------------------------
    def _dispatch(self, method: str, target: str, headers: dict, body: bytes,
                  arrived: float) -> tuple[int, Any, float, str | None]:
        """(status, payload, when the reply may be sent (monotonic), the
        query text when it answers /api/v1/query, else None)."""
        path, _, query_string = target.partition("?")
        path = path.partition("#")[0]
        params = _parse_qs(query_string.partition("#")[0])
        if method == "POST" and body and "form" in headers.get("content-type", ""):
            params.update(_parse_qs(body.decode()))
        if path == "/api/v1/query":
            if method not in ("GET", "POST"):
                self.stats_.other += 1
                return 405, {"status": "error", "errorType": "bad_data",
                             "error": "method"}, arrived, None
            st = self.stats_
            if st.first_query_at is None:
                st.first_query_at = time.time() - (time.monotonic() - arrived)
            st.active += 1
            st.max_active = max(st.max_active, st.active)
            status, payload = self._answer(params)
            return status, payload, arrived + self.latency, params.get("query", "")
        self.stats_.other += 1
        if path == "/api/v1/status/buildinfo":
            return 200, BUILDINFO, arrived, None
        if path == "/_stats":
            return 200, self.stats_.as_dict(), arrived, None
        if path == "/_trace":
            return 200, {"queries": self.stats_.trace}, arrived, None
        if path == "/_reset":
            self.stats_.reset()
            return 200, {"status": "success"}, arrived, None
        return 404, {"status": "error", "errorType": "not_found", "error": path}, arrived, None

    def _query_done(self, arrived: float, query: str | None, conn: int) -> None:
        """Bookkeeping of a query whose reply was just written."""
        st = self.stats_
        now = time.monotonic()
        st.active -= 1
        st.busy_seconds += now - arrived
        st.last_query_at = time.time()
        if len(st.trace) < TRACE_MAX:
            started = st.last_query_at - (now - arrived)
            st.trace.append((started, st.last_query_at, _scope_of(query), conn))

    def _answer(self, params: dict) -> tuple[int, Any]:
        st = self.stats_
        query = params.get("query")
        if not query:
            st.errors += 1
            return 400, {"status": "error", "errorType": "bad_data",
                         "error": "missing query parameter"}
        try:
            ts = parse_time(params.get("time"))
            c0 = time.process_time()
            raw, count = self.generator.render_counted(query, ts)
            st.render_seconds += time.process_time() - c0
        except QueryError as exc:
            st.errors += 1
            return 400, {"status": "error", "errorType": "bad_data", "error": str(exc)}
        st.queries += 1
        st.series_sent += count
        return 200, raw


#: longest request head accepted
MAX_HEAD = 1 << 20


class _HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection. No task per request: a query's
    reply is rendered at once and written by a timer ``latency`` after its
    request was read; replies leave in request order (pipelining safe)."""

    def __init__(self, server: FakePrometheus) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.queue: collections.deque = collections.deque()  # [when, data, done, keep]
        self.number = 0
        self.closing = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        st = self.server.stats_
        st.connections += 1
        self.number = st.connections
        self.server._connections.add(self)

    def connection_lost(self, exc) -> None:
        self.server._connections.discard(self)
        self.closing = True

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while not self.closing:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._queue_reply(431, {"status": "error", "error": "too large"},
                                      time.monotonic(), False, None)
                return
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length") or 0)
            if len(buf) < end + 4 + length:
                return  # the body is not all here yet
            body = bytes(buf[end + 4:end + 4 + length])
            del buf[:end + 4 + length]
            arrived = time.monotonic()
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                self.close()
                return
            keep = (version.upper() == "HTTP/1.1"
                    and headers.get("connection", "").lower() != "close")
            status, payload, when, query = self.server._dispatch(
                method.upper(), target, headers, body, arrived)
            # a query's bookkeeping is done when its reply leaves
            done = None if query is None else (arrived, query)
            self._queue_reply(status, payload, when, keep, done)
            if not keep:
                self.closing = True

    def _queue_reply(self, status: int, payload, when: float, keep: bool, done) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
                f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n").encode()
        entry = [when, head + raw, done, keep, False]
        self.queue.append(entry)
        delay = when - time.monotonic()
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._ready, entry)
        else:
            self._ready(entry)

    def _ready(self, entry: list) -> None:
        entry[4] = True
        queue = self.queue
        while queue and queue[0][4]:
            _when, data, done, keep, _ = queue.popleft()
            if self.transport is None or self.transport.is_closing():
                queue.clear()
                return
            self.transport.write(data)
            self.server.stats_.bytes_sent += len(data)
            if done is not None:
                self.server._query_done(done[0], done[1], self.number)
            if not keep:
                self.transport.close()
                queue.clear()
                return


#: queries kept in the trace (GET /_trace)
TRACE_MAX = 2_000_000


def _scope_of(query: str | None) -> str | None:
    try:
        return parse_query(query or "")[2]
    except QueryError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9099, help="0: any free port")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="delay of every /api/v1/query reply (default 0)")
    ap.add_argument("--series", type=int, default=10, help="result items per query")
    ap.add_argument("--scopes", default="",
                    help="comma-separated scope ids for fetcher queries (optional)")
    ap.add_argument("--stats-interval", type=float, default=0.0,
                    help="print the counters every N seconds (0: only at exit)")
    args = ap.parse_args(argv)
    scopes = [s for s in args.scopes.split(",") if s]
    fake = FakePrometheus(args.host, args.port, latency_ms=args.latency_ms,
                          series=args.series, scopes=scopes)

    def on_ready(server: FakePrometheus) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server._stopped.set)
        print(f"listening on {server.url}", flush=True)
        if args.stats_interval > 0:
            async def ticker():
                while True:
                    await asyncio.sleep(args.stats_interval)
                    print(json.dumps(server.stats()), flush=True)
            loop.create_task(ticker())

    fake.serve(on_ready)
    print(json.dumps(fake.stats()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
