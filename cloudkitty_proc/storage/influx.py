"""The ``influxdb`` storage: rated points in InfluxDB 1.x, CloudKitty's v2 layout.

Points are written as CloudKitty 25.0.0's InfluxDB driver writes them
(``cloudkitty/storage/v2/influx.py``), so cloudkitty-api's ``/v2/summary``,
``/v2/dataframes`` and the v1 reports read them unchanged:

* measurement ``dataframes``, time = the period's start (ns);
* tags: every groupby key (values as strings; empty ones dropped, as the
  ``influxdb`` client drops them), ``type`` = the usage type, and the
  scope key when the groupby lacks it (CloudKitty's collectors always put
  it there; deletes need it);
* fields: every metadata key (str, int, float, bool; None dropped), ``qty``
  and ``price`` as floats, ``unit``, ``groupby`` and ``metadata`` = their key
  lists joined by ``|``, ``__ck_collect_period`` = the period in seconds.

A point is identified by its series (measurement and tags) and time, so a
period written again replaces its points. Two points of one period with
equal tags (the same type and groupby: no collector makes them, a frame
may hold them) would be one point there: the second gets the tag
``__ck_dup=1`` (the third ``2``, …), which CloudKitty's reads ignore
(groupby is rebuilt from the ``groupby`` field) and its sums include.
Writes go in line protocol, ``[storage_influxdb] write_batch_size`` points
per request (CloudKitty's client sends 500). Deletes send UTC timestamps
with their zone (CloudKitty's send naive ones, which InfluxDB refuses: its
reprocessing never completes on InfluxDB 1.x).

States, periods and tasks stay in SQL (``storage/external.py``). InfluxDB 2
(``version = 2``) is not supported: refused at start.
"""

from __future__ import annotations

import datetime
import functools
import json
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any

from oslo_config import cfg

from cloudkitty_proc import http
from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.exceptions import ConfigError, StorageError
from cloudkitty_proc.storage.base import RatedRow
from cloudkitty_proc.storage.external import ExternalStorage
from cloudkitty_proc.storage.points import (PointStore, describe_scopes, from_float,
                                           period_seconds)

__all__ = ["InfluxPointStore", "InfluxStorage", "OPTS", "line", "rfc3339"]

GROUP = "storage_influxdb"
MEASUREMENT = "dataframes"
PERIOD_FIELD = "__ck_collect_period"
#: the tag telling apart points of one period whose tags are all equal
DUP_TAG = "__ck_dup"
UTC = datetime.timezone.utc
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=UTC)

influx_opts = [
    cfg.StrOpt("host", default="localhost", help="InfluxDB host."),
    cfg.PortOpt("port", default=8086, help="InfluxDB port."),
    cfg.StrOpt("username", help="InfluxDB user name."),
    cfg.StrOpt("password", secret=True, help="InfluxDB password."),
    cfg.StrOpt("database", help="InfluxDB database (required)."),
    cfg.StrOpt("retention_policy", default="autogen",
               help="Retention policy the points are written to."),
    cfg.BoolOpt("use_ssl", default=False, help="HTTPS to InfluxDB."),
    cfg.BoolOpt("insecure", default=False,
                help="Do not verify InfluxDB's TLS certificate."),
    cfg.StrOpt("cafile", help="CA bundle trusted for HTTPS to InfluxDB."),
    cfg.IntOpt("version", default=1, min=1, max=2,
               help="InfluxDB API version; only 1 is supported."),
    cfg.FloatOpt("timeout", default=60, min=0,
                 help="Seconds a request to InfluxDB may take."),
    cfg.IntOpt("write_batch_size", default=5000, min=1,
               help="Points per write request (cloudkitty_proc only; "
               "CloudKitty's driver sends 500)."),
]

OPTS = [(GROUP, influx_opts)]


# -- line protocol (as the ``influxdb`` 5.3 client writes it) ---------------

_SPECIAL = frozenset("\\ ,=\n")
_SPECIAL_STRING = frozenset('\\"\n')

@functools.lru_cache(maxsize=65536)
def _escape_key(text: str) -> str:
    """A measurement, tag key or field key escaped (cached: keys and most
    tag values repeat from point to point)."""
    if not _SPECIAL.intersection(text):
        return text
    return (text.replace("\\", "\\\\").replace(" ", "\\ ").replace(",", "\\,")
            .replace("=", "\\=").replace("\n", "\\n"))


@functools.lru_cache(maxsize=65536)
def _escape_tag_value(text: str) -> str:
    """A tag value escaped as the client's make_line does, plus a space
    after a final backslash: InfluxDB 1.x refuses ``k=a\\\\,`` (400 "invalid
    tag format", the whole request lost) and takes ``k=a\\\\ ,``."""
    escaped = _escape_key(text)
    return escaped + " " if escaped.endswith("\\") else escaped


