"""One worker's passes over the scopes (independent of cotyledon: testable).

``Worker.loop`` runs passes until stopped; between passes it reports
whether the pass was idle and waits (``poll_interval``, cut short by the
wake event). One pass (``Worker.run_pass``)::

    fetcher.get_scopes()  + scopes with an active reprocessing task
      ─► storage.get_states(scopes)               one query for the pass
      ─► for each scope, from this worker's offset in the list:
           safe point (a pending reload is applied here)
           skip it unless it is active, has due periods or reprocessing to
               do, and (--oneshot) has not failed during this run
           process_scope(scope_id):
             leases.scope_lease (non-blocking; busy → left to its holder)
             storage.get_state(scope_id)          fresh, under the lease
             _reprocess(): its reprocessing tasks first, oldest first, each
                 through Pipeline.run with a ReprocessCommitter
             schedule.due_starts(): the due periods left in the budget
             Pipeline.run with a PeriodCommitter (pipeline.py), which may
                 take the next scope ahead (lookahead.py)
           release the lease

When the pass reaches a scope taken ahead, the main loop continues it
instead (no safe point: its lease is held), with the lease, the state and
the queries in flight the look-ahead left; such a scope never has
reprocessing to do. ``[orchestrator] max_periods_per_lock`` bounds the
periods of one visit, re-rated and due ones together.

Invariants kept here (doc/source/design.rst): processing and reprocessing
of a scope never overlap, both run under its lease (invariant 5); a collect
error stops the scope for this pass without moving its state, and one
scope failing never stops the others; the periods of a scope are committed
in time order (pipeline.py).
"""

from __future__ import annotations

import collections
import datetime
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from oslo_config import cfg

from cloudkitty_proc import leases, schedule, utils
from cloudkitty_proc.batched_pass import BatchedPasses
from cloudkitty_proc.fetchers.base import FetchError, usable_scopes
from cloudkitty_proc.log import ContextLogger, mask_url
from cloudkitty_proc.lookahead import AheadPlan, AheadScope, LookAhead
from cloudkitty_proc.pipeline import (Failures, Feed, PeriodCommitter, Pipeline,
                                      ReprocessCommitter, ScopeResult)
from cloudkitty_proc.storage.base import ACTIVE_TASK_STATES, REPROCESSING, ScopeState
from cloudkitty_proc.telemetry import Telemetry

LOG = logging.getLogger(__name__)


@dataclass
class PassResult:
    worked: bool = False
    pending: bool = False
    committed: int = 0
    errors: int = 0


@dataclass
class _Pass:
    """The pass in progress, as the look-ahead needs it."""

    queue: collections.deque
    states: dict[str, ScopeState]
    task_scopes: set[str]
    now: datetime.datetime
    #: the last scope the look-ahead tried (it only ever tries the next one)
    tried: str | None = None


