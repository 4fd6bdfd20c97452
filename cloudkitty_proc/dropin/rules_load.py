"""CloudKitty's rating modules and rules, read from its database into a :class:`LiveRules`.

The build step of the drop-in rating chain (:mod:`cloudkitty_proc.dropin.rules`),
run when the rules fingerprint changed. What is read, and how CloudKitty
25.0.0 uses it (``cloudkitty/orchestrator.py`` ``BaseWorker``,
``cloudkitty/rating/hash/__init__.py`` ``HashMap._load_rates``,
``cloudkitty/rating/pyscripts/__init__.py``):

* ``modules_state``: the enabled modules run in descending priority; a
  module without a row is disabled, a NULL or 0 priority is 1; ``noop`` is
  always enabled (priority 1) and does nothing; equal priorities keep
  CloudKitty's entry point order (hashmap, noop, pyscripts). A module
  enabled in the table that cloudkitty_proc does not have fails every
  period (rating without it would be wrong), naming it.
* hashmap: every service, field and group; every mapping not soft-deleted
  (``deleted IS NULL``) whatever its window, and every threshold, in id
  order. The engine (:mod:`cloudkitty_proc.rating.hashmap_engine`) picks,
  for a period starting at T, the mappings with ``start <= T < end`` (end
  NULL: open), so one build prices any period, past ones included (a
  reprocessing task re-rates with the prices of each period). The global
  rules (``tenant_id`` NULL) load first; a rule of the scope's tenant
  replaces the global rule of the same key (group; and value for a field
  mapping, level for a threshold), as CloudKitty's ``dict.update`` of the
  tenant's rules over the global ones does; rows of the same key and origin
  both active at T: the later id wins (CloudKitty's last loaded). The rows
  become rules through :mod:`cloudkitty_proc.rating.cloudkitty_translate`
  (as ``rules import-cloudkitty`` does); a mapping ``value`` of ``''`` or
  NULL is no value. A field mapping without value (the API refuses them;
  CloudKitty's loader ignores them) is skipped with a warning; a row
  CloudKitty cannot rate with (a service mapping with a value, a threshold
  without level) fails every period, naming the row, as it fails
  CloudKitty's processor.
* pyscripts: ``pyscripts_scripts`` rows not soft-deleted, in id order,
  ``data`` zlib-decompressed and compiled; run with CloudKitty's contract
  (:class:`cloudkitty_proc.rating.pyscripts.CloudKittyScript`) when
  active at T (same window rule as mappings). Read only when the module is
  enabled and ``[rating] allow_pyscripts`` is true.
"""

from __future__ import annotations

import dataclasses
import datetime
import zlib
from collections.abc import Callable

import sqlalchemy as sa

from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.dropin import rating_tables as rt
from cloudkitty_proc.dropin.rules_fingerprint import Fingerprint
from cloudkitty_proc.exceptions import RatingError
from cloudkitty_proc.rating.cloudkitty_translate import Row, convert_row
from cloudkitty_proc.rating.hashmap_engine import RuleSet, ServiceRules
from cloudkitty_proc.rating.hashmap_schema import Rule
from cloudkitty_proc.rating.pyscripts import CloudKittyScript

__all__ = ["LiveRules", "Script", "load_live_rules", "module_order"]

#: CloudKitty's rating modules in its entry point order (ties of priority)
KNOWN_MODULES = ("hashmap", "noop", "pyscripts")
Warn = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Script:
    """One pyscript and its validity window (aware UTC; None: open)."""

    id: int
    name: str
    start: datetime.datetime | None
    end: datetime.datetime | None
    run: CloudKittyScript

    def active_at(self, when: datetime.datetime) -> bool:
        return ((self.start is None or self.start <= when)
                and (self.end is None or when < self.end))


