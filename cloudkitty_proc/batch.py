"""A batch: several scopes whose next periods are the same, collected with
one query per metric and period, rated scope by scope, committed together.

The worker (worker.py) forms batches among the scopes whose leases it
holds: scopes with the same due periods, at most ``[collect]
max_scopes_per_query`` of them. ``BatchRun.run`` then goes through the
periods in time order, keeping ``lookahead_periods`` periods' queries in
the collect executor::

    for each period (oldest first):
      for each metric: one call in the executor
          collector.retrieve_batch(metric, scopes, begin, end)
              one query, the reply split by the scope key
          (a collector or metric that cannot batch: collector.retrieve per
          scope, each in the executor)
      scopes the batched reply could not answer (the query failed, or a
          scope's values were malformed): asked again alone, collector.retrieve
          in the executor; a connection failure or a timeout is not asked
          again (every scope would meet the same server): each scope of the
          batch fails with it
      per scope: DataFrame ─► rating chain ─► skip expressions
      storage.commit_periods(every scope's frame): one transaction, each
          scope fenced on its own state version

A scope that fails (its collection, its rating, its commit, or its fence)
leaves the batch: its error is recorded as on the per-scope path
(``Failures``), its state stays, its later periods are not committed
(invariant 3: a scope commits in time order) and the other scopes go on
(invariant 4). Queries already queued for later periods still cover it; its
part of their replies is dropped.
"""

from __future__ import annotations

import collections
import datetime
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cloudkitty_proc import faults
from cloudkitty_proc.dataframe import DataFrame, time_groupby
from cloudkitty_proc.exceptions import CollectError
from cloudkitty_proc.log import ContextLogger, mask_url
from cloudkitty_proc.pipeline import PeriodCommitter, ScopeResult

if TYPE_CHECKING:  # annotations only
    from cloudkitty_proc.pipeline import Pipeline

#: CollectError kinds of a failed batched query that are not asked again
#: scope by scope: the server refuses connections, and would for each scope
#: as well (a timeout is asked again: one heavy scope can make a batch too
#: slow, and scope by scope costs what per-scope queries always cost)
NO_FALLBACK_KINDS = frozenset({"connection"})


class _Member:
    """One scope of the batch: its commits go through a PeriodCommitter
    fenced on the state version read under the lease (pipeline.py)."""

    __slots__ = ("scope_id", "committer", "log", "res")

    def __init__(self, scope_id: str, committer: PeriodCommitter, log: ContextLogger,
                 res: ScopeResult) -> None:
        self.scope_id = scope_id
        self.committer = committer
        self.log = log
        self.res = res


