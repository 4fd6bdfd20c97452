"""Hashmap rating rules: parsing, validation, compilation and pricing.

The rules file format and its semantics are CONTRACTS.md §4 (CloudKitty's
HashMap module, exactly). This module is the engine behind the ``hashmap``
rating processor (:mod:`cloudkitty_proc.rating.hashmap`); it is also used
directly by the ``quote`` command and by the tests::

    rules = load_rules("/etc/cloudkitty-proc/rating.yml")   # ConfigError
    price = price_point(rules, "instance", "p1", period_start, point)

Loading happens once per file version and does all the work that does not
depend on a datapoint:

1. parse and validate the YAML (every problem is reported with the file,
   the service, the field, the list and the index at fault);
2. per service, collect the validity boundaries (every ``start`` and
   ``end``) into a sorted list. Between two consecutive boundaries the set
   of active rules cannot change, so a period start ``T`` selects the
   interval ``bisect_right(bounds, T)``;
3. lazily, per (service, scope, interval), merge the active global and
   per-scope rules into a :class:`Plan` (cached on the ruleset; a scope
   with no rule of its own for a service shares the global plan).

A plan rates a datapoint with a few dict lookups and Decimal operations:
everything that depends only on the values of the fields the plan looks at
(field mappings, field thresholds, the per-group ``rate*flat`` products) is
memoised per tuple of field values; only the service thresholds, which
compare the quantity, and the final multiplications by the quantity are
evaluated per point.

CloudKitty details reproduced on purpose (and checked against
``shared/compat/hashmap-vectors.json``):

* a group starts at ``flat = 0``, ``rate = 1``, so a group with rate
  mappings but no flat mapping prices 0 (unless a service flat threshold
  adds to it);
* ``flat`` mappings keep the highest cost (``max``), ``rate`` mappings
  multiply;
* per group only the threshold with the highest level among all the
  matching candidates (service and field thresholds together) is applied;
  on a tie the service threshold wins (CloudKitty evaluates the service
  thresholds first and only replaces on a strictly higher level), then the
  field that comes first in the file;
* a field threshold is applied before ``rate*flat*qty`` (to flat or rate),
  a service threshold after it (to the group's result);
* the price is added to the datapoint's input price; a datapoint of a
  usage type without rules keeps its price.

Deliberate differences (CloudKitty would crash or behave surprisingly):

* a field value that is not a finite number (``"abc"``, ``None``,
  ``"NaN"``) never matches a field threshold of that field (CloudKitty
  raises ``decimal.InvalidOperation`` and fails the whole period); field
  mappings of that field still apply;
* a field mapping matches on ``str(field value) == value`` (CloudKitty
  compares the raw value, which only differs for non-string metadata);
* negative threshold levels are refused at load time (in CloudKitty a
  level <= -1 can never apply).
"""

from __future__ import annotations

import bisect
import datetime
import decimal
import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import yaml

from cloudkitty_proc.dataframe import DataPoint
from cloudkitty_proc.exceptions import ConfigError

__all__ = [
    "DEFAULT_GROUP",
    "Plan",
    "Rule",
    "RuleSet",
    "load_rules",
    "parse_rules",
    "price_point",
]

DEFAULT_GROUP = "_DEFAULT_"
FLAT = "flat"
RATE = "rate"
TYPES = (FLAT, RATE)

_UTC = datetime.timezone.utc
_D = decimal.Decimal
_MISSING = object()
_MAX_ERRORS = 20
# Entries kept per plan in the field-values memo before it is cleared; the
# memo only grows with the number of distinct combinations of the values of
# the fields the plan looks at.
_MEMO_MAX = 65536

_MAPPING_KEYS = frozenset(("cost", "type", "group", "scope", "start", "end"))
_FIELD_MAPPING_KEYS = _MAPPING_KEYS | {"value"}
_THRESHOLD_KEYS = _MAPPING_KEYS | {"level"}
_SERVICE_KEYS = ("mappings", "thresholds", "fields")
_FIELD_KEYS = ("mappings", "thresholds")

