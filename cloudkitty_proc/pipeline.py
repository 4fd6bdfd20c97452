"""Collect → rate → commit: the periods of one scope, its lease held.

``Pipeline.run(feed, committer, log, res)`` takes a ``Feed`` (the scope's
periods to process, oldest first) and, for each period in time order::

    Feed.submit_next()        every metric of the period is one call of
        │                     Pipeline._retrieve (collector.retrieve, timed)
        │                     in the collect executor; up to depth() periods
        │                     are queued ahead of the one being rated
    Pipeline._collect()       waits for the period's calls → a DataFrame
    Pipeline._rate()          the rating chain, in [rating] processors order
    committer.commit(frame)   one transaction (see below)

and stops at the first collect, rating or storage error (recorded: the
scope's state stays, the period is retried on a later pass) or when a
commit is refused. A period is committed only once every metric of it was
collected, and only after the periods before it.

Two committers: ``PeriodCommitter`` stores a due period and advances the
scope's state (``storage.commit_period``, fenced on the state version read
under the lease: a worker whose lease lapsed has its frame refused);
``ReprocessCommitter`` replaces a stored period and advances its
reprocessing task (``storage.commit_reprocessed_period``, fenced on the
task's progress).

With a ``LookAhead`` (lookahead.py), once the scope has no period left to
queue, the next scope's first periods are queued while this one's last
periods are rated and committed.
"""

from __future__ import annotations

import collections
import datetime
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from oslo_config import cfg

from cloudkitty_proc import faults, utils
from cloudkitty_proc.dataframe import DataFrame, time_groupby
from cloudkitty_proc.exceptions import CollectError, StaleStateError, TaskCancelledError
from cloudkitty_proc.log import ContextLogger, mask_url
from cloudkitty_proc.skipping import Skipper
from cloudkitty_proc.telemetry import Telemetry

if TYPE_CHECKING:  # annotations only
    from cloudkitty_proc.lookahead import LookAhead
    from cloudkitty_proc.storage.base import ReprocessTask


@dataclass
class ScopeResult:
    """What one visit of a scope did."""

    committed: int = 0
    attempted: bool = False
    error: bool = False
    more_due: bool = False
    error_message: str | None = None


