"""Quotes: price a usage description with the rating chain, store nothing.

Used by ``cloudkitty-proc-manage quote --usage FILE`` and (later) by the
``quote`` RPC. The input is CloudKitty's v1 quote body::

    {"resources": [
        {"service": "instance", "desc": {"flavor_name": "m1.small"}, "volume": "1"},
        {"service": "volume.size", "desc": {"volume_type": "ssd"}, "volume": 100}
    ],
     "scope": "p1",                              # optional
     "period_start": "2026-02-01T00:00:00Z"}     # optional

or just the list of resources. ``service`` is the usage type, ``desc`` the
datapoint's groupby/metadata values (strings, numbers, booleans or null),
``volume`` the quantity (a decimal string or a number). ``unit`` may be
given per resource (CloudKitty uses ``"undefined"``, the default).

Without ``scope`` only the global rules apply (as in CloudKitty, whose
quotes have no tenant); with it, the scope's rules replace the global ones
and ``desc`` gets the scope key (``[collect] scope_key``) unless it has it.
Without ``period_start`` the rules in force at the start of the current
period (``[collect] period``) are used.

Every resource becomes one datapoint (price 0) of one frame, the frame goes
through every processor of ``[rating] processors`` in order, and the quote is
the sum of the prices.
"""

from __future__ import annotations

import datetime
import decimal
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from oslo_config import cfg

from cloudkitty_proc import plugins, utils
from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.exceptions import ConfigError

__all__ = ["QuoteLine", "QuoteResult", "Usage", "parse_usage", "quote", "rate_usage"]

ZERO = decimal.Decimal(0)
DEFAULT_UNIT = "undefined"
_TOP_KEYS = ("resources", "scope", "period_start")
_RESOURCE_KEYS = ("service", "desc", "volume", "unit")


@dataclass(frozen=True)
class Resource:
    index: int
    service: str
    desc: dict[str, Any]
    volume: decimal.Decimal
    unit: str


@dataclass(frozen=True)
class Usage:
    resources: tuple[Resource, ...]
    scope: str | None
    period_start: datetime.datetime | None


@dataclass(frozen=True)
class QuoteLine:
    index: int | None        # None: several resources (see QuoteResult)
    service: str
    volume: decimal.Decimal
    price: decimal.Decimal
    desc: dict[str, Any]


@dataclass(frozen=True)
class QuoteResult:
    total: decimal.Decimal
    lines: tuple[QuoteLine, ...]
    scope: str | None
    period_start: datetime.datetime


def _volume(raw: Any, where: str) -> decimal.Decimal:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ConfigError(f"{where}: 'volume' must be a decimal string or a "
                          f"number, got {type(raw).__name__}")
    try:
        value = decimal.Decimal(repr(raw) if isinstance(raw, float) else
                                raw.strip() if isinstance(raw, str) else raw)
    except decimal.InvalidOperation:
        raise ConfigError(f"{where}: 'volume' is not a decimal: {raw!r}") from None
    if not value.is_finite():
        raise ConfigError(f"{where}: 'volume' is not a finite decimal: {raw!r}")
    return value


def _resource(raw: Any, index: int, where: str) -> Resource:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a resource must be an object with "
                          f"service, desc and volume, got {type(raw).__name__}")
    for key in raw:
        if key not in _RESOURCE_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (allowed: "
                              f"{', '.join(_RESOURCE_KEYS)})")
    service = raw.get("service")
    if not isinstance(service, str) or not service:
        raise ConfigError(f"{where}: 'service' (the usage type) must be a "
                          f"non-empty string, got {service!r}")
    if "volume" not in raw:
        raise ConfigError(f"{where}: 'volume' is missing")
    volume = _volume(raw["volume"], where)
    desc = raw.get("desc", {})
    if desc is None:
        desc = {}
    if not isinstance(desc, dict):
        raise ConfigError(f"{where}: 'desc' must be an object, got "
                          f"{type(desc).__name__}")
    for key, value in desc.items():
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"{where}: desc[{key!r}] must be a string, a "
                              f"number, a boolean or null, got "
                              f"{type(value).__name__}")
    unit = raw.get("unit", DEFAULT_UNIT)
    if not isinstance(unit, str) or not unit:
        raise ConfigError(f"{where}: 'unit' must be a non-empty string, got "
                          f"{unit!r}")
    return Resource(index, service, dict(desc), volume, unit)