@dataclasses.dataclass(frozen=True)
class LiveRules:
    """The modules and rules of one version of CloudKitty's tables."""

    fingerprint: Fingerprint
    #: enabled modules, in run order (noop included: it does nothing)
    modules: tuple[str, ...]
    #: (name, enabled, priority as CloudKitty reads it) of every known module
    states: tuple[tuple[str, bool, int], ...]
    hashmap: RuleSet
    scripts: tuple[Script, ...]
    mappings: int = 0
    thresholds: int = 0
    warnings: tuple[str, ...] = ()

    def scripts_at(self, when: datetime.datetime) -> list[Script]:
        return [s for s in self.scripts if s.active_at(when)]

    def rate_hashmap(self, frame: DataFrame, begin: datetime.datetime) -> DataFrame:
        """Price ``frame`` with the hashmap rules active at ``begin``."""
        rules = self.hashmap
        scope = frame.scope_id
        for usage_type, points in list(frame.items()):
            if not points:
                continue
            plan = rules.plan(usage_type, scope, begin)
            if plan is not None:
                frame.replace_points(usage_type, plan.rate_points(points))
        return frame

    def describe(self) -> str:
        order = ", ".join(f"{n}" for n in self.modules if n != "noop") or "none"
        return (f"modules in run order: {order}; hashmap: {self.mappings} mappings, "
                f"{self.thresholds} thresholds for {len(self.hashmap.services)} services; "
                f"pyscripts: {len(self.scripts)} scripts")


def module_order(rows: list[sa.Row]) -> tuple[tuple[str, ...], tuple[tuple[str, bool, int], ...]]:
    """(enabled modules in run order, states) from ``modules_state`` rows."""
    table = {r.name: (bool(r.state), int(r.priority) if r.priority else 1) for r in rows}
    unknown = sorted(name for name, (state, _) in table.items()
                     if state and name not in KNOWN_MODULES)
    if unknown:
        raise RatingError(
            f"CloudKitty's modules_state enables the rating module(s) {', '.join(unknown)}, "
            f"which cloudkitty_proc does not have (it has {', '.join(KNOWN_MODULES)}): "
            "nothing is rated until they are disabled (PUT /v2/rating/modules/<name> "
            "{\"enabled\": false}) or cloudkitty-processor rates this deployment")
    states = []
    for name in KNOWN_MODULES:
        if name == "noop":
            states.append((name, True, 1))
        else:
            state, priority = table.get(name, (False, 1))
            states.append((name, state, priority))
    enabled = [(priority, position, name)
               for position, (name, state, priority) in enumerate(states) if state]
    enabled.sort(key=lambda e: (-e[0], e[1]))
    return tuple(name for _, _, name in enabled), tuple(states)


def _column(table: sa.Table, name: str) -> sa.ColumnElement:
    """``cost`` and ``level`` as the driver returns them (no conversion by
    SQLAlchemy): a Decimal with every stored digit on PostgreSQL and
    MariaDB; on SQLite, which stores a REAL, a float that
    ``convert_row`` reads through ``repr`` (its shortest exact text)."""
    column = table.c[name]
    if name in ("cost", "level"):
        return sa.type_coerce(column, sa.types.NullType()).label(name)
    return column


def _by_id(conn: sa.Connection, table: sa.Table, *names: str,
           live: bool = False) -> list[sa.Row]:
    query = sa.select(*(_column(table, n) for n in names)).order_by(table.c.id)
    if live:
        query = query.where(table.c.deleted.is_(None))
    return conn.execute(query).all()