class Failures:
    """Records a failed period: counted, logged, and stored on the scope's
    state (``last_error``) where ``status`` shows it.

    When even that store fails (the database full, or refusing the scope),
    nothing shows the failure and nothing would slow the retries down: the
    scope then waits before its next try (``UNRECORDED_BACKOFF`` seconds,
    doubling up to ``UNRECORDED_BACKOFF_MAX``; ``waiting``), the log says
    so once per wait, and ``on_unrecorded`` tells the master (a ``--oneshot``
    run then exits 1). ``forget`` ends the wait once the scope commits again.
    """

    UNRECORDED_BACKOFF = 1.0
    UNRECORDED_BACKOFF_MAX = 300.0

    def __init__(self, storage: Any, telemetry: Telemetry,
                 on_unrecorded: Callable[[], None] | None = None) -> None:
        self.storage = storage
        self.telemetry = telemetry
        self.on_unrecorded = on_unrecorded
        #: scope -> (failures in a row not recorded, monotonic time of the next try)
        self._unrecorded: dict[str, tuple[int, float]] = {}

    def record(self, log: ContextLogger, res: ScopeResult, scope_id: str,
               begin: datetime.datetime, stage: str, exc: BaseException, *,
               kind: str) -> None:
        message = f"{stage} of period {begin.isoformat()} failed: {mask_url(exc)}"
        self.telemetry.error(kind)
        res.error = True
        res.error_message = message
        log.warning("%s; state stays, retried on a later pass", message)
        try:
            self.storage.record_error(scope_id, message, kind)
        except Exception as err:  # the DB itself may be what failed
            first_line = (mask_url(err).strip().splitlines() or [type(err).__name__])[0]
            self.unrecorded(log, scope_id, f"cannot record the error: {first_line}")

    def collect_failed(self, log: ContextLogger, res: ScopeResult, scope_id: str,
                       begin: datetime.datetime, exc: BaseException) -> None:
        """A period whose collection failed: a CollectError is recorded
        with its kind; anything else is a collector bug, logged with its
        traceback and recorded with kind "error"."""
        if isinstance(exc, CollectError):
            self.record(log, res, scope_id, begin, "collect", exc, kind=exc.kind)
            return
        log.error("collector failed for period %s", begin.isoformat(), exc_info=exc)
        self.record(log, res, scope_id, begin, "collect", exc, kind="error")

    def unrecorded(self, log: ContextLogger, scope_id: str, message: str) -> None:
        """A failure of ``scope_id`` that the storage could not keep."""
        count = self._unrecorded.get(scope_id, (0, 0.0))[0] + 1
        delay = min(self.UNRECORDED_BACKOFF * 2 ** (count - 1), self.UNRECORDED_BACKOFF_MAX)
        self._unrecorded[scope_id] = (count, time.monotonic() + delay)
        log.error("%s; the scope waits %.0f s before its next try (%d in a row)",
                  message, delay, count)
        if self.on_unrecorded is not None:
            self.on_unrecorded()

    def waiting(self, scope_id: str) -> bool:
        """True while ``scope_id`` waits after a failure that was not recorded."""
        entry = self._unrecorded.get(scope_id)
        return entry is not None and time.monotonic() < entry[1]

    def failed_unrecorded(self, scope_id: str) -> bool:
        """Whether ``scope_id`` had a failure that was not recorded (and has
        not committed since)."""
        return scope_id in self._unrecorded

    def forget(self, scope_id: str) -> None:
        self._unrecorded.pop(scope_id, None)


class Committer(Protocol):
    """Stores one rated period; False stops the scope's periods there."""

    #: how the period's log line starts ("committed period …")
    what: str

    def commit(self, frame: DataFrame, log: ContextLogger, res: ScopeResult) -> bool:
        ...


class PeriodCommitter:
    """A due period: its rows, its period record and the state advance in
    one transaction, fenced on the state version (invariants 1 and 2)."""

    what = "committed"

    def __init__(self, storage: Any, failures: Failures, worker: str, version: int) -> None:
        self.storage = storage
        self.failures = failures
        self.worker = worker
        #: the state version the next commit expects
        self.version = version

    def commit(self, frame: DataFrame, log: ContextLogger, res: ScopeResult) -> bool:
        faults.point("before_commit")
        try:
            outcome = self.storage.commit_period(frame, self.version, worker=self.worker)
        except Exception as exc:  # noqa: BLE001 - settled below
            outcome = exc
        return self.settle(frame, outcome, log, res)

    def settle(self, frame: DataFrame, outcome: int | BaseException, log: ContextLogger,
               res: ScopeResult) -> bool:
        """The outcome of the period's commit (the new version, or the
        error; storage.commit_period's, or one item of commit_periods'):
        True when committed; a stale state drops the frame; another error
        is recorded."""
        begin = frame.begin
        if isinstance(outcome, StaleStateError):
            log.warning("period %s not committed, another worker moved the "
                        "scope on (%s); dropping it", begin.isoformat(), outcome)
            return False
        if isinstance(outcome, BaseException):
            log.error("storing period %s failed: %s", begin.isoformat(), mask_url(outcome))
            self.failures.record(log, res, frame.scope_id, begin, "storage", outcome,
                                 kind="storage")
            return False
        self.version = outcome
        return True


