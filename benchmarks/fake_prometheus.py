#!/usr/bin/env python3
"""A fake Prometheus for benchmarks: CloudKitty-shaped queries, fixed latency.

It answers the queries of the ``prometheus`` collector::

    <agg>(<agg>_over_time(<metric>{<scope_key>="<scope>"}[3600s])) by (<labels>)

(a ``range_function`` / ``query_function`` around the selector is accepted
too) with ``--series`` result items per query; and its batched shape,
several scopes in one query (``[collect] max_scopes_per_query``)::

    <agg>(<agg>_over_time(<metric>{<scope_key>=~"s1|s2|..."}[3600s])) by (<scope_key>, <labels>)

with ``--series`` items per asked scope, each carrying its scope label, the
same items as that scope's own query would get. Each item carries exactly the
``by (...)`` labels: ``id=r<i>``, the scope label = the scope of the query,
and plausible values for the other labels (flavor_name, volume_type,
disk_format, state, user_id, ...). Everything is derived from (metric,
scope, series index) and, for the values, the query time: two runs get the
same replies, byte for byte.

The server is one thread running its own non-blocking socket loop, not
asyncio, whose per-callback machinery (transports, handles, ``call_later``
timers, ``_run_once``) was most of this process's CPU time; and this process
shares the machine with the daemon under test. No task or thread per
request: a query's reply is rendered as soon as its request has been read,
then waits on a heap of due times until ``--latency-ms`` after that, so
hundreds of queries can be waiting at once; replies leave a connection in
request order (pipelining safe). The sockets are watched with epoll, but a
wait until the next due reply is a ``select(2)`` on the epoll descriptor:
select's timeout is in microseconds, epoll's (and poll's) in milliseconds,
rounded up, which made every reply ~0.5 ms late. The latency is thus what
the latency bound assumes: request read -> reply written. The header lines
of a request (the same for every request of a client) are parsed once per
distinct block, and a reply head is one ``bytes`` format.

Not the tests' fake (``tests/fakes/prometheus.py``, a threaded server
whose replies come from blocking callbacks): that one is flexible, this
one is tuned for measurement, and the tests' server costs two to three
times the CPU per query (``compare_fakes.py``, README).

Endpoints:

``GET|POST /api/v1/query``          the query above (``query``, ``time``)
``GET|POST /api/v1/query_range``    the same at each step (``start``, ``end``,
                                    ``step``): a matrix, as the daemon's range
                                    batches ask
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
import collections
import ctypes
import datetime
import functools
import heapq
import itertools
import json
import re
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse
import zlib
from typing import Any, Callable, Sequence

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
def parse_query(query: str) -> tuple[str, str | None, str | None | tuple[str, ...],
                                      tuple[str, ...]]:
    """(metric, scope label, scope value, by-labels) of a collector query.

    The scope is the first ``label="value"`` matcher of the selector, or
    the first ``label=~"a|b|c"`` one (a batched query): then the scope
    value is the tuple of the alternatives, regex escapes removed. A bare
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
    matchers = list(_MATCHER_RE.finditer(sel.group("matchers")))
    for m in matchers:
        if m.group("op") == "=":
            return sel.group("metric"), m.group("label"), _unescape(m.group("value")), labels
    for m in matchers:
        if m.group("op") == "=~":
            return (sel.group("metric"), m.group("label"),
                    _alternatives(_unescape(m.group("value"))), labels)
    return sel.group("metric"), None, None, labels


def _alternatives(regex: str) -> tuple[str, ...]:
    """``a|b\\.c`` -> ``("a", "b.c")``: the literal alternatives of a
    batched query's scope matcher (split on unescaped ``|``, escapes
    dropped)."""
    parts = re.split(r"(?<!\\)\|", regex)
    return tuple(re.sub(r"\\(.)", r"\1", part) for part in parts)


def parse_time(value: str | None) -> float:
    """Prometheus' ``time`` parameter: RFC 3339 or unix seconds; now if absent."""
    if not value:
        return time.time()
    return _parse_time_text(value)


@functools.lru_cache(maxsize=4096)
def _parse_time_text(value: str) -> float:
    # every query of a period has the same time: parsed once
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


def _value_kind(metric: str) -> str:
    """What the values of ``metric`` are: "up" (0/1), "volume" and "image"
    (sizes, stable per resource), "ratio" or "usage" (vary per hour)."""
    name = metric.lower()
    if name.endswith("_up"):
        return "up"
    if "bytes" in name:
        return "volume" if "volume" in name else "image"
    if "ratio" in name or "util" in name:
        return "ratio"
    return "usage"


