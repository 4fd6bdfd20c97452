"""CloudKitty hashmap rows translated into the rules of a rules file.

The pure half of ``rules import-cloudkitty``
(:mod:`cloudkitty_proc.rating.cloudkitty_import` reads the tables): a row
of ``hashmap_mappings`` or ``hashmap_thresholds``, as a dict of its
columns, becomes a :class:`Row`, and the kept rows become the rules
document (CONTRACTS.md §4). Translation:

* a service is a usage type (``services.<name>``), a field a
  ``fields.<name>`` entry of its service;
* a mapping with ``service_id`` is a service mapping, one with ``field_id``
  a field mapping (``value``); ``map_type`` → ``type``; ``cost``/``level``
  are copied digit for digit (read as text, never through a float);
* ``group_id`` → ``group: <group name>``; no group → the default group;
* ``tenant_id`` → ``scope``;
* ``start`` → ``start`` (omitted when it is 1970-01-01 or earlier, the value
  CloudKitty's migration gave to existing rules), ``end`` → ``end``; both
  are naive in CloudKitty and read as UTC.

CloudKitty keeps, for one service/field, group and tenant, a single mapping
per value (a single threshold per level): when the database holds several
(its unique constraints do not cover NULL tenant or value columns), the row
loaded last wins, i.e. the one with the highest ``id``. The import does the
same and reports each row it drops; this file format refuses such
duplicates. Rows CloudKitty never loads (attached to no service or field)
are skipped with a warning; rows CloudKitty cannot rate with (a field
mapping without value, a service mapping with one, a threshold without
level, an unknown type) stop the import with an error naming the row.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
from collections.abc import Callable
from typing import Any

from cloudkitty_proc import utils
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.rating.hashmap_schema import DEFAULT_GROUP

__all__ = ["Row", "convert_row", "resolve_duplicates", "rules_document",
           "time_text"]

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_TYPES = ("flat", "rate")

Warn = Callable[[str], None]


@dataclasses.dataclass
class Row:
    """One CloudKitty rule row, translated (not yet checked for duplicates)."""

    table: str
    id: int
    uuid: str | None
    service: str
    field: str | None
    kind: str                      # "mappings" / "thresholds"
    cost: decimal.Decimal
    type: str
    group: str
    scope: str | None
    value: str | None = None
    level: decimal.Decimal | None = None
    start: datetime.datetime | None = None
    end: datetime.datetime | None = None
    field_id: int | None = None

    @property
    def label(self) -> str:
        uuid = f", {self.table[8:-1]}_id {self.uuid}" if self.uuid else ""
        return f"{self.table} id {self.id}{uuid}"

    @property
    def key(self) -> tuple:
        if self.kind == "thresholds":
            return (self.service, self.field, self.kind, self.scope, self.group, self.level)
        return (self.service, self.field, self.kind, self.scope, self.group, self.value)

    def overlaps(self, other: Row) -> bool:
        return ((self.start is None or other.end is None or self.start < other.end)
                and (other.start is None or self.end is None or other.start < self.end))

    def as_rule(self) -> dict[str, Any]:
        rule: dict[str, Any] = {}
        if self.kind == "mappings" and self.field is not None:
            rule["value"] = self.value
        if self.kind == "thresholds":
            rule["level"] = _dec_str(self.level)
        rule["cost"] = _dec_str(self.cost)
        rule["type"] = self.type
        if self.group != DEFAULT_GROUP:
            rule["group"] = self.group
        if self.scope is not None:
            rule["scope"] = self.scope
        if self.start is not None:
            rule["start"] = time_text(self.start)
        if self.end is not None:
            rule["end"] = time_text(self.end)
        return rule


def _dec_str(value: decimal.Decimal | None) -> str:
    """Shortest plain text of a decimal: 0.01000000 → "0.01", 10.0 → "10"."""
    assert value is not None
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def time_text(value: datetime.datetime) -> str:
    """ISO 8601 UTC text with a ``Z``, as the rules file writes times."""
    return value.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _decimal(raw: Any, what: str, label: str) -> decimal.Decimal:
    if isinstance(raw, float):
        raw = repr(raw)
    try:
        value = decimal.Decimal(raw.strip() if isinstance(raw, str) else raw)
    except (decimal.InvalidOperation, TypeError, ValueError):
        raise ConfigError(f"CloudKitty {label}: {what} is not a decimal: "
                          f"{raw!r}") from None
    if not value.is_finite():
        raise ConfigError(f"CloudKitty {label}: {what} is not finite: {raw!r}")
    return value


def _time(raw: Any, what: str, label: str) -> datetime.datetime | None:
    if raw is None:
        return None
    try:
        return utils.parse_time(raw if isinstance(raw, datetime.datetime)
                                else str(raw), what=what)
    except ValueError:
        raise ConfigError(f"CloudKitty {label}: {what} is not a time: "
                          f"{raw!r}") from None


def convert_row(raw: dict, table: str, kind: str, services: dict, fields: dict,
                groups: dict, warn: Warn) -> Row | None:
    """The row ``raw`` of ``table`` as a Row; None if CloudKitty never loads
    it (reported with ``warn``); ConfigError if CloudKitty cannot rate with it.
    ``services``/``groups``: id → name; ``fields``: id → (service, field)."""
    uuid = raw.get("mapping_id") if kind == "mappings" else raw.get("threshold_id")
    probe = Row(table, raw["id"], uuid, "", None, kind, decimal.Decimal(0),
                 "flat", DEFAULT_GROUP, None)
    label = probe.label
    service_id, field_id = raw.get("service_id"), raw.get("field_id")
    if service_id is not None and field_id is not None:
        raise ConfigError(f"CloudKitty {label}: has both a service and a field "
                          "(CloudKitty refuses such rules)")
    if field_id is not None:
        if field_id not in fields:
            warn(f"{label}: its field (id {field_id}) does not exist or was "
                 "skipped; CloudKitty never loads it, skipped")
            return None
        service, field = fields[field_id]
    elif service_id is not None:
        if service_id not in services:
            warn(f"{label}: its service (id {service_id}) does not exist; "
                 "CloudKitty never loads it, skipped")
            return None
        service, field = services[service_id], None
    else:
        warn(f"{label}: attached to no service and no field; CloudKitty never "
             "loads it, skipped")
        return None

    map_type = raw.get("map_type")
    if map_type not in _TYPES:
        raise ConfigError(f"CloudKitty {label}: unknown map_type {map_type!r} "
                          "(flat or rate)")
    cost = _decimal(raw.get("cost"), "cost", label)
    group_id = raw.get("group_id")
    if group_id is None:
        group = DEFAULT_GROUP
    elif group_id in groups:
        group = groups[group_id]
    else:
        raise ConfigError(f"CloudKitty {label}: its group (id {group_id}) does "
                          "not exist (CloudKitty cannot rate with this rule)")
    scope = raw.get("tenant_id")
    if scope is not None:
        scope = str(scope)
        if not scope.strip():
            warn(f"{label}: empty tenant_id matches no scope, skipped")
            return None
    row = Row(table, raw["id"], uuid, service, field, kind, cost, map_type,
               group, scope, field_id=field_id)

    if kind == "mappings":
        value = raw.get("value")
        if field is None and value:
            raise ConfigError(f"CloudKitty {label}: a service mapping with a "
                              f"value ({value!r}); CloudKitty cannot rate "
                              "with it")
        if field is not None:
            if value is None or value == "":
                raise ConfigError(f"CloudKitty {label}: a field mapping of "
                                  f"{service}.{field} without value; "
                                  "CloudKitty cannot rate with it")
            row.value = str(value)
    else:
        if raw.get("level") is None:
            raise ConfigError(f"CloudKitty {label}: a threshold without level; "
                              "CloudKitty cannot rate with it")
        row.level = _decimal(raw["level"], "level", label)
        if row.level < 0:
            warn(f"{label}: negative level {row.level} never applies in "
                 "CloudKitty, skipped")
            return None

    start = _time(raw.get("start"), "start", label)
    end = _time(raw.get("end"), "end", label)
    if start is not None and start <= _EPOCH:
        start = None
    if start is not None and end is not None and end <= start:
        warn(f"{label}: end {time_text(end)} is not after start "
             f"{time_text(start)}; never active, skipped")
        return None
    row.start, row.end = start, end
    return row


def resolve_duplicates(rows: list[Row], warn: Warn) -> list[Row]:
    """Per key (and origin), the row with the highest id wins where the
    validity windows of two rows overlap, as when CloudKitty loads them."""
    by_key: dict[tuple, list[Row]] = {}
    for row in sorted(rows, key=lambda r: (r.table, r.id)):
        same = by_key.setdefault(row.key, [])
        for older in list(same):
            if older.overlaps(row):
                same.remove(older)
                warn(f"{older.label} dropped: {row.label} has the same "
                     f"service/field, group, tenant and "
                     f"{'level' if row.kind == 'thresholds' else 'value'} and "
                     "overrides it in CloudKitty (the row loaded last wins)")
        same.append(row)
    kept = [r for same in by_key.values() for r in same]
    kept.sort(key=lambda r: (r.table, r.id))
    return kept


def rules_document(rows: list[Row]) -> dict:
    """The rules document: services by name; fields in field id order
    (CloudKitty's load order, which decides ties between field thresholds
    of equal level); rules in id order."""
    services: dict[str, dict] = {}
    field_ids: dict[str, dict[str, int]] = {}
    for row in rows:
        svc = services.setdefault(row.service, {})
        if row.field is None:
            svc.setdefault(row.kind, []).append(row.as_rule())
        else:
            field_ids.setdefault(row.service, {})[row.field] = row.field_id or 0
            fields = svc.setdefault("fields", {})
            fields.setdefault(row.field, {}).setdefault(row.kind, []).append(row.as_rule())
    field_order = {name: sorted(ids, key=ids.__getitem__)
                   for name, ids in field_ids.items()}
    out: dict[str, dict] = {}
    for name in sorted(services):
        svc = services[name]
        ordered: dict[str, Any] = {}
        for kind in ("mappings", "thresholds"):
            if kind in svc:
                ordered[kind] = svc[kind]
        if "fields" in svc:
            ordered["fields"] = {
                f: {k: svc["fields"][f][k] for k in ("mappings", "thresholds")
                    if k in svc["fields"][f]}
                for f in field_order[name]}
        out[name] = ordered
    return {"hashmap": {"services": out}}
