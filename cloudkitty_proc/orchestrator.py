"""The Orchestrator: one worker's scope loop, and its cotyledon Service.

One pass of a worker (``Worker.run_pass``)::

    fetcher.get_scopes() ─► states (one query) ─► for each due scope:
        tooz lock (non-blocking, hashed name) ─► re-read the state under the lock
        ─► collect periods ahead in the executor (every metric concurrently)
        ─► in time order: rate (stevedore chain) ─► storage.commit_period(
               frame, expected_version)   # rows + state, one fenced transaction
        ─► at most [orchestrator] max_periods_per_lock periods ─► release

Look-ahead across scopes (``[orchestrator] lookahead_scopes``): when the
scope in hand has no period left to queue, the next due scope of the pass is
locked and its state read (``_try_ahead``), and its first periods are queued
while the last ones of the scope in hand are rated and committed; the main
loop then continues it (``_process_ahead``). A scope with reprocessing to do
is left to the usual path, and a pending reload stops the look-ahead so that
the next scope change is a safe point.

Under the same lock, before its due periods, a scope's reprocessing tasks
run first (``_reprocess_locked``): the same collect-and-rate pipeline
(``_rate_periods``), each re-rated period replacing the stored one in one
transaction with the task's progress (``storage.commit_reprocessed_period``).
Processing and reprocessing of a scope therefore never overlap (invariant 5),
and both share ``max_periods_per_lock``.

Invariants kept here (see doc/source/design.rst): periods of a scope are
committed in time order and only after every metric of the period was
collected; a collect error stops the scope for this pass without moving its
state; a stale commit (another worker progressed) drops the frame; one scope
failing never stops the others.

Threads: cotyledon calls ``Orchestrator.run`` on a thread of its own; every
I/O object (storage, collector, executor, coordinator) is created and used
on that thread only. ``terminate`` and ``reload`` are called from signal
threads: they only set events that the run thread acts on between periods.
With ``[DEFAULT] transport_url`` set, the worker's RPC server
(``messaging.py``) runs its handlers on oslo.messaging's threads with
objects of their own; they too only set events (wake, reload).
"""

from __future__ import annotations

import collections
import datetime
import gc
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cotyledon
from oslo_config import cfg

from cloudkitty_proc import faults, plugins, utils
from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.exceptions import (CollectError, ConfigError,
                                        StaleStateError, TaskCancelledError)
from cloudkitty_proc.executor import make_executor
from cloudkitty_proc.fetchers.base import FetchError
from cloudkitty_proc.log import ContextLogger, mask_url
from cloudkitty_proc.storage.base import ACTIVE_TASK_STATES, ScopeState
from cloudkitty_proc.telemetry import Heartbeats, Telemetry

LOG = logging.getLogger(__name__)


@dataclass
class ScopeResult:
    committed: int = 0
    attempted: bool = False
    error: bool = False
    more_due: bool = False
    error_message: str | None = None


@dataclass
class PassResult:
    worked: bool = False
    pending: bool = False
    committed: int = 0
    errors: int = 0


def first_period(conf: cfg.ConfigOpts) -> datetime.datetime:
    if conf.collect.begin:
        return utils.parse_time(conf.collect.begin, what="[collect] begin")
    return utils.month_start()


def end_bound(conf: cfg.ConfigOpts) -> datetime.datetime | None:
    if conf.collect.end:
        return utils.parse_time(conf.collect.end, what="[collect] end")
    return None


def next_start(state: ScopeState | None, period: int,
               begin: datetime.datetime) -> datetime.datetime:
    if state is None or state.last_processed is None:
        return begin
    return state.last_processed + datetime.timedelta(seconds=period)


def is_due(start: datetime.datetime, now: datetime.datetime, period: int,
           wait_periods: int, end: datetime.datetime | None) -> bool:
    """The period starting at ``start`` may be collected now.

    CloudKitty's rule (start + wait_periods × period < now), except that a
    period is never collected before it has ended, even with wait_periods=0.
    """
    if end is not None and start >= end:
        return False
    return start + datetime.timedelta(seconds=period * max(wait_periods, 1)) < now


