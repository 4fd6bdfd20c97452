"""Small time helpers. Every datetime in cloudkitty_proc is aware and UTC."""

from __future__ import annotations

import datetime
import decimal

UTC = datetime.timezone.utc


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(UTC)


def parse_time(value: str | datetime.datetime, *, what: str = "time") -> datetime.datetime:
    """ISO 8601 → aware UTC datetime; a time without offset is UTC."""
    if isinstance(value, datetime.datetime):
        dt = value
    else:
        text = str(value).strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.datetime.fromisoformat(text)
        except ValueError as exc:
            raise ValueError(f"invalid {what} {value!r}: expected ISO 8601, "
                             "e.g. 2026-01-01T00:00:00Z") from exc
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def to_naive_utc(dt: datetime.datetime) -> datetime.datetime:
    """For database columns: naive datetimes that mean UTC."""
    if dt.tzinfo is None:
        return dt
    return dt.astimezone(UTC).replace(tzinfo=None)


def from_db(dt: datetime.datetime | None) -> datetime.datetime | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def month_start(now: datetime.datetime | None = None) -> datetime.datetime:
    now = now or utcnow()
    return datetime.datetime(now.year, now.month, 1, tzinfo=UTC)


def is_aligned(dt: datetime.datetime, period: int) -> bool:
    return int(dt.timestamp()) % period == 0 and dt.microsecond == 0


def align_down(dt: datetime.datetime, period: int) -> datetime.datetime:
    ts = int(dt.timestamp())
    return datetime.datetime.fromtimestamp(ts - ts % period, UTC)


def isoformat(dt: datetime.datetime) -> str:
    return dt.astimezone(UTC).isoformat()


def decimal_str(value: decimal.Decimal) -> str:
    """A decimal as a plain string (no exponent), trailing zeros kept."""
    return format(value, "f")