class BatchRun:
    """The periods ``starts`` of the scopes ``members`` ((scope id, state
    version read under the lease, logger, ScopeResult)), all due for the
    same periods; see the module docstring."""

    def __init__(self, pipeline: Pipeline, storage: Any, worker: str,
                 members: Sequence[tuple[str, int, ContextLogger, ScopeResult]],
                 starts: Sequence[datetime.datetime]) -> None:
        self.pipeline = pipeline
        self.storage = storage
        self.worker = worker
        self.members = [_Member(s, PeriodCommitter(storage, pipeline.failures, worker, v),
                                log, res) for s, v, log, res in members]
        self.starts = list(starts)
        collector = pipeline.collector
        self.collector = collector
        batch = getattr(collector, "retrieve_batch", None)
        can = getattr(collector, "batchable", None)
        #: per metric: whether it is collected with one query for the batch
        self.metrics = [(m, batch is not None and len(self.members) > 1
                         and (can is None or can(m)))
                        for m in collector.metrics]
        #: periods asked by one query (a range query) where the collector can
        self.chunk = (pipeline.conf.collect.max_periods_per_query
                      if getattr(collector, "retrieve_batch_periods", None) is not None else 1)

    # -- the run -------------------------------------------------------------
    def run(self) -> None:
        p = self.pipeline
        period = datetime.timedelta(seconds=p.period)
        alive = {m.scope_id: m for m in self.members}
        for m in self.members:
            m.res.attempted = True
        size = self.chunk
        chunks = iter([[(b, b + period) for b in self.starts[i:i + size]]
                       for i in range(0, len(self.starts), size)])
        pending: collections.deque = collections.deque()
        # periods queued ahead: lookahead_periods, and always the next chunk
        depth = max(1, p.conf.orchestrator.lookahead_periods)

        def submit_next() -> bool:
            periods = next(chunks, None)
            if periods is None:
                return False
            scopes = tuple(alive)
            pending.append((periods, scopes, self._submit(scopes, periods), time.monotonic()))
            return True

        def queued() -> int:
            return sum(len(c[0]) for c in pending)

        while queued() < depth and submit_next():
            pass
        try:
            while pending and alive:
                periods, scopes, handles, t0 = pending.popleft()
                submit_next()  # the next chunk is asked while this one is handled
                p.executor.yield_now()
                for index, (begin, end) in enumerate(periods):
                    if p.stop_event.is_set() or not alive:
                        break
                    frames = self._collect(alive, scopes, begin, end, handles, index)
                    self._rate_and_commit(alive, frames, t0)
                _drain(handles)
                if p.stop_event.is_set():
                    for m in alive.values():
                        m.res.more_due = True
                    break
        finally:
            while pending:
                _drain(pending.popleft()[2])

    # -- collect ---------------------------------------------------------------
    def _submit(self, scopes: tuple[str, ...], periods: list) -> list:
        """The executor calls of a chunk of periods, per metric: (metric,
        "range", handle of retrieve_batch_periods), (metric, "batch", [a
        handle of retrieve_batch per period]) or (metric, "scope",
        [{scope: handle of retrieve} per period]); each handle's result is
        ``_outcome``'s (ok, value or exception)."""
        submit = self.pipeline.executor.submit
        retrieve = self.pipeline._retrieve
        handles = []
        for metric, batched in self.metrics:
            if batched and len(periods) > 1:
                handles.append((metric, "range", submit(_outcome, self._retrieve_batch_periods,
                                                        metric, scopes, periods)))
            elif batched:
                handles.append((metric, "batch", [submit(_outcome, self._retrieve_batch, metric,
                                                         scopes, b, e) for b, e in periods]))
            else:
                handles.append((metric, "scope", [{s: submit(_outcome, retrieve, metric, s, b, e)
                                                   for s in scopes} for b, e in periods]))
        return handles

    def _retrieve_batch(self, metric: Any, scopes: tuple[str, ...],
                        begin: datetime.datetime, end: datetime.datetime) -> dict:
        """collector.retrieve_batch, timed (runs in the collect executor)."""
        t0 = time.monotonic()
        try:
            return self.collector.retrieve_batch(metric, scopes, begin, end)
        finally:
            self.pipeline.telemetry.query(metric.usage_type, time.monotonic() - t0)

    def _retrieve_batch_periods(self, metric: Any, scopes: tuple[str, ...],
                                periods: list) -> list:
        """collector.retrieve_batch_periods, timed (in the collect executor)."""
        t0 = time.monotonic()
        try:
            return self.collector.retrieve_batch_periods(metric, scopes, periods)
        finally:
            self.pipeline.telemetry.query(metric.usage_type, time.monotonic() - t0)

    def _collect(self, alive: dict[str, _Member], scopes: tuple[str, ...],
                 begin: datetime.datetime, end: datetime.datetime,
                 handles: list, index: int) -> dict[str, DataFrame]:
        """The frames of period ``index`` of the chunk for the scopes still
        in the batch; a scope whose collection failed is recorded and
        leaves the batch."""
        p = self.pipeline
        points: dict[str, dict[int, list]] = {s: {} for s in scopes if s in alive}
        errors: dict[str, BaseException] = {}
        retry: list[tuple[int, Any, str]] = []   # (metric index, metric, scope)
        for m_index, (metric, how, handle) in enumerate(handles):
            if how == "scope":
                for scope_id, h in handle[index].items():
                    if scope_id not in points:
                        continue
                    ok, value = h.result()
                    if ok:
                        points[scope_id][m_index] = value
                    else:
                        errors.setdefault(scope_id, value)
                continue
            got = self._batch_answer(alive, scopes, metric, begin, end, how, handle, index)
            if isinstance(got, BaseException):  # the server refuses connections
                for scope_id in points:
                    errors.setdefault(scope_id, got)
                continue
            for scope_id in points:
                mine = got.get(scope_id)
                if mine is None:
                    retry.append((m_index, metric, scope_id))
                else:
                    points[scope_id][m_index] = mine
        if retry:  # each scope alone, concurrently
            submit = p.executor.submit
            alone = [(i, s, submit(_outcome, p._retrieve, metric, s, begin, end))
                     for i, metric, s in retry if s not in errors]
            for m_index, scope_id, h in alone:
                ok, value = h.result()
                if ok:
                    points[scope_id][m_index] = value
                else:
                    errors.setdefault(scope_id, value)
        keys = time_groupby(begin)
        frames: dict[str, DataFrame] = {}
        for scope_id, by_metric in points.items():
            member = alive[scope_id]
            exc = errors.get(scope_id)
            if exc is not None:
                p.failures.collect_failed(member.log, member.res, scope_id, begin, exc)
                del alive[scope_id]
                continue
            frame = DataFrame(scope_id, begin, end)
            for m_index, (metric, _how, _h) in enumerate(handles):
                mine = by_metric[m_index]
                for point in mine:
                    point.groupby.update(keys)
                frame.add_points(metric.usage_type, mine)
            frames[scope_id] = frame
        return frames

    def _batch_answer(self, alive: dict[str, _Member], scopes: tuple[str, ...], metric: Any,
                      begin: datetime.datetime, end: datetime.datetime, how: str,
                      handle: Any, index: int) -> dict | BaseException:
        """A batched call's answer for period ``index``: {scope: points or
        None}, where a missing or None scope is then asked alone; {} when
        the batch failed (every scope asked alone); the error itself when
        it is not worth asking again (NO_FALLBACK_KINDS). A failed range
        query is asked again as one instant query for this period first, so
        that one bad period does not send a whole chunk scope by scope."""
        ok, value = handle.result() if how == "range" else handle[index].result()
        if ok:
            return value[index] if how == "range" else value
        if how == "range" and not _refused(value):
            live = tuple(s for s in scopes if s in alive)
            ok, value = self.pipeline.executor.submit(
                _outcome, self._retrieve_batch, metric, live, begin, end).result()
            if ok:
                return value
        if _refused(value):
            return value
        self._log_fallback(alive, scopes, metric, begin, value)
        return {}

    def _log_fallback(self, alive: dict[str, _Member], scopes: tuple[str, ...], metric: Any,
                      begin: datetime.datetime, exc: BaseException) -> None:
        live = [s for s in scopes if s in alive]
        if live:
            alive[live[0]].log.warning(
                "batched query of metric %s for %d scopes, period %s, failed (%s); "
                "asking each scope alone", metric.label, len(live), begin.isoformat(),
                mask_url(exc))

    # -- rate and commit -------------------------------------------------------
    def _rate_and_commit(self, alive: dict[str, _Member], frames: dict[str, DataFrame],
                         t0: float) -> None:
        p = self.pipeline
        items: list[tuple[DataFrame, int]] = []
        for scope_id, frame in frames.items():
            member = alive[scope_id]
            rated = p._rate(frame, member.log, member.res)
            if rated is None:
                del alive[scope_id]
                continue
            items.append((p.skipper.apply(rated), member.committer.version))
        if not items:
            return
        faults.point("before_commit")
        try:
            outcomes = self.storage.commit_periods(items, worker=self.worker)
        except Exception as exc:  # noqa: BLE001 - the storage failed as a whole
            outcomes = [exc] * len(items)
        elapsed = time.monotonic() - t0
        for (frame, _version), outcome in zip(items, outcomes):
            member = alive[frame.scope_id]
            if not member.committer.settle(frame, outcome, member.log, member.res):
                del alive[frame.scope_id]
                continue
            member.res.committed += 1
            p.committed(frame, PeriodCommitter.what, member.log, elapsed)


