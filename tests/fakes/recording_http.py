"""A loopback HTTP/1.1 server that records every request and answers from
canned replies: the stand-in for InfluxDB 1.x, Elasticsearch and OpenSearch
when we compare what clients send.

Standard library only and no project imports: ``tools/ck_golden_driver.py``
loads this file by path inside CloudKitty's virtualenv, and our tests import
it as ``tests.fakes.recording_http``; both record through the same code.

::

    with RecordingServer() as server:       # 127.0.0.1, a free port, a thread
        influxdb_routes(server, "cloudkitty")
        ...                                 # a client talks to server.url
        for request in server.take():       # recorded, in arrival order
            describe(request)               # a JSON-able dict (see below)

Replies: ``server.route(method, pattern, reply)`` where ``pattern`` is a
regular expression matched against the whole path (no query) and ``reply``
a :class:`Reply` or a callable ``(Request) -> Reply``. The route added last
wins, so a caller overrides a preset by adding its own after it. A request
no route matches is recorded and answered 404 (so a client calling
something unexpected fails loudly rather than proceeding on a guess).

Presets: :func:`influxdb_routes` (``/ping``, ``/write`` 204, ``/query``:
``SHOW RETENTION POLICIES``, ``SHOW DATABASES``, anything else an empty
result) and :func:`search_routes` (Elasticsearch / OpenSearch: ``/``
version, index ``HEAD``/``GET``/``PUT``/``DELETE``, ``_mapping``,
``_bulk`` answering one item per action with ``"errors": false``,
``_search``, ``_search/scroll``, ``_delete_by_query``, ``_refresh``,
``POST /<index>/_doc``). The search preset keeps the index's mapping as a
server does: ``PUT /<index>`` with ``{"mappings": …}`` sets it, ``PUT
/<index>/_mapping`` merges into it (a changed field type is refused, 400),
``GET /<index>`` and ``GET /<index>/_mapping`` answer with it as the
servers render it (``dynamic`` as a string, ``"type": "object"`` only on
an object without properties); documents do not change it.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any, Union

__all__ = ["Reply", "Request", "RecordingServer", "describe", "influxdb_routes",
           "json_reply", "search_routes"]

#: the request headers recorded (lower case); others (User-Agent, Host,
#: Accept-Encoding, Connection, ...) are client noise
HEADERS = ("content-type", "content-encoding", "authorization", "accept")


@dataclasses.dataclass
class Request:
    """One recorded request."""
    method: str
    path: str                       # unquoted, without the query
    query: dict[str, list[str]]     # every value, blank ones too
    headers: dict[str, str]         # names in lower case, HEADERS only
    body: bytes


@dataclasses.dataclass
class Reply:
    """A canned reply."""
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


Responder = Union[Reply, Callable[[Request], Reply]]


def json_reply(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    """A reply whose body is ``value`` as JSON."""
    return Reply(status, json.dumps(value).encode(),
                 {"Content-Type": "application/json", **(headers or {})})


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:     # noqa: A002
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        request = Request(
            self.command, urllib.parse.unquote(split.path),
            urllib.parse.parse_qs(split.query, keep_blank_values=True),
            {k.lower(): v for k, v in self.headers.items() if k.lower() in HEADERS},
            self._body())
        owner = self.server.owner
        with owner.lock:
            owner.requests.append(request)
        reply = owner.reply_for(request)
        self.send_response(reply.status)
        headers = {"Content-Length": str(len(reply.body)), **reply.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and reply.status not in (204, 304):
            self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _serve


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: RecordingServer


class RecordingServer:
    """The recording server (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self._routes: list[tuple[str, re.Pattern[str], Responder]] = []
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, method: str, pattern: str, reply: Responder) -> None:
        """Answer ``method`` (``*``: any) on paths matching ``pattern``."""
        with self.lock:
            self._routes.insert(0, (method.upper(), re.compile(pattern), reply))

    def reply_for(self, request: Request) -> Reply:
        with self.lock:
            routes = list(self._routes)
        for method, pattern, reply in routes:
            if method in ("*", request.method) and pattern.fullmatch(request.path):
                return reply(request) if callable(reply) else reply
        return json_reply({"error": f"no canned reply for {request.method} {request.path}"},
                          404)

    def take(self) -> list[Request]:
        """The requests recorded since the last ``take``, in arrival order."""
        with self.lock:
            taken, self.requests = self.requests, []
        return taken

    def start(self) -> RecordingServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True,
                                        name="recording-http")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> RecordingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def describe(request: Request) -> dict[str, Any]:
    """A recorded request as a JSON-able dict: ``method``, ``path``,
    ``query``, ``headers``, ``body`` (text, or None when empty) and, when
    the body is one: ``json`` (parsed), ``ndjson`` (parsed lines), ``form``
    (an urlencoded form, as ``query``), ``lines`` (a ``/write`` body's
    line-protocol lines)."""
    text = request.body.decode("utf-8") if request.body else None
    out: dict[str, Any] = {"method": request.method, "path": request.path,
                           "query": request.query, "headers": request.headers,
                           "body": text}
    if text is None:
        return out
    content_type = request.headers.get("content-type", "")
    if request.path.endswith("/write"):
        out["lines"] = [line for line in text.split("\n") if line]
    elif content_type.startswith("application/x-www-form-urlencoded"):
        out["form"] = urllib.parse.parse_qs(text, keep_blank_values=True)
    else:
        try:
            out["json"] = json.loads(text)
        except ValueError:
            try:
                out["ndjson"] = [json.loads(line) for line in text.split("\n") if line]
            except ValueError:
                pass
    return out


