#!/usr/bin/env python3
"""The schema CloudKitty 25.0.0's own migrations create, recorded as test fixtures.

What it is for: ``cloudkitty_proc/dropin/tables.py`` describes CloudKitty's
tables (the drop-in mode reads and writes them, never creates them);
``tests/functional/test_dropin_tables.py`` checks those descriptions, and
the alembic heads, against what CloudKitty itself creates, recorded here in
``tests/fixtures/cloudkitty_schema/{mariadb,postgresql,sqlite}.json``.

Regenerate::

    python tools/cloudkitty_schema_reference.py [--dialect mariadb ...]

For each dialect a scratch database is made (SQLite: a temporary file;
PostgreSQL and MariaDB: on the servers of ``CKP_TEST_PG_URL`` /
``CKP_TEST_MYSQL_URL``, as the tests use them, dropped afterwards), and
CloudKitty's four alembic trees are upgraded to head there by CloudKitty's
own code, in the CloudKitty virtualenv of ``tools/cloudkitty_storage_golden.py``
(built or reused; the ``pymysql`` / ``psycopg2`` drivers of this
interpreter are lent to it through ``PYTHONPATH``), with ``TZ=UTC``: the
core tree (``cloudkitty-dbsync upgrade``'s first), hashmap, pyscripts and
the storage state tree (``cloudkitty-storage-init``'s). A tree that fails
is recorded as failed (CloudKitty 25.0.0's hashmap migrations fail on
PostgreSQL and SQLite). The tables and version tables are then reflected by
this interpreter (``tests/cloudkitty_schema.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
import cloudkitty_storage_golden as golden  # noqa: E402

from tests import cloudkitty_schema  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "cloudkitty_schema"
VERSION_TABLES = ["cloudkitty_alembic", "hashmap_alembic", "pyscripts_alembic",
                  "storage_states_alembic"]
PG_URL = os.environ.get("CKP_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
MYSQL_URL = os.environ.get("CKP_TEST_MYSQL_URL", "mysql+pymysql://root:@127.0.0.1:3306/test")

#: run by the CloudKitty venv's python: argv[1] = its config file
DRIVER = r"""
import importlib, json, sys
from cloudkitty import service
conf = sys.argv[1]
sys.argv = ["cloudkitty-schema-reference", "--config-file", conf]
service.prepare_service()
trees = [("cloudkitty_alembic", "cloudkitty.db.sqlalchemy.migration"),
         ("hashmap_alembic", "cloudkitty.rating.hash.db.sqlalchemy.migration"),
         ("pyscripts_alembic", "cloudkitty.rating.pyscripts.db.sqlalchemy.migration"),
         ("storage_states_alembic", "cloudkitty.storage_state.migration")]
results = {}
for name, module in trees:
    try:
        importlib.import_module(module).upgrade("head")
        results[name] = "ok"
    except Exception as exc:
        line = (str(exc).strip().splitlines() or [""])[0][:200]
        results[name] = "failed: %s: %s" % (type(exc).__name__, line)
print("RESULTS " + json.dumps(results))
"""


def _lent_drivers(folder: Path) -> str:
    """A PYTHONPATH folder with this interpreter's database drivers."""
    for name in ("pymysql", "psycopg2", "psycopg2_binary.libs"):
        spec = importlib.util.find_spec(name.split(".")[0])
        if spec is None or not spec.submodule_search_locations:
            continue
        source = Path(list(spec.submodule_search_locations)[0])
        if name.endswith(".libs"):
            source = source.parent / name
        if source.exists():
            (folder / name).symlink_to(source)
    return str(folder)


def _scratch(dialect: str, tmp: Path) -> tuple[str, callable]:
    if dialect == "sqlite":
        return f"sqlite:///{tmp}/cloudkitty.sqlite", lambda: None
    admin_url = PG_URL if dialect == "postgresql" else MYSQL_URL
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = "ckref_" + uuid.uuid4().hex[:12]
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}")

    def drop() -> None:
        with admin.connect() as c:
            c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name, drop


def record(python: Path, dialect: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        url, drop = _scratch(dialect, tmp)
        try:
            conf = tmp / "cloudkitty.conf"
            conf.write_text(f"[DEFAULT]\n[database]\nconnection = {url}\n")
            lent = tmp / "drivers"
            lent.mkdir()
            env = {**os.environ, "TZ": "UTC", "PYTHONDONTWRITEBYTECODE": "1",
                   "PYTHONPATH": _lent_drivers(lent)}
            run = subprocess.run([str(python), "-c", DRIVER, str(conf)], env=env,
                                 capture_output=True, text=True, timeout=600)
            lines = [x for x in run.stdout.splitlines() if x.startswith("RESULTS ")]
            if run.returncode or not lines:
                sys.exit(f"{dialect}: CloudKitty's migrations did not run:\n{run.stderr}")
            engine = sa.create_engine(url)
            with engine.connect() as connection:
                names = sorted(sa.inspect(connection).get_table_names())
                server = ".".join(map(str, connection.dialect.server_version_info or ()))
                data = {
                    "cloudkitty": golden.CLOUDKITTY_VERSION,
                    "dialect": dialect, "server": server,
                    "migrations": json.loads(lines[-1][len("RESULTS "):]),
                    "versions": cloudkitty_schema.versions(connection, VERSION_TABLES),
                    "tables": cloudkitty_schema.reflect(connection, names),
                }
            engine.dispose()
            return data
        finally:
            drop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dialect", action="append",
                        choices=["mariadb", "postgresql", "sqlite"],
                        help="record only these (default: all three)")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args()
    python = golden.ensure_venv()
    args.out.mkdir(parents=True, exist_ok=True)
    for dialect in args.dialect or ["mariadb", "postgresql", "sqlite"]:
        data = record(python, dialect)
        path = args.out / f"{dialect}.json"
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"{path}: {len(data['tables'])} tables, migrations {data['migrations']}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