_new_point = tuple.__new__
# Prices are computed in Python's default decimal context (28 significant
# digits, ROUND_HALF_EVEN), as CloudKitty does, whatever context the calling
# thread has set.
_CONTEXT = decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN)


# --------------------------------------------------------------------------
# Rules (validated, not yet compiled)
# --------------------------------------------------------------------------

class Rule(NamedTuple):
    """One validated rule of the file."""

    service: str
    field: str | None        # None: a service rule
    kind: str                # "mappings" or "thresholds"
    index: int               # position in its list in the file
    group: str
    type: str                # "flat" or "rate"
    cost: decimal.Decimal
    value: str | None        # field mappings only
    level: decimal.Decimal | None  # thresholds only
    scope: str | None        # None: global
    start: datetime.datetime | None  # inclusive, aware UTC
    end: datetime.datetime | None    # exclusive, aware UTC

    @property
    def key(self) -> tuple:
        """What a per-scope rule replaces: CloudKitty's dictionary key."""
        if self.kind == "thresholds":
            return (self.kind, self.field, self.group, self.level)
        if self.field is None:
            return (self.kind, None, self.group)
        return (self.kind, self.field, self.group, self.value)

    @property
    def where(self) -> str:
        return _where(self.service, self.field, self.kind, self.index)

    def active_at(self, when: datetime.datetime | None) -> bool:
        """Active at ``when`` (``None``: before every boundary)."""
        if when is None:
            return self.start is None
        return ((self.start is None or self.start <= when)
                and (self.end is None or when < self.end))


def _where(service: str, field: str | None = None, kind: str | None = None,
           index: int | None = None) -> str:
    out = f"service {service!r}"
    if field is not None:
        out += f", field {field!r}"
    if kind is not None:
        out += f", {kind}"
        if index is not None:
            out += f"[{index}]"
    return out


def _describe_key(rule: Rule) -> str:
    if rule.kind == "thresholds":
        return f"group {rule.group!r}, level {rule.level}"
    if rule.field is None:
        return f"group {rule.group!r}"
    return f"group {rule.group!r}, value {rule.value!r}"


def _describe_window(rule: Rule) -> str:
    start = rule.start.isoformat() if rule.start else "-inf"
    end = rule.end.isoformat() if rule.end else "+inf"
    return f"[{start}, {end})"


