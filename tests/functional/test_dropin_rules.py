"""The drop-in rating chain: CloudKitty's modules and rules read live from its tables.

On SQLite, PostgreSQL and MariaDB (``db_url``), CloudKitty's rating tables
are created from ``cloudkitty_proc.dropin.rating_tables`` and filled as
cloudkitty-api fills them (tests/cloudkitty_rules_db.py); the chain that
``plugins.load_rating_chain`` returns in ``[cloudkitty_proc] mode =
cloudkitty`` rates frames with them.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import json
import pathlib

import pytest
import sqlalchemy as sa
from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc import plugins
from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.dropin import rules as dropin_rules
from cloudkitty_proc.dropin.rules import CloudKittyRatingChain, quote
from cloudkitty_proc.exceptions import InvalidRequestError, RatingError
from tests.cloudkitty_rules_db import RulesDB, load_vectors

D = decimal.Decimal
UTC = datetime.timezone.utc
REPO = pathlib.Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "fixtures" / "compat" / "hashmap-vectors.json"
JAN = datetime.datetime(2026, 1, 15, 10, tzinfo=UTC)
FEB = datetime.datetime(2026, 2, 1, tzinfo=UTC)
NOISY = "1.1000000000000000888178419700"  # a cost of 1.1 sent by the CLI, as stored

pytestmark = pytest.mark.service


def make_conf(url: str, allow_pyscripts: bool = False) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    ckp_conf.register_opts(conf)
    conf([], default_config_files=[])
    conf.set_override("connection", url, group="database")
    conf.set_override("mode", "cloudkitty", group="cloudkitty_proc")
    conf.set_override("allow_pyscripts", allow_pyscripts, group="rating")
    # never used in this mode: a processor that does not exist proves it
    conf.set_override("processors", ["no-such-processor"], group="rating")
    return conf


@pytest.fixture
def db(db_url):
    rules_db = RulesDB(db_url)
    yield rules_db
    rules_db.close()


@pytest.fixture
def chain_of(db):
    made = []

    def make(allow_pyscripts: bool = False) -> CloudKittyRatingChain:
        (chain,) = plugins.load_rating_chain(make_conf(db.url, allow_pyscripts))
        made.append(chain)
        return chain
    yield make
    for chain in made:
        chain.close()


def frame(scope: str | None, begin: datetime.datetime, usage: dict) -> DataFrame:
    return DataFrame(scope, begin, begin + datetime.timedelta(hours=1),
                     {k: list(v) for k, v in usage.items()})


def point(qty: str = "1", groupby: dict | None = None, metadata: dict | None = None,
          price: str = "0") -> DataPoint:
    return DataPoint("u", D(qty), D(price), groupby or {}, metadata or {})


def price(chain: CloudKittyRatingChain, scope: str | None, begin: datetime.datetime,
          service: str = "instance", *points: DataPoint) -> D:
    return chain.process(frame(scope, begin, {service: points or [point()]})).total_price()


class StatementCounter:
    """Counts the SQL statements the chain's engine sends."""

    def __init__(self, engine: sa.Engine) -> None:
        self.statements: list[str] = []
        sa.event.listen(engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, conn, cursor, statement, parameters, context, executemany):
        if not statement.lstrip().upper().startswith(("BEGIN", "ROLLBACK", "SAVEPOINT")):
            self.statements.append(statement)

    def take(self) -> list[str]:
        taken, self.statements = self.statements, []
        return taken


class WireCounter:
    """Counts the commands PyMySQL sends on the chain's pooled connection
    (its connection objects are plain Python: the method can be wrapped)."""

    def __init__(self, chain: CloudKittyRatingChain) -> None:
        with chain.engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection
        self.commands: list = []
        send = dbapi._execute_command

        def counted(command, sql):
            self.commands.append(sql)
            return send(command, sql)
        dbapi._execute_command = counted

    def take(self) -> int:
        taken, self.commands = len(self.commands), []
        return taken


