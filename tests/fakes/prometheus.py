"""The fake Prometheus of the tests: one threaded HTTP/1.1 server.

Every request is recorded, then answered by a reply callback after an
optional delay:

* :class:`FakePrometheus` ``(reply=None, delay=0.0)``: ``reply(handler)``
  returns ``(status, body)`` (``body``: bytes, or an object sent as JSON) or
  ``None`` to hang up without a reply. It runs on the request's own thread
  and may block (sleep, wait for an event). The default answers an empty
  vector. The functional tests script their replies with it.
* :class:`DatasetPrometheus` ``(om_path, metrics_yml, delay=, fault=)``: the
  same server whose callback answers ``/api/v1/query`` (and
  ``/api/v1/query_range``, each step as the instant query at that time) with
  what the file collector computes from an OpenMetrics file (a dataset of
  ``tests/datagen.py``), unless ``fault(query)`` says otherwise. The chaos
  suite runs the daemon against it.

Both answer ``GET`` and ``POST`` (Prometheus takes a query's parameters
in a form-encoded body too); the handler's ``params`` holds the parameters
of either (a POST's body over its URL's).

What is recorded: ``requests``, every request as a dict (method, path,
parameters, headers, client address); ``active`` / ``max_active``, the
requests being answered now / at most at once; and for a
:class:`DatasetPrometheus`, ``queries[(scope, begin iso, metric)]``, the
arrival times (``time.monotonic()``) of each attempt of one query (a
batched query, ``project_id=~"a|b"``, counts as an attempt of each scope
it asks; a range query, as an attempt of each scope at each of its steps),
and ``total``, the number of queries (requests) understood.

The benchmarks keep a server of their own, ``benchmarks/fake_prometheus.py``:
one thread running an epoll loop, replies held on a heap of due times, no
callbacks. Under the load of one W1 run (``benchmarks/compare_fakes.py``:
2,400 queries, 16 connections, 20 ms, the same renderer) it used 0.07-0.09
ms of CPU per query against 0.18-0.21 for this server, and answered in
20.3-20.7 ms (median) against 20.9-21.2. The daemon under test shares the
two vCPUs with its fake, and W1 is latency-bound, so this server would
lower the figures the benchmarks measure; and that loop cannot run the
blocking callbacks the tests rely on. Hence two servers: this one flexible
for tests, that one tuned for measurement. Neither waits on Nagle's
algorithm: that one writes a reply in one send, this one sets TCP_NODELAY
(see ``Handler``).
"""

from __future__ import annotations

import datetime
import http.server
import json
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections import defaultdict
from pathlib import Path

__all__ = ["EMPTY_VECTOR", "DatasetPrometheus", "FakePrometheus", "Query"]

EMPTY_VECTOR = {"status": "success", "data": {"resultType": "vector", "result": []}}


class FakePrometheus:
    """Threaded HTTP/1.1 server; ``reply(handler) -> (status, body)``, or
    ``None`` to close the connection without replying.

    The handler is the request's ``BaseHTTPRequestHandler`` (``path``,
    ``command``, ``headers``, ``close_connection`` ...), plus ``arrived``:
    the ``time.monotonic()`` at which its request was read (before the
    delay), ``params``: its parameters (from the URL, or for a POST from
    its form body over the URL's), and ``body``: a POST's body (bytes) or
    None.
    ``server`` may be wrapped (TLS) before the server is started.
    """

    def __init__(self, reply=None, delay: float = 0.0) -> None:
        self.reply = reply or (lambda handler: (200, EMPTY_VECTOR))
        self.delay = delay
        self.requests: list[dict] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # head and body are two writes: with Nagle's algorithm the body
            # waited for the client's delayed ACK (~40 ms every reply)
            disable_nagle_algorithm = True

            def do_GET(self):  # noqa: N802
                self.arrived = time.monotonic()
                parsed = urllib.parse.urlsplit(self.path)
                self.params = dict(urllib.parse.parse_qsl(parsed.query))
                body = self.body = None
                if self.command == "POST":
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.body = self.rfile.read(length) if length else b""
                    if self.headers.get_content_type() == "application/x-www-form-urlencoded":
                        self.params.update(urllib.parse.parse_qsl(body.decode("latin-1")))
                with fake.lock:
                    fake.active += 1
                    fake.max_active = max(fake.max_active, fake.active)
                    fake.requests.append({
                        "method": self.command,
                        "path": parsed.path,
                        "params": dict(self.params),
                        "headers": dict(self.headers),
                        "client": self.client_address,
                        "body": body,
                    })
                try:
                    if fake.delay:
                        time.sleep(fake.delay)
                    answer = fake.reply(self)
                    if answer is None:
                        self._hang_up()
                    else:
                        self._send(*answer)
                finally:
                    with fake.lock:
                        fake.active -= 1

            do_POST = do_GET

            def _send(self, status, body):
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:  # the client timed out and hung up
                    self.close_connection = True

            def _hang_up(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request, client_address):
                # A client that timed out and hung up is expected here.
                if not isinstance(sys.exc_info()[1], OSError):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True, name="fake-prometheus")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------