class _Errors:
    """Collects validation problems; raised as one ConfigError."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.items.append(f"{where}: {problem}" if where else problem)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = self.items[:_MAX_ERRORS]
        more = len(self.items) - len(shown)
        if len(self.items) == 1:
            msg = f"{self.path}: invalid rating rules: {shown[0]}"
        else:
            msg = (f"{self.path}: {len(self.items)} problems in rating rules: "
                   + "; ".join(shown))
            if more:
                msg += f"; … and {more} more"
        raise ConfigError(msg)


def _parse_decimal(raw: Any) -> decimal.Decimal | None:
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


def _parse_time(raw: Any) -> datetime.datetime | None:
    """Aware UTC datetime from ISO 8601 text or a YAML timestamp/date."""
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
        parsed = _parse_time(when)
        if parsed is None:
            raise ValueError(f"not an ISO 8601 time: {when!r}")
        return parsed
    if when.tzinfo is None:
        return when.replace(tzinfo=_UTC)
    if when.tzinfo is _UTC:
        return when
    return when.astimezone(_UTC)


def _as_list(raw: Any, where: str, errors: _Errors) -> list:
    if raw is None:
        return []
    if not isinstance(raw, list):
        errors.add(where, f"must be a list, got {type(raw).__name__}")
        return []
    return raw


def _parse_rule(raw: Any, service: str, field: str | None, kind: str,
                index: int, errors: _Errors) -> Rule | None:
    where = _where(service, field, kind, index)
    if not isinstance(raw, Mapping):
        errors.add(where, f"must be a mapping, got {type(raw).__name__}")
        return None
    if kind == "thresholds":
        allowed = _THRESHOLD_KEYS
    elif field is None:
        allowed = _MAPPING_KEYS
    else:
        allowed = _FIELD_MAPPING_KEYS
    ok = True
    for key in raw:
        if key in allowed:
            continue
        ok = False
        if key == "value" and kind == "mappings":
            errors.add(where, "'value' given on a service mapping (a service "
                       "mapping applies to every datapoint of the service; "
                       "put value mappings under fields.<name>.mappings)")
        elif key == "level" and kind == "mappings":
            errors.add(where, "'level' given on a mapping (levels belong to "
                       "thresholds)")
        else:
            errors.add(where, f"unknown key {key!r} (allowed: "
                       f"{', '.join(sorted(allowed))})")

    # cost
    cost = None
    if "cost" not in raw:
        errors.add(where, "'cost' is missing")
        ok = False
    else:
        cost = _parse_decimal(raw["cost"])
        if cost is None:
            errors.add(where, f"'cost' is not a decimal: {raw['cost']!r}")
            ok = False

    # type
    rtype = raw.get("type", FLAT)
    if rtype not in TYPES:
        errors.add(where, f"unknown type {rtype!r} (flat or rate)")
        ok = False

    # group
    group = raw.get("group", DEFAULT_GROUP)
    if not isinstance(group, str) or not group:
        errors.add(where, f"'group' must be a non-empty string, got {group!r}")
        ok = False

    # scope
    scope = raw.get("scope")
    if "scope" in raw and (not isinstance(scope, str) or not scope):
        errors.add(where, f"'scope' must be a non-empty string (quote "
                   f"numeric ids), got {scope!r}")
        ok = False

    # value (field mappings)
    value = None
    if kind == "mappings" and field is not None:
        if "value" not in raw or raw["value"] is None:
            errors.add(where, "'value' is missing (a field mapping matches "
                       "datapoints whose field equals its value)")
            ok = False
        else:
            value = raw["value"]
            if not isinstance(value, str):
                errors.add(where, f"'value' must be a string (quote it), got "
                           f"{value!r}")
                ok = False

    # level (thresholds)
    level = None
    if kind == "thresholds":
        if "level" not in raw or raw["level"] is None:
            errors.add(where, "'level' is missing (a threshold applies from "
                       "its level up)")
            ok = False
        else:
            level = _parse_decimal(raw["level"])
            if level is None:
                errors.add(where, f"'level' is not a decimal: {raw['level']!r}")
                ok = False
            elif level < 0:
                errors.add(where, f"'level' must be >= 0, got {raw['level']!r}")
                ok = False

    # validity
    bounds = {}
    for name in ("start", "end"):
        if name not in raw or raw[name] is None:
            bounds[name] = None
            continue
        parsed = _parse_time(raw[name])
        if parsed is None:
            errors.add(where, f"{name!r} is not an ISO 8601 time: "
                       f"{raw[name]!r}")
            ok = False
        bounds[name] = parsed
    start, end = bounds["start"], bounds["end"]
    if start is not None and end is not None and end <= start:
        errors.add(where, f"'end' ({end.isoformat()}) must be after 'start' "
                   f"({start.isoformat()})")
        ok = False

    if not ok:
        return None
    return Rule(service=service, field=field, kind=kind, index=index,
                group=group, type=rtype, cost=cost, value=value, level=level,
                scope=scope, start=start, end=end)


def _overlap(a: Rule, b: Rule) -> bool:
    return ((a.start is None or b.end is None or a.start < b.end)
            and (b.start is None or a.end is None or b.start < a.end))


def _check_duplicates(rules: list[Rule], errors: _Errors) -> None:
    by_key: dict[tuple, list[Rule]] = {}
    for rule in rules:
        by_key.setdefault((rule.scope, rule.key), []).append(rule)
    for (scope, _), same in by_key.items():
        for i, later in enumerate(same):
            for earlier in same[:i]:
                if _overlap(earlier, later):
                    origin = f"scope {scope!r}" if scope else "global"
                    errors.add(later.where, (
                        f"duplicate of {earlier.kind}[{earlier.index}] "
                        f"({_describe_key(later)}, {origin}) with overlapping "
                        f"validity {_describe_window(earlier)} and "
                        f"{_describe_window(later)}; give them disjoint "
                        f"start/end windows"))
                    break


def _parse_service(name: str, raw: Any, errors: _Errors
                   ) -> tuple[list[Rule], list[str]]:
    rules: list[Rule] = []
    fields: list[str] = []
    where = _where(name)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        errors.add(where, f"must be a mapping with mappings, thresholds or "
                   f"fields, got {type(raw).__name__}")
        return rules, fields
    for key in raw:
        if key not in _SERVICE_KEYS:
            errors.add(where, f"unknown key {key!r} (allowed: "
                       f"{', '.join(_SERVICE_KEYS)})")
    for kind in ("mappings", "thresholds"):
        items = _as_list(raw.get(kind), _where(name, None, kind), errors)
        for i, item in enumerate(items):
            rule = _parse_rule(item, name, None, kind, i, errors)
            if rule is not None:
                rules.append(rule)
    raw_fields = raw.get("fields")
    if raw_fields is None:
        raw_fields = {}
    if not isinstance(raw_fields, Mapping):
        errors.add(where + ", fields", f"must be a mapping of field names, "
                   f"got {type(raw_fields).__name__}")
        raw_fields = {}
    for fname, fraw in raw_fields.items():
        if not isinstance(fname, str) or not fname:
            errors.add(where + ", fields", f"field name must be a non-empty "
                       f"string, got {fname!r}")
            continue
        fwhere = _where(name, fname)
        fields.append(fname)
        if fraw is None:
            fraw = {}
        if not isinstance(fraw, Mapping):
            errors.add(fwhere, f"must be a mapping with mappings or "
                       f"thresholds, got {type(fraw).__name__}")
            continue
        for key in fraw:
            if key not in _FIELD_KEYS:
                errors.add(fwhere, f"unknown key {key!r} (allowed: "
                           f"{', '.join(_FIELD_KEYS)})")
        for kind in _FIELD_KEYS:
            items = _as_list(fraw.get(kind), _where(name, fname, kind), errors)
            for i, item in enumerate(items):
                rule = _parse_rule(item, name, fname, kind, i, errors)
                if rule is not None:
                    rules.append(rule)
    _check_duplicates(rules, errors)
    return rules, fields


def parse_rules(data: Any, path: str = "<rules>") -> RuleSet:
    """Validate an already parsed rules document and compile it."""
    errors = _Errors(path)
    if data is None:
        errors.add("", "the file is empty (expected a top-level 'hashmap' "
                   "key)")
        errors.raise_if_any()
    if not isinstance(data, Mapping):
        errors.add("", f"top level must be a mapping with a 'hashmap' key, "
                   f"got {type(data).__name__}")
        errors.raise_if_any()
    for key in data:
        if key != "hashmap":
            errors.add("", f"unknown top-level key {key!r} (allowed: hashmap)")
    hashmap = data.get("hashmap")
    if not isinstance(hashmap, Mapping):
        errors.add("hashmap", "'hashmap' is missing or not a mapping "
                   "(expected hashmap: {services: ...})")
        errors.raise_if_any()
    for key in hashmap:
        if key != "services":
            errors.add("hashmap", f"unknown key {key!r} (allowed: services)")
    services = hashmap.get("services")
    if not isinstance(services, Mapping) or not services:
        errors.add("hashmap.services", "must be a non-empty mapping of usage "
                   "types to their rules")
        errors.raise_if_any()
    parsed: dict[str, tuple[list[Rule], list[str]]] = {}
    for name, raw in services.items():
        if not isinstance(name, str) or not name:
            errors.add("hashmap.services", f"service name must be a non-empty "
                       f"string, got {name!r}")
            continue
        parsed[name] = _parse_service(name, raw, errors)
    errors.raise_if_any()
    return RuleSet(path, {name: ServiceRules(name, rules, fields)
                          for name, (rules, fields) in parsed.items()})


def load_rules(path: str | os.PathLike) -> RuleSet:
    """Read, validate and compile a rules file; ConfigError on any problem."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read rating rules: "
                          f"{exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML: {where}{problem}") from None
    return parse_rules(data, path)