class ReprocessCommitter:
    """A re-rated period of a reprocessing task: replaces the stored one in
    the same transaction as the task's progress (storage invariant 4),
    fenced on that progress."""

    def __init__(self, storage: Any, failures: Failures, worker: str,
                 task: ReprocessTask) -> None:
        self.storage = storage
        self.failures = failures
        self.worker = worker
        self.what = f"task {task.id}: re-rated"
        self.task_id = task.id
        #: the task as last committed, and the next period it expects
        self.task = task
        self.progress = task.next_period

    def commit(self, frame: DataFrame, log: ContextLogger, res: ScopeResult) -> bool:
        begin = frame.begin
        faults.point("before_reprocess_commit")
        try:
            self.task = self.storage.commit_reprocessed_period(
                self.task_id, frame, self.progress, worker=self.worker)
        except StaleStateError as exc:
            log.warning("period %s not re-rated: %s", begin.isoformat(), exc)
            return False
        except TaskCancelledError as exc:
            log.warning("%s", exc)
            return False
        except Exception as exc:
            log.error("storing re-rated period %s failed: %s", begin.isoformat(),
                      mask_url(exc))
            self.failures.record(log, res, frame.scope_id, begin, "storage", exc,
                                 kind="storage")
            return False
        self.progress = self.task.next_period
        return True


class Feed:
    """The periods of one scope queued in the collect executor, oldest
    first: ``pending`` holds (begin, end, [(metric, handle)], queued at)."""

    __slots__ = ("_pipeline", "scope_id", "pending", "_upcoming", "_metrics")

    def __init__(self, pipeline: Pipeline, scope_id: str,
                 starts: Sequence[datetime.datetime]) -> None:
        self._pipeline = pipeline
        self.scope_id = scope_id
        self.pending: collections.deque = collections.deque()
        self._upcoming = iter(starts)
        self._metrics = list(pipeline.collector.metrics)

    def submit_next(self) -> bool:
        """Queue the next period's queries; False when none is left."""
        begin = next(self._upcoming, None)
        if begin is None:
            return False
        p = self._pipeline
        end = begin + datetime.timedelta(seconds=p.period)
        submit, retrieve, scope_id = p.executor.submit, p._retrieve, self.scope_id
        handles = [(m, submit(retrieve, m, scope_id, begin, end)) for m in self._metrics]
        self.pending.append((begin, end, handles, time.monotonic()))
        return True

    def drain(self) -> None:
        """Wait for (and drop) the queries still queued."""
        while self.pending:
            _drain(self.pending.popleft()[2])


