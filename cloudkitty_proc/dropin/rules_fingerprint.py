"""One cheap query that tells whether CloudKitty's rating rules changed.

The drop-in rating chain (:mod:`cloudkitty_proc.dropin.rules`) runs
:data:`FINGERPRINT` once per period (and per quote) and rebuilds its rules
only when the answer differs from the one its rules were built after.
It is one ``SELECT`` of scalar subqueries, one row, two numbers per table::

    SELECT (SELECT count(*) FROM modules_state),
           (SELECT sum(hash32(<row text>)) FROM modules_state),
           (SELECT count(*) FROM hashmap_services), (SELECT sum(...) ...),
           ... hashmap_fields, hashmap_groups, hashmap_mappings,
               hashmap_thresholds, pyscripts_scripts

where ``<row text>`` concatenates every column that can change what is
rated (ids and foreign keys, names, value, cost, level, map_type,
tenant_id, start, end, deleted, state, priority, script checksum; not the
audit columns), each NULL told apart from ``''``, and ``hash32`` is a
32-bit hash of that text computed by the database:

* PostgreSQL: the first 32 bits of ``md5(text)``;
* MySQL/MariaDB: ``CRC32(text)``;
* SQLite: ``ckp_crc32(text)``, Python's ``zlib.crc32`` registered on each
  connection by :func:`register_sqlite_functions`.

A change made through the API (a row inserted, updated, soft- or hard-
deleted, a module enabled or re-prioritised, a script updated) changes the
row's text, hence the sum, except with a probability of about 2**-32 per
change; the row id is part of the text, so moving a value between rows
changes it too. The cost is one scan of each (small) rule table, done by
the database, and a few bytes over the wire.
"""

from __future__ import annotations

import zlib
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from cloudkitty_proc.dropin import rating_tables as rt

__all__ = ["FINGERPRINT", "Fingerprint", "read_fingerprint", "register_sqlite_functions"]

Fingerprint = tuple[int, ...]


class hash32(FunctionElement):
    """A 32-bit hash of a text, per dialect (module docstring)."""

    type = sa.BigInteger()
    name = "hash32"
    inherit_cache = True


@compiles(hash32)
def _hash32_sqlite(element: hash32, compiler: Any, **kw: Any) -> str:
    return f"ckp_crc32({compiler.process(element.clauses, **kw)})"


@compiles(hash32, "postgresql")
def _hash32_postgresql(element: hash32, compiler: Any, **kw: Any) -> str:
    return f"('x' || substr(md5({compiler.process(element.clauses, **kw)}), 1, 8))::bit(32)::int"


@compiles(hash32, "mysql")
@compiles(hash32, "mariadb")
def _hash32_mysql(element: hash32, compiler: Any, **kw: Any) -> str:
    return f"CRC32({compiler.process(element.clauses, **kw)})"


def _crc32(text: Any) -> int | None:
    if text is None:
        return None
    data = text if isinstance(text, bytes) else str(text).encode("utf-8")
    return zlib.crc32(data)


def register_sqlite_functions(dbapi_connection: Any) -> None:
    """Register ``ckp_crc32`` on a new SQLite connection (an engine's
    ``connect`` event)."""
    dbapi_connection.create_function("ckp_crc32", 1, _crc32, deterministic=True)


_V = sa.literal_column("'v'", sa.String)
_N = sa.literal_column("'n'", sa.String)
_SEP = sa.literal_column("'|'", sa.String)


def _row_text(columns: list[sa.ColumnElement]) -> sa.ColumnElement:
    """``'|'``-joined text of ``columns``: ``v<text>`` for a value, ``n``
    for NULL (so NULL and '' differ)."""
    text: sa.ColumnElement | None = None
    for column in columns:
        part = sa.func.coalesce(_V + sa.cast(column, sa.String), _N)
        text = part if text is None else text + _SEP + part
    assert text is not None
    return text


def _pair(table: sa.Table, names: list[str]) -> list[sa.ScalarSelect]:
    count = sa.select(sa.func.count()).select_from(table).scalar_subquery()
    digest = sa.select(sa.func.coalesce(
        sa.func.sum(hash32(_row_text([table.c[n] for n in names]))), sa.literal_column("0"))
    ).scalar_subquery()
    return [count, digest]


_RULE_REFS = ["service_id", "field_id", "group_id", "tenant_id"]
_WINDOW = ["start", "end", "deleted"]

#: The fingerprint query (module docstring); its row, as ints, is the
#: fingerprint.
FINGERPRINT = sa.select(
    *_pair(rt.modules_state, ["name", "state", "priority"]),
    *_pair(rt.hashmap_services, ["id", "name"]),
    *_pair(rt.hashmap_fields, ["id", "name", "service_id"]),
    *_pair(rt.hashmap_groups, ["id", "name"]),
    *_pair(rt.hashmap_mappings, ["id", "value", "cost", "map_type", *_RULE_REFS,
                                 *_WINDOW]),
    *_pair(rt.hashmap_thresholds, ["id", "level", "cost", "map_type", *_RULE_REFS]),
    *_pair(rt.pyscripts_scripts, ["id", "name", "checksum", *_WINDOW]),
)


def read_fingerprint(connection: sa.Connection) -> Fingerprint:
    """Run :data:`FINGERPRINT` on ``connection``: a tuple of ints."""
    row = connection.execute(FINGERPRINT).one()
    return tuple(int(value or 0) for value in row)
