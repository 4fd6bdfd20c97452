"""The storage contract: scope states and rated data, committed together.

Invariants this contract carries (doc/source/design.rst):

1. Exactly once: ``commit_period`` writes the period's rated rows, the period
   record and the scope state advance in ONE transaction, or nothing.
2. Fenced: ``commit_period`` succeeds only if the scope's state ``version`` is
   still ``expected_version`` (compare-and-set); otherwise it raises
   StaleStateError and writes nothing. A worker whose lock lapsed can
   therefore never commit over another worker's progress.
   ``commit_periods`` (several scopes at once) fences and writes each of its
   items exactly as ``commit_period`` would: a refused item writes nothing,
   and no item's failure fails another.
3. In order: the caller commits periods in time order; the state holds the
   start of the last committed period (CloudKitty's meaning).
4. Durable reprocessing: ``create_reprocess_tasks`` commits every task of a
   request (or none) before returning their ids; ``commit_reprocessed_period``
   replaces one period's rows AND advances the task's progress in one
   transaction, fenced by a compare-and-set on that progress, so a task
   interrupted at any point resumes at its next period with nothing
   duplicated or lost.

Threading: a storage object is used from the worker's main thread only (DB
drivers block the whole process: keep DB work outside the collect pool). The
RPC endpoint of a worker (messaging.py) has a storage object of its own,
used by one RPC thread at a time.

What a backend provides: every abstract method of ``BaseStorage`` (schema,
states, commit, reset, reading). Optional features are data: a backend lists
the ones it has in ``capabilities`` and callers ask ``supports()``; the
methods of a feature it does not list keep the base's behaviour (documented
on each). ``tests/storage_contract.py`` is the test suite every backend runs.
"""

from __future__ import annotations

import abc
import time
import dataclasses
import datetime
import decimal
import hashlib
from collections.abc import Callable, Iterator, Sequence

from oslo_config import cfg

from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.exceptions import InvalidRequestError


@dataclasses.dataclass(frozen=True)
class ScopeState:
    scope_id: str
    #: start of the last committed period; None: nothing committed yet
    last_processed: datetime.datetime | None
    #: compare-and-set token; 0 when the scope has no row yet
    version: int = 0
    active: bool = True
    last_error: str | None = None
    last_error_at: datetime.datetime | None = None
    last_error_kind: str | None = None
    #: wall time of the last successful commit
    last_commit_at: datetime.datetime | None = None


@dataclasses.dataclass(frozen=True)
class RatedRow:
    """One rated datapoint as stored (the export record, CONTRACTS §5)."""

    scope_id: str
    begin: datetime.datetime
    end: datetime.datetime
    type: str
    unit: str
    qty: decimal.Decimal
    price: decimal.Decimal
    groupby: dict
    metadata: dict


@dataclasses.dataclass(frozen=True)
class RatedPeriod:
    """One committed (scope, period), empty periods included."""

    scope_id: str
    begin: datetime.datetime
    end: datetime.datetime
    #: rated rows of the period
    points: int
    #: exact sum of the rows' prices
    price: decimal.Decimal
    committed_at: datetime.datetime
    #: who committed it (``commit_period``'s ``worker``; "" when not given)
    worker: str


@dataclasses.dataclass(frozen=True)
class TypeSummary:
    scope_id: str
    type: str
    periods: int
    points: int
    qty: decimal.Decimal
    price: decimal.Decimal


TASK_PENDING = "pending"
TASK_RUNNING = "running"
TASK_DONE = "done"
TASK_FAILED = "failed"
#: states of a task that still has periods to re-rate
ACTIVE_TASK_STATES = (TASK_PENDING, TASK_RUNNING)
#: longest client-supplied request id
MAX_REQUEST_ID_LENGTH = 128
#: longest error message kept (a scope's or a task's ``last_error``); a
#: longer one is cut and ends with "…"
MAX_ERROR_LENGTH = 4000


