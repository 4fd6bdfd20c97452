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
on any of the tables. Soft-deleted rows (``deleted`` set: a timestamp, or a
non-zero value for oslo.db's integer convention) are left out. How the
remaining rows become rules (and which are dropped or refused) is
:mod:`cloudkitty_proc.rating.cloudkitty_translate`.

The output is validated with the rules loader before it is written.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import sqlalchemy as sa
import yaml

from cloudkitty_proc import utils
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.log import mask_url
from cloudkitty_proc.rating.cloudkitty_translate import (
    Row,
    convert_row,
    resolve_duplicates,
    rules_document,
    time_text,
)
from cloudkitty_proc.rating.hashmap_engine import RuleSet, parse_rules

__all__ = ["ImportResult", "import_cloudkitty", "read_cloudkitty_rules", "render_rules"]

TABLES = ("hashmap_services", "hashmap_fields", "hashmap_groups",
          "hashmap_mappings", "hashmap_thresholds")


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
    rows: list[Row] = []
    for table, kind, extra in (("hashmap_mappings", "mappings", ["mapping_id", "value"]),
                               ("hashmap_thresholds", "thresholds", ["threshold_id", "level"])):
        raw_rows, n = _live(conn, tables[table], common + extra)
        result.deleted += n
        for raw in raw_rows:
            row = convert_row(raw, table, kind, services, fields, groups, warn)
            if row is not None:
                rows.append(row)

    kept = resolve_duplicates(rows, warn)
    result.mappings = sum(1 for r in kept if r.kind == "mappings")
    result.thresholds = len(kept) - result.mappings
    return rules_document(kept), result


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
              f"{time_text(utils.utcnow().replace(microsecond=0))}.\n"
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
