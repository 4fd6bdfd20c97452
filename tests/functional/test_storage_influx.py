"""The ``influxdb`` storage against a real InfluxDB 1.x (a private influxd,
tests/influxdb_server.py): what is specific to it. The points are checked
with InfluxQL through the server's HTTP API (``InfluxServer.points``), not
through the store under test. What every backend must do is in the contract
suite (test_storage_contract_influx.py).
"""

from __future__ import annotations

import datetime

import pytest

from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.exceptions import SchemaError, StorageError, StoreUnreachableError
from cloudkitty_proc.storage.influx import InfluxPointStore, InfluxStorage
from cloudkitty_proc.storage.sql import SQLStorage
from tests.functional.test_storage_contract_influx import influx_storage
from tests.storage_contract import D, PERIOD, at

NS = 10**9


def ns(dt: datetime.datetime) -> int:
    return int(dt.timestamp()) * NS


def frame(scope: str, n: int, ids, price: str = "1", usage_type: str = "instance",
          metadata=None) -> DataFrame:
    """Period ``n`` of ``scope``: one point per id."""
    f = DataFrame(scope, at(n), at(n + 1))
    f.add_points(usage_type, [
        DataPoint("instance", D(1), D(price), {"project_id": scope, "id": i},
                  dict(metadata or {"flavor_name": "m1.small"}))
        for i in ids])
    return f


@pytest.fixture
def sql_url(tmp_path):
    return f"sqlite:///{tmp_path}/ckp.sqlite"


@pytest.fixture
def make(sql_url, influxdb_database):
    server, database = influxdb_database
    made = []

    def make_storage(**options):
        storage = influx_storage(sql_url, server, database, **options)
        made.append(storage)
        storage.upgrade()
        return storage

    yield make_storage
    for storage in made:
        storage.close()


@pytest.fixture
def raw(influxdb_database):
    """raw(scope=None) -> the points InfluxDB holds (InfluxQL, not our store)."""
    server, database = influxdb_database

    def points(scope: str | None = None) -> list[dict]:
        where = "" if scope is None else " WHERE project_id = '" + scope.replace(
            "\\", "\\\\").replace("'", "\\'") + "'"
        return server.points("SELECT * FROM dataframes" + where, database)

    return points


def keys(points) -> list[tuple]:
    """(time, id) of each point, sorted."""
    return sorted((p["time"], p["id"]) for p in points)


# -- the written layout -------------------------------------------------------

def test_line_is_the_one_cloudkittys_client_writes():
    """The line captured from CloudKitty 25.0.0's InfluxDB driver
    (CLOUDKITTY-DROPIN §2.2), byte for byte."""
    begin = datetime.datetime.fromtimestamp(1796562000, datetime.timezone.utc)
    f = DataFrame("p1", begin, begin + datetime.timedelta(hours=1))
    f.add_points("instance", [DataPoint(
        "instance", D("7"), D("0.1"),
        {"id": "vm-1", "project_id": "p1", "week_of_the_year": "49",
         "day_of_the_year": "340", "month": "12", "year": "2026"},
        {"flavor_name": "m1.small"})])
    store = InfluxPointStore(None, "project_id", database="ck")
    assert list(store.lines(f)) == [
        'dataframes,day_of_the_year=340,id=vm-1,month=12,project_id=p1,type=instance,'
        'week_of_the_year=49,year=2026 __ck_collect_period=3600i,flavor_name="m1.small",'
        'groupby="id|project_id|week_of_the_year|day_of_the_year|month|year",'
        'metadata="flavor_name",price=0.1,qty=7.0,unit="instance" 1796562000000000000']


