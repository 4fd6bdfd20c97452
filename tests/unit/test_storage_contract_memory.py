"""The storage contract suite run by a minimal in-memory backend, and the
declaration checks of ``BaseStorage``.

``MemoryStorage`` keeps its rows encoded (decimal text, label JSON) and
decodes them on reading, as a database backend does; it does not support
reprocessing. Its run shows that the contract suite needs nothing but the
BaseStorage API, and that a backend without REPROCESSING passes it (the
reprocessing cases skip, the no-task case runs).
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import json
import threading
from collections.abc import Iterator

import pytest

from cloudkitty_proc.exceptions import InvalidRequestError, SchemaError, StaleStateError
from cloudkitty_proc.storage.base import (MAX_ERROR_LENGTH, REPROCESSING, BaseStorage,
                                          RatedPeriod, RatedRow, ScopeState, TypeSummary)
from tests.storage_contract import StorageContract

UTC = datetime.timezone.utc
_EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX,
                         Emin=decimal.MIN_EMIN)


class _Store:
    """What several MemoryStorage objects share (one "database")."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.revision: str | None = None
        self.period: int | None = None
        self.states: dict[str, ScopeState] = {}
        #: (scope, begin) -> (period, encoded rows in type then insertion order)
        self.periods: dict[tuple, tuple[RatedPeriod, list[tuple]]] = {}


class MemoryStorage(BaseStorage):
    REVISION = "memory-1"

    def __init__(self, store: _Store) -> None:
        super().__init__(None)
        self.store = store

    def upgrade(self) -> None:
        self.store.revision = self.REVISION

    def current_revision(self) -> str | None:
        return self.store.revision

    def check_schema(self) -> None:
        if self.store.revision != self.REVISION:
            raise SchemaError("memory store not created: call upgrade()")

    def get_state(self, scope_id: str) -> ScopeState:
        return self.get_states([scope_id])[scope_id]

    def rating_period(self) -> int | None:
        return self.store.period

    def set_rating_period(self, period: int, *, expected: int | None) -> None:
        with self.store.lock:
            if self.store.period != expected:
                raise StaleStateError(f"recorded period is {self.store.period}")
            if expected is not None:
                shift = datetime.timedelta(seconds=expected - period)
                for sid, st in list(self.store.states.items()):
                    if st.last_processed is not None:
                        self.store.states[sid] = dataclasses.replace(
                            st, last_processed=st.last_processed + shift,
                            version=st.version + 1)
            self.store.period = period

    def get_states(self, scope_ids: list[str] | None = None) -> dict[str, ScopeState]:
        with self.store.lock:
            states = dict(self.store.states)
        if scope_ids is None:
            return dict(sorted(states.items()))
        return {s: states.get(s) or ScopeState(s, None, 0) for s in dict.fromkeys(scope_ids)}

    def commit_period(self, frame, expected_version: int, *, worker: str = "") -> int:
        begin, end = frame.begin.astimezone(UTC), frame.end.astimezone(UTC)
        encoded = [(usage_type, p.unit, format(p.qty, "f"), format(p.price, "f"),
                    json.dumps(p.groupby, sort_keys=True), json.dumps(p.metadata, sort_keys=True))
                   for usage_type, points in frame.items() for p in points]
        total = decimal.Decimal(0)
        for _, point in frame.iterpoints():
            total = _EXACT.add(total, point.price)
        now = datetime.datetime.now(UTC)
        with self.store.lock:
            state = self.store.states.get(frame.scope_id)
            version = state.version if state is not None else 0
            if version != expected_version:
                raise StaleStateError(f"scope {frame.scope_id}: no longer at version "
                                      f"{expected_version}")
            self.store.periods[frame.scope_id, begin] = (
                RatedPeriod(frame.scope_id, begin, end, len(encoded), total, now, worker or ""),
                encoded)
            self.store.states[frame.scope_id] = ScopeState(
                frame.scope_id, begin, version + 1, last_commit_at=now)
        return version + 1

    def record_error(self, scope_id: str, message: str, kind: str = "error") -> None:
        message = str(message)
        if len(message) > MAX_ERROR_LENGTH:
            message = message[:MAX_ERROR_LENGTH - 1] + "…"
        with self.store.lock:
            state = self.store.states.get(scope_id) or ScopeState(scope_id, None, 0)
            self.store.states[scope_id] = ScopeState(
                scope_id, state.last_processed, state.version, state.active, message,
                datetime.datetime.now(UTC), (kind or "error")[:32], state.last_commit_at)

    def reset_state(self, scope_id: str, to, period: int) -> None:
        last = None if to is None else to.astimezone(UTC) - datetime.timedelta(seconds=period)
        with self.store.lock:
            for key in [k for k in self.store.periods
                        if k[0] == scope_id and (to is None or k[1] >= to)]:
                del self.store.periods[key]
            state = self.store.states.get(scope_id)
            version = 1 if state is None else state.version + 1
            self.store.states[scope_id] = ScopeState(scope_id, last, version)

    def _keys(self, scope_id, begin, end) -> list[tuple]:
        with self.store.lock:
            return sorted(k for k in self.store.periods
                          if (scope_id is None or k[0] == scope_id)
                          and (begin is None or k[1] >= begin) and (end is None or k[1] < end))

    def iter_periods(self, scope_id=None, begin=None, end=None) -> Iterator[RatedPeriod]:
        for key in self._keys(scope_id, begin, end):
            found = self.store.periods.get(key)
            if found is not None:
                yield found[0]

    def iter_rated(self, scope_id=None, begin=None, end=None) -> Iterator[RatedRow]:
        for key in self._keys(scope_id, begin, end):
            found = self.store.periods.get(key)
            if found is None:
                continue
            period, encoded = found
            for usage_type, unit, qty, price, groupby, metadata in encoded:
                yield RatedRow(period.scope_id, period.begin, period.end, usage_type, unit,
                               decimal.Decimal(qty), decimal.Decimal(price),
                               json.loads(groupby), json.loads(metadata))

    def summary(self, scope_id=None) -> list[TypeSummary]:
        sums: dict[tuple, list] = {}
        for row in self.iter_rated(scope_id):
            acc = sums.setdefault((row.scope_id, row.type), [set(), 0, decimal.Decimal(0),
                                                             decimal.Decimal(0)])
            acc[0].add(row.begin)
            acc[1] += 1
            acc[2] = _EXACT.add(acc[2], row.qty)
            acc[3] = _EXACT.add(acc[3], row.price)
        return [TypeSummary(s, t, len(a[0]), a[1], a[2], a[3])
                for (s, t), a in sorted(sums.items())]