# (1) ---------------------------------------------------------------------------------
def storable(ruleset: dict) -> bool:
    """Whether CloudKitty's unique constraints on thresholds accept the
    ruleset (NULL tenants never collide)."""
    seen = set()
    for name, spec in ruleset["rules"]["hashmap"]["services"].items():
        parents = [(name, None, spec)] + [(name, f, fs or {}) for f, fs in
                                          (spec.get("fields") or {}).items()]
        for service, field, rules in parents:
            for rule in rules.get("thresholds") or []:
                if rule.get("scope") is None:
                    continue
                key = (service, field, D(rule["level"]), rule["scope"])
                if key in seen:
                    return False
                seen.add(key)
    return True


def test_compat_vectors_as_cloudkitty_rows_price_as_cloudkitty(db, chain_of):
    """Each ruleset of hashmap-vectors.json written as CloudKitty rows (one
    database holds all: ruleset n's services are "n:<name>"); every case
    rated through the chain equals CloudKitty 25.0.0's price."""
    if not VECTORS.is_file():
        pytest.fail(f"compatibility vectors not found at {VECTORS}", pytrace=False)
    data = json.loads(VECTORS.read_text())
    rulesets = dict(enumerate(data["rulesets"]))
    # thresholds of one tenant with the same level in two groups: CloudKitty's
    # unique constraints (level, service_id|field_id, tenant_id) refuse them
    unstorable = {75, 94}
    assert {n for n, rs in rulesets.items() if not storable(rs)} == unstorable
    load_vectors(db, {n: rs for n, rs in rulesets.items() if n not in unstorable})
    db.module("hashmap", True)
    chain = chain_of()
    frames: dict[tuple, list] = collections.defaultdict(list)
    for rs, ruleset in rulesets.items():
        if rs in unstorable:
            continue
        for case in ruleset["cases"]:
            raw = case["point"]
            frames[(case["scope"], case["period_start"])].append(
                (f"{rs}:{case['service']}", D(case["expected_price"]),
                 DataPoint(raw["unit"], D(raw["qty"]), D(raw["price"]), dict(raw["groupby"]),
                           dict(raw["metadata"]))))
    mismatches, total = [], 0
    for (scope, start), cases in frames.items():
        begin = datetime.datetime.fromisoformat(start.replace("Z", "+00:00"))
        usage: dict[str, list] = collections.defaultdict(list)
        for service, _, p in cases:
            usage[service].append(p)
        rated = chain.process(frame(scope, begin, usage))
        seen: dict[str, int] = collections.Counter()
        for service, expected, p in cases:
            got = rated.points(service)[seen[service]].price
            seen[service] += 1
            total += 1
            if got != expected:
                mismatches.append(f"{service} scope {scope} at {start} {p}: expected "
                                  f"{expected}, got {got}")
    assert total == 1519 - 23
    assert mismatches == []
    assert chain.builds == 1