def test_points_in_cloudkittys_layout_and_read_back(make, raw):
    storage = make()
    f = DataFrame("p 1,\"x'", at(0), at(1))  # a scope id needing every escape
    # (as CloudKitty's client writes them, InfluxDB 1.x keeps a tag's backslashes
    # doubled and a field's newline as \\n: not tested)
    f.add_points("volume.size", [DataPoint(
        "GiB", D("2.5"), D("0.125"), {"project_id": "p 1,\"x'", "id": "v=1 ,"},
        {"volume_type": "s\\s\"d", "n": 3, "ok": True, "gone": None, "r": D("0.5")})])
    storage.commit_period(f, 0)
    [p] = raw()
    assert p == {
        "time": ns(at(0)), "project_id": "p 1,\"x'", "id": "v=1 ,", "type": "volume.size",
        "qty": 2.5, "price": 0.125, "unit": "GiB", "groupby": "project_id|id",
        "metadata": "volume_type|n|ok|gone|r", "volume_type": "s\\s\"d", "n": 3, "ok": True,
        "r": 0.5, "__ck_collect_period": 3600}
    [row] = storage.iter_rated("p 1,\"x'")
    assert (row.groupby, row.metadata) == (
        {"project_id": "p 1,\"x'", "id": "v=1 ,"},
        {"volume_type": "s\\s\"d", "n": 3, "ok": True, "gone": "", "r": 0.5})


def test_points_with_equal_tags_are_all_kept(make, raw):
    """Two points of one period with the same type and groupby would be one
    InfluxDB point: the second carries __ck_dup=1."""
    storage = make()
    f = DataFrame("p1", at(0), at(1))
    f.add_points("instance", [DataPoint("instance", D(1), D("0.5"), {"id": "a"}, {}),
                              DataPoint("instance", D(2), D("0.25"), {"id": "a"}, {})])
    storage.commit_period(f, 0)
    points = raw()
    assert sorted((p["qty"], p.get("__ck_dup")) for p in points) == [(1.0, None), (2.0, "1")]
    [summary] = storage.summary("p1")
    assert (summary.points, summary.qty, summary.price) == (2, D(3), D("0.75"))


# -- replacing points -----------------------------------------------------------

def test_a_rewritten_period_replaces_its_points(make, raw):
    storage = make()
    storage.commit_period(frame("p1", 0, ["a", "b"], price="1"), 0)
    # the same (scope, period, type, groupby) written again: replaced, not added
    storage.points.write(frame("p1", 0, ["a", "b"], price="3"))
    points = raw("p1")
    assert keys(points) == [(ns(at(0)), "a"), (ns(at(0)), "b")]
    assert {p["price"] for p in points} == {3.0}


def test_retry_after_a_crash_before_the_sql_commit_leaves_no_stale_point(make, raw):
    """A worker wrote the points of period 1 (and, say, 2) and died before
    its SQL commit; the retry, by a fresh storage object, rates period 1
    with another groupby set: only its points are left."""
    first = make()
    first.commit_period(frame("p1", 0, ["a"]), 0)
    crashed = make()
    crashed.points.write(frame("p1", 1, ["a", "b", "c"]))
    crashed.points.write(frame("p1", 2, ["a"]))
    make().commit_period(frame("p1", 1, ["x", "y"]), 1)  # the retry
    assert keys(raw("p1")) == [(ns(at(0)), "a"), (ns(at(1)), "x"), (ns(at(1)), "y")]
    assert [(r.begin, r.groupby["id"]) for r in first.iter_rated("p1")] == [
        (at(0), "a"), (at(1), "x"), (at(1), "y")]


def test_a_new_lease_deletes_what_another_worker_left_past_the_frontier(make, raw):
    """Worker A commits period 0 and loses the scope; worker B takes it,
    writes period 1's points and dies before its SQL commit; A takes the
    scope again (``scope_taken``) and rates period 1 from the version it
    produced itself: B's points must not survive next to A's."""
    a = make()
    a.scope_taken("p1")
    version = a.commit_period(frame("p1", 0, ["a"]), 0)
    make().points.write(frame("p1", 1, ["b-only"]))  # B, crashed before its commit
    a.scope_taken("p1")  # A's new lease
    a.commit_period(frame("p1", 1, ["a"]), version)
    assert keys(raw("p1")) == [(ns(at(0)), "a"), (ns(at(1)), "a")]