# -- InfluxDB 1.x -------------------------------------------------------------

def influxdb_routes(server: RecordingServer, databases: Iterable[str] = ("cloudkitty",),
                    policies: Iterable[str] = ("autogen",)) -> None:
    """Canned InfluxDB 1.x replies: the ``databases`` exist, each with the
    retention ``policies`` (the first one the default)."""
    databases, policies = list(databases), list(policies)
    version = {"X-Influxdb-Version": "1.6.7~rc0", "X-Influxdb-Build": "OSS"}

    def query(request: Request) -> Reply:
        fields = dict(request.query)
        if request.body and request.headers.get("content-type", "").startswith(
                "application/x-www-form-urlencoded"):
            fields.update(urllib.parse.parse_qs(request.body.decode(), keep_blank_values=True))
        statement = (fields.get("q") or [""])[0].strip()
        upper = statement.upper()
        result: dict[str, Any] = {"statement_id": 0}
        if upper.startswith("SHOW RETENTION POLICIES"):
            result["series"] = [{
                "columns": ["name", "duration", "shardGroupDuration", "replicaN",
                            "default"],
                "values": [[p, "0s", "168h0m0s", 1, i == 0] for i, p in enumerate(policies)],
            }]
        elif upper.startswith("SHOW DATABASES"):
            result["series"] = [{"name": "databases", "columns": ["name"],
                                 "values": [[d] for d in databases]}]
        return json_reply({"results": [result]}, headers=version)

    server.route("*", r"/ping", Reply(204, b"", version))
    server.route("POST", r"/write", Reply(204, b"", version))
    server.route("*", r"/query", query)


# -- Elasticsearch / OpenSearch ---------------------------------------------

def _merge_mapping(old: dict[str, Any], new: dict[str, Any], path: str = "") -> str | None:
    """Merge mapping ``new`` into ``old`` as a mapping update does: fields
    added, objects merged, other settings replaced. The reason a server
    gives when a field would change type (``old`` is then half merged:
    merge into a copy), else None."""
    for key, value in new.items():
        if key != "properties":
            old[key] = json.loads(json.dumps(value))
            continue
        props = old.setdefault("properties", {})
        for name, field in (value or {}).items():
            where = f"{path}{name}"
            if name not in props:
                props[name] = json.loads(json.dumps(field))
                continue
            before = props[name].get("type", "object")
            after = field.get("type", "object")
            if before != after:
                return f"mapper [{where}] cannot be changed from type [{before}] to [{after}]"
            problem = _merge_mapping(props[name], field, f"{where}.")
            if problem:
                return problem
    return None


def _as_served(mapping: Any) -> Any:
    """A mapping as ``GET /<index>/_mapping`` renders it: ``dynamic`` as a
    string; ``"type": "object"`` left out of an object with properties."""
    if isinstance(mapping, list):
        return [_as_served(x) for x in mapping]
    if not isinstance(mapping, dict):
        return mapping
    out = {k: _as_served(v) for k, v in mapping.items()}
    if isinstance(out.get("dynamic"), bool):
        out["dynamic"] = "true" if out["dynamic"] else "false"
    if out.get("type") == "object" and out.get("properties"):
        del out["type"]
    return out


