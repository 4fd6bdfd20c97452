"""Rated points in Elasticsearch or OpenSearch, CloudKitty's v2 layout.

The shared base of ``storage/elasticsearch.py`` and ``storage/opensearch.py``:
documents, mapping, queries and bulk writes as CloudKitty 25.0.0's drivers
(``cloudkitty/storage/v2/{elasticsearch,opensearch}/``) lay them out, so that
cloudkitty-api's ``/v2/summary``, ``/v2/dataframes`` and v1 reports read them.

* One document per rated point, in the index ``index_name``::

    {"start": "<UTC isoformat>", "end": "…", "type": "<usage type>",
     "unit": "…", "description": null, "qty": <float>, "price": <float>,
     "groupby": {…}, "metadata": {…}}

  (``description`` on Elasticsearch only, as CloudKitty's OpenSearch driver
  omits it). The groupby holds the scope key set to the frame's scope (the
  collectors put it there; reads and deletes find a scope's points by it).
* Mapping (``init``, when the index does not exist: ``PUT /<index>`` with
  it): ``dynamic: false``; ``start``/``end`` date, ``type``/``unit``
  keyword, ``qty``/``price`` double, ``groupby``/``metadata`` dynamic
  objects whose strings are keywords. Each store says what it does with an
  index that already exists.
* Writes: ``POST /<index>/_bulk`` (NDJSON, ``write_batch_size`` documents a
  request), action ``{"index": {"_id": …}}`` with a deterministic id
  (:func:`doc_id`), so a period written again replaces its documents where
  CloudKitty's auto ids would duplicate them. A reply with ``errors`` raises
  StorageError naming the first refused document.
* Reads and deletes first ``POST /<index>/_refresh`` (every acknowledged
  write becomes searchable; writes never ask for a refresh), then filter on
  ``groupby.<scope_key>`` and the ``start`` range: ``_search`` through a
  scroll (``scroll_duration``), ``_delete_by_query``. CloudKitty's deletes
  ignore the scope filter (they delete every scope's points in the range):
  these don't.

States, periods and tasks stay in SQL (``storage/external.py``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

from oslo_config import cfg

from cloudkitty_proc import http, utils
from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.exceptions import ConfigError, StorageError
from cloudkitty_proc.storage.base import RatedRow
from cloudkitty_proc.storage.points import PointStore, as_float, describe_scopes, from_float
from cloudkitty_proc.storage.search_mapping import MAPPING, mapping_problem

__all__ = ["SEARCH_PAGE", "SearchPointStore", "doc_id", "search_opts"]

LOG = logging.getLogger(__name__)

#: documents asked for per search (scroll) page
SEARCH_PAGE = 5000

#: what Elasticsearch and OpenSearch refuse in an index name
_BAD_INDEX = re.compile(r'[\\/*?"<>|,#:\s]')


def search_opts(product: str) -> list[cfg.Opt]:
    """The options of ``[storage_elasticsearch]`` / ``[storage_opensearch]``:
    CloudKitty's, then two of cloudkitty_proc's own."""
    return [
        cfg.StrOpt("host", default="http://localhost:9200",
                   help=f"{product} URL: protocol, host, port and an optional path "
                   "prefix; credentials may be given as http://user:password@host."),
        cfg.StrOpt("index_name", default="cloudkitty", help=f"{product} index of the "
                   "rated points."),
        cfg.BoolOpt("insecure", default=False,
                    help=f"Do not verify {product}'s TLS certificate."),
        cfg.StrOpt("cafile", help=f"CA bundle trusted for HTTPS to {product}."),
        cfg.IntOpt("scroll_duration", default=30, min=0, max=300, advanced=True,
                   help="Seconds a search (scroll) context is kept alive between two "
                   "pages of a read (0 counts as 1; CloudKitty's driver ignores "
                   "this option and keeps 60)."),
        cfg.BoolOpt("use_datastream", default=False,
                    help="Not supported: the points need an index whose documents can "
                    "be replaced by id. True is refused at start."),
        cfg.FloatOpt("timeout", default=60, min=0,
                     help=f"Seconds a request to {product} may take (cloudkitty_proc "
                     "only; CloudKitty's driver has no timeout)."),
        cfg.IntOpt("write_batch_size", default=5000, min=1,
                   help="Documents per bulk request (cloudkitty_proc only; CloudKitty's "
                   "driver sends 5000)."),
    ]


def _default(value: Any) -> Any:
    """JSON for what CloudKitty's encoder handles: Decimal, datetime."""
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    try:
        return as_float(value)
    except (TypeError, ValueError, ArithmeticError):
        raise TypeError(f"not JSON serializable: {type(value).__name__}") from None


