"""Hashmap rules file: reading and validation (the rule schema).

The format and its semantics are CONTRACTS.md §4 (CloudKitty's HashMap
module) and doc/source/rating.rst. This module turns a rules file into
validated :class:`Rule` tuples, per usage type, without compiling them;
:mod:`cloudkitty_proc.rating.hashmap_engine` compiles and prices them::

    data = read_rules_document(path)          # YAML; ConfigError
    services = validate_rules(data, path)     # {service: (rules, fields)}

Every problem of a file is collected and reported in one
:class:`~cloudkitty_proc.exceptions.ConfigError` (up to 20 shown) naming
the file, the service, the field, the list and the index at fault.

What is checked besides the shape (types, known keys):

* ``cost`` and ``level`` are finite decimals (text or YAML numbers, never
  through a float's binary value); ``type`` is ``flat`` or ``rate``;
* a field mapping has a string ``value``; a service mapping has none; a
  threshold has a ``level``;
* ``start``/``end`` are ISO 8601 times (naive: UTC), ``end`` after
  ``start``;
* two rules of the same key (what a per-scope rule replaces, CloudKitty's
  dictionary key) and the same origin (global or one scope) must have
  disjoint validity windows;
* negative threshold levels are refused (a deliberate difference: in
  CloudKitty a level <= -1 can never apply).
"""

from __future__ import annotations

import datetime
import decimal
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from cloudkitty_proc import yamlfile
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.rating.hashmap_values import (MAX_COST, MAX_LEVEL, MIN_COST, parse_decimal,
                                                   range_error, rule_time)
from cloudkitty_proc.yamlfile import excerpt

__all__ = ["DEFAULT_GROUP", "FLAT", "RATE", "Rule", "ServiceSpec",
           "read_rules_document", "rule_time", "validate_rules"]

DEFAULT_GROUP = "_DEFAULT_"
FLAT = "flat"
RATE = "rate"
TYPES = (FLAT, RATE)

_UTC = datetime.timezone.utc
_D = decimal.Decimal
_MAX_ERRORS = 20

_MAPPING_KEYS = frozenset(("cost", "type", "group", "scope", "start", "end"))
_FIELD_MAPPING_KEYS = _MAPPING_KEYS | {"value"}
_THRESHOLD_KEYS = _MAPPING_KEYS | {"level"}
_SERVICE_KEYS = ("mappings", "thresholds", "fields")
_FIELD_KEYS = ("mappings", "thresholds")


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
    out = f"service {excerpt(service)}"
    if field is not None:
        out += f", field {excerpt(field)}"
    if kind is not None:
        out += f", {kind}"
        if index is not None:
            out += f"[{index}]"
    return out