@dataclasses.dataclass(frozen=True)
class ReprocessTask:
    """Re-rate the periods of ``scope_id`` whose start t is in [begin, end).

    ``next_period`` is the start of the next period to re-rate (``end`` once
    done); ``done_periods`` of ``total_periods`` are re-rated. ``state``:
    pending (nothing re-rated yet), running, done, failed (cancelled, with
    ``last_error`` saying why). ``last_error`` on an active task is the last
    error of a period that will be retried.
    """

    id: int
    scope_id: str
    begin: datetime.datetime
    end: datetime.datetime
    next_period: datetime.datetime
    total_periods: int
    done_periods: int
    reason: str
    state: str
    request_key: str
    created_at: datetime.datetime
    updated_at: datetime.datetime
    last_error: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_TASK_STATES


def request_key(scope_id: str, begin: datetime.datetime, end: datetime.datetime,
                reason: str, request_id: str | None = None) -> str:
    """The idempotency key of a reprocess request for one scope: the
    client's request id when it gave one, else a hash of what it asked."""
    if request_id is not None:
        return request_id
    text = "\0".join((scope_id, begin.astimezone(datetime.timezone.utc).isoformat(),
                      end.astimezone(datetime.timezone.utc).isoformat(), reason))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def check_batch(items: Sequence[tuple[DataFrame, int]]) -> list[tuple[DataFrame, int]]:
    """``commit_periods``' items as a list; ValueError naming the scope when
    one has more than one item (their commits would fence each other)."""
    items = list(items)
    seen: set[str] = set()
    for frame, _expected in items:
        if frame.scope_id in seen:
            raise ValueError(f"commit_periods: scope {frame.scope_id} has more than one "
                             "item (at most one period per scope in a call)")
        seen.add(frame.scope_id)
    return items


#: Optional storage features. A backend lists those it has in its
#: ``capabilities``; callers test ``storage.supports(...)`` before using them.
#:
#: ``REPROCESSING``: durable reprocessing tasks (invariant 4). A backend that
#: lists it implements every method of ``CAPABILITY_METHODS[REPROCESSING]``;
#: one that does not has no tasks: ``list_tasks`` returns [],
#: ``next_pending_task`` None, and ``create_reprocess_tasks`` refuses the
#: request (InvalidRequestError naming the backend).
REPROCESSING = "reprocessing"

#: every capability, and the methods a backend listing it must define
CAPABILITY_METHODS: dict[str, tuple[str, ...]] = {
    REPROCESSING: ("create_reprocess_tasks", "list_tasks", "next_pending_task",
                   "commit_reprocessed_period", "record_task_error"),
}
CAPABILITIES = frozenset(CAPABILITY_METHODS)


