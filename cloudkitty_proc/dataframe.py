"""Rated data in memory: DataPoint and DataFrame.

A ``DataPoint`` is one collected (then rated) usage record; a ``DataFrame``
holds every point of one scope and one period, grouped by usage type. Points
are immutable named tuples (cheap to build, safe to share between rating
processors); a processor returns new points with ``point._replace(price=…)``.
Quantities and prices are always ``decimal.Decimal``.
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Iterable, Iterator
from typing import NamedTuple

ZERO = decimal.Decimal(0)

#: the groupby keys CloudKitty adds to every datapoint (its collectors'
#: ``_create_data_point``): cloudkitty-api's ``time-d/w/m/y`` groupings and
#: rules on them need them
TIME_KEYS = ("week_of_the_year", "day_of_the_year", "month", "year")


def time_groupby(begin: datetime.datetime) -> dict[str, str]:
    """CloudKitty's four time keys for a period starting at ``begin`` (UTC):
    ``strftime`` ``%U``, ``%-j``, ``%-m``, ``%Y``, as strings."""
    begin = begin.astimezone(datetime.timezone.utc)
    return {"week_of_the_year": begin.strftime("%U"),
            "day_of_the_year": str(begin.timetuple().tm_yday),
            "month": str(begin.month),
            "year": begin.strftime("%Y")}


def _decimal(value) -> decimal.Decimal:
    """As CloudKitty's DataPoint: floats through ``str``, others as given."""
    if type(value) is decimal.Decimal:
        return value
    return decimal.Decimal(str(value) if isinstance(value, float) else value)


class _Point(NamedTuple):
    unit: str
    qty: decimal.Decimal
    price: decimal.Decimal
    groupby: dict[str, str]
    metadata: dict[str, str]


class DataPoint(_Point):
    """One usage record. Built as CloudKitty builds its DataPoint: a missing
    unit is ``"undefined"``, ``qty`` and ``price`` given as int, float (through
    ``str``) or str become Decimals. The hot paths build points with
    ``tuple.__new__(DataPoint, ...)`` from values already converted."""

    __slots__ = ()

    def __new__(cls, unit, qty, price=ZERO, groupby=None, metadata=None):
        return tuple.__new__(cls, (unit or "undefined", _decimal(qty), _decimal(price),
                                   dict(groupby or {}), dict(metadata or {})))

    def desc(self) -> dict[str, str]:
        """groupby ∪ metadata (groupby wins), as hashmap fields see it."""
        out = dict(self.metadata)
        out.update(self.groupby)
        return out


class DataFrame:
    """Every point of one scope for the period [begin, end)."""

    __slots__ = ("scope_id", "begin", "end", "_points")

    def __init__(
        self,
        scope_id: str,
        begin: datetime.datetime,
        end: datetime.datetime,
        points: dict[str, list[DataPoint]] | None = None,
    ) -> None:
        self.scope_id = scope_id
        self.begin = begin
        self.end = end
        self._points: dict[str, list[DataPoint]] = points if points is not None else {}

    def add_points(self, usage_type: str, points: Iterable[DataPoint]) -> None:
        self._points.setdefault(usage_type, []).extend(points)

    def types(self) -> list[str]:
        return sorted(self._points)

    def points(self, usage_type: str) -> list[DataPoint]:
        return self._points.get(usage_type, [])

    def items(self) -> Iterator[tuple[str, list[DataPoint]]]:
        """(usage type, points) in usage type order."""
        for usage_type in sorted(self._points):
            yield usage_type, self._points[usage_type]

    def iterpoints(self) -> Iterator[tuple[str, DataPoint]]:
        for usage_type, points in self.items():
            for point in points:
                yield usage_type, point

    def replace_points(self, usage_type: str, points: list[DataPoint]) -> None:
        self._points[usage_type] = points

    def __len__(self) -> int:
        return sum(len(p) for p in self._points.values())

    def total_price(self) -> decimal.Decimal:
        return sum((p.price for _, p in self.iterpoints()), ZERO)

    def __repr__(self) -> str:
        return (f"DataFrame(scope={self.scope_id!r}, begin={self.begin.isoformat()}, "
                f"points={len(self)})")