def _describe_key(rule: Rule) -> str:
    if rule.kind == "thresholds":
        return f"group {excerpt(rule.group)}, level {rule.level}"
    if rule.field is None:
        return f"group {excerpt(rule.group)}"
    return f"group {excerpt(rule.group)}, value {excerpt(rule.value)}"


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
            errors.add(where, f"unknown key {excerpt(key)} (allowed: "
                       f"{', '.join(sorted(allowed))})")

    # cost
    cost = None
    if "cost" not in raw:
        errors.add(where, "'cost' is missing")
        ok = False
    else:
        cost = parse_decimal(raw["cost"])
        if cost is None:
            errors.add(where, f"'cost' is not a decimal: {excerpt(raw['cost'])}")
            ok = False
        elif (problem := range_error(cost, MIN_COST, MAX_COST)) is not None:
            errors.add(where, f"'cost' {excerpt(raw['cost'])} is {problem}")
            ok = False

    # type
    rtype = raw.get("type", FLAT)
    if rtype not in TYPES:
        errors.add(where, f"unknown type {excerpt(rtype)} (flat or rate)")
        ok = False

    # group
    group = raw.get("group", DEFAULT_GROUP)
    if not isinstance(group, str) or not group:
        errors.add(where, f"'group' must be a non-empty string, got {excerpt(group)}")
        ok = False

    # scope
    scope = raw.get("scope")
    if "scope" in raw and (not isinstance(scope, str) or not scope):
        errors.add(where, f"'scope' must be a non-empty string (quote "
                   f"numeric ids), got {excerpt(scope)}")
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
                           f"{excerpt(value)}")
                ok = False

    # level (thresholds)
    level = None
    if kind == "thresholds":
        if "level" not in raw or raw["level"] is None:
            errors.add(where, "'level' is missing (a threshold applies from "
                       "its level up)")
            ok = False
        else:
            level = parse_decimal(raw["level"])
            if level is None:
                errors.add(where, f"'level' is not a decimal: {excerpt(raw['level'])}")
                ok = False
            elif (problem := range_error(level, _D(0), MAX_LEVEL)) is not None:
                errors.add(where, f"'level' {excerpt(raw['level'])} is {problem}")
                ok = False
            elif level < 0:
                errors.add(where, f"'level' must be >= 0, got {excerpt(raw['level'])}")
                ok = False

    # validity
    bounds = {}
    for name in ("start", "end"):
        if name not in raw or raw[name] is None:
            bounds[name] = None
            continue
        parsed = rule_time(raw[name])
        if parsed is None:
            errors.add(where, f"{excerpt(name)} is not an ISO 8601 time: "
                       f"{excerpt(raw[name])}")
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
                    origin = f"scope {excerpt(scope)}" if scope else "global"
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
            errors.add(where, f"unknown key {excerpt(key)} (allowed: "
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
                       f"string, got {excerpt(fname)}")
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
                errors.add(fwhere, f"unknown key {excerpt(key)} (allowed: "
                           f"{', '.join(_FIELD_KEYS)})")
        for kind in _FIELD_KEYS:
            items = _as_list(fraw.get(kind), _where(name, fname, kind), errors)
            for i, item in enumerate(items):
                rule = _parse_rule(item, name, fname, kind, i, errors)
                if rule is not None:
                    rules.append(rule)
    _check_duplicates(rules, errors)
    return rules, fields


class ServiceSpec(NamedTuple):
    """The validated rules of one usage type, in file order."""

    rules: list[Rule]
    fields: list[str]     # field names in file order (ties between fields)


def validate_rules(data: Any, path: str = "<rules>") -> dict[str, ServiceSpec]:
    """Validate an already parsed rules document: the rules per usage type.

    ConfigError naming ``path`` and every problem found.
    """
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
            errors.add("", f"unknown top-level key {excerpt(key)} (allowed: hashmap)")
    hashmap = data.get("hashmap")
    if not isinstance(hashmap, Mapping):
        errors.add("hashmap", "'hashmap' is missing or not a mapping "
                   "(expected hashmap: {services: ...})")
        errors.raise_if_any()
    for key in hashmap:
        if key != "services":
            errors.add("hashmap", f"unknown key {excerpt(key)} (allowed: services)")
    services = hashmap.get("services")
    if not isinstance(services, Mapping) or not services:
        errors.add("hashmap.services", "must be a non-empty mapping of usage "
                   "types to their rules")
        errors.raise_if_any()
    parsed: dict[str, ServiceSpec] = {}
    for name, raw in services.items():
        if not isinstance(name, str) or not name:
            errors.add("hashmap.services", f"service name must be a non-empty "
                       f"string, got {excerpt(name)}")
            continue
        parsed[name] = ServiceSpec(*_parse_service(name, raw, errors))
    errors.raise_if_any()
    return parsed


def read_rules_document(path: str | os.PathLike) -> Any:
    """The parsed YAML of a rules file (not validated); ConfigError if the
    file cannot be read, is not UTF-8 or not acceptable YAML (yamlfile)."""
    return yamlfile.load(path, what="rating rules")