# --------------------------------------------------------------------------
# Compiled rules
# --------------------------------------------------------------------------

class _Entry(NamedTuple):
    """One group of a plan, given the values of the plan's fields.

    ``svc``: the group's service thresholds, highest level first, as
    (level, is_rate, cost); ``flevel``: the level of the best field
    threshold (-1: none); ``ks``: rate*flat when a service threshold wins
    (no field threshold applied); ``kf``: rate*flat with the field threshold
    (if any) applied, used when no service threshold wins.
    """

    svc: tuple
    flevel: decimal.Decimal | int
    ks: decimal.Decimal | int
    kf: decimal.Decimal | int


class Plan:
    """The merged rules of one service for one scope and validity interval."""

    __slots__ = ("service", "groups", "fields", "_base", "_svc_thr",
                 "_field_maps", "_field_thr", "_memo", "_static", "rules")

    def __init__(self, service: str, rules: list[Rule],
                 field_order: list[str]) -> None:
        with decimal.localcontext(_CONTEXT):
            self._compile(service, rules, field_order)

    def _compile(self, service: str, rules: list[Rule],
                 field_order: list[str]) -> None:
        self.service = service
        self.rules = tuple(rules)
        groups: list[str] = []
        index: dict[str, int] = {}

        def gi(group: str) -> int:
            if group not in index:
                index[group] = len(groups)
                groups.append(group)
            return index[group]

        for rule in rules:
            gi(rule.group)
        self.groups = tuple(groups)
        n = len(groups)
        base_flat: list = [0] * n
        base_rate: list = [1] * n
        svc_thr: list[list] = [[] for _ in range(n)]
        field_maps: dict[str, dict[str, list]] = {}
        field_thr: dict[str, list[list]] = {}
        for rule in rules:
            g = index[rule.group]
            is_rate = rule.type == RATE
            if rule.field is None and rule.kind == "mappings":
                if is_rate:
                    base_rate[g] = base_rate[g] * rule.cost
                elif rule.cost > base_flat[g]:
                    base_flat[g] = rule.cost
            elif rule.field is None:
                svc_thr[g].append((rule.level, is_rate, rule.cost))
            elif rule.kind == "mappings":
                field_maps.setdefault(rule.field, {}).setdefault(
                    rule.value, []).append((g, is_rate, rule.cost))
            else:
                field_thr.setdefault(rule.field, [[] for _ in range(n)])[g] \
                    .append((rule.level, is_rate, rule.cost))
        self._base = tuple(zip(base_flat, base_rate))
        self._svc_thr = tuple(
            tuple(sorted(t, key=lambda x: x[0], reverse=True)) for t in svc_thr)
        fields = [f for f in field_order if f in field_maps or f in field_thr]
        self.fields = tuple(fields)
        self._field_maps = tuple(
            {v: tuple(eff) for v, eff in field_maps[f].items()}
            if f in field_maps else None for f in fields)
        self._field_thr = tuple(
            tuple((g, tuple(sorted(t, key=lambda x: x[0], reverse=True)))
                  for g, t in enumerate(field_thr[f]) if t)
            if f in field_thr else None for f in fields)
        self._memo: dict[tuple, tuple[_Entry, ...]] = {}
        self._static = self._entries(()) if not fields else None

    def __repr__(self) -> str:
        return (f"Plan(service={self.service!r}, rules={len(self.rules)}, "
                f"groups={self.groups}, fields={self.fields})")

    def _entries(self, values: tuple) -> tuple[_Entry, ...]:
        """Per-group entries for these field values (MISSING: absent)."""
        n = len(self.groups)
        flat = [b[0] for b in self._base]
        rate = [b[1] for b in self._base]
        flevel: list = [-1] * n
        fthr: list = [None] * n
        for i, value in enumerate(values):
            if value is _MISSING:
                continue
            maps = self._field_maps[i]
            if maps:
                effects = maps.get(value if type(value) is str else str(value))
                if effects:
                    for g, is_rate, cost in effects:
                        if is_rate:
                            rate[g] = rate[g] * cost
                        elif cost > flat[g]:
                            flat[g] = cost
            thresholds = self._field_thr[i]
            if thresholds:
                number = _field_number(value)
                if number is None:
                    continue
                for g, levels in thresholds:
                    for level, is_rate, cost in levels:
                        if number >= level:
                            # strictly higher: first field wins on a tie
                            if level > flevel[g]:
                                flevel[g] = level
                                fthr[g] = (is_rate, cost)
                            break
        out = []
        for g in range(n):
            ks = rate[g] * flat[g]
            if fthr[g] is None:
                kf = ks
            elif fthr[g][0]:
                kf = (rate[g] * fthr[g][1]) * flat[g]
            else:
                kf = rate[g] * (flat[g] + fthr[g][1])
            svc = self._svc_thr[g]
            if not svc and not kf:
                continue  # this group adds 0 to every datapoint
            out.append(_Entry(svc, flevel[g], ks, kf))
        return tuple(out)

    def _key(self, groupby: Mapping, metadata: Mapping) -> tuple:
        """The values of the plan's fields (groupby first, then metadata)."""
        values = []
        for name in self.fields:
            value = groupby.get(name, _MISSING)
            if value is _MISSING:
                value = metadata.get(name, _MISSING)
            values.append(value)
        return tuple(values)

    def _miss(self, key: tuple) -> tuple[_Entry, ...]:
        """Entries for a key not in the memo (memoised if possible)."""
        entries = self._entries(key)
        # Only str values are memoised: 1, 1.0 and True are equal keys but
        # do not match the same mapping values.
        if all(type(v) is str or v is _MISSING for v in key):
            memo = self._memo
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            memo[key] = entries
        return entries

    def _lookup(self, groupby: Mapping, metadata: Mapping) -> tuple[_Entry, ...]:
        if self._static is not None:
            return self._static
        key = self._key(groupby, metadata)
        try:
            entries = self._memo.get(key)
        except TypeError:  # an unhashable metadata value
            return self._entries(key)
        return self._miss(key) if entries is None else entries

    def price(self, point: DataPoint) -> decimal.Decimal:
        """The datapoint's price after this plan (input price + Σ groups)."""
        with decimal.localcontext(_CONTEXT):
            return self._price(point)

    def _price(self, point: DataPoint) -> decimal.Decimal:
        price = point.price
        qty = point.qty
        for svc, flevel, ks, kf in self._lookup(point.groupby, point.metadata):
            r = None
            for level, is_rate, cost in svc:
                if qty >= level:
                    if level >= flevel:  # the service threshold wins ties
                        r = ks * qty
                        r = r * cost if is_rate else r + cost
                    break
            if r is None:
                r = kf * qty
            price = price + r
        return price

    def rate_points(self, points: Iterable[DataPoint]) -> list[DataPoint]:
        """New points with their prices (same order).

        The hot loop of the daemon: :meth:`price` inlined, with the memo key
        built without a call for plans looking at one or two fields.
        """
        with decimal.localcontext(_CONTEXT):
            return self._rate_points(points)

    def _rate_points(self, points: Iterable[DataPoint]) -> list[DataPoint]:
        out: list[DataPoint] = []
        append = out.append
        static = self._static
        memo_get = self._memo.get
        miss = self._miss
        fields = self.fields
        nf = len(fields)
        f0 = fields[0] if nf > 0 else None
        f1 = fields[1] if nf > 1 else None
        missing = _MISSING
        for point in points:
            unit, qty, price, groupby, metadata = point
            if static is not None:
                entries = static
            else:
                if nf == 1:
                    v0 = groupby.get(f0, missing)
                    if v0 is missing:
                        v0 = metadata.get(f0, missing)
                    key = (v0,)
                elif nf == 2:
                    v0 = groupby.get(f0, missing)
                    if v0 is missing:
                        v0 = metadata.get(f0, missing)
                    v1 = groupby.get(f1, missing)
                    if v1 is missing:
                        v1 = metadata.get(f1, missing)
                    key = (v0, v1)
                else:
                    key = self._key(groupby, metadata)
                try:
                    entries = memo_get(key)
                except TypeError:  # an unhashable metadata value
                    entries = self._entries(key)
                if entries is None:
                    entries = miss(key)
            if not entries:
                append(point)
                continue
            for svc, flevel, ks, kf in entries:
                r = None
                for level, is_rate, cost in svc:
                    if qty >= level:
                        if level >= flevel:  # the service threshold wins ties
                            r = ks * qty
                            r = r * cost if is_rate else r + cost
                        break
                if r is None:
                    r = kf * qty
                price = price + r
            append(_new_point(DataPoint, (unit, qty, price, groupby, metadata)))
        return out


