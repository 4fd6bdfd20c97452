"""A fake Elasticsearch / OpenSearch for the tests: one threaded HTTP/1.1 server.

It implements what the point stores of ``cloudkitty_proc/storage/search.py``
send, and refuses (HTTP 400, as the real servers refuse a malformed
request) any other endpoint, query clause, body key or bulk action, so
that a store cannot silently send something else:

* ``HEAD /<index>``; ``PUT /<index>`` with ``{"mappings": …}``;
  ``GET|PUT /<index>/_mapping``;
* ``POST /<index>/_bulk`` (NDJSON, actions ``{"index": {"_id": …}}``);
* ``POST /<index>/_refresh``;
* ``POST /<index>/_search[?scroll=…]`` with ``size``, ``query`` and
  ``sort``; ``POST /_search/scroll``; ``DELETE /_search/scroll``;
* ``POST /<index>/_delete_by_query`` with ``query``.

Queries: ``bool`` (``filter`` / ``must`` lists), ``term``, ``terms``, ``range``
(``gte`` ``gt`` ``lt`` ``lte``), ``match_all``; fields resolved through
the index's mapping as the servers do: a ``keyword`` matches the exact
string, a ``text`` field one of its lower-cased word tokens, a
``….keyword`` sub-field the exact string (within ``ignore_above``), an
unmapped field nothing. New groupby/metadata fields are mapped as a
dynamic object maps them (the string template, else text with a
``.keyword`` sub-field; numbers, booleans), and a value the field's type
cannot take is refused (``mapper_parsing_exception``), as the servers do.

Refresh semantics: writes go to the live documents; searches, scrolls and
deletes by query see the snapshot taken by the last ``_refresh``. A scroll
keeps the hits of its search. The index must exist before a bulk write
(the real servers would create it with the default mapping).

Hooks: ``fault(method, path) -> None | (status, body)`` answers a request
instead of the handler; ``refuse(doc) -> None | (status, error dict)``
refuses one bulk item. ``requests`` records every request as
``{"method", "path", "params", "content_type", "body"}`` (JSON decoded,
or the list of NDJSON lines decoded), unless ``record`` is set False.
"""

from __future__ import annotations

import copy
import datetime
import http.server
import itertools
import json
import re
import sys
import threading
import urllib.parse

from cloudkitty_proc.storage.search_mapping import DEFAULT_STRING, string_template

__all__ = ["FakeSearch"]