class Worker(BatchedPasses):
    """The scope loop of one worker; see the module docstring."""

    def __init__(self, conf: cfg.ConfigOpts, worker_name: str, *,
                 storage: Any, collector: Any, fetcher: Any, rating_chain: Sequence[Any],
                 coordinator: Any, executor: Any, oneshot: bool = False,
                 run_started: datetime.datetime | None = None,
                 stop_event: threading.Event | None = None,
                 wake_event: threading.Event | None = None,
                 safe_point: Any = None, telemetry: Telemetry | None = None,
                 on_unrecorded: Callable[[], None] | None = None,
                 worker_index: int = 0, worker_count: int = 1,
                 reload_pending: Any = None) -> None:
        self.conf = conf
        self.name = worker_name
        self.storage = storage
        self.fetcher = fetcher
        self.rating_chain = list(rating_chain)
        self.coordinator = coordinator
        self.executor = executor
        self.oneshot = oneshot
        self.run_started = run_started or utils.utcnow()
        self.stop_event = stop_event or threading.Event()
        # set to cut an idle sleep short (stop, reload, new work)
        self.wake_event = wake_event or threading.Event()
        # called between scopes, where a reload may be applied safely
        self.safe_point = safe_point
        # True while a reload waits for a safe point: no scope is taken
        # ahead then, so the next scope change is one
        self.reload_pending = reload_pending
        self.telemetry = telemetry or Telemetry(worker_index, None, False)
        self.worker_index = worker_index
        self.worker_count = max(worker_count, 1)
        self.log = ContextLogger(LOG, worker_name)
        self._known_scopes: list[str] = []
        self.period = conf.collect.period
        self.begin = schedule.first_period(conf)
        self.end = schedule.end_bound(conf)
        self.failures = Failures(storage, self.telemetry, on_unrecorded=on_unrecorded)
        self.pipeline = Pipeline(conf, executor=executor, collector=collector,
                                 rating_chain=self.rating_chain, failures=self.failures,
                                 telemetry=self.telemetry, stop_event=self.stop_event)
        self.lookahead = LookAhead(coordinator, self.log, next_scope=self._next_ahead,
                                   plan=self._plan_ahead,
                                   lock_name=lambda s: leases.lease_name(conf, s))
        self._pass: _Pass | None = None
        #: scope ids refused (too long), logged once each
        self._refused_scopes: set[str] = set()

    @property
    def collector(self) -> Any:
        return self.pipeline.collector

    @collector.setter
    def collector(self, collector: Any) -> None:
        """The collector in use; a reload replaces it (Pipeline.collector)."""
        self.pipeline.collector = collector

    # -- one pass over every scope ---------------------------------------
    def run_pass(self) -> PassResult:
        result = PassResult()
        try:
            scopes = usable_scopes(self.fetcher.get_scopes(), self._refused_scopes, self.log)
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
        self._pass = _Pass(queue, states, task_scopes, now)
        if self.batching:
            try:
                self._batched_pass(result)
            finally:
                self._pass = None
            return result
        try:
            while queue:
                if self.stop_event.is_set():
                    result.pending = True
                    break
                scope_id = queue.popleft()
                ahead = self.lookahead.pop(scope_id)
                if ahead is not None:
                    with ahead:
                        res = self._continue_ahead(ahead)
                else:
                    if self.safe_point is not None:
                        self.safe_point()
                    if not self._wants_visit(scope_id):
                        continue
                    res = self.process_scope(scope_id)
                if res is None:  # locked by another worker
                    result.pending = True
                    continue
                self._account(result, scope_id, res)
        finally:
            self._pass = None
            self.lookahead.drop()
        return result

    def _account(self, result: PassResult, scope_id: str, res: ScopeResult) -> None:
        """Add a scope's visit to the pass's result."""
        if res.committed and not res.error:
            self.failures.forget(scope_id)
        result.worked |= res.attempted
        result.pending |= res.more_due
        result.committed += res.committed
        result.errors += int(res.error)

    def _wants_visit(self, scope_id: str) -> bool:
        """The scope has due periods or reprocessing to do, as seen from the
        states read at the start of the pass."""
        p = self._pass
        state = p.states.get(scope_id)
        if scope_id not in p.task_scopes:
            start = schedule.next_start(state, self.period, self.begin)
            if not schedule.is_due(start, p.now, self.period,
                                   self.conf.collect.wait_periods, self.end):
                return False
        if state is not None and not state.active:
            return False
        if self.failures.waiting(scope_id):  # its last error could not be stored
            return False
        if self.oneshot and self.failures.failed_unrecorded(scope_id):
            return False
        return not (self.oneshot and self._failed_this_run(state))

    def _task_scopes(self) -> set[str]:
        """Scopes with an active reprocessing task (one query per pass)."""
        if not self.storage.supports(REPROCESSING):
            return set()
        return {t.scope_id for t in self.storage.list_tasks(states=ACTIVE_TASK_STATES)}

    def _has_task(self, scope_id: str) -> bool:
        return (self.storage.supports(REPROCESSING)
                and self.storage.next_pending_task(scope_id) is not None)

    def _failed_this_run(self, state: ScopeState | None) -> bool:
        return (state is not None and state.last_error_at is not None
                and state.last_error_at >= self.run_started)

    # -- one scope, under its lease --------------------------------------
    def process_scope(self, scope_id: str) -> ScopeResult | None:
        """Process one scope: its reprocessing tasks, then its due periods.
        None if another member holds its lease."""
        log = self.log.for_scope(scope_id)
        with leases.scope_lease(self.coordinator, scope_id, log,
                                on_busy=self.telemetry.lock_busy,
                                name=leases.lease_name(self.conf, scope_id)) as held:
            if not held:
                return None
            return self._process_leased(scope_id, log)

    def _process_leased(self, scope_id: str, log: ContextLogger) -> ScopeResult:
        res = ScopeResult()
        try:
            self.storage.scope_taken(scope_id)
            state = self.storage.get_state(scope_id)  # fresh, under the lease
        except Exception as exc:
            self.failures.unrecorded(log, scope_id,
                                     f"cannot read the scope state: {mask_url(exc)}")
            res.error = True
            return res
        if not state.active:
            return res
        limit = self.conf.orchestrator.max_periods_per_lock
        # reprocessing first (same lease: invariant 5), within the same budget
        used = self._reprocess(scope_id, log, res, limit)
        if res.error or res.more_due or self.stop_event.is_set():
            return res
        starts, res.more_due = self._due_starts(state, limit - used)
        if starts:
            self._process_due(state, self.pipeline.feed(scope_id, starts), log, res)
        return res

    def _due_starts(self, state: ScopeState,
                    budget: int) -> tuple[list[datetime.datetime], bool]:
        """The scope's due periods, at most ``budget``; True if more are due."""
        return schedule.due_starts(schedule.next_start(state, self.period, self.begin),
                                   utils.utcnow(), self.period,
                                   self.conf.collect.wait_periods, self.end, budget)

    def _process_due(self, state: ScopeState, feed: Feed, log: ContextLogger,
                     res: ScopeResult) -> None:
        """Rate and commit the periods of ``feed`` (the scope's lease held),
        each fenced on the state version read under the lease."""
        res.attempted = True
        committer = PeriodCommitter(self.storage, self.failures, self.name, state.version)
        self.pipeline.run(feed, committer, log, res, lookahead=self.lookahead)

    def _reprocess(self, scope_id: str, log: ContextLogger, res: ScopeResult,
                   budget: int) -> int:
        """Re-rate the periods of the scope's active reprocessing tasks,
        oldest task first, at most ``budget`` periods; returns how many were
        re-rated. Each period is collected again and rated with the rules in
        force for its start (ReprocessCommitter)."""
        if not self.storage.supports(REPROCESSING):
            return 0
        used = 0
        while used < budget and not self.stop_event.is_set():
            try:
                task = self.storage.next_pending_task(scope_id)
            except Exception as exc:
                log.error("cannot read the reprocessing tasks: %s", mask_url(exc))
                res.error = True
                return used
            if task is None:
                return used
            starts = schedule.starts_between(task.next_period, task.end, self.period,
                                             budget - used)
            if not starts:  # cannot happen: a task at its end is done
                log.error("task %d: active with nothing left to re-rate", task.id)
                res.error = True
                return used
            if task.done_periods == 0:
                log.info("task %d: re-rating %d periods [%s, %s) (%s)", task.id,
                         task.total_periods, task.begin.isoformat(), task.end.isoformat(),
                         task.reason)
            res.attempted = True
            committer = ReprocessCommitter(self.storage, self.failures, self.name, task)
            before = res.committed
            self.pipeline.run(self.pipeline.feed(scope_id, starts), committer, log, res)
            used += res.committed - before
            if res.error:
                try:
                    self.storage.record_task_error(task.id, res.error_message or "error")
                except Exception as exc:  # noqa: BLE001 - the DB may be what failed
                    log.error("cannot record the task error: %s", mask_url(exc))
                return used
            current = committer.task
            if current.state == "done":
                log.info("task %d: done, %d periods re-rated", task.id, current.done_periods)
                continue
            planned_end = starts[-1] + datetime.timedelta(seconds=self.period)
            if committer.progress != planned_end or not current.active:
                # stale or cancelled (logged), or stopped: look again next pass
                res.more_due = res.more_due or current.active
                return used
        if used >= budget:
            res.more_due = True
        return used

    # -- look-ahead across scopes (lookahead.py) -------------------------
    def _next_ahead(self) -> str | None:
        """The scope the look-ahead may take: the next one of the pass worth
        a visit, tried once. None outside a pass, with lookahead_scopes off,
        on stop, while a reload waits, or when that scope has reprocessing
        to do (it goes first, on the usual path)."""
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
                return None
            return scope_id
        return None

    def _plan_ahead(self, scope_id: str, log: ContextLogger) -> AheadPlan | None:
        """With the scope's lease held ahead: its fresh state and first due
        periods; None when it is inactive, has reprocessing to do or nothing
        due."""
        self.storage.scope_taken(scope_id)
        state = self.storage.get_state(scope_id)  # fresh, under the lease
        if not state.active or self._has_task(scope_id):
            return None
        starts, more_due = self._due_starts(
            state, self.conf.orchestrator.max_periods_per_lock)
        if not starts:
            return None
        return AheadPlan(state, self.pipeline.feed(scope_id, starts), more_due)

    def _continue_ahead(self, ahead: AheadScope) -> ScopeResult:
        """The main loop's visit of a scope taken ahead (its lease held)."""
        plan = ahead.plan
        res = ScopeResult(more_due=plan.more_due)
        self._process_due(plan.state, plan.feed, ahead.log, res)
        return res

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
