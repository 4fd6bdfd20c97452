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


class DataPoint(NamedTuple):
    unit: str
    qty: decimal.Decimal
    price: decimal.Decimal
    groupby: dict[str, str]
    metadata: dict[str, str]

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