class Pipeline:
    """Collects, rates and commits periods on the worker's run thread; the
    collector's queries run in the executor."""

    def __init__(self, conf: cfg.ConfigOpts, *, executor: Any, collector: Any,
                 rating_chain: list[Any], failures: Failures, telemetry: Telemetry,
                 stop_event: threading.Event) -> None:
        self.conf = conf
        self.period = conf.collect.period
        self.executor = executor
        self.collector = collector
        self.rating_chain = rating_chain
        self.failures = failures
        self.telemetry = telemetry
        self.stop_event = stop_event
        #: the level of the one line per committed period (DEBUG in an
        #: interactive --oneshot, where a progress display replaces them)
        self.period_log_level = logging.INFO

    @property
    def collector(self) -> Any:
        return self._collector

    @collector.setter
    def collector(self, collector: Any) -> None:
        """The collector in use (replaced on reload), wired to the executor:
        a query's slot goes to the next query once its reply is read, not
        once it is parsed and converted (executor.py)."""
        set_io_hooks = getattr(collector, "set_io_hooks", None)
        if set_io_hooks is not None:
            set_io_hooks(self.executor.io_begin, self.executor.io_done)
        self._collector = collector
        # the skip expressions follow the metrics the collector was built with
        self.skipper = Skipper(self.conf, collector.metrics)

    def feed(self, scope_id: str, starts: Sequence[datetime.datetime]) -> Feed:
        return Feed(self, scope_id, starts)

    def depth(self) -> int:
        """Periods of a scope queued ahead of the one being rated: at least
        ``[orchestrator] lookahead_periods``, and enough to keep every slot
        of the executor busy."""
        return max(self.conf.orchestrator.lookahead_periods,
                   -(-2 * self.executor.size // max(len(self.collector.metrics), 1)))

    def run(self, feed: Feed, committer: Committer, log: ContextLogger, res: ScopeResult,
            lookahead: LookAhead | None = None) -> None:
        """Process the periods of ``feed`` in time order (module docstring);
        ``res.committed`` counts the committed ones. With ``lookahead``,
        once the scope has nothing left to queue, the next scope's first
        periods are queued (``LookAhead.top_up``)."""
        depth = self.depth()
        pending = feed.pending
        while len(pending) < depth and feed.submit_next():
            pass
        if lookahead is not None and len(pending) < depth:  # a short scope
            lookahead.top_up(depth - len(pending))
        try:
            while pending:
                if self.stop_event.is_set():
                    res.more_due = True
                    break
                begin, end, handles, t0 = pending.popleft()
                frame = self._collect(feed.scope_id, begin, end, handles, log, res)
                if frame is None:
                    break
                # keep the pool busy while we rate and store
                if not feed.submit_next() and lookahead is not None:
                    lookahead.top_up(depth - len(pending))
                self.executor.yield_now()
                frame = self._rate(frame, log, res)
                if frame is None or not committer.commit(self.skipper.apply(frame), log, res):
                    break
                res.committed += 1
                self.committed(frame, committer.what, log, time.monotonic() - t0)
        finally:
            feed.drain()

    def committed(self, frame: DataFrame, what: str, log: ContextLogger,
                  elapsed: float) -> None:
        """A committed period: counted, and its line logged (``what``: how
        it starts, the committer's)."""
        self.telemetry.period_committed(frame, elapsed)
        if log.isEnabledFor(self.period_log_level):
            log.log(self.period_log_level, "%s period %s: %d datapoints, price %s, %.3f s",
                    what, frame.begin.isoformat(), len(frame),
                    utils.decimal_str(frame.total_price()), elapsed)

    def _collect(self, scope_id: str, begin: datetime.datetime, end: datetime.datetime,
                 handles: list, log: ContextLogger, res: ScopeResult) -> DataFrame | None:
        """The period's frame once every metric's call returned; None (the
        error recorded) if one failed."""
        frame = DataFrame(scope_id, begin, end)
        keys = time_groupby(begin)  # as CloudKitty's collectors add them
        try:
            for mdef, handle in handles:
                points = handle.result()
                for point in points:
                    point.groupby.update(keys)
                frame.add_points(mdef.usage_type, points)
        except Exception as exc:  # noqa: BLE001 - a collector bug too: recorded
            self.failures.collect_failed(log, res, scope_id, begin, exc)
        else:
            return frame
        _drain(handles)
        return None

    def _rate(self, frame: DataFrame, log: ContextLogger,
              res: ScopeResult) -> DataFrame | None:
        """The frame through the rating chain; None (recorded) on an error."""
        scope_id, begin = frame.scope_id, frame.begin
        try:
            for processor in self.rating_chain:
                frame = processor.process(frame)
        except Exception as exc:
            log.exception("rating failed for period %s", begin.isoformat())
            self.failures.record(log, res, scope_id, begin, "rating", exc, kind="rating")
            return None
        return frame

    def _retrieve(self, metric: Any, scope_id: str, begin: datetime.datetime,
                  end: datetime.datetime) -> list:
        """collector.retrieve, timed (runs in the collect executor)."""
        t0 = time.monotonic()
        try:
            return self.collector.retrieve(metric, scope_id, begin, end)
        finally:
            self.telemetry.query(metric.usage_type, time.monotonic() - t0)


def _drain(handles) -> None:
    for _m, handle in handles:
        try:
            handle.result()
        except Exception:  # noqa: S110 - the first error was reported
            pass