# (2) ---------------------------------------------------------------------------------
def test_a_change_through_the_api_applies_from_the_next_period(db, chain_of):
    service = db.service("instance")
    flavor = db.field(service, "flavor_name")
    db.module("hashmap", True)
    base = db.mapping("1", service=service, value="")
    chain = chain_of()
    small = point("2", metadata={"flavor_name": "m1.small"})
    assert price(chain, "p1", JAN, "instance", small) == D("2")
    counter = StatementCounter(chain.engine)
    wire = WireCounter(chain) if db.engine.dialect.name in ("mysql", "mariadb") else None
    for hour in range(1, 4):  # nothing changed: exactly one query per period
        assert price(chain, "p1", JAN + datetime.timedelta(hours=hour), "instance",
                     small) == D("2")
        assert len(counter.take()) == 1
        if wire is not None:  # and nothing else on the wire (no ROLLBACK, no ping)
            assert wire.take() == 1
    assert chain.builds == 1

    added = db.mapping("3", field=flavor, value="m1.small")  # flat: max(1, 3)
    assert price(chain, "p1", JAN, "instance", small) == D("6")
    assert len(counter.take()) > 1 and chain.builds == 2
    db.update_mapping(added, cost="4")                      # each column alone
    assert price(chain, "p1", JAN, "instance", small) == D("8")
    db.update_mapping(added, cost="0.5")
    assert price(chain, "p1", JAN, "instance", small) == D("2")
    db.update_mapping(added, map_type="rate")               # rate 0.5 * flat 1
    assert price(chain, "p1", JAN, "instance", small) == D("1.0")
    db.update_mapping(added, value="m1.large")
    assert price(chain, "p1", JAN, "instance", small) == D("2")
    db.update_mapping(added, value="m1.small")
    assert price(chain, "p1", JAN, "instance", small) == D("1.0")
    db.update_mapping(added, tenant_id="p2")
    assert price(chain, "p1", JAN, "instance", small) == D("2")
    assert price(chain, "p2", JAN, "instance", small) == D("1.0")
    db.update_mapping(added, tenant_id=None)
    assert price(chain, "p1", JAN, "instance", small) == D("1.0")
    db.update_mapping(added, end=datetime.datetime(2026, 1, 10))
    assert price(chain, "p1", JAN, "instance", small) == D("2")
    db.update_mapping(base, value=None)                     # '' -> NULL: still no value
    assert price(chain, "p1", JAN, "instance", small) == D("2")
    assert chain.builds == 11
    db.delete_mapping(added)
    assert price(chain, "p1", JAN, "instance", small) == D("2")
    counter.take()
    assert price(chain, "p1", JAN, "instance", small) == D("2")
    assert len(counter.take()) == 1

    chain.invalidate()  # an RPC notification: rebuilt although nothing changed
    assert price(chain, "p1", JAN, "instance", small) == D("2")
    assert chain.builds == 13


def test_a_connection_closed_by_the_server_is_replaced(db, chain_of):
    """No pre-ping (an extra round trip per period): a pooled connection
    the server closed fails once and is replaced within the same call."""
    if db.is_sqlite:
        pytest.skip("SQLite has no server to close the connection")
    service = db.service("instance")
    db.module("hashmap", True)
    db.mapping("1", service=service)
    chain = chain_of()
    assert price(chain, "p1", JAN) == D("1")
    postgres = db.engine.dialect.name == "postgresql"
    with chain.engine.connect() as conn:  # the pooled connection the chain uses
        backend = conn.exec_driver_sql("SELECT pg_backend_pid()" if postgres
                                       else "SELECT CONNECTION_ID()").scalar()
    with db.engine.connect() as admin:
        admin.exec_driver_sql(f"SELECT pg_terminate_backend({backend})" if postgres
                              else f"KILL {backend}")
        admin.commit()
    assert price(chain, "p1", JAN) == D("1")
    assert chain.builds == 1


def test_exact_costs_and_thresholds(db, chain_of):
    """DECIMAL costs priced digit for digit (SQLite stores a REAL: its
    shortest text), service '' and NULL values alike, thresholds."""
    service = db.service("instance")
    db.module("hashmap", True)
    db.mapping(NOISY, service=service, value="")
    db.threshold("10", "0.5", "rate", service=service)
    chain = chain_of()
    cost = D("1.1") if db.is_sqlite else D(NOISY)
    assert price(chain, "p1", JAN, "instance", point("2")) == cost * 2
    assert price(chain, "p1", JAN, "instance", point("20")) == cost * 20 * D("0.5")


def test_per_tenant_rules_replace_the_global_ones_of_the_same_key(db, chain_of):
    service = db.service("instance")
    flavor = db.field(service, "flavor_name")
    gpu = db.group("gpu")
    db.module("hashmap", True)
    db.mapping("1", service=service)                                  # global, default group
    db.mapping("5", service=service, tenant="p1")                     # replaces it for p1
    db.mapping("2", field=flavor, value="m1.small", group=gpu)        # global, group gpu
    db.mapping("7", field=flavor, value="m1.large", group=gpu, tenant="p2")  # p2 only
    chain = chain_of()
    small = point("1", metadata={"flavor_name": "m1.small"})
    large = point("1", groupby={"flavor_name": "m1.large"})
    assert price(chain, "p1", JAN, "instance", small) == D("5") + D("2")
    assert price(chain, "p2", JAN, "instance", small) == D("1") + D("2")
    assert price(chain, "p2", JAN, "instance", large) == D("1") + D("7")
    assert price(chain, "p3", JAN, "instance", large) == D("1")


