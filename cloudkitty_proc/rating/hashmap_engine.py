"""Hashmap pricing engine: rules compiled into plans that price datapoints.

Behind the ``hashmap`` rating processor (:mod:`cloudkitty_proc.rating.hashmap`),
the ``quote`` command and the tests::

    rules = load_rules("/etc/cloudkitty-proc/rating.yml")   # ConfigError
    price = price_point(rules, "instance", "p1", period_start, point)

Loading (once per file version) does all the work that does not depend on
a datapoint:

1. read and validate the file (:mod:`~cloudkitty_proc.rating.hashmap_schema`);
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
* a field mapping matches on ``str(field value) == value``, as CloudKitty
  25 does (not a difference; said here because earlier notes claimed one).
"""

from __future__ import annotations

import bisect
import datetime
import decimal
import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from cloudkitty_proc.dataframe import DataPoint
from cloudkitty_proc.rating.hashmap_schema import RATE, Rule, read_rules_document, validate_rules
from cloudkitty_proc.rating.hashmap_values import field_number, to_utc

__all__ = ["Plan", "RuleSet", "ServiceRules", "load_rules", "parse_rules",
           "price_point", "to_utc"]

_UTC = datetime.timezone.utc
_D = decimal.Decimal
_MISSING = object()
# Entries kept per plan in the field-values memo before it is cleared; the
# memo only grows with the number of distinct combinations of the values of
# the fields the plan looks at.
_MEMO_MAX = 65536

_new_point = tuple.__new__
# Python's default decimal context, as CloudKitty's, whatever context the
# calling thread has set.
_CONTEXT = decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN)


def parse_rules(data: Any, path: str = "<rules>") -> RuleSet:
    """Validate an already parsed rules document and compile it."""
    return RuleSet(path, {name: ServiceRules(name, spec.rules, spec.fields)
                          for name, spec in validate_rules(data, path).items()})


def load_rules(path: str | os.PathLike) -> RuleSet:
    """Read, validate and compile a rules file; ConfigError on any problem."""
    path = os.fspath(path)
    return parse_rules(read_rules_document(path), path)


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
                number = field_number(value)
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
