"""The storage contract suite: what every storage backend must do.

A backend runs it from a test module by subclassing ``StorageContract`` and
defining the ``make_storage`` fixture::

    class TestMyStorageContract(StorageContract):
        @pytest.fixture
        def make_storage(self, tmp_path):
            ...                    # one fresh, empty store for the test
            yield make             # make(upgrade=True) -> a new storage object
            ...                    # close every object made, drop the store

``make(upgrade=True)`` returns a NEW storage object on the test's store
(every object a test makes shares that store, as the workers of one
deployment share a database), its schema upgraded unless ``upgrade`` is
False. The cases use the ``BaseStorage`` API only; the reprocessing cases
skip unless ``storage.supports(REPROCESSING)``, and the case for backends
without it skips for those with it.

Hooks a backend may override (methods of the subclass):

* ``small_fetch_batches(monkeypatch)``: make ``iter_rated`` fetch a few rows
  at a time, so that ordering across fetch boundaries and streaming are
  tested (default: nothing);
* ``move_frontier(storage, scope_id, last_processed)``: set a scope's
  last_processed behind the storage's back, as a reset-state racing with a
  reprocessing commit would (default: the case that needs it skips);
* ``stored(value)``: the Decimal a rated row holds once ``value`` (a qty or
  price) went through the store: itself for exact stores (the default),
  ``Decimal(repr(float(value)))`` for stores that keep floats, as
  CloudKitty's InfluxDB and Elasticsearch layouts do (``exact_numbers =
  False``). Period records (``iter_periods``) are exact on every backend;
* ``fail_storing(monkeypatch, storage, scope_id)``: make storing that
  scope's rated data fail inside its commit, after its compare-and-set, as
  a database or point store error would (default: the object's
  ``commit_period`` raises for the scope, before anything, which tests
  only a backend whose ``commit_periods`` is the base's per-item loop).
  ``fail_point_writes`` does it for the backends with a point store.
"""

from __future__ import annotations

import datetime
import decimal
import gc
import threading
import tracemalloc

import pytest

from cloudkitty_proc.dataframe import DataFrame, DataPoint
from cloudkitty_proc.exceptions import (InvalidRequestError, SchemaError, StaleStateError,
                                        TaskCancelledError)
from cloudkitty_proc.storage.base import (CAPABILITIES, MAX_ERROR_LENGTH, REPROCESSING,
                                          RatedRow, request_key)

D = decimal.Decimal
UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
H = datetime.timedelta(hours=1)
#: the period, in seconds, as the reprocessing and reset calls take it
PERIOD = 3600


def exact_sum(*values: D) -> D:
    """The sum of ``values``, never rounded."""
    context = decimal.Context(prec=200)
    total = D(0)
    for value in values:
        total = context.add(total, value)
    return total


def at(n: int) -> datetime.datetime:
    return T0 + n * H


def make_frame(scope: str, n: int, points: int = 0, types=("instance",)) -> DataFrame:
    """Period ``n`` of ``scope``: ``points`` points per type, qty i+1,
    price 0.01 x (i+1)."""
    frame = DataFrame(scope, at(n), at(n + 1))
    for usage_type in types:
        frame.add_points(usage_type, [
            DataPoint(usage_type, D(i + 1), D("0.01") * (i + 1),
                      {"project_id": scope, "i": str(i)}, {"period": str(n)})
            for i in range(points)])
    return frame


def priced_frame(scope: str, n: int, price: str = "1", points: int = 2) -> DataFrame:
    """Period ``n`` of ``scope``: ``points`` instances at ``price`` each."""
    f = DataFrame(scope, at(n), at(n + 1))
    f.add_points("instance", [DataPoint("instance", D(1), D(price), {"id": f"r{i}"}, {})
                              for i in range(points)])
    return f


def rate(storage, scope: str, hours: int, price: str = "1") -> None:
    """Commit periods 0 .. hours-1 of ``scope``."""
    version = storage.get_state(scope).version
    for n in range(hours):
        version = storage.commit_period(priced_frame(scope, n, price), version)


def rows(storage, scope):
    return [(r.begin, r.price) for r in storage.iter_rated(scope)]


def count(storage, scope_id: str | None = None) -> int:
    """Rated rows stored (for the scope)."""
    return sum(1 for _ in storage.iter_rated(scope_id))


def snapshot(storage, scope_id: str):
    """Everything a commit could change for one scope."""
    return (storage.get_state(scope_id), list(storage.iter_rated(scope_id)),
            list(storage.iter_periods(scope_id)))


class InjectedStoreError(RuntimeError):
    """The failure ``fail_storing`` injects."""


