"""Shared fixtures: real services, or a clear skip.

Service-backed tests use the services started on this machine (PostgreSQL,
MariaDB, Redis, RabbitMQ on 127.0.0.1, and a Prometheus server the tests
start themselves). Where one cannot be reached the test is skipped with the
reason, unless CLOUDKITTY_PROC_REQUIRE_SERVICES=1 (set by .ci/run), in which
case it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid

import pytest

REQUIRE_SERVICES = os.environ.get("CLOUDKITTY_PROC_REQUIRE_SERVICES") == "1"

PG_URL = os.environ.get("CKP_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
MYSQL_URL = os.environ.get("CKP_TEST_MYSQL_URL", "mysql+pymysql://root:@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("CKP_TEST_REDIS_URL", "redis://127.0.0.1:6379")
AMQP_URL = os.environ.get("CKP_TEST_AMQP_URL", "rabbit://guest:guest@127.0.0.1:5672/")


def service_unavailable(what: str, reason: str) -> None:
    """Skip (laptop) or fail (CI) a test whose service is unreachable."""
    msg = f"{what} unavailable: {reason}"
    if REQUIRE_SERVICES:
        pytest.fail(msg + " (CLOUDKITTY_PROC_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(msg)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def need_binary(name: str, package: str = "prometheus") -> str:
    path = shutil.which(name)
    if not path:
        service_unavailable(name, f"'{name}' not on PATH (apt-get install {package})")
    return path


def _make_pg_db() -> tuple[str, callable]:
    import sqlalchemy as sa
    if not _port_open("127.0.0.1", 5432):
        service_unavailable("PostgreSQL", "nothing listens on 127.0.0.1:5432")
    # pre-ping: the chaos suite restarts PostgreSQL between create and drop
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    name = "ckp_" + uuid.uuid4().hex[:12]
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}")
    url = PG_URL.rsplit("/", 1)[0] + "/" + name

    def drop():
        with admin.connect() as c:
            c.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
            c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()
    return url, drop


def _make_mysql_db() -> tuple[str, callable]:
    import sqlalchemy as sa
    if not _port_open("127.0.0.1", 3306):
        service_unavailable("MariaDB", "nothing listens on 127.0.0.1:3306")
    admin = sa.create_engine(MYSQL_URL, isolation_level="AUTOCOMMIT")
    name = "ckp_" + uuid.uuid4().hex[:12]
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    url = MYSQL_URL.rsplit("/", 1)[0] + "/" + name + "?charset=utf8mb4"

    def drop():
        with admin.connect() as c:
            c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()
    return url, drop


@pytest.fixture
def pg_url():
    url, drop = _make_pg_db()
    yield url
    drop()


@pytest.fixture
def mysql_url():
    url, drop = _make_mysql_db()
    yield url
    drop()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/ckp.sqlite"


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db_url(request, tmp_path):
    """A fresh empty database of each supported backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ckp.sqlite"
        return
    url, drop = _make_pg_db() if request.param == "postgresql" else _make_mysql_db()
    yield url
    drop()


@pytest.fixture
def redis_url():
    if not _port_open("127.0.0.1", 6379):
        service_unavailable("Redis", "nothing listens on 127.0.0.1:6379")
    return REDIS_URL


@pytest.fixture
def amqp_url():
    if not _port_open("127.0.0.1", 5672):
        service_unavailable("RabbitMQ", "nothing listens on 127.0.0.1:5672")
    return AMQP_URL


@pytest.fixture
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def influxdb_server(tmp_path_factory):
    """A private influxd for the session (tests/influxdb_server.py)."""
    from tests.influxdb_server import running_influxdb
    with running_influxdb(tmp_path_factory.mktemp("influxdb")) as server:
        yield server


@pytest.fixture(scope="session")
def keystone_server(tmp_path_factory):
    """A private Keystone 30.0.0 for the session (tests/keystone_server.py)."""
    from tests.keystone_server import running_keystone
    with running_keystone(tmp_path_factory.mktemp("keystone")) as server:
        yield server


@pytest.fixture
def influxdb_database(influxdb_server):
    """A fresh database on the session's influxd, dropped after the test:
    (server, database name)."""
    name = influxdb_server.create_database()
    yield influxdb_server, name
    if name in influxdb_server.databases():
        influxdb_server.drop_database(name)