_VOLUME_GIB = (1, 10, 20, 50, 100, 250, 500, 1000, 3000)


@functools.lru_cache(maxsize=1 << 16)
def _sizes(metric: str, scope: str | None, n: int, kind: str) -> tuple[str, ...]:
    """The values of series 0..n-1 of a size metric: the same every hour."""
    stable = [_h("v", metric, scope, i) for i in range(n)]
    if kind == "volume":
        return tuple(str(_VOLUME_GIB[h % 9] * GiB) for h in stable)
    return tuple(str((10 + h % 40000) * MiB) for h in stable)


@functools.lru_cache(maxsize=1 << 16)
def _hourly_seed(metric: str, scope: str | None) -> int:
    """The CRC of the start of ``_h("t", metric, scope, index, hour)``:
    the rest is CRC'd per value (the same checksum, one short string)."""
    return zlib.crc32(f"t\x00{metric}\x00{scope}\x00".encode())


def series_values(metric: str, scope: str | None, n: int, ts: float) -> Sequence[str]:
    """The sample values of series 0..n-1 at ``ts`` (text, as Prometheus
    writes it). Sizes are stable per resource; usage varies per hour."""
    kind = _value_kind(metric)
    if kind in ("volume", "image"):
        return _sizes(metric, scope, n, kind)
    seed, hour = _hourly_seed(metric, scope), int(ts // 3600)
    hourly = [zlib.crc32(b"%d\x00%d" % (i, hour), seed) for i in range(n)]
    if kind == "up":
        return ["0" if h % 10 == 0 else "1" for h in hourly]
    if kind == "ratio":
        return [format((h % 10000) / 10000, "g") for h in hourly]
    return [format((h % 100000) / 100, "g") for h in hourly]


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
            items = []
            # a batched query: each asked scope's series, as its own query
            for one in (scope if isinstance(scope, tuple) else (scope,)):
                prefixes = self._prefixes(metric, labels, scope_label, one, self.series)
                values = series_values(metric, one, self.series, ts)
                items += [f'{p}{tstext},"{v}"]}}' for p, v in zip(prefixes, values)]
        return ('{"status":"success","data":{"resultType":"vector","result":['
                + ",".join(items) + "]}}").encode(), len(items)

    def render_range_counted(self, query: str, start: float, end: float,
                             step: float) -> tuple[bytes, int]:
        """(reply, number of (series, step) values) of a range query: each
        series with its value at every step, as the instant query at that
        step answers it (a matrix, the daemon's range batches)."""
        metric, scope_label, scope, labels = parse_query(query)
        steps = []
        t = start
        while t <= end + 1e-9:
            steps.append(t)
            t += step
        texts = [_ts_text(t) for t in steps]
        items = []
        count = 0
        for one in (scope if isinstance(scope, tuple) else (scope,)):
            prefixes = self._prefixes(metric, labels, scope_label, one, self.series)
            by_step = [series_values(metric, one, self.series, t) for t in steps]
            for i, prefix in enumerate(prefixes):
                values = ",".join(f'[{ts},"{vals[i]}"]' for ts, vals in zip(texts, by_step))
                items.append(prefix[:-len('"value":[')] + '"values":[' + values + "]}")
                count += len(steps)
        return ('{"status":"success","data":{"resultType":"matrix","result":['
                + ",".join(items) + "]}}").encode(), count


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=65536)
def _unquote(text: str) -> str:
    # a scope's query text comes back every period, the time of a period
    # with every query of it: each decoded once
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
        value = _unquote(value)
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
        self.render_seconds = 0.0   # time spent building replies
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