def fail_point_writes(monkeypatch, storage, scope_id: str) -> None:
    """``fail_storing`` for a backend with a point store (``storage.points``):
    writing the scope's points fails, alone or in a batched write."""
    write = storage.points.write

    def failing_write(frame, *args, **kwargs):
        if frame.scope_id == scope_id:
            raise InjectedStoreError(f"injected: writing the points of {scope_id} failed")
        return write(frame, *args, **kwargs)

    write_many = storage.points.write_many

    def failing_write_many(frames, *args, **kwargs):
        # a batched write (one request for many scopes) fails as a whole
        if any(frame.scope_id == scope_id for frame in frames):
            raise InjectedStoreError(f"injected: a batched write with the points of "
                                     f"{scope_id} failed")
        return write_many(frames, *args, **kwargs)

    monkeypatch.setattr(storage.points, "write", failing_write)
    monkeypatch.setattr(storage.points, "write_many", failing_write_many)


def need_reprocessing(storage) -> None:
    if not storage.supports(REPROCESSING):
        pytest.skip(f"{type(storage).__name__} does not support reprocessing")


class StorageContract:
    """The contract cases; see the module docstring to run them."""

    @pytest.fixture
    def make_storage(self):
        raise NotImplementedError("a backend's contract class defines make_storage")

    @pytest.fixture
    def storage(self, make_storage):
        return make_storage()

    def small_fetch_batches(self, monkeypatch) -> None:
        """Make iter_rated fetch a few rows at a time (backend hook)."""

    #: whether rated rows keep qty and price exactly (see ``stored``)
    exact_numbers = True

    def stored(self, value: D) -> D:
        """``value`` as a rated row holds it once stored."""
        return value if self.exact_numbers else D(repr(float(value)))

    def move_frontier(self, storage, scope_id: str, last_processed) -> None:
        """Set the scope's last_processed behind the storage's back."""
        pytest.skip(f"{type(storage).__name__}: no way to move a scope's frontier "
                    "behind the storage's back")

    def fail_storing(self, monkeypatch, storage, scope_id: str) -> None:
        """Make storing ``scope_id``'s rated data fail (backend hook)."""
        commit_period = storage.commit_period

        def failing_commit(frame, expected_version, *, worker=""):
            if frame.scope_id == scope_id:
                raise InjectedStoreError(f"injected: storing {scope_id} failed")
            return commit_period(frame, expected_version, worker=worker)

        monkeypatch.setattr(storage, "commit_period", failing_commit)

    # -- schema and capabilities -------------------------------------------

    def test_schema_checked_until_upgraded(self, make_storage):
        storage = make_storage(upgrade=False)
        assert storage.current_revision() is None
        with pytest.raises(SchemaError, match="upgrade"):
            storage.check_schema()
        storage.upgrade()
        revision = storage.current_revision()
        assert revision is not None
        storage.check_schema()
        storage.upgrade()  # idempotent
        assert storage.current_revision() == revision
        storage.check_schema()

    def test_capabilities_are_declared_as_data(self, storage):
        assert storage.capabilities <= CAPABILITIES
        for capability in CAPABILITIES:
            assert storage.supports(capability) == (capability in storage.capabilities)
        with pytest.raises(ValueError, match="unknown storage capability 'teleport'"):
            storage.supports("teleport")

    # -- commit and read back ------------------------------------------------

    def test_commit_and_read_back_exact(self, storage):
        big_qty = D("12345678901234567890.123456789012345678901234567891")
        tiny_price = D("0.000000000000000000000000000001")
        frame = DataFrame("p1", at(0), at(1))
        # added out of type order: rows come back ordered by type
        frame.add_points("volume", [
            DataPoint("GiB", big_qty, tiny_price, {"project_id": "p1", "id": "vol-é✓"},
                      {"z": "last", "a": "first", "quote": 'say "hi"'}),
        ])
        frame.add_points("instance", [
            DataPoint("instance", D("1"), D("0.010000"), {"project_id": "p1", "id": "vm-1"},
                      {"flavor_name": "m1.small"}),
            DataPoint("instance", D("1E+3"), D("98765432109876543210.98765432109876543210"),
                      {"project_id": "p1", "id": "vm-2"}, {}),
        ])

        assert storage.commit_period(frame, 0, worker="host-1") == 1

        rows = list(storage.iter_rated("p1"))
        v = self.stored
        assert rows == [
            RatedRow("p1", at(0), at(1), "instance", "instance", v(D("1")), v(D("0.010000")),
                     {"project_id": "p1", "id": "vm-1"}, {"flavor_name": "m1.small"}),
            RatedRow("p1", at(0), at(1), "instance", "instance", v(D("1000")),
                     v(D("98765432109876543210.98765432109876543210")),
                     {"project_id": "p1", "id": "vm-2"}, {}),
            RatedRow("p1", at(0), at(1), "volume", "GiB", v(big_qty), v(tiny_price),
                     {"project_id": "p1", "id": "vol-é✓"},
                     {"z": "last", "a": "first", "quote": 'say "hi"'}),
        ]
        if self.exact_numbers:
            # exact strings, trailing zeros and all, no exponent
            assert [format(r.price, "f") for r in rows] == [
                "0.010000", "98765432109876543210.98765432109876543210",
                "0.000000000000000000000000000001"]
            assert str(rows[2].qty) == "12345678901234567890.123456789012345678901234567891"
        for row in rows:
            assert row.begin.tzinfo is not None and row.begin.utcoffset() == datetime.timedelta(0)

        state = storage.get_state("p1")
        assert state.last_processed == at(0) and state.last_processed.tzinfo is not None
        assert state.version == 1
        assert state.last_error is None
        assert abs(state.last_commit_at - datetime.datetime.now(UTC)) < datetime.timedelta(
            minutes=1)

        total = D("98765432109876543210.997654321098765432100000000001")  # no rounding
        [period] = storage.iter_periods("p1")
        assert (period.begin, period.end, period.points, period.worker) == (
            at(0), at(1), 3, "host-1")
        assert period.price == total and str(period.price) == str(total)

        summary = {(s.scope_id, s.type): s for s in storage.summary()}
        assert set(summary) == {("p1", "instance"), ("p1", "volume")}
        inst = summary["p1", "instance"]
        assert (inst.periods, inst.points, inst.qty) == (1, 2, exact_sum(v(D("1")), v(D("1000"))))
        assert inst.price == exact_sum(
            v(D("0.010000")), v(D("98765432109876543210.98765432109876543210")))
        assert summary["p1", "volume"].qty == v(big_qty)

    def test_summary_is_exact_and_counts_periods(self, storage):
        v = 0
        for n in range(3):
            frame = DataFrame("p1", at(n), at(n + 1))
            frame.add_points("instance", [
                DataPoint("instance", D("0.1"), D("10000000000000000000000000000"),
                          {}, {}),
                DataPoint("instance", D("0.2"), D("0.0000000001"), {}, {}),
            ])
            v = storage.commit_period(frame, v)
        storage.commit_period(make_frame("p2", 0, points=1, types=("volume",)), 0)
        [inst] = storage.summary("p1")
        assert (inst.scope_id, inst.type, inst.periods, inst.points) == ("p1", "instance", 3, 6)
        v = self.stored
        assert inst.qty == exact_sum(*[v(D("0.1")), v(D("0.2"))] * 3)
        # 29 integer digits + 10 decimals: beyond the default 28-digit context
        assert inst.price == exact_sum(
            *[v(D("10000000000000000000000000000")), v(D("0.0000000001"))] * 3)
        if self.exact_numbers:
            assert inst.price == D("30000000000000000000000000000.0000000003")
        assert [(s.scope_id, s.type) for s in storage.summary()] == [
            ("p1", "instance"), ("p2", "volume")]

    def test_empty_frame_commits_and_advances_state(self, storage):
        assert storage.commit_period(make_frame("p1", 0), 0) == 1
        assert storage.commit_period(make_frame("p1", 1), 1) == 2
        state = storage.get_state("p1")
        assert (state.last_processed, state.version) == (at(1), 2)
        assert list(storage.iter_rated("p1")) == []
        periods = list(storage.iter_periods("p1"))
        assert [(p.begin, p.points, p.price) for p in periods] == [(at(0), 0, 0), (at(1), 0, 0)]
        assert storage.summary("p1") == []

    def test_periods_commit_in_time_order(self, storage):
        """The state holds the start of the last committed period; periods
        and rows read back in time order, scope by scope, however the
        commits of several scopes interleave."""
        versions = {"s1": 0, "s2": 0}
        for n in range(5):
            for scope in ("s2", "s1"):
                versions[scope] = storage.commit_period(make_frame(scope, n, points=1),
                                                        versions[scope])
                assert storage.get_state(scope).last_processed == at(n)
        assert versions == {"s1": 5, "s2": 5}
        assert [(p.scope_id, p.begin) for p in storage.iter_periods()] == [
            (s, at(n)) for s in ("s1", "s2") for n in range(5)]
        assert [r.begin for r in storage.iter_rated("s2")] == [at(n) for n in range(5)]

    # -- batched commits (commit_periods) ---------------------------------------

    def test_commit_periods_commits_each_scope_as_commit_period(self, storage):
        """A batch of several scopes (first commits, later ones, an empty
        frame, a scope with only an error row): each item is stored as
        commit_period stores it, the results in the items' order."""
        storage.commit_period(make_frame("b", 0, points=1), 0)
        storage.commit_period(make_frame("b", 1, points=1), 1)
        storage.record_error("c", "collector down")  # a row at version 0
        assert storage.commit_periods([]) == []
        items = [(make_frame("z", 0, points=3, types=("volume", "instance")), 0),
                 (make_frame("b", 2, points=2), 2),
                 (make_frame("c", 0), 0),
                 (priced_frame("a", 0, "0.5", points=4), 0)]
        assert storage.commit_periods(items, worker="w1") == [1, 3, 1, 1]

        states = storage.get_states(["z", "b", "c", "a"])
        assert {s: (st.last_processed, st.version, st.last_error)
                for s, st in states.items()} == {
            "z": (at(0), 1, None), "b": (at(2), 3, None), "c": (at(0), 1, None),
            "a": (at(0), 1, None)}
        assert [(p.scope_id, p.begin, p.points, p.price, p.worker)
                for p in storage.iter_periods()] == [
            ("a", at(0), 4, D(2), "w1"),
            ("b", at(0), 1, D("0.01"), ""), ("b", at(1), 1, D("0.01"), ""),
            ("b", at(2), 2, D("0.03"), "w1"),
            ("c", at(0), 0, D(0), "w1"),
            ("z", at(0), 6, D("0.12"), "w1")]
        v = self.stored
        assert [(r.begin, r.type, r.qty, r.price, r.groupby["i"], r.metadata)
                for r in storage.iter_rated("z")] == [
            (at(0), t, v(D(i + 1)), v(D("0.01") * (i + 1)), str(i), {"period": "0"})
            for t in ("instance", "volume") for i in range(3)]
        assert rows(storage, "a") == [(at(0), v(D("0.5")))] * 4
        assert count(storage, "b") == 4 and count(storage, "c") == 0

        # later periods of the same scopes, in another order
        assert storage.commit_periods([(make_frame("a", 1, points=1), 1),
                                       (make_frame("z", 1, points=1), 1),
                                       (make_frame("b", 3), 3)]) == [2, 2, 4]
        assert {s: st.version for s, st in storage.get_states(["a", "b", "z"]).items()} == {
            "a": 2, "b": 4, "z": 2}
        assert [p.begin for p in storage.iter_periods("a")] == [at(0), at(1)]

    def test_commit_periods_refuses_a_stale_item_alone(self, storage):
        storage.commit_period(make_frame("a", 0, points=1), 0)
        storage.commit_period(make_frame("b", 0, points=1), 0)
        storage.commit_period(make_frame("d", 0, points=1), 0)
        before = {s: snapshot(storage, s) for s in ("b", "d")}
        results = storage.commit_periods([
            (make_frame("a", 1, points=2), 1),
            (make_frame("b", 1, points=2), 0),  # row exists: expected 0 is stale
            (make_frame("c", 0, points=2), 0),
            (make_frame("d", 1, points=2), 5),
        ])
        assert results[0] == 2 and results[2] == 1
        for result, scope in ((results[1], "b"), (results[3], "d")):
            assert isinstance(result, StaleStateError), results
            assert f"scope {scope}" in str(result)
        assert {s: snapshot(storage, s) for s in ("b", "d")} == before
        assert (storage.get_state("a").version, count(storage, "a")) == (2, 3)
        assert (storage.get_state("c").version, count(storage, "c")) == (1, 2)
        # the refused scopes go on from the version they really have
        assert storage.commit_periods([(make_frame("b", 1, points=2), 1),
                                       (make_frame("d", 1, points=2), 1)]) == [2, 2]

    def test_commit_periods_refuses_two_items_of_one_scope(self, storage):
        storage.commit_period(make_frame("a", 0, points=1), 0)
        before = {s: snapshot(storage, s) for s in ("a", "b")}
        with pytest.raises(ValueError, match="scope a has more than one item"):
            storage.commit_periods([(make_frame("a", 1, points=1), 1),
                                    (make_frame("b", 0, points=1), 0),
                                    (make_frame("a", 2, points=1), 2)])
        assert {s: snapshot(storage, s) for s in ("a", "b")} == before

    def test_commit_periods_an_item_failing_to_store_fails_alone(self, storage, monkeypatch):
        storage.commit_period(make_frame("a", 0, points=1), 0)
        storage.commit_period(make_frame("b", 0, points=1), 0)
        before = snapshot(storage, "b")
        self.fail_storing(monkeypatch, storage, "b")
        results = storage.commit_periods([(make_frame("a", 1, points=2), 1),
                                          (make_frame("b", 1, points=2), 1),
                                          (make_frame("c", 0, points=2), 0)])
        assert results[0] == 2 and results[2] == 1
        assert isinstance(results[1], InjectedStoreError), results
        assert snapshot(storage, "b") == before
        assert [(p.begin, p.points) for p in storage.iter_periods("a")] == [
            (at(0), 1), (at(1), 2)]
        assert (storage.get_state("c").version, count(storage, "c")) == (1, 2)
        # a first commit failing to store leaves no state row behind either
        storage.commit_period(make_frame("d", 0, points=1), 0)
        self.fail_storing(monkeypatch, storage, "e")
        results = storage.commit_periods([(make_frame("e", 0, points=2), 0),
                                          (make_frame("d", 1, points=2), 1)])
        assert isinstance(results[0], InjectedStoreError) and results[1] == 2
        assert snapshot(storage, "e") == (storage.get_state("e"), [], [])
        assert storage.get_state("e").version == 0
        monkeypatch.undo()
        assert storage.commit_periods([(make_frame("b", 1, points=2), 1),
                                       (make_frame("e", 0, points=2), 0)]) == [2, 1]
        assert count(storage, "b") == 3 and count(storage, "e") == 2

    # -- reading -------------------------------------------------------------

    def test_iter_rated_order_and_half_open_window(self, storage, monkeypatch):
        # small batches: ordering must hold across fetch boundaries
        self.small_fetch_batches(monkeypatch)
        scopes = ["b", "a", "B"]  # bytewise order: "B" < "a" < "b" on every backend
        for scope in scopes:
            v = 0
            for n in (0, 1, 2, 3):
                v = storage.commit_period(
                    make_frame(scope, n, points=2, types=("zeta", "alpha")), v)

        rows = list(storage.iter_rated())
        keys = [(r.scope_id, r.begin, r.type, r.groupby["i"]) for r in rows]
        assert keys == [(s, at(n), t, i) for s in ("B", "a", "b") for n in range(4)
                        for t in ("alpha", "zeta") for i in ("0", "1")]

        window = list(storage.iter_rated(begin=at(1), end=at(3)))
        assert {r.begin for r in window} == {at(1), at(2)}
        assert len(window) == 3 * 2 * 2 * 2

        only_a = list(storage.iter_rated("a", begin=at(3)))
        assert {(r.scope_id, r.begin) for r in only_a} == {("a", at(3))}
        assert len(only_a) == 4
        assert list(storage.iter_rated("a", begin=at(2), end=at(2))) == []
        assert list(storage.iter_rated("nobody")) == []

        periods = list(storage.iter_periods(begin=at(1), end=at(2)))
        assert [(p.scope_id, p.begin) for p in periods] == [
            ("B", at(1)), ("a", at(1)), ("b", at(1))]

    def test_iter_rated_streams(self, storage, monkeypatch):
        """iter_rated is lazy (an iterator that can be closed early) and
        its memory does not grow with the rows it yields: reading every
        row one by one takes a small part of what the list of them takes."""
        self.small_fetch_batches(monkeypatch)
        v = 0
        for n in range(20):
            v = storage.commit_period(make_frame("p1", n, points=100), v)

        it = storage.iter_rated("p1")
        assert iter(it) is it
        assert next(it).begin == at(0)
        it.close()
        # closed early: the storage goes on, reads and writes
        assert storage.commit_period(make_frame("p1", 20, points=1), v) == v + 1
        assert count(storage, "p1") == 2001

        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            every = list(storage.iter_rated("p1"))
            listed = tracemalloc.get_traced_memory()[0] - before
            del every
            gc.collect()
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            seen = 0
            for _row in storage.iter_rated("p1"):
                seen += 1
            streamed = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        assert seen == 2001
        assert streamed < listed / 5, (streamed, listed)

    def test_get_states(self, storage):
        storage.commit_period(make_frame("p1", 0), 0)
        storage.record_error("p2", "boom")
        assert set(storage.get_states()) == {"p1", "p2"}
        states = storage.get_states(["p3", "p1"])
        assert list(states) == ["p3", "p1"]
        assert (states["p3"].last_processed, states["p3"].version) == (None, 0)
        assert states["p1"].version == 1
        many = [f"s{i}" for i in range(1200)] + ["p1"]  # more than one IN chunk
        assert storage.get_states(many)["p1"].version == 1
        assert len(storage.get_states(many)) == 1201

    # -- compare-and-set -----------------------------------------------------

    def test_stale_version_raises_and_writes_nothing(self, storage):
        assert storage.commit_period(make_frame("p1", 0, points=3), 0) == 1
        before = snapshot(storage, "p1")
        # row exists: expected 0 takes the INSERT path and hits the key
        with pytest.raises(StaleStateError, match="p1"):
            storage.commit_period(make_frame("p1", 1, points=3), 0)
        with pytest.raises(StaleStateError):
            storage.commit_period(make_frame("p1", 1, points=3), 7)
        assert snapshot(storage, "p1") == before
        assert storage.commit_period(make_frame("p1", 1, points=3), 1) == 2

    def test_two_commits_from_one_read_exactly_one_wins(self, make_storage):
        s1, s2 = make_storage(), make_storage(upgrade=False)
        # no row yet: both read version 0
        v1, v2 = s1.get_state("p1").version, s2.get_state("p1").version
        assert v1 == v2 == 0
        assert s1.commit_period(make_frame("p1", 0, points=2), v1, worker="w1") == 1
        with pytest.raises(StaleStateError):
            s2.commit_period(make_frame("p1", 0, points=5), v2, worker="w2")
        # row present: both read version 1, the second writer wins this time
        v1, v2 = s1.get_state("p1").version, s2.get_state("p1").version
        assert s2.commit_period(make_frame("p1", 1, points=5), v2, worker="w2") == 2
        with pytest.raises(StaleStateError):
            s1.commit_period(make_frame("p1", 1, points=2), v1, worker="w1")
        assert [(p.begin, p.worker, p.points) for p in s1.iter_periods("p1")] == [
            (at(0), "w1", 2), (at(1), "w2", 5)]
        assert count(s1, "p1") == 7

    def test_concurrent_commits_race_exactly_one_wins(self, make_storage):
        """Eight storage objects commit the same period at once from the
        same read, first with no state row (INSERT race), then from an
        existing row."""
        workers = 8
        stores = [make_storage()] + [make_storage(upgrade=False) for _ in range(workers - 1)]
        for n in range(3):
            expected = stores[0].get_state("p1").version
            barrier = threading.Barrier(workers)
            outcome: list = [None] * workers

            def run(i, n=n, expected=expected, barrier=barrier, outcome=outcome):
                frame = make_frame("p1", n, points=i + 1)
                barrier.wait()
                try:
                    outcome[i] = stores[i].commit_period(frame, expected, worker=f"w{i}")
                except StaleStateError:
                    outcome[i] = "stale"
                except Exception as e:  # noqa: BLE001 - reported below
                    outcome[i] = repr(e)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            wins = [i for i, o in enumerate(outcome) if o == expected + 1]
            assert len(wins) == 1, outcome
            assert outcome.count("stale") == workers - 1, outcome
            [period] = stores[0].iter_periods("p1", begin=at(n), end=at(n + 1))
            assert period.worker == f"w{wins[0]}"
            assert count(stores[0], "p1") == sum(
                p.points for p in stores[0].iter_periods("p1"))
        assert stores[0].get_state("p1").version == 3

    # -- errors and resets ---------------------------------------------------

    def test_record_error_keeps_state_and_version(self, storage):
        storage.record_error("p1", "collector down", kind="collect")
        state = storage.get_state("p1")
        assert (state.last_processed, state.version) == (None, 0)
        assert (state.last_error, state.last_error_kind) == ("collector down", "collect")
        assert state.last_error_at is not None and state.last_error_at.tzinfo is not None
        assert "p1" in storage.get_states()

        # a row with version 0 means the same as no row: the first commit works
        assert storage.commit_period(make_frame("p1", 0, points=1), 0) == 1
        state = storage.get_state("p1")
        assert (state.last_processed, state.version, state.last_error) == (at(0), 1, None)

        storage.record_error("p1", "x" * 10_000)
        state = storage.get_state("p1")
        assert (state.last_processed, state.version) == (at(0), 1)
        assert state.last_error.startswith("xxx")
        assert len(state.last_error) <= MAX_ERROR_LENGTH
        assert state.last_error_kind == "error"
        assert storage.commit_period(make_frame("p1", 1), 1) == 2

    def test_rating_period_is_recorded_once_and_changed_by_compare_and_set(
            self, storage, make_storage):
        assert storage.rating_period() is None
        storage.set_rating_period(3600, expected=None)
        other = make_storage()  # another process: sees it
        assert other.rating_period() == 3600
        with pytest.raises(StaleStateError):
            other.set_rating_period(1800, expected=None)  # a second first start
        with pytest.raises(StaleStateError):
            other.set_rating_period(1800, expected=7200)
        assert storage.rating_period() == 3600
        storage.commit_period(make_frame("p1", 0, points=1), 0)  # hour 0 rated
        before = storage.get_state("p1")
        other.set_rating_period(1800, expected=3600)
        assert storage.rating_period() == 1800
        # the next period still starts at hour 1, now 1800 s long
        after = storage.get_state("p1")
        assert after.last_processed == at(1) - datetime.timedelta(seconds=1800)
        assert after.version == before.version + 1  # a worker of the old period is fenced
        with pytest.raises(StaleStateError):
            storage.commit_period(make_frame("p1", 1), before.version)

    def test_reset_state_deletes_from_to_and_fences_old_version(self, storage):
        v = 0
        for n in range(4):
            v = storage.commit_period(make_frame("p1", n, points=2), v)
        storage.commit_period(make_frame("other", 3, points=2), 0)
        assert v == 4

        storage.reset_state("p1", at(2), PERIOD)
        state = storage.get_state("p1")
        assert (state.last_processed, state.version) == (at(1), 5)
        assert {r.begin for r in storage.iter_rated("p1")} == {at(0), at(1)}
        assert [p.begin for p in storage.iter_periods("p1")] == [at(0), at(1)]
        assert count(storage, "other") == 2  # other scopes untouched

        with pytest.raises(StaleStateError):
            storage.commit_period(make_frame("p1", 2, points=1), 4)
        assert storage.commit_period(make_frame("p1", 2, points=1), 5) == 6

        storage.reset_state("p1", None, PERIOD)
        state = storage.get_state("p1")
        assert (state.last_processed, state.version) == (None, 7)
        assert list(storage.iter_rated("p1")) == [] and list(storage.iter_periods("p1")) == []

        # a scope never seen: a worker that read "no row" (version 0) is fenced
        storage.reset_state("new", at(5), PERIOD)
        assert storage.get_state("new").last_processed == at(4)
        with pytest.raises(StaleStateError):
            storage.commit_period(make_frame("new", 5), 0)
        assert storage.commit_period(make_frame("new", 5), storage.get_state("new").version)

    # -- reprocessing (capability REPROCESSING) -------------------------------

    def test_without_reprocessing_there_are_no_tasks(self, storage):
        if storage.supports(REPROCESSING):
            pytest.skip(f"{type(storage).__name__} supports reprocessing: its cases run")
        rate(storage, "p1", 4)
        with pytest.raises(InvalidRequestError, match="reprocessing is not available"):
            storage.create_reprocess_tasks(["p1"], at(0), at(2), "fix", PERIOD)
        assert storage.list_tasks() == []
        assert storage.next_pending_task("p1") is None
        storage.reset_state("p1", at(2), PERIOD)  # no task to cut
        assert storage.get_state("p1").last_processed == at(1)

    def test_validation_names_each_problem_and_writes_nothing(self, storage):
        need_reprocessing(storage)
        rate(storage, "p1", 6)
        rate(storage, "p2", 3)
        cases = [
            (dict(begin=at(1) + datetime.timedelta(minutes=5)), "begin .* is not aligned"),
            (dict(begin=at(4), end=at(2)), "must be before end"),
            (dict(begin=at(2), end=at(2)), "must be before end"),
            (dict(reason="  "), "reason: a non-empty reason is required"),
            (dict(scopes=[]), "no scope given"),
            (dict(scopes=["never"]), "scope never: nothing rated yet"),
            (dict(end=at(7)), r"end 2026-01-01T07:00:00\+00:00 is beyond what was processed "
                              r".*end must be at most 2026-01-01T06:00:00\+00:00"),
            (dict(begin=at(-1)), "begin .* is before the first rated period"),
            # one scope at fault: the whole request is refused, naming it
            (dict(scopes=["p1", "p2"], end=at(5)), "scope p2: end .* is beyond"),
        ]
        for overrides, message in cases:
            args = dict(scopes=["p1"], begin=at(1), end=at(3), reason="fix")
            args.update(overrides)
            with pytest.raises(InvalidRequestError, match=message):
                storage.create_reprocess_tasks(args["scopes"], args["begin"], args["end"],
                                               args["reason"], PERIOD)
        assert storage.list_tasks() == []
        # the frontier itself is allowed: end == last_processed + period
        [tid] = storage.create_reprocess_tasks(["p1"], at(0), at(6), "whole", PERIOD)
        task = storage.list_tasks(ids=[tid])[0]
        assert (task.state, task.total_periods, task.done_periods, task.next_period) == \
            ("pending", 6, 0, at(0))

    def test_same_request_is_idempotent_overlap_refused_identical_window_merged(self, storage):
        need_reprocessing(storage)
        rate(storage, "p1", 10)
        rate(storage, "p2", 10)
        ids = storage.create_reprocess_tasks(["p1", "p2"], at(2), at(6), "price fix", PERIOD)
        assert len(set(ids)) == 2
        assert storage.create_reprocess_tasks(["p1", "p2"], at(2), at(6), "price fix",
                                              PERIOD) == ids
        # another reason, the exact same window: merged into the pending task
        assert storage.create_reprocess_tasks(["p2"], at(2), at(6), "other", PERIOD) == [ids[1]]
        # an overlapping different window: refused, naming the task and its reason
        with pytest.raises(InvalidRequestError,
                           match=rf"scope p1: the window overlaps task {ids[0]} .*'price fix'"):
            storage.create_reprocess_tasks(["p1"], at(5), at(8), "more", PERIOD)
        # a disjoint window is another task
        [other] = storage.create_reprocess_tasks(["p1"], at(6), at(8), "more", PERIOD)
        assert other not in ids
        assert len(storage.list_tasks()) == 3
        # a client request id: reused for the same request → the same tasks
        a = storage.create_reprocess_tasks(["p2"], at(8), at(10), "x", PERIOD,
                                           request_id="req-1")
        assert storage.create_reprocess_tasks(["p2"], at(8), at(10), "y", PERIOD,
                                              request_id="req-1") == a
        with pytest.raises(InvalidRequestError, match="request id 'req-1' was already used"):
            storage.create_reprocess_tasks(["p2"], at(0), at(1), "x", PERIOD,
                                           request_id="req-1")
        assert storage.list_tasks(ids=a)[0].request_key == "req-1"
        assert storage.list_tasks(ids=[ids[0]])[0].request_key == \
            request_key("p1", at(2), at(6), "price fix")

    def test_commit_reprocessed_period_replaces_rows_and_advances_fenced(self, storage):
        need_reprocessing(storage)
        rate(storage, "p1", 5, price="1")
        rate(storage, "p2", 5, price="1")
        state_before = storage.get_state("p1")
        [tid] = storage.create_reprocess_tasks(["p1"], at(1), at(3), "fix", PERIOD)
        with pytest.raises(ValueError, match="expects"):
            storage.commit_reprocessed_period(tid, priced_frame("p1", 2, "2"), at(1))
        task = storage.commit_reprocessed_period(tid, priced_frame("p1", 1, "2", points=3),
                                                 at(1), worker="w")
        assert (task.state, task.done_periods, task.next_period) == ("running", 1, at(2))
        # a second worker still at the old progress is fenced: nothing written
        with pytest.raises(StaleStateError, match=f"task {tid}"):
            storage.commit_reprocessed_period(tid, priced_frame("p1", 1, "9"), at(1))
        task = storage.commit_reprocessed_period(tid, priced_frame("p1", 2, "2", points=0),
                                                 at(2))
        assert (task.state, task.done_periods, task.total_periods, task.next_period) == \
            ("done", 2, 2, at(3))
        with pytest.raises(StaleStateError):  # done: nothing more
            storage.commit_reprocessed_period(tid, priced_frame("p1", 3, "2"), at(3))
        assert rows(storage, "p1") == [(at(0), D(1)), (at(0), D(1))] + [(at(1), D(2))] * 3 + \
            [(at(3), D(1))] * 2 + [(at(4), D(1))] * 2
        periods = [(p.begin, p.points) for p in storage.iter_periods("p1")]
        assert periods == [(at(0), 2), (at(1), 3), (at(2), 0), (at(3), 2), (at(4), 2)]
        assert rows(storage, "p2") == [(at(n), D(1)) for n in range(5) for _ in range(2)]
        # the scope state is not touched: normal processing goes on unfenced
        assert storage.get_state("p1") == state_before
        assert storage.next_pending_task("p1") is None
        # done: the same request again returns the done task, rates nothing
        assert storage.create_reprocess_tasks(["p1"], at(1), at(3), "fix", PERIOD) == [tid]
        assert storage.next_pending_task("p1") is None

    def test_reset_state_cuts_or_cancels_tasks(self, storage):
        need_reprocessing(storage)
        rate(storage, "p1", 10)
        [a] = storage.create_reprocess_tasks(["p1"], at(0), at(4), "a", PERIOD)
        [b] = storage.create_reprocess_tasks(["p1"], at(4), at(8), "b", PERIOD)
        storage.commit_reprocessed_period(a, priced_frame("p1", 0, "2"), at(0))
        storage.reset_state("p1", at(2), PERIOD)
        ta, tb = storage.list_tasks(ids=[a, b])
        assert (ta.state, ta.end, ta.total_periods, ta.done_periods) == ("running", at(2), 2, 1)
        assert "window cut" in ta.last_error
        assert tb.state == "failed" and "cancelled by reset-state" in tb.last_error
        storage.commit_reprocessed_period(a, priced_frame("p1", 1, "2"), at(1))
        assert storage.list_tasks(ids=[a])[0].state == "done"
        # normal processing rates 2.. again; the failed task's request again
        # restarts it
        v = storage.get_state("p1").version
        for n in range(2, 9):
            v = storage.commit_period(priced_frame("p1", n), v)
        assert storage.create_reprocess_tasks(["p1"], at(4), at(8), "b", PERIOD) == [b]
        tb = storage.list_tasks(ids=[b])[0]
        assert (tb.state, tb.done_periods, tb.next_period, tb.last_error) == \
            ("pending", 0, at(4), None)
        storage.commit_reprocessed_period(b, priced_frame("p1", 4, "3"), at(4))
        storage.reset_state("p1", None, PERIOD)
        assert all(not t.active for t in storage.list_tasks())

    def test_reprocessed_commit_refused_once_frontier_moved_below(self, storage):
        """The frontier moved below the task's next period (as a reset
        racing with the commit would): the commit is refused, the task
        fails, nothing is written."""
        need_reprocessing(storage)
        rate(storage, "p1", 9)
        [b] = storage.create_reprocess_tasks(["p1"], at(4), at(8), "b", PERIOD)
        storage.commit_reprocessed_period(b, priced_frame("p1", 4, "3"), at(4))
        self.move_frontier(storage, "p1", at(4))
        with pytest.raises(TaskCancelledError, match="no longer below"):
            storage.commit_reprocessed_period(b, priced_frame("p1", 5, "3"), at(5))
        assert storage.list_tasks(ids=[b])[0].state == "failed"
        assert [r for r in rows(storage, "p1") if r[0] == at(5)] == [(at(5), D(1))] * 2
        assert [r for r in rows(storage, "p1") if r[0] == at(4)] == [(at(4), D(3))] * 2
