"""The storage contract: scope states and rated data, committed together.

Invariants this contract carries (doc/source/design.rst):

1. Exactly once: ``commit_period`` writes the period's rated rows, the period
   record and the scope state advance in ONE transaction, or nothing.
2. Fenced: ``commit_period`` succeeds only if the scope's state ``version`` is
   still ``expected_version`` (compare-and-set); otherwise it raises
   StaleStateError and writes nothing. A worker whose lock lapsed can
   therefore never commit over another worker's progress.
3. In order: the caller commits periods in time order; the state holds the
   start of the last committed period (CloudKitty's meaning).

Threading: a storage object is used from the worker's main thread only (DB
drivers block the whole process: keep DB work outside the collect pool).
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
import decimal
from collections.abc import Iterator

from oslo_config import cfg

from cloudkitty_proc.dataframe import DataFrame


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
class TypeSummary:
    scope_id: str
    type: str
    periods: int
    points: int
    qty: decimal.Decimal
    price: decimal.Decimal


class BaseStorage(abc.ABC):
    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf

    # -- schema ---------------------------------------------------------
    @abc.abstractmethod
    def upgrade(self) -> None:
        """Create or migrate the schema to the latest version."""

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
        """States of the given scopes (all known scopes when None). Scopes
        without a row are returned with version 0."""

    @abc.abstractmethod
    def commit_period(self, frame: DataFrame, expected_version: int,
                      *, worker: str = "") -> int:
        """Store the rated ``frame`` and set the scope state to
        ``frame.begin`` in one transaction, if and only if the scope's version
        is still ``expected_version``. Returns the new version. Raises
        StaleStateError (nothing written) otherwise. An empty frame is a
        valid commit (a period with no data)."""

    @abc.abstractmethod
    def record_error(self, scope_id: str, message: str, kind: str = "error") -> None:
        """Remember the last error of a scope (for status); never changes
        last_processed nor version."""

    @abc.abstractmethod
    def reset_state(self, scope_id: str, to: datetime.datetime | None,
                    period: int) -> None:
        """Delete the scope's rated rows with begin >= ``to`` and set its
        state so the period starting at ``to`` is the next one rated
        (last_processed = to - period). Bumps the version."""

    # -- reading ---------------------------------------------------------
    @abc.abstractmethod
    def iter_rated(self, scope_id: str | None = None,
                   begin: datetime.datetime | None = None,
                   end: datetime.datetime | None = None) -> Iterator[RatedRow]:
        """Rated rows with begin <= row.begin < end, ordered by scope, begin,
        type (then insertion order). Streams: memory does not grow with
        the number of rows."""

    @abc.abstractmethod
    def summary(self, scope_id: str | None = None) -> list[TypeSummary]:
        """Per scope and type: periods with data, points, Σqty, Σprice."""

    def close(self) -> None:
        """Release connections."""