class BaseStorage(abc.ABC):
    """A storage backend (a ``cloudkitty_proc.storage`` entry point).

    Built as ``cls(conf)``, connecting lazily (a storage may be built in
    the master before the workers fork). Subclasses define every abstract
    method below, and the methods of each capability they list in
    ``capabilities`` (checked when the class is defined). Their options
    are declared in their module as ``OPTS = [(group, [opts])]`` and listed
    in conf.py's ``PLUGIN_OPT_MODULES``.
    """

    #: the optional features this backend has (a subset of CAPABILITIES)
    capabilities: frozenset[str] = frozenset()

    #: how the storage waits for a lock held by another process; a worker
    #: with the GreenPool executor sets ``eventlet.sleep`` so its collector
    #: replies are handled meanwhile
    sleep: Callable[[float], None]

    #: whether the storage's own network I/O (a point store's HTTP requests)
    #: uses green sockets: set by a worker running the GreenPool executor
    #: before the first call; the ``sql`` backend ignores it
    green: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.capabilities) - CAPABILITIES
        if unknown:
            raise TypeError(f"{cls.__name__}.capabilities: unknown "
                            f"{', '.join(sorted(unknown))} (known: "
                            f"{', '.join(sorted(CAPABILITIES))})")
        for capability in cls.capabilities:
            missing = [name for name in CAPABILITY_METHODS[capability]
                       if getattr(cls, name) is getattr(BaseStorage, name)]
            if missing:
                raise TypeError(f"{cls.__name__} lists the {capability} capability "
                                f"but does not define {', '.join(missing)}")

    def supports(self, capability: str) -> bool:
        """Whether this backend has the optional feature ``capability``."""
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown storage capability {capability!r}")
        return capability in self.capabilities

    def __init__(self, conf: cfg.ConfigOpts | None) -> None:
        self.conf = conf
        self.sleep = time.sleep

    # -- schema ---------------------------------------------------------
    @abc.abstractmethod
    def upgrade(self) -> None:
        """Create or migrate the schema to the latest version (idempotent)."""

    @abc.abstractmethod
    def current_revision(self) -> str | None:
        """The schema revision the store is at; None when not created."""

    @abc.abstractmethod
    def check_schema(self) -> None:
        """Raise SchemaError (saying which command to run) unless the schema
        is at the latest version."""

    # -- states ---------------------------------------------------------
    @abc.abstractmethod
    def get_state(self, scope_id: str) -> ScopeState:
        """The scope's state; a scope never seen has last_processed None,
        version 0."""

    @abc.abstractmethod
    def get_states(self, scope_ids: list[str] | None = None) -> dict[str, ScopeState]:
        """States of the given scopes, in the order given (all known scopes
        when None). Scopes without a row are returned with version 0."""

    @abc.abstractmethod
    def commit_period(self, frame: DataFrame, expected_version: int,
                      *, worker: str = "") -> int:
        """Store the rated ``frame``, its period record and set the scope
        state to ``frame.begin`` in one transaction, if and only if the
        scope's version is still ``expected_version``. Returns the new
        version (expected_version + 1). Raises StaleStateError (nothing
        written) otherwise. An empty frame is a valid commit (a period with
        no data)."""

    def commit_periods(self, items: Sequence[tuple[DataFrame, int]],
                       *, worker: str = "") -> list[int | Exception]:
        """Commit several scopes' periods: ``items`` are (rated frame,
        expected version of ``frame.scope_id``), at most one per scope
        (ValueError otherwise, nothing written). Returns one entry per item,
        in order: the new version (expected + 1), or the exception of that
        item: StaleStateError when its compare-and-set was refused (nothing
        of it written), any other when storing it failed.

        Each item is fenced and written as ``commit_period`` does it
        (invariants 1 and 2); a refused or failed item never makes another
        item fail. A backend may commit the items together (the ``sql``
        backend: one transaction) as long as that holds. Here: one
        ``commit_period`` per item, in order."""
        items = check_batch(items)
        results: list[int | Exception] = []
        for frame, expected_version in items:
            try:
                results.append(self.commit_period(frame, expected_version, worker=worker))
            except Exception as exc:  # noqa: BLE001 - that item's outcome
                results.append(exc)
        return results

    @abc.abstractmethod
    def record_error(self, scope_id: str, message: str, kind: str = "error") -> None:
        """Remember the last error of a scope (for status; at most
        MAX_ERROR_LENGTH characters kept); never changes last_processed nor
        version."""

    @abc.abstractmethod
    def reset_state(self, scope_id: str, to: datetime.datetime | None,
                    period: int) -> None:
        """Delete the scope's rated rows and period records with begin >=
        ``to`` and set its state so the period starting at ``to`` is the
        next one rated (last_processed = to - period). Bumps the version (a
        scope without a row gets version 1, so a worker that read version 0
        is fenced). In the same transaction, active reprocessing tasks of
        the scope are cut at ``to`` (their periods from ``to`` on are rated
        again anyway), or marked failed when nothing of their window is left
        before ``to``. ``to`` None: everything is deleted and every active
        task failed."""

    def scope_taken(self, scope_id: str) -> None:
        """A worker took the scope's lease and is about to read its state
        and commit: forget anything cached about the scope from an earlier
        lease (another worker may have written meanwhile). Nothing by
        default."""

    # -- reprocessing tasks (capability REPROCESSING) -----------------------
    def create_reprocess_tasks(self, scope_ids: Sequence[str], begin: datetime.datetime,
                               end: datetime.datetime, reason: str, period: int,
                               *, request_id: str | None = None,
                               skip_uncovered: bool = False) -> list[int]:
        """One task per scope re-rating the periods starting in [begin, end),
        all committed in ONE transaction before the ids are returned (in the
        order of ``scope_ids``), or none.

        Raises InvalidRequestError (nothing written), naming every scope at
        fault, unless: ``begin`` < ``end``, both aligned to ``period``,
        ``reason`` not empty, and for every scope ``end`` <= its processed
        frontier (last_processed + period) and ``begin`` >= its first rated
        period. ``skip_uncovered``: scopes failing those last two checks
        are left out instead (refused only if no scope is left).

        Idempotent: a task of the scope with the same request key (see
        ``request_key``) is returned as is (a failed one is restarted); an
        active task of the scope with exactly this window is returned (the
        requests merge); an active task whose window overlaps this one
        refuses the request.

        Without REPROCESSING: always InvalidRequestError.
        """
        raise InvalidRequestError(
            f"reprocessing is not available: the {type(self).__name__} storage backend "
            "does not support it")

    def list_tasks(self, states: Sequence[str] | None = None,
                   scope_id: str | None = None,
                   ids: Sequence[int] | None = None) -> list[ReprocessTask]:
        """Tasks (filtered), ordered by id. Without REPROCESSING: []."""
        return []

    def next_pending_task(self, scope_id: str) -> ReprocessTask | None:
        """The oldest active (pending or running) task of the scope.
        Without REPROCESSING: None."""
        return None

    def commit_reprocessed_period(self, task_id: int, frame: DataFrame,
                                  expected_next_period: datetime.datetime,
                                  *, worker: str = "") -> ReprocessTask:
        """Replace the rated rows (and period record) of ``frame``'s period by
        ``frame``'s and advance the task past it (done when it reaches the
        task's end), in ONE transaction, if and only if the task is still
        active at ``expected_next_period`` (== ``frame.begin``, else
        ValueError). Returns the task as updated. The scope state is not
        touched.

        StaleStateError (nothing written) when the task moved on or was
        cancelled; TaskCancelledError when the period is no longer below the
        scope's processed frontier (a reset-state moved it): the task is
        then marked failed and no rows are written.

        Without REPROCESSING: NotImplementedError (there is no task).
        """
        raise NotImplementedError(f"{type(self).__name__}: no reprocessing")

    def record_task_error(self, task_id: int, message: str) -> None:
        """Remember the last error of an active task (it stays active and
        is retried). Without REPROCESSING: NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__}: no reprocessing")

    # -- reading ---------------------------------------------------------
    # -- the period of the stored data ---------------------------------------
    @abc.abstractmethod
    def rating_period(self) -> int | None:
        """The ``[collect] period`` (seconds) every stored state and rated
        period is aligned to; None when none is recorded yet."""

    @abc.abstractmethod
    def set_rating_period(self, period: int, *, expected: int | None) -> None:
        """Record ``period`` if the recorded one is still ``expected`` (None:
        none recorded); StaleStateError (nothing written) otherwise.

        Changing a recorded period also moves every scope's
        ``last_processed`` by ``expected - period`` (its next period starts
        where it did, with the new length) and bumps its version, in the
        same transaction."""

    @abc.abstractmethod
    def iter_rated(self, scope_id: str | None = None,
                   begin: datetime.datetime | None = None,
                   end: datetime.datetime | None = None) -> Iterator[RatedRow]:
        """Rated rows with begin <= row.begin < end, ordered by scope, begin,
        type (then insertion order). Streams: memory does not grow with
        the number of rows; closing the iterator early releases what it
        holds."""

    @abc.abstractmethod
    def iter_periods(self, scope_id: str | None = None,
                     begin: datetime.datetime | None = None,
                     end: datetime.datetime | None = None) -> Iterator[RatedPeriod]:
        """Committed periods (empty ones included) with
        begin <= period.begin < end, ordered by scope and begin; streams
        as iter_rated."""

    @abc.abstractmethod
    def summary(self, scope_id: str | None = None) -> list[TypeSummary]:
        """Per scope and type (in that order): periods with data, points,
        Σqty, Σprice (exact: never rounded)."""

    def close(self) -> None:
        """Release connections; the next call reconnects."""