# Answers from a dataset, with faults
# ---------------------------------------------------------------------------

#: the selector of the collector's query: metric, scope, range in seconds
_SELECTOR = re.compile(r'(\w+)\{project_id="((?:[^"\\]|\\.)*)"\}\[(\d+)s\]')
#: the selector of a batched query: metric, the scopes' regex, range
_BATCH_SELECTOR = re.compile(r'(\w+)\{project_id=~"((?:[^"\\]|\\.)*)"\}\[(\d+)s\]')
#: a batched query groups by the scope key first
_BATCH_BY = re.compile(r'\) by \(project_id(?:, |\))')


def _unquote(text: str) -> str:
    """A PromQL double-quoted string's content, unescaped."""
    return re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), text)


def _scopes_of(regex: str) -> tuple[str, ...] | None:
    """The scope ids of ``a|b\\.c|...`` (alternatives of literal ids,
    escaped as Go's regexp.QuoteMeta does), or None for any other regex."""
    scopes, current, chars = [], [], iter(regex)
    for c in chars:
        if c == "\\":
            nxt = next(chars, None)
            if nxt is None:
                return None
            current.append(nxt)
        elif c == "|":
            scopes.append("".join(current))
            current = []
        elif c in ".+*?()[]{}^$":
            return None           # an unescaped metacharacter: not a literal
        else:
            current.append(c)
    scopes.append("".join(current))
    return tuple(scopes)


class Query:
    """One instant query as the fake server understood it, or one step of a
    range query (``range_ends`` set): the instant query at that step."""

    __slots__ = ("attempt", "begin", "end", "metric", "range_ends", "scope", "scopes")

    def __init__(self, metric: str, scope: str, begin: datetime.datetime,
                 end: datetime.datetime, attempt: int,
                 scopes: tuple[str, ...] | None = None,
                 range_ends: tuple[datetime.datetime, ...] | None = None) -> None:
        self.metric = metric
        #: the scope asked; for a batched query, the first one
        self.scope = scope
        #: the scopes asked, in the query's order (``(scope,)`` unless batched)
        self.scopes = scopes or (scope,)
        self.begin = begin
        self.end = end
        #: 1 for the first request of this query (batched: of its first scope;
        #: a range step: of its first scope at that step)
        self.attempt = attempt
        #: for a step of a range query: the ends (times) of all its steps,
        #: in order (``begin``/``end`` are this step's period); else None
        self.range_ends = range_ends

    @property
    def ranged(self) -> bool:
        return self.range_ends is not None

    @property
    def batched(self) -> bool:
        return len(self.scopes) > 1

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.scope, self.begin.isoformat(), self.metric)


def _file_collector_conf(om_path: Path):
    from oslo_config import cfg

    import cloudkitty_proc.conf as ckconf

    conf = cfg.ConfigOpts()
    ckconf.register_opts(conf)
    conf([], project="cloudkitty-proc", default_config_files=[])
    conf.set_override("path", str(om_path), "collector_file")
    return conf


