"""Import of a CloudKitty database's hashmap rules.

The CloudKitty schema is built here the way CloudKitty defines it
(cloudkitty/rating/hash/db/sqlalchemy/models.py; the columns added to
hashmap_mappings by its migration 8a591f85865f: created_at, start, end,
name, description, deleted, created_by, updated_by, deleted_by; cost
Numeric(40, 28) since 4e0232ce), in SQLite.
"""

from __future__ import annotations

import datetime
import uuid
from decimal import Decimal as D

import pytest
import sqlalchemy as sa
import yaml

from cloudkitty_proc.dataframe import DataPoint
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.rating.hashmap_engine import load_rules, price_point
from cloudkitty_proc.rating.cloudkitty_import import import_cloudkitty

JAN = "2026-01-15T10:00:00Z"
FEB = "2026-02-15T10:00:00Z"
EPOCH = datetime.datetime(1970, 1, 1)


def cloudkitty_metadata(audited: bool = True) -> sa.MetaData:
    """CloudKitty's hashmap tables. ``audited``: with the columns of
    migration 8a591f85865f (current CloudKitty); without: older releases,
    whose mappings had unique constraints instead."""
    meta = sa.MetaData()
    mysql = {"mysql_charset": "utf8", "mysql_engine": "InnoDB"}
    sa.Table(
        "hashmap_services", meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("service_id", sa.String(36), nullable=False, unique=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        **mysql)
    sa.Table(
        "hashmap_fields", meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("field_id", sa.String(36), nullable=False, unique=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("service_id", sa.Integer,
                  sa.ForeignKey("hashmap_services.id", ondelete="CASCADE"),
                  nullable=False),
        sa.UniqueConstraint("service_id", "name", name="uniq_field_per_service"),
        **mysql)
    sa.Table(
        "hashmap_groups", meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("group_id", sa.String(36), nullable=False, unique=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        **mysql)

    def refs():
        return [
            sa.Column("service_id", sa.Integer,
                      sa.ForeignKey("hashmap_services.id", ondelete="CASCADE"),
                      nullable=True),
            sa.Column("field_id", sa.Integer,
                      sa.ForeignKey("hashmap_fields.id", ondelete="CASCADE"),
                      nullable=True),
            sa.Column("group_id", sa.Integer,
                      sa.ForeignKey("hashmap_groups.id", ondelete="SET NULL"),
                      nullable=True),
            sa.Column("tenant_id", sa.String(255), nullable=True),
        ]

    mapping_extra: list = []
    if audited:
        mapping_extra = [
            sa.Column("created_at", sa.DateTime, nullable=False),
            sa.Column("start", sa.DateTime, nullable=False),
            sa.Column("end", sa.DateTime, nullable=True),
            sa.Column("name", sa.String(32), nullable=False),
            sa.Column("description", sa.String(256), nullable=True),
            sa.Column("deleted", sa.DateTime, nullable=True),
            sa.Column("created_by", sa.String(32), nullable=False),
            sa.Column("updated_by", sa.String(32), nullable=True),
            sa.Column("deleted_by", sa.String(32), nullable=True),
        ]
    else:
        mapping_extra = [
            sa.UniqueConstraint("value", "field_id", "tenant_id", name="uniq_field_mapping"),
            sa.UniqueConstraint("value", "service_id", "tenant_id",
                                name="uniq_service_mapping"),
        ]
    sa.Table(
        "hashmap_mappings", meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("mapping_id", sa.String(36), nullable=False, unique=True),
        sa.Column("value", sa.String(255), nullable=True),
        sa.Column("cost", sa.Numeric(40, 28), nullable=False),
        sa.Column("map_type", sa.Enum("flat", "rate", name="enum_map_type"),
                  nullable=False),
        *refs(), *mapping_extra, **mysql)
    sa.Table(
        "hashmap_thresholds", meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("threshold_id", sa.String(36), nullable=False, unique=True),
        sa.Column("level", sa.Numeric(20, 8), nullable=True),
        sa.Column("cost", sa.Numeric(40, 28), nullable=False),
        sa.Column("map_type", sa.Enum("flat", "rate", name="enum_hashmap_type"),
                  nullable=False),
        *refs(),
        sa.UniqueConstraint("level", "field_id", "tenant_id", name="uniq_field_threshold"),
        sa.UniqueConstraint("level", "service_id", "tenant_id",
                            name="uniq_service_threshold"),
        **mysql)
    return meta


class CloudKittyDB:
    """A CloudKitty hashmap database, filled the way its API would."""

    def __init__(self, url: str, audited: bool = True) -> None:
        self.url = url
        self.audited = audited
        self.engine = sa.create_engine(url)
        self.meta = cloudkitty_metadata(audited)
        self.meta.create_all(self.engine)
        self.t = self.meta.tables

    def _insert(self, table: str, **values) -> int:
        with self.engine.begin() as conn:
            return conn.execute(self.t[table].insert().values(**values)).inserted_primary_key[0]

    def service(self, name: str) -> int:
        return self._insert("hashmap_services", service_id=str(uuid.uuid4()), name=name)

    def field(self, service: int, name: str) -> int:
        return self._insert("hashmap_fields", field_id=str(uuid.uuid4()), name=name,
                            service_id=service)

    def group(self, name: str) -> int:
        return self._insert("hashmap_groups", group_id=str(uuid.uuid4()), name=name)

    def mapping(self, cost: str, map_type: str = "flat", *, service=None, field=None,
                value=None, group=None, tenant=None, start=None, end=None,
                deleted=None) -> int:
        values = dict(mapping_id=str(uuid.uuid4()), value=value, cost=cost,
                      map_type=map_type, service_id=service, field_id=field,
                      group_id=group, tenant_id=tenant)
        if self.audited:
            values.update(created_at=datetime.datetime(2025, 6, 1), start=start or EPOCH,
                          end=end, name=uuid.uuid4().hex, deleted=deleted,
                          created_by="admin",
                          deleted_by="admin" if deleted else None)
        else:
            assert start is end is deleted is None
        return self._insert("hashmap_mappings", **values)

    def threshold(self, level: str, cost: str, map_type: str = "flat", *, service=None,
                  field=None, group=None, tenant=None) -> int:
        return self._insert("hashmap_thresholds", threshold_id=str(uuid.uuid4()),
                            level=level, cost=cost, map_type=map_type, service_id=service,
                            field_id=field, group_id=group, tenant_id=tenant)


@pytest.fixture
def ck_url(tmp_path):
    return f"sqlite:///{tmp_path}/cloudkitty.sqlite"


def build_sample(db: CloudKittyDB) -> None:
    """The database behind the expected prices of test_import_prices."""
    instance = db.service("instance")
    volume = db.service("volume.size")
    flavor = db.field(instance, "flavor_name")
    vtype = db.field(volume, "volume_type")
    compute = db.group("compute")
    storage = db.group("storage")
    db.group("unused")

    db.mapping("0.002", service=instance)                         # default group
    db.mapping("0.1", field=flavor, value="m1.large", group=compute)
    db.mapping("0.08", field=flavor, value="m1.large", group=compute, tenant="p-alpha")
    db.mapping("0.0003", field=vtype, value="ssd", group=storage)
    db.threshold("500", "0.9", "rate", service=volume, group=storage)
    db.threshold("500", "0.8", "rate", service=volume, group=storage, tenant="p-alpha")
    db.threshold("1000.00000000", "5", service=volume)           # default group
    if db.audited:
        # soft-deleted: must not price m1.tiny
        db.mapping("0.5", field=flavor, value="m1.tiny", group=compute,
                   deleted=datetime.datetime(2025, 12, 1))
        # a rate from February on
        db.mapping("1.05", "rate", service=instance, group=compute,
                   start=datetime.datetime(2026, 2, 1))
        # a price change on February 1st
        db.mapping("0.01", field=flavor, value="m1.small", group=compute,
                   start=datetime.datetime(2025, 1, 1), end=datetime.datetime(2026, 2, 1))
        db.mapping("0.012", field=flavor, value="m1.small", group=compute,
                   start=datetime.datetime(2026, 2, 1))


def pt(qty, **desc) -> DataPoint:
    return DataPoint("u", D(qty), D(0), desc, {})


def test_import_prices(ck_url, tmp_path):
    db = CloudKittyDB(ck_url)
    build_sample(db)
    out = tmp_path / "rating.yml"
    result = import_cloudkitty(ck_url, str(out))
    assert result.deleted == 1
    assert result.mappings == 7 and result.thresholds == 3
    assert result.warnings == []
    rules = load_rules(out)

    def price(service, scope, when, qty, **desc):
        return price_point(rules, service, scope, when, pt(qty, **desc))

    # compute 0.1 + default 0.002
    assert price("instance", "p-beta", JAN, "1", flavor_name="m1.large") == D("0.102")
    # tenant rule replaces the global one: 0.08 + 0.002
    assert price("instance", "p-alpha", JAN, "1", flavor_name="m1.large") == D("0.082")
    # soft-deleted m1.tiny mapping is gone: only the default group
    assert price("instance", "p-beta", JAN, "1", flavor_name="m1.tiny") == D("0.002")
    # February: the compute rate 1.05 starts: 1.05 * 0.1 + 0.002
    assert price("instance", "p-beta", FEB, "1", flavor_name="m1.large") == D("0.107")
    assert price("instance", "p-alpha", FEB, "2", flavor_name="m1.large") == D("0.172")
    # m1.small: 0.01 in January, 0.012 (× 1.05) from February
    assert price("instance", None, JAN, "1", flavor_name="m1.small") == D("0.012")
    assert price("instance", None, FEB, "1", flavor_name="m1.small") == D("0.0146")
    # volume.size, ssd: 0.0003 × qty; 500 GiB threshold × 0.9 (p-alpha × 0.8)
    assert price("volume.size", None, JAN, "100", volume_type="ssd") == D("0.03")
    assert price("volume.size", "p-beta", JAN, "600", volume_type="ssd") == D("0.162")
    assert price("volume.size", "p-alpha", JAN, "600", volume_type="ssd") == D("0.144")
    # default group: 0 flat + 5 (flat threshold at 1000) ; storage 0.0003*1200*0.9
    assert price("volume.size", None, JAN, "1200", volume_type="ssd") == D("5.324")

    doc = yaml.safe_load(out.read_text())
    svc = doc["hashmap"]["services"]
    assert list(svc) == ["instance", "volume.size"]
    assert svc["volume.size"]["thresholds"][2] == {"level": "1000", "cost": "5",
                                                   "type": "flat"}
    assert {"value": "m1.large", "cost": "0.08", "type": "flat", "group": "compute",
            "scope": "p-alpha"} in svc["instance"]["fields"]["flavor_name"]["mappings"]
    # a migrated rule (start 1970-01-01) has no start
    assert svc["instance"]["mappings"][0] == {"cost": "0.002", "type": "flat"}
    assert {"cost": "1.05", "type": "rate", "group": "compute",
            "start": "2026-02-01T00:00:00Z"} in svc["instance"]["mappings"]
    assert out.read_text().startswith("# Hashmap rules imported from CloudKitty")


def test_import_older_cloudkitty_schema(ck_url):
    """Before migration 8a591f85865f: no start/end/deleted columns."""
    db = CloudKittyDB(ck_url, audited=False)
    build_sample(db)
    result = import_cloudkitty(ck_url)
    assert result.mappings == 4 and result.thresholds == 3 and result.deleted == 0
    rules = result.ruleset
    point = pt("1", flavor_name="m1.large")
    assert price_point(rules, "instance", "p1", FEB, point) == D("0.102")
    assert price_point(rules, "instance", "p-alpha", FEB, point) == D("0.082")
    head, _, _ = result.text.partition("hashmap:")
    assert head and all(line.startswith("#") for line in head.splitlines())


def test_duplicates_last_row_wins_as_in_cloudkitty(ck_url):
    db = CloudKittyDB(ck_url, audited=False)
    svc = db.service("instance")
    first = db.mapping("0.002", service=svc)
    db.mapping("0.003", service=svc)   # same group, same (NULL) tenant
    db.mapping("0.004", service=svc, tenant="p1")
    result = import_cloudkitty(ck_url)
    assert len(result.warnings) == 1
    assert f"hashmap_mappings id {first}" in result.warnings[0]
    assert "dropped" in result.warnings[0]
    assert price_point(result.ruleset, "instance", None, JAN, pt("1")) == D("0.003")
    assert price_point(result.ruleset, "instance", "p1", JAN, pt("1")) == D("0.004")


def test_field_order_follows_field_ids_for_threshold_ties(ck_url):
    """CloudKitty keeps the first field's threshold on equal levels."""
    db = CloudKittyDB(ck_url, audited=False)
    svc = db.service("volume")
    zeta = db.field(svc, "zeta")      # created first: processed first
    alpha = db.field(svc, "alpha")
    db.mapping("1", service=svc)
    db.threshold("10", "2", field=alpha)     # inserted first, but field 2
    db.threshold("10", "3", field=zeta)
    result = import_cloudkitty(ck_url)
    assert list(yaml.safe_load(result.text)["hashmap"]["services"]["volume"]["fields"]) \
        == ["zeta", "alpha"]
    # zeta's flat threshold wins: (1 + 3) × 2
    assert price_point(result.ruleset, "volume", None, JAN,
                       pt("2", zeta="10", alpha="10")) == D("8")


def test_rows_cloudkitty_never_loads_are_skipped(ck_url):
    db = CloudKittyDB(ck_url, audited=False)
    svc = db.service("instance")
    db.mapping("1", service=svc)
    db.mapping("2")  # no service, no field
    result = import_cloudkitty(ck_url)
    assert result.mappings == 1
    assert any("attached to no service and no field" in w for w in result.warnings)


def test_field_mapping_without_value_is_an_error_naming_the_row(ck_url):
    db = CloudKittyDB(ck_url, audited=False)
    svc = db.service("instance")
    field = db.field(svc, "flavor_name")
    bad = db.mapping("1", field=field)
    with pytest.raises(ConfigError) as info:
        import_cloudkitty(ck_url)
    assert f"hashmap_mappings id {bad}" in str(info.value)
    assert "without value" in str(info.value)


def test_not_a_cloudkitty_database(tmp_path):
    url = f"sqlite:///{tmp_path}/empty.sqlite"
    sa.create_engine(url).connect().close()
    with pytest.raises(ConfigError) as info:
        import_cloudkitty(url)
    assert "not a CloudKitty database" in str(info.value)
    assert "hashmap_mappings" in str(info.value)


def test_empty_database_is_refused_and_nothing_written(ck_url, tmp_path):
    CloudKittyDB(ck_url)
    out = tmp_path / "rating.yml"
    with pytest.raises(ConfigError) as info:
        import_cloudkitty(ck_url, str(out))
    assert "no hashmap rules" in str(info.value)
    assert not out.exists()


def test_costs_keep_every_digit(ck_url):
    db = CloudKittyDB(ck_url, audited=False)
    svc = db.service("instance")
    db.mapping("0.000123456789", service=svc)
    result = import_cloudkitty(ck_url)
    assert "cost: '0.000123456789'" in result.text


def test_import_from_each_database_backend(db_url):
    """Exact decimals and naive datetimes from SQLite, PostgreSQL, MariaDB."""
    db = CloudKittyDB(db_url)
    try:
        build_sample(db)
        svc = db.service("precise")
        db.mapping("0.0000000000000000000000000123", service=svc)
        result = import_cloudkitty(db_url)
    finally:
        db.engine.dispose()
    assert result.mappings == 8 and result.thresholds == 3 and result.deleted == 1
    rules = result.ruleset
    assert price_point(rules, "instance", "p-alpha", FEB, pt("2", flavor_name="m1.large")) \
        == D("0.172")
    assert price_point(rules, "volume.size", "p-alpha", JAN, pt("600", volume_type="ssd")) \
        == D("0.144")
    if not db_url.startswith("sqlite"):  # SQLite stores NUMERIC as a float
        assert "cost: '0.0000000000000000000000000123'" in result.text