class Refused(Exception):
    """An error reply: ``status`` and ``{"error": {"type", "reason"}}``."""

    def __init__(self, status: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.body = {"error": {"root_cause": [{"type": kind, "reason": reason}],
                               "type": kind, "reason": reason}, "status": status}


def _bad(reason: str) -> Refused:
    return Refused(400, "parsing_exception", f"fake: {reason}")


def _date(value):
    if not isinstance(value, str):
        raise ValueError(f"not a date: {value!r}")
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


class Index:
    """One index: mapping, live documents, searchable snapshot."""

    def __init__(self, name: str, mappings: dict) -> None:
        self.name = name
        self.mappings = copy.deepcopy(mappings)
        self.mappings.setdefault("properties", {})
        self.live: dict[str, tuple[int, int, dict]] = {}    # id -> (seq, version, doc)
        self.visible: dict[str, tuple[int, int, dict]] = {}
        #: whether live differs from visible
        self.dirty = False
        self.seq = itertools.count()

    # -- mapping -----------------------------------------------------------
    def field(self, path: str) -> dict | None:
        node = {"properties": self.mappings["properties"]}
        parts = path.split(".")
        for n, part in enumerate(parts):
            props = node.get("properties")
            if props is not None and part in props:
                node = props[part]
            elif n == len(parts) - 1 and part in (node.get("fields") or {}):
                return node["fields"][part]
            else:
                return None
        return node

    def map_value(self, path: str, obj: dict, value) -> None:
        """Map ``obj[leaf]`` (under dynamic object ``obj``) and check ``value``."""
        leaf = path.rsplit(".", 1)[-1]
        props = obj.setdefault("properties", {})
        field = props.get(leaf)
        if field is None:
            if isinstance(value, bool):
                field = {"type": "boolean"}
            elif isinstance(value, int):
                field = {"type": "long"}
            elif isinstance(value, float):
                field = {"type": "float"}
            elif isinstance(value, str):
                field = copy.deepcopy(string_template(self.mappings, path) or DEFAULT_STRING)
            elif value is None:
                return
            else:
                field = {"type": "object"}
            props[leaf] = field
        _check(path, field, value)

    def index(self, doc: dict) -> None:
        """Check ``doc`` against the mapping (raises Refused), mapping new
        groupby/metadata fields."""
        if not isinstance(doc, dict):
            raise Refused(400, "mapper_parsing_exception", "not an object")
        props = self.mappings["properties"]
        for key, value in doc.items():
            field = props.get(key)
            if field is None and value is not None and str(
                    self.mappings.get("dynamic", True)).lower() == "true":
                # a dynamic root: objects stay dynamic, date strings are dates
                if isinstance(value, dict):
                    field = props[key] = {"dynamic": True, "properties": {}}
                elif isinstance(value, str) and _is_date(value):
                    field = props[key] = {"type": "date"}
                else:
                    self.map_value(key, self.mappings, value)
                    continue
            if field is None:
                continue   # dynamic: false
            if field.get("type", "object") == "object":
                if value is None:
                    continue
                if not isinstance(value, dict):
                    raise Refused(400, "mapper_parsing_exception",
                                  f"object mapping for [{key}] tried to parse a value")
                for leaf, leaf_value in value.items():
                    if field.get("dynamic") in (True, "true"):
                        self.map_value(f"{key}.{leaf}", field, leaf_value)
            else:
                _check(key, field, value)


def _is_date(value: str) -> bool:
    try:
        _date(value)
    except ValueError:
        return False
    return True


def _check(path: str, field: dict, value) -> None:
    kind = field.get("type")
    if value is None:
        return
    try:
        if kind in ("long", "float", "double"):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(value)
            number = float(value)
            if kind == "long" and number != int(number):
                raise ValueError(value)
        elif kind == "date":
            _date(value)
        elif kind == "boolean" and not isinstance(value, bool) and value not in ("true",
                                                                                 "false"):
            raise ValueError(value)
        elif kind in ("keyword", "text") and isinstance(value, (dict, list)):
            raise ValueError(value)
    except (ValueError, OverflowError):
        raise Refused(400, "mapper_parsing_exception",
                      f"failed to parse field [{path}] of type [{kind}]") from None


def _get(doc: dict, path: str):
    """The value at ``path`` of a document, a ``.keyword`` sub-field read as
    its parent's value."""
    value = doc
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif part == "keyword" and not isinstance(value, dict):
            return value
        else:
            return None
    return value


def _as_string(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class FakeSearch:
    """The fake server (see the module docstring); a context manager."""

    def __init__(self) -> None:
        self.indices: dict[str, Index] = {}
        self.scrolls: dict[str, list] = {}
        self.requests: list[dict] = []
        #: whether requests are recorded (the memory of a long test stays flat without)
        self.record = True
        self.fault = lambda method, path: None
        self.refuse = lambda doc: None
        self.lock = threading.RLock()
        self._ids = itertools.count(1)
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _handle(self):
                parts = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, body = fake.handle(self.command, parts.path,
                                           dict(urllib.parse.parse_qsl(parts.query)),
                                           self.headers.get("Content-Type"), raw)
                data = (b"" if body is None else body if isinstance(body, bytes)
                        else json.dumps(body).encode())
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], OSError):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True, name="fake-search")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # -- helpers for tests ---------------------------------------------------
    def docs(self, index: str = "cloudkitty") -> dict[str, dict]:
        """The live documents of ``index``: ``{_id: source}``."""
        with self.lock:
            return {i: d for i, (_s, _v, d) in self.indices[index].live.items()}

    def of(self, method: str, suffix: str) -> list[dict]:
        """The recorded requests of ``method`` whose path ends with ``suffix``."""
        return [r for r in self.requests if r["method"] == method
                and r["path"].endswith(suffix)]

    # -- dispatch --------------------------------------------------------------
    def handle(self, method: str, path: str, params: dict, ctype: str | None,
               raw: bytes) -> tuple[int, dict | None]:
        with self.lock:
            try:
                body = self._decode(path, ctype, raw)
                if self.record:
                    self.requests.append({"method": method, "path": path, "params": params,
                                          "content_type": ctype, "body": body})
                answer = self.fault(method, path)
                if answer is not None:
                    return answer
                return self._route(method, path, params, body)
            except Refused as exc:
                return exc.status, exc.body

    @staticmethod
    def _decode(path: str, ctype: str | None, raw: bytes):
        if not raw:
            return None
        kind = (ctype or "").split(";")[0].strip()
        if kind not in ("application/json", "application/x-ndjson"):
            raise Refused(406, "content_type", f"Content-Type header [{ctype}] is not "
                          "supported")
        try:
            if path.endswith("/_bulk"):
                text = raw.decode("utf-8")
                if not text.endswith("\n"):
                    raise _bad("the bulk request must be terminated by a newline")
                return [json.loads(line) for line in text.split("\n")[:-1]]
            return json.loads(raw)
        except ValueError as exc:
            raise _bad(f"not JSON: {exc}") from None

    def _route(self, method: str, path: str, params: dict, body):
        parts = path.strip("/").split("/")
        if parts[:2] == ["_search", "scroll"] and len(parts) == 2:
            if method == "POST":
                return self._scroll(body)
            if method == "DELETE":
                return self._clear(body)
        elif len(parts) == 1 and not parts[0].startswith("_"):
            if method == "HEAD":
                return (200 if parts[0] in self.indices else 404), None
            if method == "PUT":
                return self._create(parts[0], params, body)
        elif len(parts) == 2:
            index = self.indices.get(parts[0])
            op = (method, parts[1])
            known = {("GET", "_mapping"), ("PUT", "_mapping"), ("POST", "_bulk"),
                     ("POST", "_refresh"), ("POST", "_search"),
                     ("POST", "_delete_by_query")}
            if op in known:
                if index is None:
                    raise Refused(404, "index_not_found_exception",
                                  f"no such index [{parts[0]}]")
                handler = getattr(self, "_" + parts[1].lstrip("_"))
                return handler(index, method, params, body)
        raise _bad(f"no handler for {method} {path}")

    # -- indices -----------------------------------------------------------------
    def _create(self, name: str, params: dict, body):
        if params or not isinstance(body, dict) or set(body) != {"mappings"}:
            raise _bad(f"index creation takes {{'mappings': …}} only, not {body} {params}")
        if name in self.indices:
            raise Refused(400, "resource_already_exists_exception",
                          f"index [{name}/x] already exists")
        self.indices[name] = Index(name, body["mappings"])
        return 200, {"acknowledged": True, "shards_acknowledged": True, "index": name}

    def _mapping(self, index: Index, method: str, params: dict, body):
        if method == "GET":
            return 200, {index.name: {"mappings": index.mappings}}
        if params or not isinstance(body, dict):
            raise _bad(f"a mapping update takes a mapping, not {body} {params}")
        for key, new in (body.get("properties") or {}).items():
            old = index.mappings["properties"].get(key)
            if old is not None and old.get("type", "object") != new.get("type", "object"):
                raise Refused(400, "illegal_argument_exception",
                              f"mapper [{key}] cannot be changed from type "
                              f"[{old.get('type')}] to [{new.get('type')}]")
            if old is None:
                index.mappings["properties"][key] = copy.deepcopy(new)
        for key in ("dynamic", "dynamic_templates"):
            if key in body:
                index.mappings[key] = copy.deepcopy(body[key])
        return 200, {"acknowledged": True}

    def _refresh(self, index: Index, method: str, params: dict, body):
        if index.dirty:
            index.visible = dict(index.live)
            index.dirty = False
        return 200, {"_shards": {"total": 1, "successful": 1, "failed": 0}}

    # -- writes --------------------------------------------------------------------
    def _bulk(self, index: Index, method: str, params: dict, lines):
        if params or not isinstance(lines, list) or len(lines) % 2:
            raise _bad(f"bulk: params {params}, or not action/document pairs")
        items, errors = [], False
        for action, doc in zip(lines[::2], lines[1::2]):
            if (not isinstance(action, dict) or list(action) != ["index"]
                    or not isinstance(action["index"], dict)
                    or set(action["index"]) != {"_id"}
                    or not isinstance(action["index"]["_id"], str)):
                raise _bad(f"bulk action {action}: only {{'index': {{'_id': …}}}}")
            _id = action["index"]["_id"]
            try:
                refused = self.refuse(doc)
                if refused is not None:
                    raise Refused(refused[0], refused[1]["type"], refused[1]["reason"])
                index.index(doc)
            except Refused as exc:
                errors = True
                items.append({"index": {"_index": index.name, "_id": _id,
                                        "status": exc.status, "error": exc.body["error"]}})
                continue
            old = index.live.get(_id)
            version = old[1] + 1 if old else 1
            index.live[_id] = (next(index.seq), version, doc)
            index.dirty = True
            items.append({"index": {"_index": index.name, "_id": _id, "_version": version,
                                    "result": "updated" if old else "created",
                                    "status": 200 if old else 201}})
        return 200, {"took": 1, "errors": errors, "items": items}

    def _delete_by_query(self, index: Index, method: str, params: dict, body):
        if params or not isinstance(body, dict) or set(body) != {"query"}:
            raise _bad(f"delete by query takes {{'query': …}} only, not {body} {params}")
        match = self._matcher(index, body["query"])
        deleted, failures = 0, []
        for _id, entry in list(index.visible.items()):
            if not match(entry[2]):
                continue
            live = index.live.get(_id)
            if live is entry:
                del index.live[_id]
                deleted += 1
            elif live is not None:   # written again since the refresh: abort
                failures.append({"index": index.name, "id": _id, "status": 409, "cause": {
                    "type": "version_conflict_engine_exception",
                    "reason": f"[{_id}]: version conflict, current version [{live[1]}] is "
                              f"different than the one provided [{entry[1]}]"}})
                break
            del index.visible[_id]   # a delete by query refreshes
        return (409 if failures else 200), {
            "took": 1, "timed_out": False, "total": deleted + len(failures),
            "deleted": deleted, "batches": 1, "version_conflicts": len(failures), "noops": 0,
            "failures": failures}

    # -- searches ------------------------------------------------------------------
    def _search(self, index: Index, method: str, params: dict, body):
        if set(params) - {"scroll"} or not isinstance(body, dict) or set(body) - {
                "size", "query", "sort"}:
            raise _bad(f"search: params {params}, body {body}")
        size = body.get("size", 10)
        if not isinstance(size, int) or not 0 <= size <= 10000:
            raise _bad(f"size {size!r}")
        match = self._matcher(index, body.get("query", {"match_all": {}}))
        hits = [(_id, entry) for _id, entry in index.visible.items() if match(entry[2])]
        hits.sort(key=self._sort_key(index, body.get("sort", ["_doc"])))
        docs = [{"_index": index.name, "_id": _id, "_score": None, "_source": entry[2]}
                for _id, entry in hits]
        total = {"value": len(docs), "relation": "eq"}
        reply = {"took": 1, "timed_out": False, "hits": {"total": total,
                                                         "max_score": None,
                                                         "hits": docs[:size]}}
        if "scroll" in params:
            if not re.fullmatch(r"\d+[smh]", params["scroll"]):
                raise _bad(f"scroll {params['scroll']!r}")
            scroll_id = f"scroll-{next(self._ids)}"
            self.scrolls[scroll_id] = [docs[size:], size, total]
            reply["_scroll_id"] = scroll_id
        return 200, reply

    def _scroll(self, body):
        if not isinstance(body, dict) or set(body) - {"scroll", "scroll_id"}:
            raise _bad(f"scroll body {body}")
        state = self.scrolls.get(body.get("scroll_id"))
        if state is None:
            raise Refused(404, "search_context_missing_exception",
                          f"No search context found for id [{body.get('scroll_id')}]")
        rest, size, total = state
        state[0] = rest[size:]
        return 200, {"_scroll_id": body["scroll_id"], "took": 1, "timed_out": False,
                     "hits": {"total": total, "max_score": None, "hits": rest[:size]}}

    def _clear(self, body):
        if not isinstance(body, dict) or set(body) != {"scroll_id"}:
            raise _bad(f"clear scroll body {body}")
        ids = body["scroll_id"] if isinstance(body["scroll_id"], list) else [body["scroll_id"]]
        freed = sum(1 for i in ids if self.scrolls.pop(i, None) is not None)
        return (200 if freed else 404), {"succeeded": True, "num_freed": freed}

    def _sort_key(self, index: Index, sort):
        if not isinstance(sort, list):
            raise _bad(f"sort {sort!r}")
        keys = []
        for item in sort:
            if item == "_doc":
                keys.append(lambda entry: entry[1][0])
                continue
            if not isinstance(item, dict) or len(item) != 1:
                raise _bad(f"sort clause {item!r}")
            [(path, order)] = item.items()
            if isinstance(order, dict) and set(order) == {"order"}:
                order = order["order"]
            field = index.field(path)
            if order != "asc" or field is None or field.get("type") not in (
                    "date", "keyword", "long", "double", "float"):
                raise _bad(f"sort clause {item!r} (asc on a mapped date, keyword or number)")
            convert = _date if field["type"] == "date" else (lambda v: v)
            keys.append(lambda entry, path=path, convert=convert: convert(
                _get(entry[1][2], path)))
        return lambda entry: tuple(key(entry) for key in keys)

    def _matcher(self, index: Index, query):
        """A predicate on documents for ``query`` (Refused if not understood)."""
        if not isinstance(query, dict) or len(query) != 1:
            raise _bad(f"query {query!r}")
        [(kind, spec)] = query.items()
        if kind == "match_all" and spec == {}:
            return lambda doc: True
        if kind == "bool" and isinstance(spec, dict) and spec and set(spec) <= {"filter",
                                                                                 "must"}:
            clauses = [self._matcher(index, q) for key in ("filter", "must")
                       for q in (spec.get(key) or [])]
            return lambda doc: all(c(doc) for c in clauses)
        if kind == "terms" and isinstance(spec, dict) and len(spec) == 1:
            [(path, values)] = spec.items()
            if not isinstance(values, list):
                raise _bad(f"terms {spec!r}")
            field = index.field(path)
            return lambda doc: any(_term(field, _get(doc, path), v) for v in values)
        if kind in ("term", "range") and isinstance(spec, dict) and len(spec) == 1:
            [(path, value)] = spec.items()
            field = index.field(path)
            if kind == "term":
                if isinstance(value, dict):
                    if set(value) != {"value"}:
                        raise _bad(f"term {spec!r}")
                    value = value["value"]
                return lambda doc: _term(field, _get(doc, path), value)
            if not isinstance(value, dict) or not value or set(value) - {"gte", "gt",
                                                                        "lt", "lte"}:
                raise _bad(f"range {spec!r}")
            return lambda doc: _in_range(field, _get(doc, path), value)
        raise _bad(f"unknown query [{kind}]: {spec!r}")


def _term(field: dict | None, stored, value) -> bool:
    if field is None or stored is None:
        return False
    kind = field.get("type")
    if kind == "keyword":
        text = _as_string(stored)
        limit = field.get("ignore_above")
        return (limit is None or len(text) <= limit) and text == _as_string(value)
    if kind == "text":
        return str(value) in re.findall(r"\w+", str(stored).lower())
    if kind in ("long", "float", "double"):
        return float(stored) == float(value)
    return _as_string(stored) == _as_string(value)


def _in_range(field: dict | None, stored, bounds: dict) -> bool:
    if field is None or stored is None:
        return False
    convert = _date if field.get("type") == "date" else float
    value = convert(stored)
    ops = {"gte": value.__ge__, "gt": value.__gt__, "lt": value.__lt__, "lte": value.__le__}
    return all(ops[op](convert(bound)) for op, bound in bounds.items())