def _iso(dt: datetime.datetime) -> str:
    """UTC isoformat with ``+00:00`` (a naive datetime means UTC)."""
    return utils.isoformat(utils.from_db(dt))


def doc_id(scope_id: str, start: datetime.datetime, usage_type: str,
           groupby: dict[str, Any], repeat: int = 0) -> str:
    """The ``_id`` of a point: the SHA-256 (hex) of the canonical JSON of
    ``[scope_id, start isoformat (UTC), usage_type, groupby]``, with
    ``repeat`` appended when > 0 (the n-th other point of the frame with
    the same type and groupby, so that none overwrites another)."""
    key: list[Any] = [scope_id, _iso(start), usage_type, groupby]
    if repeat:
        key.append(repeat)
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _error_detail(body: bytes) -> str:
    """``type: reason`` of an Elasticsearch error reply, else its start."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            return f"{error.get('type', 'error')}: {error.get('reason', '')}".strip()
        if isinstance(error, str):
            return error
        failures = data.get("failures")
        if isinstance(failures, list) and failures and isinstance(failures[0], dict):
            cause = failures[0].get("cause") or failures[0]
            if isinstance(cause, dict):
                return f"{cause.get('type', 'failure')}: {cause.get('reason', '')}".strip()
    return body[:300].decode("utf-8", "replace").strip().replace("\n", " ")


class SearchPointStore(PointStore):
    """Rated points in an Elasticsearch or OpenSearch index (see the module
    docstring). Subclasses set the class attributes below."""

    #: the option group
    group = ""
    #: the group's options (``search_opts``)
    opts: list[cfg.Opt] = []
    #: whether documents carry ``description`` (None)
    with_description = True
    #: appended to ``groupby.<scope_key>`` in queries
    keyword_suffix = ""
    #: the mapping an index is created with
    mapping: dict[str, Any] = MAPPING

    def __init__(self, conf: cfg.ConfigOpts | None, scope_key: str, **options: Any) -> None:
        super().__init__(conf, scope_key)
        group = getattr(conf, self.group) if conf is not None else None
        values = {opt.dest: getattr(group, opt.dest) if group is not None else opt.default
                  for opt in self.opts}
        unknown = set(options) - set(values)
        if unknown:
            raise TypeError(f"unknown [{self.group}] options: {', '.join(sorted(unknown))}")
        values.update(options)
        self.options = values
        if values["use_datastream"]:
            raise ConfigError(f"[{self.group}] use_datastream = True: data streams are not "
                              "supported (the points need an index whose documents can be "
                              "replaced by id); set it to False")
        index = values["index_name"] or ""
        index = index.strip("/")
        if (not index or index != index.lower() or _BAD_INDEX.search(index)
                or index.startswith(("-", "_", "+")) or index in (".", "..")):
            raise ConfigError(f"[{self.group}] index_name {values['index_name']!r}: not a "
                              f"valid {self.name} index name (lowercase, no spaces nor "
                              '\\ / * ? " < > | , # :)')
        self.index = index
        self.index_path = "/" + urllib.parse.quote(index, safe="")
        self.batch_size = values["write_batch_size"]
        self.scroll = f"{max(1, values['scroll_duration'])}s"
        self.scope_field = f"groupby.{scope_key}{self.keyword_suffix}"

    def _make_transport(self) -> http.Transport:
        o = self.options
        try:
            return http.Transport(o["host"] or "", option=f"[{self.group}] host",
                                  green=self.green, timeout=o["timeout"], cafile=o["cafile"],
                                  insecure=o["insecure"])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    # -- requests -------------------------------------------------------------
    def call(self, what: str, method: str, path: str, body: Any = None, *,
             params: dict[str, str] | None = None, ok: Sequence[int] = (200,),
             ndjson: bool = False) -> tuple[int, Any]:
        """One request with a JSON (or NDJSON text) body; (status, decoded
        reply). StorageError naming ``what``, the status and the error's
        type and reason unless the status is in ``ok``."""
        headers = None
        data = None
        if body is not None:
            data = body if ndjson else json.dumps(body, separators=(",", ":"))
            headers = {"Content-Type": "application/x-ndjson" if ndjson
                       else "application/json"}
        reply = self.request(what, method, path, params=params, body=data, headers=headers,
                             ok=range(100, 600))
        if reply.status not in ok:
            raise StorageError(f"{self.name} at {self.transport.safe_url}: {what}: HTTP "
                               f"{reply.status} {reply.reason}: {_error_detail(reply.body)}")
        if method == "HEAD" or not reply.body:
            return reply.status, None
        try:
            return reply.status, json.loads(reply.body)
        except ValueError:
            raise StorageError(f"{self.name} at {self.transport.safe_url}: {what}: the reply "
                               "is not JSON") from None

    def fail(self, what: str, detail: str) -> StorageError:
        return StorageError(f"{self.name} at {self.transport.safe_url}: {what}: {detail}")

    # -- the index --------------------------------------------------------------
    def initialized(self) -> bool:
        status, _ = self.call(f"checking index {self.index}", "HEAD", self.index_path,
                              ok=(200, 404))
        return status == 200

    def init(self) -> None:
        """Create the index with the mapping, or ``init_existing`` when it
        exists (another process may create it at the same time)."""
        if not self.initialized():
            status, reply = self.call(f"creating index {self.index}", "PUT", self.index_path,
                                      {"mappings": self.mapping}, ok=(200, 400))
            if status == 200:
                LOG.info("%s: created index %s", self.name, self.index)
                return
            detail = _error_detail(json.dumps(reply).encode())
            if not detail.startswith("resource_already_exists_exception"):
                raise self.fail(f"creating index {self.index}", f"HTTP 400: {detail}")
        self.init_existing()

    def init_existing(self) -> None:
        """What ``init`` does to an index that exists (subclasses), then
        ``check_mapping``."""
        self.check_mapping()

    def check_mapping(self) -> None:
        """StorageError unless the index's mapping lets the term query on
        the scope find the scope's points exactly."""
        what = f"checking the mapping of index {self.index}"
        _, reply = self.call(what, "GET", f"{self.index_path}/_mapping")
        if not isinstance(reply, dict) or not reply:
            raise self.fail(what, "not a mapping reply")
        for index, body in sorted(reply.items()):
            mappings = body.get("mappings") if isinstance(body, dict) else None
            problem = mapping_problem(mappings if isinstance(mappings, dict) else {},
                                      self.scope_key, self.keyword_suffix)
            if problem:
                raise self.fail(what, f"index {index}: {problem}; reads and deletes of a "
                                "scope would miss points: use a new index, which `storage "
                                "init` creates with the mapping")

    def refresh(self) -> None:
        """Make every acknowledged write searchable."""
        self.call(f"refreshing index {self.index}", "POST", f"{self.index_path}/_refresh")

    # -- writing ----------------------------------------------------------------
    def documents(self, frame: DataFrame) -> Iterator[tuple[str, dict[str, Any]]]:
        """(``_id``, document) of every point of ``frame``, in CloudKitty's
        layout."""
        start, end = _iso(frame.begin), _iso(frame.end)
        scope_key, scope_id = self.scope_key, frame.scope_id
        seen: dict[str, int] = {}
        for usage_type, point in frame.iterpoints():
            groupby = dict(point.groupby)
            groupby[scope_key] = scope_id
            doc: dict[str, Any] = {"start": start, "end": end, "type": usage_type,
                                   "unit": point.unit}
            if self.with_description:
                doc["description"] = None
            doc["qty"] = as_float(point.qty)
            doc["price"] = as_float(point.price)
            doc["groupby"] = groupby
            doc["metadata"] = point.metadata
            base = doc_id(scope_id, frame.begin, usage_type, groupby)
            repeat = seen.get(base, 0)
            seen[base] = repeat + 1
            yield (doc_id(scope_id, frame.begin, usage_type, groupby, repeat)
                   if repeat else base), doc

    def write(self, frame: DataFrame) -> None:
        self.write_many([frame])

    def write_many(self, frames: Sequence[DataFrame]) -> None:
        """The frames' documents, ``write_batch_size`` a ``_bulk`` request
        whatever scope they belong to (a batched commit: one request for
        many scopes' periods)."""
        lines: list[str] = []
        ids: list[tuple[str, str, DataFrame]] = []
        for frame in frames:
            for _id, doc in self.documents(frame):
                try:
                    source = json.dumps(doc, default=_default, allow_nan=False)
                except (TypeError, ValueError) as exc:
                    raise StorageError(
                        f"{self.name}: scope {frame.scope_id}, {doc['type']} point "
                        f"{doc['groupby']}: cannot be stored: {exc}") from None
                lines.append(json.dumps({"index": {"_id": _id}}))
                lines.append(source)
                ids.append((_id, doc["type"], frame))
                if len(ids) >= self.batch_size:
                    self._bulk(lines, ids)
                    lines, ids = [], []
        if ids:
            self._bulk(lines, ids)

    def _bulk(self, lines: list[str], ids: list[tuple[str, str, DataFrame]]) -> None:
        """One ``_bulk`` request; ``ids``: (``_id``, type, frame) per document."""
        scopes = list(dict.fromkeys(frame.scope_id for _, _, frame in ids))
        what = f"writing {len(ids)} points of {describe_scopes(scopes)}"
        _, reply = self.call(what, "POST", f"{self.index_path}/_bulk",
                             "\n".join(lines) + "\n", ndjson=True)
        items = reply.get("items") if isinstance(reply, dict) else None
        if not isinstance(items, list) or len(items) != len(ids):
            raise self.fail(what, "not a bulk reply (no item per document)")
        if not reply.get("errors"):
            return
        refused = [(n, item) for n, item in enumerate(items)
                   if isinstance(item, dict) and "error" in next(iter(item.values()), {})]
        if not refused:
            raise self.fail(what, "the reply says errors but no item has one")
        n, item = refused[0]
        result = next(iter(item.values()))
        error = result.get("error")
        if isinstance(error, dict):
            detail = f"{error.get('type', 'error')}: {error.get('reason', '')}"
            cause = error.get("caused_by")
            if isinstance(cause, dict) and cause.get("reason"):
                detail += f" ({cause.get('type', '')}: {cause['reason']})"
        else:
            detail = str(error)
        _id, usage_type, frame = ids[n]
        scope = f"scope {frame.scope_id}, " if len(scopes) > 1 else ""
        raise self.fail(what, f"{len(refused)} refused, the first: document {_id} ({scope}type "
                        f"{usage_type}, period {_iso(frame.begin)}): HTTP "
                        f"{result.get('status', '?')} {detail}")

    # -- queries ------------------------------------------------------------------
    def query(self, scope_id: str, begin: datetime.datetime,
              end: datetime.datetime | None) -> dict[str, Any]:
        """The scope's points whose period starts in [begin, end)."""
        starts = {"gte": _iso(begin)}
        if end is not None:
            starts["lt"] = _iso(end)
        return {"bool": {"filter": [{"term": {self.scope_field: scope_id}},
                                    {"range": {"start": starts}}]}}

    def delete(self, scope_id: str, begin: datetime.datetime,
               end: datetime.datetime | None) -> None:
        what = f"deleting the points of scope {scope_id}"
        self.refresh()
        self._delete_by_query(what, self.query(scope_id, begin, end))

    def _delete_by_query(self, what: str, query: dict[str, Any]) -> None:
        _, reply = self.call(what, "POST", f"{self.index_path}/_delete_by_query",
                             {"query": query})
        if not isinstance(reply, dict):
            raise self.fail(what, "not a delete-by-query reply")
        if reply.get("failures") or reply.get("timed_out"):
            detail = _error_detail(json.dumps(reply).encode()) if reply.get("failures") \
                else "timed out"
            raise self.fail(what, f"{reply.get('deleted', 0)} deleted, then {detail}")

    def delete_from(self, scope_ids: Sequence[str], begin: datetime.datetime) -> None:
        """One ``_delete_by_query`` for the scopes (a ``terms`` filter)."""
        if len(scope_ids) == 1:
            self.delete(scope_ids[0], begin, None)
            return
        what = f"deleting the points of {describe_scopes(scope_ids)}"
        self.refresh()
        query = {"bool": {"filter": [{"terms": {self.scope_field: list(scope_ids)}},
                                     {"range": {"start": {"gte": _iso(begin)}}}]}}
        self._delete_by_query(what, query)

    def read(self, scope_id: str, begin: datetime.datetime,
             end: datetime.datetime) -> list[RatedRow]:
        what = f"reading the points of scope {scope_id}"
        self.refresh()
        size = SEARCH_PAGE
        body = {"size": size, "query": self.query(scope_id, begin, end),
                "sort": [{"start": {"order": "asc"}}, "_doc"]}
        _, reply = self.call(what, "POST", f"{self.index_path}/_search", body,
                             params={"scroll": self.scroll})
        rows: list[RatedRow] = []
        scroll_ids: set[str] = set()
        try:
            while True:
                if not isinstance(reply, dict) or not isinstance(reply.get("hits"), dict):
                    raise self.fail(what, "not a search reply")
                scroll_id = reply.get("_scroll_id")
                if scroll_id:
                    scroll_ids.add(scroll_id)
                hits = reply["hits"].get("hits") or []
                for hit in hits:
                    rows.append(self._row(scope_id, hit, what))
                total = _total(reply["hits"].get("total"))
                if not hits or (total is not None and len(rows) >= total):
                    break
                if not scroll_id:
                    raise self.fail(what, "a search reply without a scroll id")
                _, reply = self.call(what, "POST", "/_search/scroll",
                                     {"scroll": self.scroll, "scroll_id": scroll_id})
        finally:
            if scroll_ids:
                self._clear_scroll(sorted(scroll_ids))
        return rows

    def _clear_scroll(self, scroll_ids: list[str]) -> None:
        """Free the search contexts now rather than after scroll_duration."""
        try:
            self.call("clearing a scroll", "DELETE", "/_search/scroll",
                      {"scroll_id": scroll_ids}, ok=(200, 404))
        except StorageError as exc:
            LOG.debug("%s", exc)

    def _row(self, scope_id: str, hit: Any, what: str) -> RatedRow:
        source = hit.get("_source") if isinstance(hit, dict) else None
        try:
            return RatedRow(
                scope_id, utils.parse_time(source["start"]), utils.parse_time(source["end"]),
                source["type"], source.get("unit") or "", from_float(source["qty"]),
                from_float(source["price"]), dict(source.get("groupby") or {}),
                dict(source.get("metadata") or {}))
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            _id = hit.get("_id") if isinstance(hit, dict) else None
            raise self.fail(what, f"document {_id} is not a rated point "
                            f"({type(exc).__name__}: {exc})") from None


def _total(total: Any) -> int | None:
    """The exact number of hits of a search reply, if it says it."""
    if isinstance(total, int) and not isinstance(total, bool):
        return total
    if isinstance(total, dict) and total.get("relation") == "eq":
        value = total.get("value")
        return value if isinstance(value, int) else None
    return None