def _outcome(fn: Any, *args: Any) -> tuple[bool, Any]:
    """(True, fn(*args)) or (False, the exception). The run thread reads
    a failure as a value: re-raising the same exception in every period of
    a chunk would chain each raising frame into its traceback, and the
    frame (holding the handle, which holds the exception) into a reference
    cycle; with the worker's raised GC threshold, such cycles (and the
    replies they hold) piled up (W3 with failing range queries: RSS end/10%
    1.40)."""
    try:
        return True, fn(*args)
    except Exception as exc:  # noqa: BLE001 - handed to the run thread
        return False, exc


def _refused(exc: BaseException) -> bool:
    """A failure not asked again, scope by scope (NO_FALLBACK_KINDS)."""
    return isinstance(exc, CollectError) and exc.kind in NO_FALLBACK_KINDS


def _drain_one(handle: Any) -> None:
    try:
        handle.result()
    except Exception:  # noqa: S110 - dropped: the scope left the batch
        pass


def _drain(handles: list) -> None:
    """Wait for every call of a chunk (their results are dropped)."""
    for _metric, how, handle in handles:
        if how == "range":
            _drain_one(handle)
        elif how == "batch":
            for h in handle:
                _drain_one(h)
        else:
            for by_scope in handle:
                for h in by_scope.values():
                    _drain_one(h)