class Worker:
    """The scope loop of one worker, independent of cotyledon (testable)."""

    def __init__(self, conf: cfg.ConfigOpts, worker_name: str, *,
                 storage: Any, collector: Any, fetcher: Any, rating_chain: Sequence[Any],
                 coordinator: Any, executor: Any, oneshot: bool = False,
                 run_started: datetime.datetime | None = None,
                 stop_event: threading.Event | None = None,
                 wake_event: threading.Event | None = None,
                 safe_point: Any = None, telemetry: Telemetry | None = None,
                 worker_index: int = 0, worker_count: int = 1,
                 reload_pending: Any = None) -> None:
        self.conf = conf
        self.name = worker_name
        self.storage = storage
        self.fetcher = fetcher
        self.rating_chain = list(rating_chain)
        self.coordinator = coordinator
        self.executor = executor
        self.collector = collector
        self.oneshot = oneshot
        self.run_started = run_started or utils.utcnow()
        self.stop_event = stop_event or threading.Event()
        # set to cut an idle sleep short (stop, reload, new work)
        self.wake_event = wake_event or threading.Event()
        # called between scopes, where a reload may be applied safely
        self.safe_point = safe_point
        # True while a reload waits for a safe point: no scope is locked
        # ahead then, so the next scope change is one
        self.reload_pending = reload_pending
        self.telemetry = telemetry or Telemetry(worker_index, None, False)
        self.worker_index = worker_index
        self.worker_count = max(worker_count, 1)
        self.log = ContextLogger(LOG, worker_name)
        self._known_scopes: list[str] = []
        self.period = conf.collect.period
        self.begin = first_period(conf)
        self.end = end_bound(conf)
        self._pass: _PassQueue | None = None
        self._ahead: _Ahead | None = None

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

    # -- one pass over every scope ---------------------------------------
    def run_pass(self) -> PassResult:
        result = PassResult()
        try:
            scopes = self.fetcher.get_scopes()
            self._known_scopes = scopes
        except FetchError as exc:
            self.log.error("cannot list scopes, using the %d known ones: %s",
                           len(self._known_scopes), mask_url(exc))
            scopes = self._known_scopes
            result.pending = True
        # scopes with reprocessing to do are visited even with no due period
        task_scopes = self._task_scopes()
        known = set(scopes)
        scopes = scopes + sorted(task_scopes - known)
        if not scopes:
            return result
        states = self.storage.get_states(scopes)
        now = utils.utcnow()
        # Workers start at different offsets so they rarely contend.
        offset = (self.worker_index * len(scopes)) // self.worker_count
        queue = collections.deque(scopes[offset:] + scopes[:offset])
        self._pass = _PassQueue(queue, states, task_scopes, now)
        try:
            while queue:
                if self.stop_event.is_set():
                    result.pending = True
                    break
                scope_id = queue.popleft()
                ahead = self._ahead if (self._ahead is not None
                                        and self._ahead.scope_id == scope_id) else None
                if ahead is not None:
                    self._ahead = None
                    res = self._process_ahead(ahead)
                else:
                    if self.safe_point is not None:
                        self.safe_point()
                    if not self._wants_visit(scope_id):
                        continue
                    res = self.process_scope(scope_id)
                if res is None:  # locked by another worker
                    result.pending = True
                    continue
                result.worked |= res.attempted
                result.pending |= res.more_due
                result.committed += res.committed
                result.errors += int(res.error)
        finally:
            self._pass = None
            self._drop_ahead()
        return result

    def _wants_visit(self, scope_id: str) -> bool:
        """The scope has due periods or reprocessing to do, as seen from the
        states read at the start of the pass."""
        p = self._pass
        state = p.states.get(scope_id)
        if scope_id not in p.task_scopes:
            start = next_start(state, self.period, self.begin)
            if not is_due(start, p.now, self.period, self.conf.collect.wait_periods, self.end):
                return False
        if state is not None and not state.active:
            return False
        return not (self.oneshot and self._failed_this_run(state))

    def _task_scopes(self) -> set[str]:
        """Scopes with an active reprocessing task (one query per pass)."""
        try:
            return {t.scope_id for t in self.storage.list_tasks(states=ACTIVE_TASK_STATES)}
        except NotImplementedError:  # a storage without reprocessing
            return set()

    def _failed_this_run(self, state: ScopeState | None) -> bool:
        return (state is not None and state.last_error_at is not None
                and state.last_error_at >= self.run_started)

    # -- one scope, under its lock ---------------------------------------
    def process_scope(self, scope_id: str) -> ScopeResult | None:
        """Process the due periods of one scope. None if its lock is held."""
        log = self.log.for_scope(scope_id)
        lock = self.coordinator.get_lock(utils.lock_name(scope_id))
        try:
            acquired = lock.acquire(blocking=False)
        except Exception as exc:  # tooz backend unreachable
            log.warning("cannot take the scope lock: %s", mask_url(exc))
            return None
        if not acquired:
            self.telemetry.lock_busy()
            return None
        try:
            return self._process_locked(scope_id, log)
        finally:
            _release(lock, log)

    def _process_locked(self, scope_id: str, log: ContextLogger) -> ScopeResult:
        res = ScopeResult()
        try:
            state = self.storage.get_state(scope_id)  # fresh, under the lock
        except Exception as exc:
            log.error("cannot read the scope state: %s", mask_url(exc))
            res.error = True
            return res
        if not state.active:
            return res
        limit = self.conf.orchestrator.max_periods_per_lock
        # reprocessing first (same lock: invariant 5), within the same budget
        used = self._reprocess_locked(scope_id, log, res, limit)
        if res.error or res.more_due or self.stop_event.is_set():
            return res
        starts, res.more_due = self._due_starts(state, limit - used)
        if starts:
            self._process_due(state, _Feed(self, scope_id, starts), log, res)
        return res

    def _due_starts(self, state: ScopeState,
                    budget: int) -> tuple[list[datetime.datetime], bool]:
        """The scope's due periods, at most ``budget``; True if more are due."""
        now = utils.utcnow()
        starts: list[datetime.datetime] = []
        start = next_start(state, self.period, self.begin)
        wait = self.conf.collect.wait_periods
        delta = datetime.timedelta(seconds=self.period)
        while is_due(start, now, self.period, wait, self.end):
            if len(starts) >= budget:
                return starts, True
            starts.append(start)
            start += delta
        return starts, False

    def _process_due(self, state: ScopeState, feed: _Feed, log: ContextLogger,
                     res: ScopeResult) -> None:
        """Rate and commit the periods of ``feed`` (the scope's lock held),
        each fenced on the state version read under the lock."""
        scope_id = feed.scope_id
        res.attempted = True
        version = state.version

        def commit(frame: DataFrame) -> bool:
            nonlocal version
            begin = frame.begin
            faults.point("before_commit")
            try:
                version = self.storage.commit_period(frame, version, worker=self.name)
            except StaleStateError as exc:
                log.warning("period %s not committed, another worker moved the "
                            "scope on (%s); dropping it", begin.isoformat(), exc)
                return False
            except Exception as exc:
                log.error("storing period %s failed: %s", begin.isoformat(), mask_url(exc))
                self._fail(log, scope_id, begin, "storage", exc, kind="storage", res=res)
                return False
            return True

        self._rate_periods(feed, log, res, commit, "committed", look_ahead=True)

    # -- look-ahead across scopes ----------------------------------------
    def _look_ahead(self, room: int) -> None:
        """Called when the current scope has no period left to queue: lock
        the next scope of the pass that has due periods and queue its first
        ones (up to ``room`` periods), so the pool does not drain while the
        current scope's last periods are rated and committed. The main loop
        then continues that scope with its lock and queries as they are."""
        ahead = self._ahead
        if ahead is None:
            ahead = self._start_ahead()
            if ahead is None:
                return
        feed = ahead.feed
        while len(feed.pending) < room and feed.submit_next():
            pass

    def _start_ahead(self) -> _Ahead | None:
        p = self._pass
        if (p is None or not self.conf.orchestrator.lookahead_scopes
                or self.stop_event.is_set()
                or (self.reload_pending is not None and self.reload_pending())):
            return None
        queue = p.queue
        while queue:
            scope_id = queue[0]
            if scope_id == p.tried:
                return None  # tried already: the main loop visits it next
            if not self._wants_visit(scope_id):
                queue.popleft()  # the main loop would skip it as well
                continue
            p.tried = scope_id
            if scope_id in p.task_scopes:
                return None  # reprocessing goes first: the usual path does it
            self._ahead = self._try_ahead(scope_id)
            return self._ahead
        return None

    def _try_ahead(self, scope_id: str) -> _Ahead | None:
        """Lock ``scope_id`` and plan its due periods; None (lock released)
        when it is busy, has reprocessing to do or nothing due, or on any
        error: the main loop then visits it the usual way."""
        log = self.log.for_scope(scope_id)
        lock = self.coordinator.get_lock(utils.lock_name(scope_id))
        try:
            if not lock.acquire(blocking=False):
                return None
        except Exception:  # noqa: BLE001 - the main loop retries and logs
            return None
        ahead = None
        try:
            state = self.storage.get_state(scope_id)  # fresh, under the lock
            if not state.active or self._has_task(scope_id):
                return None
            starts, more_due = self._due_starts(
                state, self.conf.orchestrator.max_periods_per_lock)
            if starts:
                ahead = _Ahead(scope_id, lock, state, _Feed(self, scope_id, starts),
                               more_due, log)
            return ahead
        except Exception as exc:  # noqa: BLE001 - the main loop retries and logs
            log.debug("no look-ahead: %s", mask_url(exc))
            return None
        finally:
            if ahead is None:
                _release(lock, log)

    def _has_task(self, scope_id: str) -> bool:
        try:
            return self.storage.next_pending_task(scope_id) is not None
        except NotImplementedError:  # a storage without reprocessing
            return False

    def _process_ahead(self, ahead: _Ahead) -> ScopeResult:
        """The main loop's visit of a scope locked and queued ahead."""
        res = ScopeResult(more_due=ahead.more_due)
        try:
            self._process_due(ahead.state, ahead.feed, ahead.log, res)
        finally:
            ahead.feed.drain()
            _release(ahead.lock, ahead.log)
        return res

    def _drop_ahead(self) -> None:
        """End of pass (or stop): give up a scope locked ahead, unrated."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.feed.drain()
            _release(ahead.lock, ahead.log)

    def _reprocess_locked(self, scope_id: str, log: ContextLogger, res: ScopeResult,
                          budget: int) -> int:
        """Re-rate the periods of the scope's active reprocessing tasks,
        oldest task first, at most ``budget`` periods; returns how many were
        re-rated. Each period is collected again and rated with the rules in
        force for its start, then replaces the stored one in the same
        transaction as the task's progress (storage invariant 4)."""
        used = 0
        delta = datetime.timedelta(seconds=self.period)
        while used < budget and not self.stop_event.is_set():
            try:
                task = self.storage.next_pending_task(scope_id)
            except NotImplementedError:  # a storage without reprocessing
                return used
            except Exception as exc:
                log.error("cannot read the reprocessing tasks: %s", mask_url(exc))
                res.error = True
                return used
            if task is None:
                return used
            starts: list[datetime.datetime] = []
            start = task.next_period
            while start < task.end and used + len(starts) < budget:
                starts.append(start)
                start += delta
            if not starts:  # cannot happen: a task at its end is done
                log.error("task %d: active with nothing left to re-rate", task.id)
                res.error = True
                return used
            if task.done_periods == 0:
                log.info("task %d: re-rating %d periods [%s, %s) (%s)", task.id,
                         task.total_periods, task.begin.isoformat(), task.end.isoformat(),
                         task.reason)
            res.attempted = True
            progress = task.next_period
            current = task

            def commit(frame: DataFrame, task_id: int = task.id) -> bool:
                nonlocal progress, current
                begin = frame.begin
                faults.point("before_reprocess_commit")
                try:
                    current = self.storage.commit_reprocessed_period(
                        task_id, frame, progress, worker=self.name)
                except StaleStateError as exc:
                    log.warning("period %s not re-rated: %s", begin.isoformat(), exc)
                    return False
                except TaskCancelledError as exc:
                    log.warning("%s", exc)
                    return False
                except Exception as exc:
                    log.error("storing re-rated period %s failed: %s", begin.isoformat(),
                              mask_url(exc))
                    self._fail(log, scope_id, begin, "storage", exc, kind="storage",
                               res=res)
                    return False
                progress = current.next_period
                return True

            before = res.committed
            self._rate_periods(_Feed(self, scope_id, starts), log, res, commit,
                               f"task {task.id}: re-rated")
            used += res.committed - before
            if res.error:
                try:
                    self.storage.record_task_error(task.id, res.error_message or "error")
                except Exception as exc:  # noqa: BLE001 - the DB may be what failed
                    log.error("cannot record the task error: %s", mask_url(exc))
                return used
            if current.state == "done":
                log.info("task %d: done, %d periods re-rated", task.id, current.done_periods)
                continue
            if progress != start or not current.active:
                # stale or cancelled (logged), or stopped: look again next pass
                res.more_due = res.more_due or current.active
                return used
        if used >= budget:
            res.more_due = True
        return used

    def lookahead(self) -> int:
        """Periods queued ahead: enough to keep every slot of the pool busy."""
        return max(self.conf.orchestrator.lookahead_periods,
                   -(-2 * self.executor.size // max(len(self.collector.metrics), 1)))

    def _rate_periods(self, feed: _Feed, log: ContextLogger, res: ScopeResult,
                      commit, what: str, *, look_ahead: bool = False) -> None:
        """Collect the periods of ``feed`` (queued ahead in the executor,
        every metric concurrently), rate each frame with the chain and hand
        it to ``commit(frame) -> bool`` in time order; stop at the first
        collect or rating error (recorded, ``res.error``) or when commit
        returns False. ``res.committed`` counts the committed periods. With
        ``look_ahead``, once the scope has nothing left to queue, the next
        scope's first periods are queued (``_look_ahead``)."""
        lookahead = self.lookahead()
        pending = feed.pending
        while len(pending) < lookahead and feed.submit_next():
            pass
        if look_ahead and len(pending) < lookahead:  # a short scope: the next one now
            self._look_ahead(lookahead - len(pending))
        try:
            while pending:
                if self.stop_event.is_set():
                    res.more_due = True
                    break
                begin, end, handles, t0 = pending.popleft()
                frame = DataFrame(feed.scope_id, begin, end)
                try:
                    for mdef, handle in handles:
                        frame.add_points(mdef.usage_type, handle.result())
                except CollectError as exc:
                    self._fail(log, feed.scope_id, begin, "collect", exc, kind=exc.kind,
                               res=res)
                    _drain(handles)
                    break
                except Exception as exc:  # a collector bug: same treatment
                    log.exception("collector failed for period %s", begin.isoformat())
                    self._fail(log, feed.scope_id, begin, "collect", exc, kind="error",
                               res=res)
                    _drain(handles)
                    break
                # keep the pool busy while we rate and store
                if not feed.submit_next() and look_ahead:
                    self._look_ahead(lookahead - len(pending))
                self.executor.yield_now()
                try:
                    for processor in self.rating_chain:
                        frame = processor.process(frame)
                except Exception as exc:
                    log.exception("rating failed for period %s", begin.isoformat())
                    self._fail(log, feed.scope_id, begin, "rating", exc, kind="rating",
                               res=res)
                    break
                if not commit(frame):
                    break
                res.committed += 1
                elapsed = time.monotonic() - t0
                self.telemetry.period_committed(frame, elapsed)
                if log.isEnabledFor(logging.INFO):
                    log.info("%s period %s: %d datapoints, price %s, %.3f s", what,
                             begin.isoformat(), len(frame),
                             utils.decimal_str(frame.total_price()), elapsed)
        finally:
            feed.drain()

    def _retrieve(self, metric: Any, scope_id: str, begin: datetime.datetime,
                  end: datetime.datetime) -> list:
        """collector.retrieve, timed (runs in the collect executor)."""
        t0 = time.monotonic()
        try:
            return self.collector.retrieve(metric, scope_id, begin, end)
        finally:
            self.telemetry.query(metric.usage_type, time.monotonic() - t0)

    def _fail(self, log: ContextLogger, scope_id: str, begin: datetime.datetime,
              stage: str, exc: BaseException, *, kind: str,
              res: ScopeResult | None = None) -> None:
        message = f"{stage} of period {begin.isoformat()} failed: {mask_url(exc)}"
        self.telemetry.error(kind)
        if res is not None:
            res.error = True
            res.error_message = message
        log.warning("%s; state stays, retried on a later pass", message)
        try:
            self.storage.record_error(scope_id, message, kind)
        except Exception as err:  # the DB itself may be what failed
            log.error("cannot record the error: %s", mask_url(err))

    # -- the loop ----------------------------------------------------------
    def loop(self, on_idle=None) -> None:
        """Run passes until stopped. ``on_idle(idle: bool)`` is called after
        each pass with True when the pass found nothing to do or wait for."""
        while not self.stop_event.is_set():
            try:
                result = self.run_pass()
            except Exception as exc:
                self.log.error("pass failed: %s", mask_url(exc))
                result = PassResult(pending=True, errors=1)
                self.stop_event.wait(min(5.0, self.conf.orchestrator.poll_interval))
            idle = not result.worked and not result.pending
            self.telemetry.beat()
            if on_idle is not None:
                on_idle(idle)
            if result.worked:
                continue
            if self.oneshot:
                wait = 0.2 if result.pending else 0.5
            else:
                wait = self.conf.orchestrator.poll_interval
            self.wake_event.wait(wait * random.uniform(0.8, 1.2))
            self.wake_event.clear()


class _Feed:
    """The periods of one scope queued in the collect executor, oldest
    first: ``pending`` holds (begin, end, [(metric, handle)], queued at)."""

    __slots__ = ("_worker", "scope_id", "pending", "_upcoming", "_metrics")

    def __init__(self, worker: Worker, scope_id: str,
                 starts: Sequence[datetime.datetime]) -> None:
        self._worker = worker
        self.scope_id = scope_id
        self.pending: collections.deque = collections.deque()
        self._upcoming = iter(starts)
        self._metrics = list(worker.collector.metrics)

    def submit_next(self) -> bool:
        """Queue the next period's queries; False when none is left."""
        begin = next(self._upcoming, None)
        if begin is None:
            return False
        w = self._worker
        end = begin + datetime.timedelta(seconds=w.period)
        submit, retrieve, scope_id = w.executor.submit, w._retrieve, self.scope_id
        handles = [(m, submit(retrieve, m, scope_id, begin, end)) for m in self._metrics]
        self.pending.append((begin, end, handles, time.monotonic()))
        return True

    def drain(self) -> None:
        """Wait for (and drop) the queries still queued."""
        while self.pending:
            _drain(self.pending.popleft()[2])


@dataclass
class _Ahead:
    """A scope locked and queued ahead by ``Worker._look_ahead``."""

    scope_id: str
    lock: Any
    state: ScopeState
    feed: _Feed
    more_due: bool
    log: ContextLogger


@dataclass
class _PassQueue:
    """What the look-ahead needs of the pass in progress."""

    queue: collections.deque
    states: dict[str, ScopeState]
    task_scopes: set[str]
    now: datetime.datetime
    #: the last scope the look-ahead tried (it only ever tries the next one)
    tried: str | None = None


def _release(lock: Any, log: ContextLogger) -> None:
    try:
        lock.release()
    except Exception as exc:  # lease lost; the fenced commit protected us
        log.warning("releasing the scope lock failed: %s", mask_url(exc))


def _drain(handles) -> None:
    for _m, handle in handles:
        try:
            handle.result()
        except Exception:  # noqa: S110 - the first error was reported
            pass


def pool_size(conf: cfg.ConfigOpts) -> int:
    """Concurrent queries of one worker: max_greenthreads, within its share
    of [orchestrator] max_host_queries."""
    size = conf.orchestrator.max_greenthreads
    cap = conf.orchestrator.max_host_queries
    if cap:
        size = min(size, max(1, cap // max(conf.orchestrator.max_workers, 1)))
    return size


#: collections of the youngest generation happen every this many net
#: allocations (CPython's default is 700): a period allocates thousands of
#: short-lived objects, nearly none of them in reference cycles
GC_THRESHOLD0 = 10_000


def _settle_gc() -> None:
    """Once a worker is set up: move every object alive now (modules,
    plugins, SQLAlchemy, eventlet: ~10^5 objects) out of the cyclic
    garbage collector's reach, and collect the young generation less
    often. A full collection scanned them all (70 ms, every thread of the
    worker stopped: each query in flight waited for it); the young ones
    took 0.2 ms per W1 period. Objects created later are collected as
    usual. No collection first: at this point one found nothing to free
    and took 60-80 ms of the worker's start."""
    gc.freeze()
    _t0, t1, t2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, t1, t2)


def start_coordinator(conf: cfg.ConfigOpts, member_id: str):
    from tooz import coordination

    url = conf.orchestrator.coordination_url
    if url.startswith("file://"):
        os.makedirs(url[len("file://"):].split("?", 1)[0], exist_ok=True)
    coord = coordination.get_coordinator(url, member_id.encode())
    coord.start(start_heart=True)
    return coord


class Orchestrator(cotyledon.Service):
    """One worker process. See the module docstring for the threads."""

    name = "cloudkitty-proc-orchestrator"

    def __init__(self, worker_id: int, oneshot: bool = False, done_flags: Any = None,
                 run_started: datetime.datetime | None = None, worker_count: int = 1,
                 heartbeats: Heartbeats | None = None) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id
        self.conf = cfg.CONF
        self.oneshot = oneshot
        self.done_flags = done_flags
        self.run_started = run_started
        self.worker_count = worker_count
        self.heartbeats = heartbeats
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._wake = threading.Event()
        self._reload = threading.Event()
        #: +1 after every reload (the RPC quote endpoint follows it)
        self.rules_generation = 0
        self._rpc = None
        self.worker: Worker | None = None
        self._coordinator = None
        self._executor = None
        if done_flags is not None:
            done_flags[worker_id] = 0

    @property
    def worker_name(self) -> str:
        return f"{self.conf.host}-{self.worker_id}"

    def run(self) -> None:
        """Runs on a thread cotyledon spawned; returns when stopped."""
        conf = self.conf
        try:
            storage = plugins.load_storage(conf)
            collector = plugins.load_collector(conf)
            fetcher = plugins.load_fetcher(conf)
            chain = plugins.load_rating_chain(conf)
            self._executor = make_executor(conf.orchestrator.collect_executor,
                                           pool_size(conf))
            # waits for the database's write lock let green threads run
            storage.sleep = self._executor.sleep
            self._coordinator = start_coordinator(
                conf, f"{self.worker_name}-{os.getpid()}")
        except ConfigError as exc:
            LOG.error("worker %s cannot start: %s", self.worker_name, exc)
            os._exit(2)
        self.worker = Worker(
            conf, self.worker_name, storage=storage, collector=collector,
            fetcher=fetcher, rating_chain=chain, coordinator=self._coordinator,
            executor=self._executor, oneshot=self.oneshot, run_started=self.run_started,
            stop_event=self._stop, wake_event=self._wake, safe_point=self._safe_point,
            reload_pending=self._reload.is_set,
            telemetry=Telemetry(self.worker_id, self.heartbeats, bool(conf.metrics.listen)),
            worker_index=self.worker_id,
            worker_count=self.worker_count)
        LOG.info("worker %s started (%s executor, %d concurrent queries)", self.worker_name,
                 self._executor.name, self._executor.size)
        _settle_gc()
        try:
            self._start_rpc()
            self.worker.loop(on_idle=self._on_idle)
        finally:
            self._stop_rpc()
            self._shutdown_resources()
            self._finished.set()

    def _start_rpc(self) -> None:
        """When [DEFAULT] transport_url is set: this worker's RPC server
        (messaging.py). Its handlers run on oslo.messaging's threads and
        reach this worker only through the wake and reload events."""
        from cloudkitty_proc import messaging  # workers only: no eventlet in the master

        try:
            self._rpc = messaging.start_server(
                self.conf, self.worker_name, wake=self._wake.set,
                request_reload=self.reload, rules_generation=lambda: self.rules_generation)
        except Exception as exc:  # a bad transport_url must not stop rating
            LOG.error("worker %s: no RPC server: %s", self.worker_name, mask_url(exc))

    def _stop_rpc(self) -> None:
        rpc, self._rpc = self._rpc, None
        if rpc is not None:
            rpc.stop()

    def _safe_point(self) -> None:
        if self._reload.is_set():
            self._reload.clear()
            self._apply_reload()

    def _on_idle(self, idle: bool) -> None:
        self._safe_point()
        if self.done_flags is not None:
            self.done_flags[self.worker_id] = 1 if idle else 0

    def _apply_reload(self) -> None:
        """At a safe point between passes: re-read config files and rules.
        Invalid new rules or metrics keep the ones in force."""
        assert self.worker is not None
        try:
            self.conf.reload_config_files()
        except Exception as exc:
            LOG.error("worker %s: config reload failed, keeping the current one: %s",
                      self.worker_name, exc)
            return
        for processor in self.worker.rating_chain:
            try:
                processor.reload()
            except Exception as exc:
                LOG.error("worker %s: %s rules not reloaded, keeping the current ones: %s",
                          self.worker_name, type(processor).__name__, exc)
        try:
            collector = plugins.load_collector(self.conf)
        except ConfigError as exc:
            LOG.error("worker %s: metrics not reloaded, keeping the current ones: %s",
                      self.worker_name, exc)
        else:
            old, self.worker.collector = self.worker.collector, collector
            old.close()
        if self.conf.collect.period != self.worker.period:
            LOG.error("worker %s: [collect] period cannot change without a restart "
                      "(states are aligned to %d s); keeping it", self.worker_name,
                      self.worker.period)
        try:
            self.worker.begin = first_period(self.conf)
            self.worker.end = end_bound(self.conf)
        except ValueError as exc:
            LOG.error("worker %s: [collect] begin/end not reloaded: %s", self.worker_name, exc)
        self.rules_generation += 1
        LOG.info("worker %s reloaded its configuration", self.worker_name)

    def _shutdown_resources(self) -> None:
        if self.worker is not None:
            for obj in (self.worker.collector, self.worker.fetcher, self.worker.storage):
                try:
                    obj.close()
                except Exception:  # noqa: S110
                    pass
        if self._executor is not None:
            try:
                self._executor.close()
            except Exception:  # noqa: S110
                pass
        if self._coordinator is not None:
            try:
                self._coordinator.stop()  # frees every lock at once
            except Exception:  # noqa: S110
                pass

    def terminate(self) -> None:
        """Signal thread: stop after the period in flight, within
        graceful_shutdown_timeout (cotyledon kills us after that)."""
        # -- chaos suite (issue 5): bounded stop; the lock of an abandoned
        # period is freed at once, not when its lease ends
        timeout = max(self.conf.graceful_shutdown_timeout, 1)
        # return before cotyledon's own alarm (os._exit at ``timeout``)
        deadline = time.monotonic() + max(timeout - 2.0, timeout / 2.0)
        self._stop.set()
        self._wake.set()
        self._stop_rpc()  # no new request; the ones in flight finish
        if self._finished.wait(max(deadline - time.monotonic(), 0.1)):
            return
        LOG.warning("worker %s: the period in flight did not finish within %.0f s; "
                    "abandoning it (nothing of it is stored) and freeing the scope "
                    "locks", self.worker_name, timeout)
        coordinator = self._coordinator
        if coordinator is not None:
            try:
                coordinator.stop()
            except Exception as exc:  # noqa: BLE001 - exiting anyway
                LOG.warning("worker %s: stopping the coordinator failed: %s",
                            self.worker_name, mask_url(exc))
        # -- end chaos suite

    def reload(self) -> None:
        """Signal thread (SIGHUP) or RPC thread (reload_rules): applied by
        the run thread between passes (cotyledon's oslo_config glue reloads
        the master only)."""
        self._reload.set()
        self._wake.set()