def _field_number(value: Any) -> decimal.Decimal | None:
    """Decimal(field value) for a field threshold; None if not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = value if isinstance(value, _D) else _D(value)
    except (decimal.InvalidOperation, TypeError, ValueError):
        return None
    return None if number.is_nan() else number


class ServiceRules:
    """Every rule of one usage type, and its plans cache."""

    __slots__ = ("name", "rules", "field_order", "bounds", "scopes", "_plans")

    def __init__(self, name: str, rules: list[Rule],
                 field_order: list[str]) -> None:
        self.name = name
        self.rules = tuple(rules)
        self.field_order = list(field_order)
        edges = {t for r in rules for t in (r.start, r.end) if t is not None}
        self.bounds = sorted(edges)
        self.scopes = frozenset(r.scope for r in rules if r.scope is not None)
        self._plans: dict[tuple[str | None, int], Plan] = {}

    def plan(self, scope: str | None, when: datetime.datetime) -> Plan:
        """The plan for ``scope`` at period start ``when`` (aware UTC)."""
        idx = bisect.bisect_right(self.bounds, when) if self.bounds else 0
        if scope not in self.scopes:
            scope = None
        key = (scope, idx)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._build(scope, idx)
        return plan

    def active_rules(self, scope: str | None, idx: int) -> list[Rule]:
        """The rules in force in validity interval ``idx`` for ``scope``:
        the global ones, each replaced by the scope's rule of the same key.
        """
        when = self.bounds[idx - 1] if idx > 0 else None
        merged: dict[tuple, Rule] = {}
        for rule in self.rules:
            if rule.scope is None and rule.active_at(when):
                merged[rule.key] = rule
        if scope is not None:
            for rule in self.rules:
                if rule.scope == scope and rule.active_at(when):
                    merged[rule.key] = rule
        return list(merged.values())

    def _build(self, scope: str | None, idx: int) -> Plan:
        return Plan(self.name, self.active_rules(scope, idx), self.field_order)


class RuleSet:
    """A loaded rules file, compiled. Immutable apart from its caches."""

    __slots__ = ("path", "services")

    def __init__(self, path: str, services: dict[str, ServiceRules]) -> None:
        self.path = path
        self.services = services

    def __repr__(self) -> str:
        return (f"RuleSet({self.path!r}, services={sorted(self.services)}, "
                f"rules={self.rule_count})")

    @property
    def rule_count(self) -> int:
        return sum(len(s.rules) for s in self.services.values())

    def plan(self, service: str, scope: str | None,
             period_start: datetime.datetime) -> Plan | None:
        """The plan for a usage type, or None if it has no rules at all.

        ``period_start`` must be an aware datetime (see :func:`to_utc`).
        """
        rules = self.services.get(service)
        if rules is None:
            return None
        return rules.plan(scope, period_start)


def price_point(ruleset: RuleSet, service: str, scope: str | None,
                period_start: datetime.datetime | str,
                point: DataPoint) -> decimal.Decimal:
    """The price of one datapoint of ``service`` in ``scope`` for the period
    starting at ``period_start`` (a datetime, naive = UTC, or ISO text)."""
    plan = ruleset.plan(service, scope, to_utc(period_start))
    if plan is None:
        return point.price
    return plan.price(point)
