"""The values of hashmap rules: decimals (costs, levels, field values) and
times, parsed and bounded the same way for the schema and the engine.

Bounds: a cost is 0 or between ``MIN_COST`` and ``MAX_COST`` in absolute
value (``MIN_COST`` is the precision of CloudKitty's cost column, so every
rule CloudKitty holds imports), a level between 0 and ``MAX_LEVEL`` (the
largest quantity a collector accepts), both with at most ``MAX_DIGITS``
significant digits. A cost such as ``"1e999999"`` used to pass and be
stored as a million-digit price.
"""

from __future__ import annotations

import datetime
import decimal
from typing import Any

_UTC = datetime.timezone.utc
_D = decimal.Decimal

MAX_COST = decimal.Decimal("1e15")
MIN_COST = decimal.Decimal("1e-28")
MAX_LEVEL = decimal.Decimal("1e36")
MAX_DIGITS = 40


def range_error(value: decimal.Decimal, low: decimal.Decimal,
                 high: decimal.Decimal) -> str | None:
    """Why ``value`` is out of [low, high] in absolute value (0 aside)."""
    if len(value.as_tuple().digits) > MAX_DIGITS:
        return f"more than {MAX_DIGITS} significant digits"
    if value and not low <= abs(value) <= high:
        return f"out of range (0, or {low:.0e} to {high:.0e} in absolute value)"
    return None


def parse_decimal(raw: Any) -> decimal.Decimal | None:
    """Decimal from a YAML string or number; None if not a finite decimal."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, float):
        raw = repr(raw)
    if isinstance(raw, (int, str)):
        try:
            value = _D(raw.strip() if isinstance(raw, str) else raw)
        except (decimal.InvalidOperation, ValueError):
            return None
        return value if value.is_finite() else None
    return None


def rule_time(raw: Any) -> datetime.datetime | None:
    """Aware UTC datetime from ISO 8601 text or a YAML timestamp/date
    (naive: UTC); None if ``raw`` is not a time."""
    if isinstance(raw, datetime.datetime):
        value = raw
    elif isinstance(raw, datetime.date):
        value = datetime.datetime(raw.year, raw.month, raw.day)
    elif isinstance(raw, str):
        try:
            value = datetime.datetime.fromisoformat(raw.strip())
        except ValueError:
            return None
    else:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=_UTC)
    return value.astimezone(_UTC)


def to_utc(when: datetime.datetime | str) -> datetime.datetime:
    """A period start as an aware UTC datetime (naive or no offset: UTC)."""
    if isinstance(when, str):
        parsed = rule_time(when)
        if parsed is None:
            raise ValueError(f"not an ISO 8601 time: {when!r}")
        return parsed
    if when.tzinfo is None:
        return when.replace(tzinfo=_UTC)
    if when.tzinfo is _UTC:
        return when
    return when.astimezone(_UTC)


def field_number(value: Any) -> decimal.Decimal | None:
    """Decimal(field value) for a field threshold; None if not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = value if isinstance(value, _D) else _D(value)
    except (decimal.InvalidOperation, TypeError, ValueError):
        return None
    return None if number.is_nan() else number