def parse_usage(usage: Any, *, source: str = "usage") -> Usage:
    """Validate a quote body (JSON text or parsed); ConfigError naming
    ``source`` and the index/key at fault."""
    if isinstance(usage, (bytes, bytearray)):
        try:
            usage = usage.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: not UTF-8: {exc}") from None
    if isinstance(usage, str):
        try:
            usage = json.loads(usage)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: invalid JSON: line {exc.lineno}, "
                              f"column {exc.colno}: {exc.msg}") from None
    scope = None
    period_start = None
    if isinstance(usage, list):
        resources, prefix = usage, ""
    elif isinstance(usage, dict):
        for key in usage:
            if key not in _TOP_KEYS:
                raise ConfigError(f"{source}: unknown top-level key {key!r} "
                                  f"(allowed: {', '.join(_TOP_KEYS)})")
        if "resources" not in usage:
            raise ConfigError(f"{source}: 'resources' is missing (a list of "
                              "{service, desc, volume} objects)")
        resources, prefix = usage["resources"], "resources"
        if not isinstance(resources, list):
            raise ConfigError(f"{source}: 'resources' must be a list, got "
                              f"{type(resources).__name__}")
        scope = usage.get("scope")
        if scope is not None and (not isinstance(scope, str) or not scope):
            raise ConfigError(f"{source}: 'scope' must be a non-empty string, "
                              f"got {scope!r}")
        raw_start = usage.get("period_start")
        if raw_start is not None:
            if not isinstance(raw_start, str):
                raise ConfigError(f"{source}: 'period_start' must be an ISO "
                                  f"8601 string, got {raw_start!r}")
            try:
                period_start = utils.parse_time(raw_start, what="period_start")
            except ValueError as exc:
                raise ConfigError(f"{source}: 'period_start': {exc}") from None
    else:
        raise ConfigError(f"{source}: expected an object with 'resources' or "
                          f"a list of resources, got {type(usage).__name__}")
    if not resources:
        raise ConfigError(f"{source}: no resources to quote")
    parsed = tuple(_resource(raw, i, f"{source}: {prefix}[{i}]")
                   for i, raw in enumerate(resources))
    return Usage(parsed, scope, period_start)


def _default_start(conf: cfg.ConfigOpts) -> datetime.datetime:
    return utils.align_down(utils.utcnow(), conf.collect.period)


def rate_usage(conf: cfg.ConfigOpts, usage: Any, *, source: str = "usage",
               chain: Sequence[Any] | None = None) -> QuoteResult:
    """Price ``usage`` with ``chain`` (default: load ``[rating] processors``).

    ConfigError for bad input (or rules); a processor's own error
    (RatingError, …) propagates.
    """
    parsed = usage if isinstance(usage, Usage) else parse_usage(usage, source=source)
    if chain is None:
        chain = plugins.load_rating_chain(conf)
    begin = parsed.period_start or _default_start(conf)
    end = begin + datetime.timedelta(seconds=conf.collect.period)
    scope_key = conf.collect.scope_key
    frame = DataFrame(parsed.scope, begin, end)  # type: ignore[arg-type]
    order: dict[str, list[Resource]] = {}
    for res in parsed.resources:
        desc = dict(res.desc)
        if parsed.scope is not None:
            desc.setdefault(scope_key, parsed.scope)
        frame.add_points(res.service, [DataPoint(res.unit, res.volume, ZERO, desc, {})])
        order.setdefault(res.service, []).append(res)
    for processor in chain:
        frame = processor.process(frame)
    lines: list[QuoteLine] = []
    for service, resources in order.items():
        points = frame.points(service)
        if len(points) == len(resources):
            lines.extend(QuoteLine(r.index, service, r.volume, p.price, r.desc)
                         for r, p in zip(resources, points))
        else:  # a processor added or removed points: per usage type only
            lines.append(QuoteLine(None, service,
                                   sum((p.qty for p in points), ZERO),
                                   sum((p.price for p in points), ZERO), {}))
    for service, points in frame.items():  # types a processor added
        if service not in order and points:
            lines.append(QuoteLine(None, service, sum((p.qty for p in points), ZERO),
                                   sum((p.price for p in points), ZERO), {}))
    lines.sort(key=lambda ln: (ln.index is None, ln.index or 0, ln.service))
    return QuoteResult(frame.total_price(), tuple(lines), parsed.scope, begin)


def quote(conf: cfg.ConfigOpts, usage_json: Any, *, source: str = "usage",
          chain: Sequence[Any] | None = None) -> decimal.Decimal:
    """The total price of a usage description (JSON text or parsed)."""
    return rate_usage(conf, usage_json, source=source, chain=chain).total
