"""DataPoint is built as CloudKitty builds its own (issue 16 item 6), and
the four time keys of a period (item 3)."""

from __future__ import annotations

import datetime
import decimal

import pytest

from cloudkitty_proc.dataframe import DataPoint, time_groupby

D = decimal.Decimal


@pytest.mark.parametrize("given,expected", [
    (1, D(1)), (1.1, D("1.1")), ("2.50", D("2.50")), (D("3"), D("3")), (0.1 + 0.2, D("0.30000000000000004")),
])
def test_qty_and_price_become_decimals(given, expected):
    point = DataPoint("u", given, given, {}, {})
    assert type(point.qty) is D and point.qty == expected and point.qty.as_tuple() == \
        expected.as_tuple()
    assert type(point.price) is D and point.price == expected


def test_missing_unit_is_undefined_and_labels_are_copied():
    groupby = {"id": "a"}
    point = DataPoint(None, 1, 0, groupby, None)
    assert point.unit == "undefined" and point.metadata == {}
    groupby["id"] = "b"
    assert point.groupby == {"id": "a"}
    assert DataPoint("", 1).unit == "undefined" and DataPoint("", 1).price == 0


def test_replace_keeps_the_type_and_values():
    point = DataPoint("u", 1, 0, {"id": "a"}, {})._replace(price=D("2"))
    assert type(point) is DataPoint and point.price == 2 and point.desc() == {"id": "a"}


@pytest.mark.parametrize("when,expected", [
    ("2026-01-01T00:00:00+00:00", ("00", "1", "1", "2026")),
    ("2026-12-31T23:00:00+00:00", ("52", "365", "12", "2026")),
    ("2024-12-31T12:00:00+00:00", ("52", "366", "12", "2024")),
    ("2026-03-01T01:00:00+02:00", ("08", "59", "2", "2026")),  # UTC: Feb 28th, 23:00
])
def test_time_keys_are_cloudkittys(when, expected):
    keys = time_groupby(datetime.datetime.fromisoformat(when))
    assert (keys["week_of_the_year"], keys["day_of_the_year"], keys["month"],
            keys["year"]) == expected
