"""Point stores: where the backends in CloudKitty's v2 layout keep rated points.

A point store (InfluxDB, Elasticsearch, OpenSearch) holds the rated points
and nothing else; the scope states, the period records and the reprocessing
tasks stay in SQL (``[database] connection``), in the tables of the ``sql``
backend. ``storage/external.py`` joins the two into one ``BaseStorage`` and
says how the invariants hold without a transaction spanning both.

What a point store does (one module per store, e.g. ``influx.py``):

* ``write(frame)``: every point of the frame, in as few requests as it can
  (batched), **idempotently**: writing the same (scope, period, type,
  groupby) again replaces the point instead of adding a second one;
* ``delete(scope_id, begin, end)``: the scope's points whose period starts
  in [begin, end) (``end`` None: from ``begin`` on), and only that scope's;
* ``read(scope_id, begin, end)``: the scope's points whose period starts in
  [begin, end), as ``RatedRow`` (any order: the caller sorts a batch);
* ``init()`` / ``initialized()``: create the database, index or mapping
  (``cloudkitty-proc-manage storage init``), idempotently; whether it exists.

Errors: :class:`cloudkitty_proc.exceptions.StorageError`, one line naming the
store and what failed (never a credential). The HTTP work goes through the
project's one transport (``cloudkitty_proc.http``), green when ``green`` is
set before the first request (the worker's GreenPool), plain otherwise.
Numbers: these stores keep qty and price as floats, as CloudKitty's drivers
write them; a row read back holds ``Decimal(repr(float(value)))``.
"""

from __future__ import annotations

import abc
import datetime
import decimal
import os
from collections.abc import Sequence
from typing import Any

from oslo_config import cfg

from cloudkitty_proc import http
from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.exceptions import StorageError, StoreUnreachableError
from cloudkitty_proc.storage.base import RatedRow

__all__ = ["PointStore", "as_float", "from_float", "period_seconds"]

UTC = datetime.timezone.utc


def as_float(value: decimal.Decimal) -> float:
    """A quantity or price as the float CloudKitty's drivers write."""
    return float(value)


def from_float(value: Any) -> decimal.Decimal:
    """A stored float (or int) read back as the Decimal of its shortest repr."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"not a number: {value!r}")
    if isinstance(value, float):
        return decimal.Decimal(repr(value))
    return decimal.Decimal(str(value))


def describe_scopes(scopes: Sequence[str], shown: int = 3) -> str:
    """How a write's messages name its scopes: "scope a", or "5 scopes
    (a, b, c, …)"."""
    if len(scopes) == 1:
        return f"scope {scopes[0]}"
    more = ", …" if len(scopes) > shown else ""
    return f"{len(scopes)} scopes ({', '.join(scopes[:shown])}{more})"


def period_seconds(frame: DataFrame) -> int:
    return int((frame.end - frame.begin).total_seconds())


class PointStore(abc.ABC):
    """The rated points of one deployment in an external store.

    Built as ``cls(conf, scope_key)`` without connecting. ``green`` (set
    before first use) picks green I/O for the worker's GreenPool.
    """

    #: how messages name the store ("InfluxDB")
    name: str = "point store"

    def __init__(self, conf: cfg.ConfigOpts | None, scope_key: str) -> None:
        self.conf = conf
        self.scope_key = scope_key
        self.green = False
        self._transport: http.Transport | None = None
        self._pid: int | None = None

    # -- the HTTP transport -------------------------------------------------
    @abc.abstractmethod
    def _make_transport(self) -> http.Transport:
        """A new transport to the store (from the options)."""

    @property
    def transport(self) -> http.Transport:
        """The store's transport, made on first use in this process."""
        if self._transport is None or self._pid != os.getpid():
            self._transport = self._make_transport()
            self._pid = os.getpid()
        return self._transport

    def request(self, what: str, method: str, path: str, *,
                params: dict[str, str] | None = None, body: bytes | str | None = None,
                headers: dict[str, str] | None = None,
                ok: Sequence[int] = (200, 201, 204)) -> http.Reply:
        """One request; StorageError naming ``what`` unless the status is
        in ``ok``, StoreUnreachableError when no reply came."""
        try:
            reply = self.transport.request(method, path, params=params, body=body,
                                           headers=headers)
        except http.TransportError as exc:
            raise StoreUnreachableError(f"{self.name} at {self.transport.safe_url}: "
                                        f"{what}: {exc}") from None
        if reply.status not in ok:
            detail = reply.body[:300].decode("utf-8", "replace").strip().replace("\n", " ")
            raise StorageError(f"{self.name} at {self.transport.safe_url}: {what}: HTTP "
                               f"{reply.status} {reply.reason}: {detail}")
        return reply

    def close(self) -> None:
        if self._transport is not None and self._pid == os.getpid():
            self._transport.close()
        self._transport = None

    # -- the store ------------------------------------------------------------
    @abc.abstractmethod
    def init(self) -> None:
        """Create what the store needs (database, index, mapping); idempotent."""

    @abc.abstractmethod
    def initialized(self) -> bool:
        """Whether ``init`` was done (the database or index exists)."""

    @abc.abstractmethod
    def write(self, frame: DataFrame) -> None:
        """Store every point of ``frame`` (idempotent per scope, period,
        type and groupby); an empty frame writes nothing."""

    def write_many(self, frames: Sequence[DataFrame]) -> None:
        """``write`` of several frames (a batched commit's); a store that
        can sends them together, ``write_batch_size`` points a request.
        Here: one ``write`` per frame."""
        for frame in frames:
            self.write(frame)

    @abc.abstractmethod
    def delete(self, scope_id: str, begin: datetime.datetime,
               end: datetime.datetime | None) -> None:
        """Delete the scope's points whose period starts in [begin, end)
        (``end`` None: every one from ``begin`` on)."""

    def delete_from(self, scope_ids: Sequence[str], begin: datetime.datetime) -> None:
        """``delete(scope_id, begin, None)`` of several scopes (a batched
        commit's uncommitted points); a store that can sends one request
        for many scopes. Here: one ``delete`` per scope."""
        for scope_id in scope_ids:
            self.delete(scope_id, begin, None)

    @abc.abstractmethod
    def read(self, scope_id: str, begin: datetime.datetime,
             end: datetime.datetime) -> list[RatedRow]:
        """The scope's points whose period starts in [begin, end), any order."""
