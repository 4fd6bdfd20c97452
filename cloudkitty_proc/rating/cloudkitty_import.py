"""Import a CloudKitty database's hashmap rules into a rules file.

``cloudkitty-proc-manage rules import-cloudkitty --connection URL
[--output FILE]`` reads the tables of CloudKitty's hashmap module
(``cloudkitty/rating/hash/db/sqlalchemy/models.py`` and its alembic
migrations) and writes the equivalent rules file (CONTRACTS.md §4)::

    hashmap_services   (id, service_id, name)
    hashmap_fields     (id, field_id, name, service_id → services.id)
    hashmap_groups     (id, group_id, name)
    hashmap_mappings   (id, mapping_id, value, cost, map_type, service_id,
                        field_id, group_id, tenant_id
                        [, start, end, deleted, created_at, name, ...])
    hashmap_thresholds (id, threshold_id, level, cost, map_type, service_id,
                        field_id, group_id, tenant_id)

The optional columns came with CloudKitty's migration ``8a591f85865f``
(rules with a validity window, soft deletion); they are used when present,
on any of the tables. Translation:

* a service is a usage type (``services.<name>``), a field a
  ``fields.<name>`` entry of its service;
* a mapping with ``service_id`` is a service mapping, one with ``field_id``
  a field mapping (``value``); ``map_type`` → ``type``; ``cost``/``level``
  are copied digit for digit (read as text, never through a float);
* ``group_id`` → ``group: <group name>``; no group → the default group;
* ``tenant_id`` → ``scope``;
* ``start`` → ``start`` (omitted when it is 1970-01-01 or earlier, the value
  CloudKitty's migration gave to existing rules), ``end`` → ``end``; both
  are naive in CloudKitty and read as UTC;
* soft-deleted rows (``deleted`` set: a timestamp, or a non-zero value for
  oslo.db's integer convention) are left out.

CloudKitty keeps, for one service/field, group and tenant, a single mapping
per value (a single threshold per level): when the database holds several
(its unique constraints do not cover NULL tenant or value columns), the row
loaded last wins, i.e. the one with the highest ``id``. The import does the
same and reports each row it drops; this file format refuses such
duplicates. Rows CloudKitty never loads (attached to no service or field)
are skipped with a warning; rows CloudKitty cannot rate with (a field
mapping without value, a service mapping with one, a threshold without
level, an unknown type) stop the import with an error naming the row.

The output is validated with the rules loader before it is written.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import os
import tempfile
from typing import Any

import sqlalchemy as sa
import yaml

from cloudkitty_proc import utils
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.log import mask_url
from cloudkitty_proc.rating.hashmap_engine import RuleSet, parse_rules
from cloudkitty_proc.rating.hashmap_schema import DEFAULT_GROUP

__all__ = ["ImportResult", "import_cloudkitty", "read_cloudkitty_rules", "render_rules"]

TABLES = ("hashmap_services", "hashmap_fields", "hashmap_groups",
          "hashmap_mappings", "hashmap_thresholds")
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_TYPES = ("flat", "rate")


@dataclasses.dataclass
class ImportResult:
    text: str                      # the rules file
    ruleset: RuleSet               # the file, loaded
    mappings: int = 0
    thresholds: int = 0
    deleted: int = 0               # soft-deleted rows left out
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def services(self) -> int:
        return len(self.ruleset.services)


@dataclasses.dataclass
class _Row:
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

    def overlaps(self, other: _Row) -> bool:
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
            rule["start"] = _time_str(self.start)
        if self.end is not None:
            rule["end"] = _time_str(self.end)
        return rule


def _dec_str(value: decimal.Decimal | None) -> str:
    """Shortest plain text of a decimal: 0.01000000 → "0.01", 10.0 → "10"."""
    assert value is not None
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _time_str(value: datetime.datetime) -> str:
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


def _is_deleted(value: Any) -> bool:
    """CloudKitty: ``deleted`` is a timestamp, NULL while the row is live;
    oslo.db's SoftDeleteMixin: 0 while live, the row id once deleted."""
    if value is None:
        return False
    if isinstance(value, (bool, int)) or (isinstance(value, str) and value.strip().isdigit()):
        return int(value) != 0
    return True


def _live(conn: sa.Connection, table: sa.Table, columns: list[str]) -> tuple[list[dict], int]:
    """Rows of ``table`` (dicts of ``columns`` present), without the
    soft-deleted ones, in id order; and how many were soft-deleted.

    ``cost`` and ``level`` are read as text so no float ever touches them
    (SQLite stores NUMERIC as REAL; MySQL and PostgreSQL give exact text).
    """
    cols = []
    for name in columns:
        if name not in table.c:
            continue
        col = table.c[name]
        if name in ("cost", "level"):
            cols.append(sa.cast(col, sa.String).label(name))
        else:
            cols.append(col)
    has_deleted = "deleted" in table.c
    if has_deleted:
        cols.append(table.c.deleted)
    rows = conn.execute(sa.select(*cols).order_by(table.c.id)).mappings().all()
    live = []
    deleted = 0
    for row in rows:
        if has_deleted and _is_deleted(row["deleted"]):
            deleted += 1
            continue
        live.append(dict(row))
    return live, deleted