def search_routes(server: RecordingServer, index: str = "cloudkitty",
                  flavour: str = "elasticsearch", index_exists: bool = True,
                  mappings: dict[str, Any] | None = None) -> None:
    """Canned Elasticsearch (``flavour`` ``elasticsearch``, 7.17) or
    OpenSearch (``opensearch``, 2.x) replies for one index. When
    ``index_exists``, the index is there with ``mappings`` (default: none,
    as ``PUT /<index>`` without a body leaves it)."""
    if flavour == "opensearch":
        version = {"distribution": "opensearch", "number": "2.11.0",
                   "minimum_wire_compatibility_version": "7.10.0"}
    else:
        version = {"number": "7.17.0", "build_flavor": "default",
                   "minimum_wire_compatibility_version": "6.8.0"}
    state: dict[str, Any] = {"exists": index_exists,
                             "mappings": json.loads(json.dumps(mappings or {}))}
    name = re.escape(index)
    acknowledged = json_reply({"acknowledged": True})
    missing = json_reply({"error": {"type": "index_not_found_exception",
                                    "reason": f"no such index [{index}]"},
                          "status": 404}, 404)

    def root(request: Request) -> Reply:
        return json_reply({"name": "recording", "cluster_name": "recording",
                           "version": version, "tagline": "You Know, for Search"})

    def index_head(request: Request) -> Reply:
        return Reply(200 if state["exists"] else 404, b"",
                     {"Content-Type": "application/json"})

    def index_get(request: Request) -> Reply:
        if not state["exists"]:
            return missing
        return json_reply({index: {"aliases": {},
                                   "mappings": _as_served(state["mappings"]),
                                   "settings": {}}})

    def index_put(request: Request) -> Reply:
        if state["exists"]:
            return json_reply({"error": {"type": "resource_already_exists_exception",
                                         "reason": f"index [{index}] already exists"},
                               "status": 400}, 400)
        body = json.loads(request.body) if request.body else {}
        state["exists"] = True
        state["mappings"] = json.loads(json.dumps(body.get("mappings") or {}))
        return json_reply({"acknowledged": True, "shards_acknowledged": True,
                           "index": index})

    def index_delete(request: Request) -> Reply:
        state["exists"] = False
        state["mappings"] = {}
        return acknowledged

    def mapping_get(request: Request) -> Reply:
        if not state["exists"]:
            return missing
        return json_reply({index: {"mappings": _as_served(state["mappings"])}})

    def mapping_put(request: Request) -> Reply:
        if not state["exists"]:
            return missing
        typed = request.path.rstrip("/").rsplit("/", 1)[-1] != "_mapping"
        if typed and (flavour != "elasticsearch"
                      or request.query.get("include_type_name") != ["true"]):
            return json_reply({"error": {"type": "illegal_argument_exception",
                                         "reason": "Types cannot be provided in put "
                                         "mapping requests"}, "status": 400}, 400)
        merged = json.loads(json.dumps(state["mappings"]))
        problem = _merge_mapping(merged, json.loads(request.body or b"{}"))
        if problem:
            return json_reply({"error": {"type": "illegal_argument_exception",
                                         "reason": problem}, "status": 400}, 400)
        state["mappings"] = merged
        return acknowledged

    def bulk(request: Request) -> Reply:
        lines = [json.loads(x) for x in request.body.decode("utf-8").split("\n") if x]
        items, i, n = [], 0, 0
        while i < len(lines):
            action = next(iter(lines[i]))
            meta = lines[i][action] or {}
            n += 1
            status = 200 if action == "delete" else 201
            items.append({action: {"_index": meta.get("_index", index),
                                   "_id": meta.get("_id", f"auto-{n}"), "_version": 1,
                                   "result": "deleted" if action == "delete" else "created",
                                   "status": status}})
            i += 1 if action == "delete" else 2
        return json_reply({"took": 1, "errors": False, "items": items})

    def search(request: Request) -> Reply:
        return json_reply({"took": 1, "timed_out": False, "_scroll_id": "scroll-1",
                           "hits": {"total": {"value": 0, "relation": "eq"},
                                    "max_score": None, "hits": []},
                           "aggregations": {}})

    def scroll_delete(request: Request) -> Reply:
        return json_reply({"succeeded": True, "num_freed": 1})

    def delete_by_query(request: Request) -> Reply:
        return json_reply({"took": 1, "timed_out": False, "total": 0, "deleted": 0,
                           "batches": 0, "failures": []})

    def doc(request: Request) -> Reply:
        return json_reply({"_index": index, "_id": "auto-doc", "_version": 1,
                           "result": "created"}, 201)

    server.route("GET", r"/", root)
    server.route("HEAD", rf"/{name}", index_head)
    server.route("GET", rf"/{name}", index_get)
    server.route("PUT", rf"/{name}", index_put)
    server.route("DELETE", rf"/{name}", index_delete)
    server.route("PUT", rf"/{name}/_mapping(/[^/]+)?", mapping_put)
    server.route("POST", rf"/{name}/_mapping(/[^/]+)?", mapping_put)
    server.route("GET", rf"/{name}/_mapping(/[^/]+)?", mapping_get)
    server.route("POST", rf"/{name}/_doc", doc)
    server.route("*", rf"(/{name})?(/_doc)?/_bulk", bulk)
    server.route("*", rf"/{name}/_refresh", json_reply({"_shards": {"failed": 0}}))
    server.route("*", rf"/{name}/_search", search)
    server.route("*", r"/_search/scroll", search)
    server.route("DELETE", r"/_search/scroll", scroll_delete)
    server.route("POST", rf"/{name}/_delete_by_query", delete_by_query)