def test_under_one_lease_a_commit_does_not_delete_first(make, raw, monkeypatch):
    """The delete before a write is skipped while this object's own commit
    produced the version it expects, under the same lease: one request per
    period, not two."""
    storage = make()
    storage.scope_taken("p1")
    version = storage.commit_period(frame("p1", 0, ["a"]), 0)
    deletes = []
    real = storage.points.delete
    monkeypatch.setattr(storage.points, "delete",
                        lambda *a: deletes.append(a) or real(*a))
    storage.commit_period(frame("p1", 1, ["a"]), version)
    assert deletes == []
    storage.scope_taken("p1")
    storage.commit_period(frame("p1", 2, ["a"]), version + 1)
    assert [d[0] for d in deletes] == ["p1"]


def test_reset_state_deletes_only_that_scopes_points_from_to_on(make, raw):
    storage = make()
    for scope in ("p1", "p2", "p1x"):
        for n in range(4):
            storage.commit_period(frame(scope, n, ["a"]), n)
    # a tz-aware time in another zone: the DELETE sends it in UTC, with its zone
    to = at(2).astimezone(datetime.timezone(datetime.timedelta(hours=5, minutes=30)))
    storage.reset_state("p1", to, PERIOD)
    assert keys(raw("p1")) == [(ns(at(0)), "a"), (ns(at(1)), "a")]
    assert len(raw("p2")) == len(raw("p1x")) == 4
    storage.reset_state("p2", None, PERIOD)
    assert raw("p2") == [] and len(raw("p1x")) == 4


def test_reset_state_keeps_the_points_of_a_period_committed_meanwhile(make, raw,
                                                                     monkeypatch):
    """A worker commits the period ``to`` between the reset's SQL part and
    its point delete: that commit's points stay, the older ones go."""
    storage, worker = make(), make()
    for n in range(4):
        storage.commit_period(frame("p1", n, ["a", "b"]), n)
    sql_reset = SQLStorage.reset_state

    def reset_then_a_commit(self, scope_id, to, period):
        sql_reset(self, scope_id, to, period)
        worker.commit_period(frame("p1", 2, ["z"]), worker.get_state("p1").version)

    monkeypatch.setattr(SQLStorage, "reset_state", reset_then_a_commit)
    storage.reset_state("p1", at(2), PERIOD)
    assert keys(raw("p1")) == [(ns(at(0)), "a"), (ns(at(0)), "b"), (ns(at(1)), "a"),
                               (ns(at(1)), "b"), (ns(at(2)), "z")]


def test_a_reprocessed_period_replaces_its_points(make, raw):
    storage = make()
    for n in range(3):
        storage.commit_period(frame("p1", n, ["a", "b"], price="1"), n)
    [task] = storage.create_reprocess_tasks(["p1"], at(1), at(2), "fix", PERIOD)
    storage.commit_reprocessed_period(task, frame("p1", 1, ["x", "y", "z"], price="2"),
                                      at(1))
    points = raw("p1")
    assert keys(points) == [(ns(at(0)), "a"), (ns(at(0)), "b"), (ns(at(1)), "x"),
                            (ns(at(1)), "y"), (ns(at(1)), "z"), (ns(at(2)), "a"),
                            (ns(at(2)), "b")]
    assert {p["price"] for p in points if p["time"] == ns(at(1))} == {2.0}
    [period] = storage.iter_periods("p1", begin=at(1), end=at(2))
    assert (period.points, period.price) == (3, D(6))


# -- batched commits --------------------------------------------------------------

def recorded_requests(storage, monkeypatch) -> list[str]:
    """What each POST of ``storage`` to InfluxDB says it does, in order."""
    whats: list[str] = []
    real = storage.points.request

    def request(what, method, path, **kwargs):
        if method == "POST":
            whats.append(what)
        return real(what, method, path, **kwargs)

    monkeypatch.setattr(storage.points, "request", request)
    return whats