def read_cloudkitty_rules(url: str) -> tuple[dict, ImportResult]:
    """Read the hashmap tables at ``url``: (rules document, counters and
    warnings; ``text``/``ruleset`` not set yet). ConfigError on failure."""
    shown = mask_url(url)
    try:
        engine = sa.create_engine(url)
    except Exception as exc:  # bad URL, missing driver
        raise ConfigError(f"--connection {shown}: {exc}") from None
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            present = set(inspector.get_table_names())
            missing = [t for t in TABLES if t not in present]
            if missing:
                raise ConfigError(
                    f"{shown}: not a CloudKitty database with the hashmap "
                    f"module (missing tables: {', '.join(missing)})")
            meta = sa.MetaData()
            meta.reflect(bind=conn, only=list(TABLES))
            return _read(conn, meta)
    except ConfigError:
        raise
    except sa.exc.SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise ConfigError(f"{shown}: cannot read the CloudKitty database: "
                          f"{mask_url(detail)}") from None
    finally:
        engine.dispose()


def _read(conn: sa.Connection, meta: sa.MetaData) -> tuple[dict, ImportResult]:
    tables = meta.tables
    result = ImportResult(text="", ruleset=None)  # type: ignore[arg-type]
    warn = result.warnings.append

    services_rows, n = _live(conn, tables["hashmap_services"], ["id", "name"])
    result.deleted += n
    services = {r["id"]: r["name"] for r in services_rows}
    field_rows, n = _live(conn, tables["hashmap_fields"], ["id", "name", "service_id"])
    result.deleted += n
    fields: dict[int, tuple[str, str]] = {}  # id → (service name, field name)
    for r in field_rows:
        if r["service_id"] not in services:
            warn(f"hashmap_fields id {r['id']} ({r['name']!r}): its service "
                 f"(id {r['service_id']}) does not exist; its rules are skipped")
            continue
        fields[r["id"]] = (services[r["service_id"]], r["name"])
    group_rows, n = _live(conn, tables["hashmap_groups"], ["id", "name"])
    result.deleted += n
    groups = {r["id"]: r["name"] for r in group_rows}

    common = ["id", "cost", "map_type", "service_id", "field_id", "group_id",
              "tenant_id", "start", "end"]
    rows: list[_Row] = []
    for table, kind, extra in (("hashmap_mappings", "mappings", ["mapping_id", "value"]),
                               ("hashmap_thresholds", "thresholds", ["threshold_id", "level"])):
        raw_rows, n = _live(conn, tables[table], common + extra)
        result.deleted += n
        for raw in raw_rows:
            row = _convert(raw, table, kind, services, fields, groups, warn)
            if row is not None:
                rows.append(row)

    kept = _resolve_duplicates(rows, warn)
    result.mappings = sum(1 for r in kept if r.kind == "mappings")
    result.thresholds = len(kept) - result.mappings
    return _document(kept), result


def _convert(raw: dict, table: str, kind: str, services: dict, fields: dict,
             groups: dict, warn) -> _Row | None:
    uuid = raw.get("mapping_id") if kind == "mappings" else raw.get("threshold_id")
    probe = _Row(table, raw["id"], uuid, "", None, kind, decimal.Decimal(0),
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
    row = _Row(table, raw["id"], uuid, service, field, kind, cost, map_type,
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
        warn(f"{label}: end {_time_str(end)} is not after start "
             f"{_time_str(start)}; never active, skipped")
        return None
    row.start, row.end = start, end
    return row


def _resolve_duplicates(rows: list[_Row], warn) -> list[_Row]:
    """Per key (and origin), the row with the highest id wins where the
    validity windows of two rows overlap, as when CloudKitty loads them."""
    by_key: dict[tuple, list[_Row]] = {}
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


def _document(rows: list[_Row]) -> dict:
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


def render_rules(document: dict, *, header: str = "") -> str:
    """YAML text, one flow mapping per rule."""
    body = yaml.safe_dump(document, sort_keys=False, default_flow_style=None,
                          width=10_000, allow_unicode=True)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    return ("\n".join(lines) + "\n" if lines else "") + body


def import_cloudkitty(url: str, output: str | None = None) -> ImportResult:
    """Read, translate, validate, then write ``output`` (if given).

    The file is written atomically (a temporary file renamed over it) and
    only after it loaded without error.
    """
    document, result = read_cloudkitty_rules(url)
    if not document["hashmap"]["services"]:
        raise ConfigError(f"{mask_url(url)}: no hashmap rules in the CloudKitty "
                          "database (nothing to import)")
    header = (f"Hashmap rules imported from CloudKitty ({mask_url(url)})\n"
              f"by cloudkitty-proc-manage rules import-cloudkitty on "
              f"{_time_str(utils.utcnow().replace(microsecond=0))}.\n"
              f"{result.mappings} mappings, {result.thresholds} thresholds; "
              f"soft-deleted rows left out: {result.deleted}.\n"
              "Format and semantics: doc/source/rating.rst")
    text = render_rules(document, header=header)
    path = output or "<stdout>"
    try:
        ruleset = parse_rules(yaml.safe_load(text), path)
    except ConfigError as exc:
        raise ConfigError(f"the rules read from CloudKitty do not validate, "
                          f"nothing written: {exc}") from None
    result.text = text
    result.ruleset = ruleset
    if output:
        _write_atomic(output, text)
    return result


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".rules-", suffix=".yml", dir=directory)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
