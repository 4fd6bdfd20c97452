"""A point store in memory (``storage/points.py``'s contract), for tests.

``MemoryPointStore(data=shared)``: several stores built on one ``PointData``
share their points, as the workers of a deployment share an InfluxDB
database. Points are kept by (scope, period start, type, groupby, n), n
counting the points of a frame with equal groupby (as the influxdb store's
``__ck_dup`` tag keeps them apart): writing a period again replaces its
points, as InfluxDB replaces a series' point at the same time. Quantities and prices are kept exactly (the contract
suite's ``exact_numbers`` stays True). Every call is counted in
``data.calls`` (method name -> calls) and may be made to fail with
``data.fail`` (method name -> exception to raise once).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import threading

from cloudkitty_proc import http
from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.storage.base import RatedRow
from cloudkitty_proc.storage.points import PointStore


class PointData:
    """What the stores of one test share."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.initialized = False
        #: (scope, begin, type, groupby JSON, n) -> RatedRow
        self.points: dict[tuple, RatedRow] = {}
        self.calls: collections.Counter = collections.Counter()
        self.fail: dict[str, Exception] = {}


class MemoryPointStore(PointStore):
    name = "memory"

    def __init__(self, conf=None, scope_key: str = "project_id", *,
                 data: PointData | None = None) -> None:
        super().__init__(conf, scope_key)
        self.data = data if data is not None else PointData()

    def _make_transport(self) -> http.Transport:  # pragma: no cover - no HTTP here
        raise NotImplementedError("the memory point store has no transport")

    def _call(self, name: str) -> None:
        self.data.calls[name] += 1
        failure = self.data.fail.pop(name, None)
        if failure is not None:
            raise failure

    def init(self) -> None:
        self._call("init")
        self.data.initialized = True

    def initialized(self) -> bool:
        return self.data.initialized

    def write(self, frame: DataFrame) -> None:
        self._call("write")
        seen: collections.Counter = collections.Counter()
        with self.data.lock:
            for usage_type, point in frame.iterpoints():
                labels = (usage_type, json.dumps(point.groupby, sort_keys=True, default=str))
                seen[labels] += 1
                key = (frame.scope_id, frame.begin, *labels, seen[labels])
                self.data.points[key] = RatedRow(
                    frame.scope_id, frame.begin, frame.end, usage_type, point.unit,
                    point.qty, point.price, dict(point.groupby), dict(point.metadata))

    def delete(self, scope_id: str, begin: datetime.datetime,
               end: datetime.datetime | None) -> None:
        self._call("delete")
        with self.data.lock:
            for key in [k for k in self.data.points
                        if k[0] == scope_id and k[1] >= begin and (end is None or k[1] < end)]:
                del self.data.points[key]

    def read(self, scope_id: str, begin: datetime.datetime,
             end: datetime.datetime) -> list[RatedRow]:
        self._call("read")
        with self.data.lock:
            found = [row for key, row in self.data.points.items()
                     if key[0] == scope_id and begin <= key[1] < end]
        # new objects, as a store decoding its reply makes them
        return [dataclasses.replace(r, groupby=dict(r.groupby), metadata=dict(r.metadata))
                for r in found]