# (3) ---------------------------------------------------------------------------------
def test_period_t_is_priced_with_the_mappings_valid_at_t(db, chain_of):
    service = db.service("instance")
    db.module("hashmap", True)
    db.mapping("1", service=service, end=FEB)                       # January price
    db.mapping("2", service=service, start=FEB)                     # from February
    db.mapping("9", service=service, start=FEB, deleted="2026-02-02T00:00:00")  # deleted
    db.mapping("4", service=service, tenant="p1", start="2026-01-20", end="2026-01-25")
    chain = chain_of()
    hour = datetime.timedelta(hours=1)
    assert price(chain, "p1", JAN) == D("1")
    assert price(chain, "p1", FEB - hour) == D("1")                 # end is exclusive
    assert price(chain, "p1", FEB) == D("2")                        # start is inclusive
    assert price(chain, "p1", datetime.datetime(2026, 1, 22, tzinfo=UTC)) == D("4")
    assert price(chain, "p2", datetime.datetime(2026, 1, 22, tzinfo=UTC)) == D("1")
    assert chain.builds == 1  # one build prices every period


def test_overlapping_rows_of_one_key_later_id_wins_where_both_are_active(db, chain_of):
    service = db.service("instance")
    db.module("hashmap", True)
    db.mapping("1", service=service, start="2026-01-01", end="2026-03-01")
    db.mapping("2", service=service, start=FEB)       # overlaps from February
    chain = chain_of()
    assert price(chain, "p1", JAN) == D("1")
    assert price(chain, "p1", FEB) == D("2")
    assert price(chain, "p1", datetime.datetime(2026, 4, 1, tzinfo=UTC)) == D("2")


# (4) ---------------------------------------------------------------------------------
DOUBLE = ("for points in data['usage'].values():\n"
          "    for p in points:\n"
          "        p['rating']['price'] = (p['rating']['price'] + 1) * 2\n")


def test_modules_state_enables_and_orders_the_modules(db, chain_of):
    service = db.service("instance")
    db.mapping("10", service=service)
    db.script("double", DOUBLE)
    chain = chain_of(allow_pyscripts=True)
    assert price(chain, "p1", JAN) == D("0")          # no row: every module disabled
    db.module("hashmap", True)
    assert price(chain, "p1", JAN) == D("10")
    db.module("pyscripts", True, priority=None)       # NULL priority = 1: tie, hashmap first
    assert price(chain, "p1", JAN) == D("22")
    assert chain.rules.modules == ("hashmap", "noop", "pyscripts")
    db.module("pyscripts", True, priority=5)          # pyscripts first, then hashmap adds 10
    assert price(chain, "p1", JAN) == D("12")
    assert chain.rules.modules == ("pyscripts", "hashmap", "noop")
    db.module("hashmap", True, priority=0)            # 0 reads as 1 (CloudKitty)
    assert price(chain, "p1", JAN) == D("12")
    assert chain.rules.modules == ("pyscripts", "hashmap", "noop")
    db.module("hashmap", False)                       # PUT {"enabled": false}
    assert price(chain, "p1", JAN) == D("2")
    db.module("pyscripts", False)
    assert price(chain, "p1", JAN) == D("0")
    db.module("fancy", True)
    with pytest.raises(RatingError, match="fancy"):
        price(chain, "p1", JAN)


# (5) ---------------------------------------------------------------------------------
def test_pyscripts_from_the_table(db, chain_of):
    db.module("pyscripts", True)
    db.script("double", DOUBLE)
    db.script("later", DOUBLE, start=FEB)
    db.script("gone", DOUBLE, deleted="2026-01-02")
    chain = chain_of(allow_pyscripts=True)
    assert price(chain, "p1", JAN, "instance", point(price="1")) == D("4")
    assert price(chain, "p1", FEB, "instance", point(price="1")) == D("10")
    db.script("broken", "def (:\n")
    with pytest.raises(RatingError, match="broken"):
        price(chain, "p1", FEB)