def _reply_format(status: int, keep: bool) -> bytes:
    """``format % (len(body), body)`` is the whole reply."""
    return (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n%b").encode()


#: (status, keep-alive) -> reply format: one bytes ``%`` per reply
_REPLY_FORMATS = {(status, keep): _reply_format(status, keep)
                  for status in _REASONS for keep in (True, False)}

#: longest request head accepted
MAX_HEAD = 1 << 20

#: bytes asked of each recv(): requests are < 1 KiB, pipelined ones a few
RECV_SIZE = 1 << 16

#: prctl(2) option: the timer slack of the calling thread, in ns
PR_SET_TIMERSLACK = 29

_READ = select.EPOLLIN
_WRITE = select.EPOLLOUT
#: what makes a recv() worth trying (its error or EOF says what happened)
_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR


@functools.lru_cache(maxsize=4096)
def _header_fields(block: bytes) -> tuple[bool, int, bool]:
    """(``Connection: close``, Content-Length, form body) of the header
    lines of a request (its head after the request line). A client sends
    the same lines with every request: each distinct block is parsed once.
    Raises ValueError for a bad Content-Length."""
    headers = {}
    for line in block.decode("latin-1").split("\r\n"):
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length") or 0)
    if length < 0:
        raise ValueError(f"Content-Length {length}")
    return (headers.get("connection", "").lower() == "close", length,
            "form" in headers.get("content-type", ""))


def _exact_timeouts() -> None:
    """A timer slack of 1 ns for this thread: Linux lets a timeout expire up
    to the slack late (50 us by default), which added ~60 us to each reply."""
    ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


class _Connection:
    """One client connection. ``queue`` holds its replies in request order,
    each ``[data, done, keep, ready]``: the whole reply, the query's
    (arrived, text) for its bookkeeping (None: not a query), whether the
    connection stays open after it, whether it is due. ``out`` is what the
    socket did not take yet (a partial write)."""

    __slots__ = ("sock", "fd", "number", "inbuf", "queue", "out",
                 "closing", "draining", "closed")

    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.number = number
        self.inbuf = b""                  # the start of a request not all read
        self.queue: collections.deque[list] = collections.deque()
        self.out = bytearray()
        self.closing = False              # no more requests: read only to see EOF
        self.draining = False             # nothing but ``out`` left to send
        self.closed = False


class FakePrometheus:
    """The server. ``start()`` runs it on a daemon thread of this process
    (``serve()`` runs it on the caller's thread, for the command line).

    One thread, one loop: wait for the sockets or the next due reply,
    read and answer the requests that came (replies rendered at once),
    write the replies that are due. Other threads talk to the loop through
    ``_call_soon_threadsafe`` (a queue and a wake-up socket)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, latency_ms: float = 0.0,
                 series: int = 10, scopes: list[str] | None = None) -> None:
        self.host = host
        self.port = port
        self.latency = max(latency_ms, 0.0) / 1000.0
        self.generator = ReplyGenerator(series=series, scopes=scopes)
        self.stats_ = Stats()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop_requested = False
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._waker: socket.socket | None = None         # written to wake the loop
        self._epoll: select.epoll | None = None
        self._conns: dict[int, _Connection] = {}          # by file descriptor
        #: (when (monotonic), sequence number, connection, queue entry) of
        #: every reply waiting for its latency
        self._due: list[tuple[float, int, _Connection, list]] = []
        self._seq = itertools.count()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ------------------------------------------------------
    def serve(self, on_ready: Callable[["FakePrometheus"], None] | None = None) -> None:
        """Run the server on this thread until :meth:`stop`."""
        family = socket.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        listener = socket.create_server((self.host, self.port), family=family, backlog=1024)
        wake_r, wake_w = socket.socketpair()
        epoll = select.epoll()
        try:
            _exact_timeouts()
            for sock in (listener, wake_r, wake_w):
                sock.setblocking(False)
            epoll.register(listener.fileno(), _READ)
            epoll.register(wake_r.fileno(), _READ)
            self.port = listener.getsockname()[1]
            self._epoll, self._waker = epoll, wake_w
            self._stop_requested = False
            self._ready.set()
            if on_ready is not None:
                on_ready(self)
            self._loop(listener, wake_r)
        finally:
            self._waker = None
            for conn in list(self._conns.values()):  # idle keep-alive connections
                self._close(conn)
            self._due.clear()
            for closable in (epoll, listener, wake_r, wake_w):
                closable.close()

    def start(self) -> "FakePrometheus":
        self._thread = threading.Thread(target=self.serve, name="fake-prometheus", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake Prometheus did not start")
        return self

    def stop(self) -> None:
        self._request_stop()
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
        if self._waker is not None:
            self._call_soon_threadsafe(self.stats_.reset)
        else:
            self.stats_.reset()

    # -- the loop ---------------------------------------------------------
    def _request_stop(self) -> None:
        """Make the loop return (any thread, or a signal handler)."""
        self._stop_requested = True
        self._wake()

    def _call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        self._wake()

    def _wake(self) -> None:
        waker = self._waker
        if waker is not None:
            try:
                waker.send(b"\0")
            except OSError:
                pass  # full (the loop has wake-ups to read already) or closed

    def _loop(self, listener: socket.socket, wake_r: socket.socket) -> None:
        conns = self._conns
        listen_fd, wake_fd = listener.fileno(), wake_r.fileno()
        while not self._stop_requested:
            for fd, events in self._wait():
                conn = conns.get(fd)
                if conn is not None:
                    if events & _WRITE:
                        self._on_writable(conn)
                    if events & _READ_EVENTS and not conn.closed:
                        self._on_readable(conn)
                elif fd == listen_fd:
                    self._accept(listener)
                elif fd == wake_fd:
                    self._run_calls(wake_r)
            self._write_due()

    def _wait(self) -> list[tuple[int, int]]:
        """The epoll events, waiting until the next reply is due at most.

        epoll_wait() takes its timeout in milliseconds (Python rounds it
        up): every reply would leave up to 1 ms late. So a wait with a
        deadline is a select(2) on the epoll descriptor (readable when
        some socket is ready), whose timeout is in microseconds."""
        due = self._due
        if not due:
            return self._epoll.poll()
        delay = due[0][0] - time.monotonic()
        if delay > 0 and not select.select((self._epoll,), (), (), delay)[0]:
            return []
        return self._epoll.poll(0)

    def _run_calls(self, wake_r: socket.socket) -> None:
        try:
            wake_r.recv(4096)
        except OSError:
            pass
        while self._calls:
            self._calls.popleft()()

    def _accept(self, listener: socket.socket) -> None:
        st = self.stats_
        while True:
            try:
                sock, _addr = listener.accept()
            except OSError:  # none left (BlockingIOError), or it failed
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            st.connections += 1
            conn = _Connection(sock, st.connections)
            self._conns[conn.fd] = conn
            self._epoll.register(conn.fd, _READ)

    def _on_readable(self, conn: _Connection) -> None:
        if conn.draining:   # only a hang-up or an error brings us here
            self._close(conn)
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:         # the client is gone: its pending replies too
            self._finish(conn)
            return
        if conn.closing:     # after a "Connection: close" request
            return
        arrived = time.monotonic()
        try:
            conn.inbuf = self._requests(conn, conn.inbuf + data, arrived)
        except Exception as exc:  # noqa: BLE001 - a bad request drops its connection only
            print(f"fake Prometheus: connection {conn.number} dropped: {exc!r}",
                  file=sys.stderr, flush=True)
            self._close(conn)

    def _on_writable(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        del conn.out[:sent]
        if conn.out:
            return
        if conn.draining:
            self._close(conn)
        else:
            self._epoll.modify(conn.fd, _READ)

    def _finish(self, conn: _Connection) -> None:
        """Read no more, drop the replies not written yet, close once the
        written ones are out."""
        if conn.closed:
            return
        conn.queue.clear()
        conn.closing = True
        if not conn.out:
            self._close(conn)
        elif not conn.draining:
            conn.draining = True
            self._epoll.modify(conn.fd, _WRITE)

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = conn.closing = True
        conn.queue.clear()
        conn.out.clear()
        self._epoll.unregister(conn.fd)
        del self._conns[conn.fd]
        conn.sock.close()

    # -- HTTP -------------------------------------------------------------
    def _requests(self, conn: _Connection, buf: bytes, arrived: float) -> bytes:
        """Answer the complete requests at the start of ``buf``, read at
        ``arrived`` (monotonic); returns the rest (a partial request)."""
        pos, size = 0, len(buf)
        while pos < size and not conn.closing:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                if size - pos > MAX_HEAD:
                    self._reply(conn, 431, {"status": "error", "error": "too large"},
                                arrived, False, None)
                    conn.closing = True
                    return b""
                break
            line_end = buf.find(b"\r\n", pos, end)
            if line_end < 0:
                line_end = end          # a request line and no header
            close, length, form = _header_fields(buf[line_end + 2:end])
            body_end = end + 4 + length
            if body_end > size:
                break                   # the body is not all here yet
            body = buf[end + 4:body_end]
            request_line = buf[pos:line_end].decode("latin-1")
            pos = body_end
            try:
                method, target, version = request_line.split(" ", 2)
            except ValueError:
                self._finish(conn)
                return b""
            keep = not close and version.upper() == "HTTP/1.1"
            status, payload, when, query = self._dispatch(
                method.upper(), target, form, body, arrived)
            # a query's bookkeeping is done when its reply leaves
            done = None if query is None else (arrived, query)
            self._reply(conn, status, payload, when, keep, done)
            if not keep:
                conn.closing = True
        return buf[pos:]

    def _dispatch(self, method: str, target: str, form: bool, body: bytes,
                  arrived: float) -> tuple[int, Any, float, str | None]:
        """(status, payload, when the reply may be sent (monotonic), the
        query text when it answers /api/v1/query, else None)."""
        path, _, query_string = target.partition("?")
        path = path.partition("#")[0]
        params = _parse_qs(query_string.partition("#")[0])
        if method == "POST" and body and form:
            params.update(_parse_qs(body.decode()))
        if path in ("/api/v1/query", "/api/v1/query_range"):
            if method not in ("GET", "POST"):
                self.stats_.other += 1
                return 405, {"status": "error", "errorType": "bad_data",
                             "error": "method"}, arrived, None
            st = self.stats_
            if st.first_query_at is None:
                st.first_query_at = time.time() - (time.monotonic() - arrived)
            st.active += 1
            st.max_active = max(st.max_active, st.active)
            status, payload = self._answer(params, path.endswith("_range"))
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

    def _answer(self, params: dict, ranged: bool = False) -> tuple[int, Any]:
        st = self.stats_
        query = params.get("query")
        if not query:
            st.errors += 1
            return 400, {"status": "error", "errorType": "bad_data",
                         "error": "missing query parameter"}
        try:
            # wall time: the loop does nothing else meanwhile, so it is about
            # the CPU time, without process_time()'s two system calls
            t0 = time.perf_counter()
            if ranged:
                step = params.get("step", "")
                raw, count = self.generator.render_range_counted(
                    query, parse_time(params.get("start")), parse_time(params.get("end")),
                    float(step[:-1] if step.endswith("s") else step))
            else:
                raw, count = self.generator.render_counted(query,
                                                           parse_time(params.get("time")))
            st.render_seconds += time.perf_counter() - t0
        except QueryError as exc:
            st.errors += 1
            return 400, {"status": "error", "errorType": "bad_data", "error": str(exc)}
        st.queries += 1
        st.series_sent += count
        return 200, raw

    def _reply(self, conn: _Connection, status: int, payload: Any, when: float,
               keep: bool, done: tuple[float, str] | None) -> None:
        """Queue a reply on ``conn``; it leaves at ``when`` (monotonic), after
        the replies queued before it."""
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        entry = [_REPLY_FORMATS[status, keep] % (len(raw), raw), done, keep, False]
        conn.queue.append(entry)
        if when > time.monotonic():
            heapq.heappush(self._due, (when, next(self._seq), conn, entry))
        else:
            entry[3] = True
            self._flush(conn)

    def _write_due(self) -> None:
        due = self._due
        now = time.monotonic()
        while due and due[0][0] <= now:
            _when, _seq, conn, entry = heapq.heappop(due)
            entry[3] = True
            self._flush(conn)

    def _flush(self, conn: _Connection) -> None:
        """Write the replies at the head of ``conn``'s queue that are due."""
        queue = conn.queue
        while queue and queue[0][3]:
            data, done, keep, _ready = queue.popleft()
            self._send(conn, data)
            self.stats_.bytes_sent += len(data)
            if done is not None:
                self._query_done(done[0], done[1], conn.number)
            if not keep:
                self._finish(conn)

    def _send(self, conn: _Connection, data: bytes) -> None:
        """Write ``data``; what the socket does not take waits in ``out``
        until it is writable."""
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent < len(data):
            conn.out += memoryview(data)[sent:]
            self._epoll.modify(conn.fd, _READ | _WRITE)

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


#: queries kept in the trace (GET /_trace)
TRACE_MAX = 2_000_000


def _scope_of(query: str | None) -> str | None:
    """The scope of a query for the trace (a batched query's first one)."""
    try:
        scope = parse_query(query or "")[2]
    except QueryError:
        return None
    return scope[0] if isinstance(scope, tuple) else scope


def _print_stats_every(server: FakePrometheus, interval: float) -> None:
    """--stats-interval, on a thread of its own: the loop's only timers are
    the replies'."""
    while True:
        time.sleep(interval)
        sys.stdout.write(json.dumps(server.stats()) + "\n")
        sys.stdout.flush()


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
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda _sig, _frame: server._request_stop())
        print(f"listening on {server.url}", flush=True)
        if args.stats_interval > 0:
            threading.Thread(target=_print_stats_every, args=(server, args.stats_interval),
                             name="fake-prometheus-stats", daemon=True).start()

    fake.serve(on_ready)
    print(json.dumps(fake.stats()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