def _hashmap_rows(conn: sa.Connection, warn: Warn) -> tuple[list[Row], dict[str, list[str]]]:
    """The live rule rows (mappings then thresholds, each in id order) and
    every service's field names in id order (CloudKitty's order between
    fields, which decides ties between field thresholds)."""
    services = {r.id: r.name for r in _by_id(conn, rt.hashmap_services, "id", "name")}
    fields = {r.id: (services[r.service_id], r.name)
              for r in _by_id(conn, rt.hashmap_fields, "id", "name", "service_id")
              if r.service_id in services}
    groups = {r.id: r.name for r in _by_id(conn, rt.hashmap_groups, "id", "name")}
    common = ("id", "cost", "map_type", "service_id", "field_id", "group_id", "tenant_id")
    m, t = rt.hashmap_mappings, rt.hashmap_thresholds
    mappings = _by_id(conn, m, *common, "mapping_id", "value", "start", "end", live=True)
    thresholds = _by_id(conn, t, *common, "threshold_id", "level")
    rows: list[Row] = []
    for mapping in mappings:
        raw = dict(mapping._mapping)
        if raw["field_id"] is not None and raw["value"] in (None, ""):
            warn(f"hashmap_mappings id {raw['id']}: a field mapping without value; "
                 "CloudKitty never matches it, skipped")
            continue
        row = convert_row(raw, "hashmap_mappings", "mappings", services, fields, groups, warn)
        if row is not None:
            rows.append(row)
    for raw in thresholds:
        row = convert_row(dict(raw._mapping), "hashmap_thresholds", "thresholds", services,
                          fields, groups, warn)
        if row is not None:
            rows.append(row)
    field_order: dict[str, list[str]] = {}
    for service, field in fields.values():
        field_order.setdefault(service, []).append(field)
    return rows, field_order


def _ruleset(rows: list[Row], field_order: dict[str, list[str]]) -> RuleSet:
    per_service: dict[str, list[Rule]] = {}
    for row in rows:  # mappings then thresholds, each in id order
        per_service.setdefault(row.service, []).append(Rule(
            service=row.service, field=row.field, kind=row.kind, index=row.id,
            group=row.group, type=row.type, cost=row.cost, value=row.value,
            level=row.level, scope=row.scope, start=row.start, end=row.end))
    return RuleSet("CloudKitty's hashmap tables", {
        name: ServiceRules(name, rules, field_order.get(name, []))
        for name, rules in per_service.items()})


def _scripts(conn: sa.Connection) -> tuple[Script, ...]:
    s = rt.pyscripts_scripts
    rows = conn.execute(sa.select(s.c.id, s.c.name, s.c.data, s.c.start, s.c.end)
                        .where(s.c.deleted.is_(None)).order_by(s.c.id)).all()
    scripts = []
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    for row in rows:
        label = f"<PyScripts: {row.name}>"
        try:
            source = zlib.decompress(bytes(row.data))
        except zlib.error as exc:
            raise RatingError(f"pyscripts_scripts id {row.id} ({row.name!r}): data is not "
                              f"zlib-compressed: {exc}") from None
        try:
            code = compile(source, label, "exec")
        except (SyntaxError, ValueError) as exc:
            line = f" line {exc.lineno}" if getattr(exc, "lineno", None) else ""
            raise RatingError(f"pyscripts_scripts id {row.id} ({row.name!r}):{line}: "
                              f"{getattr(exc, 'msg', None) or exc}") from None
        start = _utc(row.start)
        scripts.append(Script(row.id, row.name, None if start and start <= epoch else start,
                              _utc(row.end), CloudKittyScript(label, code)))
    return tuple(scripts)


def _utc(value: datetime.datetime | None) -> datetime.datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.timezone.utc)
    return value.astimezone(datetime.timezone.utc)


def load_live_rules(conn: sa.Connection, fingerprint: Fingerprint, *,
                    allow_pyscripts: bool) -> LiveRules:
    """Read modules, hashmap rules and (when enabled and allowed) scripts.

    RatingError or ConfigError naming the table and row CloudKitty could not
    rate with either; SQLAlchemy errors propagate."""
    warnings: list[str] = []
    modules, states = module_order(conn.execute(
        sa.select(rt.modules_state.c.name, rt.modules_state.c.state,
                  rt.modules_state.c.priority)).all())
    ruleset = RuleSet("CloudKitty's hashmap tables", {})
    mappings = thresholds = 0
    if "hashmap" in modules:
        rows, field_order = _hashmap_rows(conn, warnings.append)
        mappings = sum(1 for r in rows if r.kind == "mappings")
        thresholds = len(rows) - mappings
        ruleset = _ruleset(rows, field_order)
    scripts: tuple[Script, ...] = ()
    if "pyscripts" in modules and allow_pyscripts:
        scripts = _scripts(conn)
    return LiveRules(fingerprint, modules, states, ruleset, scripts, mappings, thresholds,
                     tuple(warnings))