def test_pyscripts_enabled_but_not_allowed_fails_every_period(db, chain_of):
    service = db.service("instance")
    db.mapping("10", service=service)
    db.module("hashmap", True)
    db.module("pyscripts", True)
    db.script("double", DOUBLE)
    chain = chain_of(allow_pyscripts=False)
    for begin in (JAN, FEB):
        with pytest.raises(RatingError) as err:
            price(chain, "p1", begin)
        assert "modules_state" in str(err.value) and "allow_pyscripts" in str(err.value)
    db.module("pyscripts", False)
    assert price(chain, "p1", FEB) == D("10")


# (6) ---------------------------------------------------------------------------------
def test_quote_as_cloudkitty(db, chain_of, monkeypatch):
    service = db.service("instance")
    flavor = db.field(service, "flavor_name")
    db.module("hashmap", True)
    db.mapping("1", service=service)
    db.mapping("2", field=flavor, value="m1.small", group=db.group("g"))
    db.mapping("50", service=service, tenant="p1")                   # never in a quote
    db.mapping("100", service=service, start="2999-01-01")           # not yet in force
    res_data = {"usage": {"instance": [
        {"desc": {"groupby": {"project_id": "p1"}, "metadata": {"flavor_name": "m1.small"}},
         "vol": {"qty": "2", "unit": "undef"}},
        {"desc": {"flavor_name": "m1.small"}, "vol": {"qty": "1", "unit": "undef"}},  # flat keys: ignored
        {"vol": {"qty": 1.5, "unit": "undef"}}]}}
    conf = make_conf(db.url)
    got = quote(conf, res_data, chain=chain_of())
    assert isinstance(got, D) and got == D("2") * 3 + D("1") + D("1.5")
    # the per-process chain (the RPC helper's default), built once
    monkeypatch.setattr(dropin_rules, "_quote_chain", {})
    assert quote(conf, res_data) == got
    assert quote(conf, res_data) == got and dropin_rules._quote_chain["chain"].builds == 1
    dropin_rules.invalidate_quote_chain()  # RPC reload_module & co.
    assert quote(conf, res_data) == got and dropin_rules._quote_chain["chain"].builds == 2
    dropin_rules._quote_chain["chain"].close()
    for bad in ({}, {"usage": []}, {"usage": {"instance": [{"desc": {}}]}},
                {"usage": {"instance": [{"vol": {"qty": "x", "unit": "u"}}]}}):
        with pytest.raises(InvalidRequestError, match="quote: .*res_data"):
            quote(conf, bad, chain=chain_of())


def test_the_quote_chain_follows_the_database(tmp_path, monkeypatch):
    """The per-process quote chain is kept per configuration AND database:
    the same ConfigOpts pointed at another database (a reload, another
    test) quotes with that database's rules."""
    res_data = {"usage": {"instance": [{"vol": {"qty": "1", "unit": "undef"}}]}}
    monkeypatch.setattr(dropin_rules, "_quote_chain", {})
    conf = None
    for name, cost in (("one", "1"), ("two", "7")):
        url = f"sqlite:///{tmp_path}/{name}.sqlite"
        rules_db = RulesDB(url)
        try:
            rules_db.module("hashmap", True)
            rules_db.mapping(cost, service=rules_db.service("instance"))
            if conf is None:
                conf = make_conf(url)
            conf.set_override("connection", url, group="database")
            assert quote(conf, res_data) == D(cost)
        finally:
            rules_db.close()
    dropin_rules._quote_chain["chain"].close()


def test_native_mode_is_unchanged(tmp_path):
    conf = make_conf(f"sqlite:///{tmp_path}/x.sqlite")
    conf.set_override("mode", "native", group="cloudkitty_proc")
    with pytest.raises(Exception, match="no-such-processor"):
        plugins.load_rating_chain(conf)