def _field_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value)
    if not isinstance(value, str):
        try:  # Decimal and other numbers: a float, as the client writes them
            return repr(float(value))
        except (TypeError, ValueError):
            pass
    text = str(value)
    if not _SPECIAL_STRING.intersection(text):
        return f'"{text}"'
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def line(tags: dict[str, str], fields: dict[str, Any], time_ns: int) -> str:
    """One point in line protocol: tags and fields sorted by key, empty
    tags and None fields left out."""
    tag_text = "".join(f",{_escape_key(k)}={_escape_tag_value(v)}"
                       for k, v in sorted(tags.items()) if v != "")
    field_text = ",".join(f"{_escape_key(k)}={v}" for k, v in (
        (k, _field_value(fields[k])) for k in sorted(fields)) if v is not None)
    return f"{MEASUREMENT}{tag_text} {field_text} {time_ns}"


def rfc3339(dt: datetime.datetime) -> str:
    """A UTC timestamp InfluxQL accepts (``2026-01-01T00:00:00Z``)."""
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{dt.microsecond:06d}Z"
                                               if dt.microsecond else "Z")


def _quote_ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _quote_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ns(dt: datetime.datetime) -> int:
    delta = dt.astimezone(UTC) - EPOCH
    return (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000


#: scopes per DELETE statement of ``delete_from`` (about 50 bytes each)
DELETE_SCOPES = 200


class InfluxPointStore(PointStore):
    """Rated points in an InfluxDB 1.x database (see the module docstring)."""

    name = "InfluxDB"

    def __init__(self, conf: cfg.ConfigOpts | None, scope_key: str, **options: Any) -> None:
        super().__init__(conf, scope_key)
        group = getattr(conf, GROUP) if conf is not None else None
        values = {opt.dest: getattr(group, opt.dest) if group is not None else opt.default
                  for opt in influx_opts}
        values.update(options)
        self.options = values
        if values["version"] != 1:
            raise ConfigError(f"[{GROUP}] version = {values['version']}: only InfluxDB 1.x "
                              "(version = 1) is supported")
        if not values["database"]:
            raise ConfigError(f"[{GROUP}] database: not set (the InfluxDB database of the "
                              "rated points)")
        self.database = values["database"]
        self.retention_policy = values["retention_policy"]
        self.batch_size = values["write_batch_size"]

    def _make_transport(self) -> http.Transport:
        o = self.options
        scheme = "https" if o["use_ssl"] else "http"
        host = o["host"]
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return http.Transport(
            f"{scheme}://{host}:{o['port']}", option=f"[{GROUP}] host",
            green=self.green, timeout=o["timeout"], user=o["username"],
            password=o["password"], cafile=o["cafile"], insecure=o["insecure"],
            # InfluxDB spends CPU compressing; the replies are small
            headers={"Accept-Encoding": "identity"})

    # -- queries ------------------------------------------------------------
    def query(self, what: str, statement: str, *, post: bool = False) -> list[dict]:
        """The results of an InfluxQL statement; StorageError on an error
        reply or an ``error`` in the results."""
        params = {"db": self.database, "q": statement, "epoch": "ns"}
        if post:
            reply = self.request(what, "POST", "/query", params={"db": self.database},
                                 body=_form({"q": statement}),
                                 headers={"Content-Type":
                                          "application/x-www-form-urlencoded"})
        else:
            reply = self.request(what, "GET", "/query", params=params)
        try:
            results = json.loads(reply.body)["results"]
        except (ValueError, KeyError, TypeError):
            raise StorageError(f"InfluxDB at {self.transport.safe_url}: {what}: not an "
                               "InfluxDB query reply") from None
        for result in results:
            if "error" in result:
                raise StorageError(f"InfluxDB at {self.transport.safe_url}: {what}: "
                                   f"{result['error']}")
        return results

    # -- PointStore -----------------------------------------------------------
    def init(self) -> None:
        self.query(f"creating database {self.database}",
                   f"CREATE DATABASE {_quote_ident(self.database)}", post=True)
        results = self.query("listing retention policies",
                             f"SHOW RETENTION POLICIES ON {_quote_ident(self.database)}")
        names = {row[0] for s in results[0].get("series", []) for row in s.get("values", [])}
        if self.retention_policy not in names:
            raise StorageError(
                f"[{GROUP}] retention_policy {self.retention_policy!r}: no such retention "
                f"policy in InfluxDB database {self.database!r} (it has "
                f"{', '.join(sorted(names)) or 'none'})")

    def initialized(self) -> bool:
        results = self.query("listing databases", "SHOW DATABASES")
        names = {row[0] for s in results[0].get("series", []) for row in s.get("values", [])}
        return self.database in names

    def lines(self, frame: DataFrame) -> Iterable[str]:
        """The frame's points in line protocol (CloudKitty's layout)."""
        time_ns = _ns(frame.begin)
        period = period_seconds(frame)
        scope_key, scope_id = self.scope_key, frame.scope_id
        seen: dict[tuple, int] = {}
        for usage_type, point in frame.iterpoints():
            fields = dict(point.metadata)
            fields["qty"] = float(point.qty)
            fields["price"] = float(point.price)
            fields["unit"] = point.unit
            fields["groupby"] = "|".join(point.groupby)
            fields["metadata"] = "|".join(point.metadata)
            fields[PERIOD_FIELD] = period
            tags = {k: str(v) for k, v in point.groupby.items() if v is not None}
            tags["type"] = usage_type
            if scope_key not in tags:
                tags[scope_key] = scope_id
            # a second point of the same series would overwrite the first
            series = tuple(sorted((k, v) for k, v in tags.items() if v != ""))
            repeat = seen.get(series, 0)
            seen[series] = repeat + 1
            if repeat:
                tags[DUP_TAG] = str(repeat)
            yield line(tags, fields, time_ns)

    def write(self, frame: DataFrame) -> None:
        self.write_many([frame])

    def write_many(self, frames: Sequence[DataFrame]) -> None:
        """The frames' points, ``write_batch_size`` lines a request whatever
        scope they belong to (a batched commit: one request for many
        scopes' periods)."""
        params = {"db": self.database, "rp": self.retention_policy}
        batch: list[str] = []
        scopes: dict[str, None] = {}
        for frame in frames:
            for text in self.lines(frame):
                batch.append(text)
                scopes[frame.scope_id] = None
                if len(batch) >= self.batch_size:
                    self._write(params, batch, list(scopes))
                    batch, scopes = [], {}
        if batch:
            self._write(params, batch, list(scopes))

    def _write(self, params: dict[str, str], batch: list[str], scopes: list[str]) -> None:
        self.request(f"writing {len(batch)} points of {describe_scopes(scopes)}",
                     "POST", "/write", params=params,
                     body=("\n".join(batch) + "\n").encode("utf-8"),
                     headers={"Content-Type": "application/octet-stream"})

    def _where(self, scope_ids: Sequence[str], begin: datetime.datetime,
               end: datetime.datetime | None) -> str:
        """WHERE the scope tag is one of ``scope_ids`` and the time in
        [begin, end) (``end`` None: from ``begin`` on)."""
        key = _quote_ident(self.scope_key)
        scopes = " OR ".join(f"{key} = {_quote_string(s)}" for s in scope_ids)
        where = (f" WHERE {scopes if len(scope_ids) == 1 else f'({scopes})'}"
                 f" AND time >= '{rfc3339(begin)}'")
        if end is not None:
            where += f" AND time < '{rfc3339(end)}'"
        return where

    def delete(self, scope_id: str, begin: datetime.datetime,
               end: datetime.datetime | None) -> None:
        self.query(f"deleting the points of scope {scope_id}",
                   f"DELETE FROM {MEASUREMENT}" + self._where([scope_id], begin, end),
                   post=True)

    def delete_from(self, scope_ids: Sequence[str], begin: datetime.datetime) -> None:
        """One DELETE for up to DELETE_SCOPES scopes (their tag equalities
        OR-ed): a batched commit's scopes, at the cost of one."""
        for i in range(0, len(scope_ids), DELETE_SCOPES):
            chunk = scope_ids[i:i + DELETE_SCOPES]
            self.query(f"deleting the points of {describe_scopes(chunk)}",
                       f"DELETE FROM {MEASUREMENT}" + self._where(chunk, begin, None),
                       post=True)

    def read(self, scope_id: str, begin: datetime.datetime,
             end: datetime.datetime) -> list[RatedRow]:
        results = self.query(
            f"reading the points of scope {scope_id}",
            f"SELECT * FROM {MEASUREMENT}" + self._where([scope_id], begin, end))
        rows: list[RatedRow] = []
        for series in results[0].get("series", []) if results else []:
            columns = series["columns"]
            for values in series.get("values", []):
                rows.append(self._row(scope_id, dict(zip(columns, values))))
        return rows

    def _row(self, scope_id: str, point: dict[str, Any]) -> RatedRow:
        begin = EPOCH + datetime.timedelta(microseconds=point["time"] // 1000)
        period = point.get(PERIOD_FIELD)
        groupby_keys = [k for k in (point.get("groupby") or "").split("|") if k]
        metadata_keys = [k for k in (point.get("metadata") or "").split("|") if k]
        return RatedRow(
            scope_id, begin, begin + datetime.timedelta(seconds=period or 0),
            point.get("type") or "", point.get("unit") or "",
            from_float(point.get("qty") or 0), from_float(point.get("price") or 0),
            {k: "" if point.get(k) is None else str(point[k]) for k in groupby_keys},
            {k: "" if point.get(k) is None else point[k] for k in metadata_keys})


def _form(values: dict[str, str]) -> str:
    return urllib.parse.urlencode(values)


class InfluxStorage(ExternalStorage):
    """The ``influxdb`` backend: points in InfluxDB, states in SQL."""

    point_store_class = InfluxPointStore