def test_a_batch_writes_many_scopes_points_in_one_request(make, raw, monkeypatch):
    """commit_periods: the points of every scope of the batch in one POST
    /write (``write_batch_size`` points a request), after one DELETE for
    the scopes whose points past the frontier must go (decided per scope
    as commit_period decides it)."""
    storage = make()
    for scope in ("p1", "p2", "p3"):
        storage.scope_taken(scope)
    make().points.write(frame("p2", 0, ["left-by-a-dead-worker"]))
    make().points.write(frame("p4", 0, ["another-scope"]))
    requests = recorded_requests(storage, monkeypatch)
    assert storage.commit_periods([(frame(s, 0, ["a", "b"]), 0)
                                   for s in ("p1", "p2", "p3")]) == [1, 1, 1]
    assert requests == ["deleting the points of 3 scopes (p1, p2, p3)",
                        "writing 6 points of 3 scopes (p1, p2, p3)"]
    for scope in ("p1", "p2", "p3"):
        assert keys(raw(scope)) == [(ns(at(0)), "a"), (ns(at(0)), "b")]
    assert keys(raw("p4")) == [(ns(at(0)), "another-scope")]

    # the same leases: no delete; a new lease of p2 and p3: their points
    # past the frontier are deleted first, p1's are not
    make().points.write(frame("p1", 1, ["not-deleted-under-the-same-lease"]))
    storage.scope_taken("p2"), storage.scope_taken("p3")
    requests.clear()
    assert storage.commit_periods([(frame(s, 1, ["a"]), 1)
                                   for s in ("p1", "p2", "p3")]) == [2, 2, 2]
    assert requests == ["deleting the points of 2 scopes (p2, p3)",
                        "writing 3 points of 3 scopes (p1, p2, p3)"]
    assert keys(raw("p1")) == [(ns(at(0)), "a"), (ns(at(0)), "b"), (ns(at(1)), "a"),
                               (ns(at(1)), "not-deleted-under-the-same-lease")]

    # write_batch_size splits a batch across scopes, not per scope
    small = make(write_batch_size=4)
    requests = recorded_requests(small, monkeypatch)
    assert small.commit_periods([(frame(s, 0, ["a", "b", "c"]), 0)
                                 for s in ("q1", "q2", "q3")]) == [1, 1, 1]
    assert requests == ["deleting the points of 3 scopes (q1, q2, q3)",
                        "writing 4 points of 2 scopes (q1, q2)",
                        "writing 4 points of 2 scopes (q2, q3)",
                        "writing 1 points of scope q3"]
    assert sum(len(raw(s)) for s in ("q1", "q2", "q3")) == 9


def test_a_write_refused_in_a_batch_fails_that_scope_alone(make, raw):
    """InfluxDB refuses one scope's point (a field type conflict): the
    batch is rolled back and committed scope by scope; that scope fails
    with InfluxDB's error, its state and points unchanged; the others
    commit."""
    storage = make()
    for scope in ("p1", "p2", "p3"):
        storage.commit_period(frame(scope, 0, ["a"], metadata={"size": 1}), 0)
    results = storage.commit_periods([
        (frame("p1", 1, ["a"], metadata={"size": 2}), 1),
        (frame("p2", 1, ["a"], metadata={"size": "big"}), 1),
        (frame("p3", 1, ["a"], metadata={"size": 3}), 1)])
    assert results[0] == 2 and results[2] == 2, results
    assert isinstance(results[1], StorageError), results
    assert "writing 1 points of scope p2: HTTP 400" in str(results[1])
    assert storage.get_state("p2").version == 1
    assert [p.begin for p in storage.iter_periods("p2")] == [at(0)]
    assert keys(raw("p2")) == [(ns(at(0)), "a")]
    for scope in ("p1", "p3"):
        assert keys(raw(scope)) == [(ns(at(0)), "a"), (ns(at(1)), "a")]
        assert [p.begin for p in storage.iter_periods(scope)] == [at(0), at(1)]