class DatasetPrometheus(FakePrometheus):
    """``/api/v1/query`` answered with what the file collector computes for
    the samples of ``om_path`` (so that an export can be checked with
    datagen), ``/api/v1/status/buildinfo`` with a version, anything else
    with 400. ``delay``: seconds every request takes (a slow backend).

    Queries are CloudKitty's, one scope each (``project_id="a"``), or the
    batched shape of promql.build_batch_query (``project_id=~"a|b\\.c"``,
    ``by (project_id, ...)``), answered with the series of every scope
    asked, in the order asked; GET or form-encoded POST.

    ``/api/v1/query_range`` (``start``, ``end``, ``step``) takes the same
    queries: each step is the instant query at that time (period: the
    selector's range up to the step), the reply a matrix of the series of
    all steps (a series per label set, its values in step order), sorted
    by labels as Prometheus sorts range results (:meth:`answer_range`).

    ``fault(query) -> action``, called for every query understood (for a
    range query: once per step, in step order, with that step's Query, so
    a hook keyed on (scope, begin, metric) fires for the period it
    targets; the first action returned applies to the whole request):
    ``None`` (answer normally), ``("reply", status, body)``,
    ``("sleep", seconds)`` (then answer), ``("hold", event)`` (answer once
    the event is set, 120 s at most) or ``("close",)`` (hang up without a
    reply).
    """

    def __init__(self, om_path: Path, metrics_yml: Path, *, delay: float = 0.0,
                 fault=None) -> None:
        from cloudkitty_proc.collectors.file import FileCollector
        from cloudkitty_proc.metrics_conf import PROMQL_EXTRA_ARGS, load_metrics_conf

        mconf = load_metrics_conf(str(metrics_yml), scope_key="project_id",
                                  extra_args_schema=PROMQL_EXTRA_ARGS)
        self._file = FileCollector(_file_collector_conf(om_path), mconf)
        self._metrics = {m.name: m for m in mconf}
        self.fault = fault
        self.queries: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        self.total = 0
        super().__init__(self._reply, delay=delay)

    def _reply(self, handler):
        parsed = urllib.parse.urlsplit(handler.path)
        if parsed.path == "/api/v1/status/buildinfo":
            return 200, {"status": "success", "data": {"version": "fake"}}
        params = handler.params
        if parsed.path == "/api/v1/query_range":
            steps = self._parse_range(params, handler.arrived)
            if steps is None:
                return 400, {"status": "error", "errorType": "bad_data",
                             "error": f"cannot parse {params!r}"}
            action = None
            for step in steps:
                act = self.fault(step) if self.fault else None
                if action is None:
                    action = act
            query, answer = steps[0], self.answer_range
        elif parsed.path == "/api/v1/query":
            query = self._parse(params, handler.arrived)
            if query is None:
                return 400, {"status": "error", "errorType": "bad_data",
                             "error": f"cannot parse {params!r}"}
            action = self.fault(query) if self.fault else None
            answer = self.answer
        else:
            return 400, {"status": "error", "errorType": "bad_data",
                         "error": f"unknown path {parsed.path}"}
        if action is not None:
            if action[0] == "reply":
                return action[1], action[2]
            if action[0] == "sleep":
                time.sleep(action[1])
            elif action[0] == "hold":
                action[1].wait(120)
            elif action[0] == "close":
                return None
            else:
                raise ValueError(f"unknown fault action {action!r}")
        return 200, answer(query)

    def _parse(self, params: dict, arrived: float) -> Query | None:
        if "time" not in params:
            return None
        parsed = self._parse_query(params.get("query", ""))
        if parsed is None:
            return None
        end = _time(params["time"])
        return self._record(*parsed, [end], arrived)[0]

    def _parse_range(self, params: dict, arrived: float) -> list[Query] | None:
        """One Query per step of a range query (Prometheus' steps: start,
        start + step, ... up to end), or None when it is not understood."""
        if not {"start", "end", "step"} <= params.keys():
            return None
        parsed = self._parse_query(params.get("query", ""))
        if parsed is None:
            return None
        start, end = _time(params["start"]), _time(params["end"])
        step = _seconds(params["step"])
        if step is None or step <= 0 or end < start:
            return None
        ends = []
        t = start
        while t <= end:
            ends.append(t)
            t += datetime.timedelta(seconds=step)
        if len(ends) > 11000:        # Prometheus' limit of points per series
            return None
        return self._record(*parsed, ends, arrived, ranged=True)

    def _parse_query(self, text: str) -> tuple[str, tuple[str, ...], int, bool] | None:
        """(metric, scopes, range seconds, batched) of a query's text."""
        m = _SELECTOR.search(text)
        scopes = None
        if m is None:
            m = _BATCH_SELECTOR.search(text)
            if m is None or not _BATCH_BY.search(text):
                return None
            scopes = _scopes_of(_unquote(m.group(2)))
            if not scopes:
                return None
        if m.group(1) not in self._metrics:
            return None
        batched = scopes is not None
        if scopes is None:
            scopes = (m.group(2).replace('\\"', '"').replace("\\\\", "\\"),)
        return m.group(1), scopes, int(m.group(3)), batched

    def _record(self, metric: str, scopes: tuple[str, ...], seconds: int, batched: bool,
                ends: list[datetime.datetime], arrived: float,
                ranged: bool = False) -> list[Query]:
        """A Query per step end (one for an instant query), each recorded in
        ``queries`` as an attempt of each scope; ``total`` counts one."""
        length = datetime.timedelta(seconds=seconds)
        range_ends = tuple(ends) if ranged else None
        out = []
        with self.lock:
            self.total += 1
            for end in ends:
                begin = end - length
                keys = [(scope, begin.isoformat(), metric) for scope in scopes]
                for key in keys:
                    self.queries[key].append(arrived)
                out.append(Query(metric, scopes[0], begin, end, len(self.queries[keys[0]]),
                                 scopes if batched and len(scopes) > 1 else None,
                                 range_ends))
        return out

    def answer(self, query: Query) -> dict:
        """The reply to ``query`` without a fault (a fault may alter it)."""
        metric = self._metrics[query.metric]
        ts = query.end.timestamp()
        result = []
        for scope in query.scopes:
            for labels, value in self._file.fetch(metric, scope, query.begin, query.end):
                labels = dict(labels)
                labels["project_id"] = scope   # in every by (...) list
                result.append({"metric": labels, "value": [ts, value]})
        return {"status": "success", "data": {"resultType": "vector", "result": result}}

    def answer_range(self, query: Query) -> dict:
        """The reply (without a fault) to the range query of which ``query``
        is a step: each step's :meth:`answer`, as a matrix: one item per
        label set, its ``[time, value]`` pairs in step order, items sorted
        by labels (Prometheus' labels.Compare)."""
        length = query.end - query.begin
        series: dict[tuple, dict] = {}
        for end in query.range_ends or (query.end,):
            step = Query(query.metric, query.scope, end - length, end, query.attempt,
                         query.scopes if query.batched else None, query.range_ends)
            for item in self.answer(step)["data"]["result"]:
                key = tuple(sorted(item["metric"].items()))
                entry = series.setdefault(key, {"metric": item["metric"], "values": []})
                entry["values"].append(item["value"])
        result = [series[key] for key in sorted(series)]
        return {"status": "success", "data": {"resultType": "matrix", "result": result}}


def _time(text: str) -> datetime.datetime:
    """An RFC 3339 or Unix-seconds time parameter."""
    try:
        return datetime.datetime.fromtimestamp(float(text), datetime.UTC)
    except ValueError:
        return datetime.datetime.fromisoformat(text)


_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> float | None:
    """A step parameter (seconds, or a duration such as ``3600s``/``1h``)."""
    try:
        return float(text)
    except ValueError:
        pass
    m = _DURATION.fullmatch(text)
    return int(m.group(1)) * _UNITS[m.group(2)] if m else None
