"""CloudKitty's rating tables in a test database, written as cloudkitty-api writes them.

``RulesDB(url)`` creates the tables from ``cloudkitty_proc.dropin.rating_tables``
and inserts rows the way CloudKitty 25.0.0's API does
(``cloudkitty/rating/hash/db/sqlalchemy/api.py``, the pyscripts and
modules_state APIs): uuids in ``*_id`` columns, a 32-character ``name``,
``created_at``/``created_by`` set, a mapping deleted by setting ``deleted``
(soft), a threshold deleted for real, a script's ``data`` zlib-compressed
with its sha512 ``checksum``. Ids are given explicitly, increasing, so the
load order is known on every backend.

``load_vectors`` turns the rulesets of ``shared/compat/hashmap-vectors.json``
into such rows (service ``"<ruleset>:<name>"``), so one database holds
them all.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import itertools
import uuid
import zlib
from typing import Any

import sqlalchemy as sa

from cloudkitty_proc.dropin import rating_tables as rt

EPOCH = datetime.datetime(1970, 1, 1)  # the start migration 8a591f85865f gave old rules
UTC = datetime.timezone.utc


def naive(value: datetime.datetime | str | None) -> datetime.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


class RulesDB:
    """One database with CloudKitty's rating tables."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sa.create_engine(url)
        rt.rating_metadata.create_all(self.engine)
        self._ids = {t.name: itertools.count(1) for t in rt.rating_metadata.sorted_tables}
        self.is_sqlite = self.engine.dialect.name == "sqlite"

    def close(self) -> None:
        self.engine.dispose()

    def _insert(self, table: sa.Table, rows: list[dict]) -> list[int]:
        for row in rows:
            row.setdefault("id", next(self._ids[table.name]))
        with self.engine.begin() as conn:
            conn.execute(table.insert(), rows)
        return [row["id"] for row in rows]

    def _update(self, table: sa.Table, row_id: int, **values: Any) -> None:
        with self.engine.begin() as conn:
            assert conn.execute(table.update().where(table.c.id == row_id)
                                .values(**values)).rowcount == 1

    # -- modules_state (PUT /v2/rating/modules/<name>) --------------------------------
    def module(self, name: str, enabled: bool, priority: int | None = 1) -> None:
        t = rt.modules_state
        with self.engine.begin() as conn:
            conn.execute(t.delete().where(t.c.name == name))
            conn.execute(t.insert().values(name=name, state=enabled, priority=priority))

    # -- hashmap (POST /v1/rating/module_config/hashmap/...) ---------------------------
    def service(self, name: str) -> int:
        return self._insert(rt.hashmap_services, [
            {"service_id": str(uuid.uuid4()), "name": name}])[0]

    def field(self, service_id: int, name: str) -> int:
        return self._insert(rt.hashmap_fields, [
            {"field_id": str(uuid.uuid4()), "name": name, "service_id": service_id}])[0]

    def group(self, name: str) -> int:
        return self._insert(rt.hashmap_groups, [
            {"group_id": str(uuid.uuid4()), "name": name}])[0]

    @staticmethod
    def mapping_row(cost: Any, map_type: str = "flat", *, service: int | None = None,
                    field: int | None = None, value: str | None = None,
                    group: int | None = None, tenant: str | None = None,
                    start: Any = EPOCH, end: Any = None, deleted: Any = None) -> dict:
        """A row as ``create_mapping`` writes it (``value`` of a service
        mapping: '' when the API got JSON without value, None from the CLI)."""
        return {"mapping_id": str(uuid.uuid4()), "value": value,
                "cost": decimal.Decimal(str(cost)), "map_type": map_type,
                "service_id": service, "field_id": field, "group_id": group,
                "tenant_id": tenant, "name": uuid.uuid4().hex,
                "created_at": datetime.datetime(2026, 1, 1), "start": naive(start),
                "end": naive(end), "description": None, "deleted": naive(deleted),
                "created_by": "unknown", "updated_by": None, "deleted_by": None}

    def mapping(self, cost: Any, map_type: str = "flat", **kw: Any) -> int:
        return self._insert(rt.hashmap_mappings, [self.mapping_row(cost, map_type, **kw)])[0]

    def mappings(self, rows: list[dict]) -> list[int]:
        return self._insert(rt.hashmap_mappings, rows)

    def update_mapping(self, mapping_id: int, **values: Any) -> None:
        """``PUT .../mappings/<id>`` (cost, value, map_type, group, tenant, end, ...)."""
        if "cost" in values:
            values["cost"] = decimal.Decimal(str(values["cost"]))
        self._update(rt.hashmap_mappings, mapping_id, updated_by="unknown", **values)

    def delete_mapping(self, mapping_id: int,
                       when: datetime.datetime = datetime.datetime(2026, 6, 1)) -> None:
        """``DELETE .../mappings/<id>``: a soft delete."""
        self._update(rt.hashmap_mappings, mapping_id, deleted=when, deleted_by="unknown")

    @staticmethod
    def threshold_row(level: Any, cost: Any, map_type: str = "flat", *,
                      service: int | None = None, field: int | None = None,
                      group: int | None = None, tenant: str | None = None) -> dict:
        return {"threshold_id": str(uuid.uuid4()), "level": decimal.Decimal(str(level)),
                "cost": decimal.Decimal(str(cost)), "map_type": map_type,
                "service_id": service, "field_id": field, "group_id": group,
                "tenant_id": tenant}

    def threshold(self, level: Any, cost: Any, map_type: str = "flat", **kw: Any) -> int:
        return self._insert(rt.hashmap_thresholds, [self.threshold_row(level, cost, map_type,
                                                                       **kw)])[0]

    def thresholds(self, rows: list[dict]) -> list[int]:
        return self._insert(rt.hashmap_thresholds, rows)

    # -- pyscripts (POST /v1/rating/module_config/pyscripts/scripts) -------------------
    def script(self, name: str, source: str, *, start: Any = EPOCH, end: Any = None,
               deleted: Any = None) -> int:
        data = source.encode("utf-8")
        return self._insert(rt.pyscripts_scripts, [{
            "script_id": str(uuid.uuid4()), "name": name, "data": zlib.compress(data),
            "checksum": hashlib.sha512(data).hexdigest(),
            "created_at": datetime.datetime(2026, 1, 1), "start": naive(start),
            "end": naive(end), "description": None, "deleted": naive(deleted),
            "created_by": "unknown", "updated_by": None, "deleted_by": None}])[0]