class TestMemoryStorageContract(StorageContract):

    @pytest.fixture
    def make_storage(self):
        store = _Store()

        def make(upgrade: bool = True) -> MemoryStorage:
            storage = MemoryStorage(store)
            if upgrade:
                storage.upgrade()
            return storage

        return make


# -- BaseStorage's declarations ------------------------------------------------

def test_a_backend_without_reprocessing_has_no_tasks():
    storage = MemoryStorage(_Store())
    assert not storage.supports(REPROCESSING)
    assert storage.list_tasks() == [] and storage.next_pending_task("p1") is None
    with pytest.raises(InvalidRequestError, match="the MemoryStorage storage backend does "
                       "not support it"):
        storage.create_reprocess_tasks(["p1"], datetime.datetime(2026, 1, 1, tzinfo=UTC),
                                       datetime.datetime(2026, 1, 2, tzinfo=UTC), "fix", 3600)
    with pytest.raises(NotImplementedError):
        storage.record_task_error(1, "boom")


def test_an_unknown_capability_is_refused_at_class_definition():
    with pytest.raises(TypeError, match="Odd.capabilities: unknown teleport"):
        class Odd(MemoryStorage):
            capabilities = frozenset({"teleport"})


def test_a_listed_capability_needs_its_methods():
    with pytest.raises(TypeError, match="Half lists the reprocessing capability but does "
                       "not define list_tasks, next_pending_task, "
                       "commit_reprocessed_period, record_task_error"):
        class Half(MemoryStorage):
            capabilities = frozenset({REPROCESSING})

            def create_reprocess_tasks(self, *args, **kwargs):
                return []


def test_a_backend_missing_a_required_method_cannot_be_built():
    class NoSummary(BaseStorage):
        def upgrade(self): ...
        def current_revision(self): ...
        def check_schema(self): ...
        def get_state(self, scope_id): ...
        def get_states(self, scope_ids=None): ...
        def commit_period(self, frame, expected_version, *, worker=""): ...
        def record_error(self, scope_id, message, kind="error"): ...
        def reset_state(self, scope_id, to, period): ...
        def iter_rated(self, scope_id=None, begin=None, end=None): ...
        def iter_periods(self, scope_id=None, begin=None, end=None): ...

    with pytest.raises(TypeError, match="abstract method.*summary"):
        NoSummary(None)