# -- errors ----------------------------------------------------------------------

def test_unreachable_influxdb_fails_the_commit_and_keeps_the_state(make, sql_url,
                                                                  free_port):
    storage = make()
    storage.commit_period(frame("p1", 0, ["a"]), 0)
    before = storage.get_state("p1")
    down = InfluxStorage(url=sql_url, points=InfluxPointStore(
        None, "project_id", host="127.0.0.1", port=free_port, database="ck", timeout=5))
    try:
        with pytest.raises(StorageError, match=rf"^InfluxDB at http://127\.0\.0\.1:"
                           rf"{free_port}: .*connect"):
            down.commit_period(frame("p1", 1, ["a"]), before.version)
        # a batch: one attempt, not one more per scope (each would fail as
        # long); every scope gets the error, nothing moves
        attempts = []
        real = down.points.request
        down.points.request = lambda *a, **k: attempts.append(a[0]) or real(*a, **k)
        results = down.commit_periods([(frame("p1", 1, ["a"]), before.version),
                                       (frame("p2", 0, ["a"]), 0), (frame("p3", 0, ["a"]), 0)])
        assert [type(r) for r in results] == [StoreUnreachableError] * 3, results
        assert attempts == ["deleting the points of scope p1"]
    finally:
        down.close()
    assert storage.get_state("p1") == before
    assert [p.begin for p in storage.iter_periods("p1")] == [at(0)]
    assert storage.get_states(["p2", "p3"])["p2"].version == 0
    # InfluxDB back (the real one): the same period commits
    assert storage.commit_period(frame("p1", 1, ["a"]), before.version) == before.version + 1


def test_a_refused_write_fails_the_commit_and_keeps_the_state(make, raw):
    """A field of another type than before (InfluxDB: HTTP 400, field type
    conflict): StorageError naming the request, state and periods unchanged."""
    storage = make()
    storage.commit_period(frame("p1", 0, ["a"], metadata={"size": 1}), 0)
    with pytest.raises(StorageError, match=r"^InfluxDB at .*: writing 1 points of scope p1: "
                       r"HTTP 400 .*conflict"):
        storage.commit_period(frame("p1", 1, ["a"], metadata={"size": "big"}), 1)
    assert storage.get_state("p1").version == 1
    assert [p.begin for p in storage.iter_periods("p1")] == [at(0)]
    assert keys(raw("p1")) == [(ns(at(0)), "a")]


def test_missing_database_is_a_schema_error_with_the_init_hint(sql_url, influxdb_server):
    name = "ckp_missing_" + datetime.datetime.now().strftime("%H%M%S%f")
    storage = influx_storage(sql_url, influxdb_server, name)
    try:
        SQLStorage.upgrade(storage)  # the SQL schema only
        with pytest.raises(SchemaError, match=r"^InfluxDB: .*`cloudkitty-proc-manage "
                           r"storage init`"):
            storage.check_schema()
        storage.upgrade()  # creates the database
        assert name in influxdb_server.databases()
        storage.check_schema()
    finally:
        storage.close()
        if name in influxdb_server.databases():
            influxdb_server.drop_database(name)


def test_an_error_in_the_query_results_is_a_storage_error(sql_url, influxdb_server):
    """InfluxDB answers 200 with {"results": [{"error": ...}]}."""
    storage = influx_storage(sql_url, influxdb_server, "ckp_never_created")
    try:
        with pytest.raises(StorageError, match=r"^InfluxDB at .*: reading the points of "
                           r"scope p1: database not found"):
            storage.points.read("p1", at(0), at(1))
    finally:
        storage.close()


def test_an_unknown_retention_policy_is_named_at_init(make):
    with pytest.raises(StorageError, match=r"\[storage_influxdb\] retention_policy "
                       r"'nope': no such retention policy .*autogen"):
        make(retention_policy="nope")