def load_vectors(db: RulesDB, rulesets: dict[int, dict]) -> None:
    """Every ruleset of hashmap-vectors.json as CloudKitty rows; ruleset n's
    service ``s`` is named ``"n:s"``, its groups ``"n:g"``. Service mappings
    alternate '' and NULL values (both "no value" in CloudKitty)."""
    groups: dict[str, int] = {}
    mappings: list[dict] = []
    thresholds: list[dict] = []
    blank = itertools.cycle(["", None])

    def common(rule: dict, rs: int) -> dict:
        name = rule.get("group")
        group = None
        if name not in (None, "_DEFAULT_"):
            key = f"{rs}:{name}"
            if key not in groups:
                groups[key] = db.group(key)
            group = groups[key]
        return {"group": group, "tenant": rule.get("scope")}

    def add(rules: dict, rs: int, **parent: Any) -> None:
        for rule in rules.get("mappings") or []:
            value = rule["value"] if "field" in parent else next(blank)
            mappings.append(db.mapping_row(
                rule["cost"], rule.get("type", "flat"), value=value,
                start=rule.get("start", EPOCH), end=rule.get("end"),
                **common(rule, rs), **parent))
        for rule in rules.get("thresholds") or []:
            thresholds.append(db.threshold_row(rule["level"], rule["cost"],
                                               rule.get("type", "flat"),
                                               **common(rule, rs), **parent))

    for rs, ruleset in rulesets.items():
        for name, spec in ruleset["rules"]["hashmap"]["services"].items():
            service = db.service(f"{rs}:{name}")
            add(spec, rs, service=service)
            for field_name, field_spec in (spec.get("fields") or {}).items():
                add(field_spec or {}, rs, field=db.field(service, field_name))
    if mappings:
        db.mappings(mappings)
    if thresholds:
        db.thresholds(thresholds)
