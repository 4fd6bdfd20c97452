"""Passes by lease: partitions of scopes leased together, their due scopes
collected in batches (the part of ``Worker`` used when ``[orchestrator]
lease_partitions`` > 0 or ``[collect] max_scopes_per_query`` > 1).

One batched pass::

    the pass's scopes worth a visit (Worker._wants_visit), grouped by lease:
        their partition's lock (leases.lease_name), or their own with
        lease_partitions = 0 (the drop-in mode: CloudKitty's lock names)
    repeat: safe point (a pending reload is applied here, no lease held)
            take leases (non-blocking; a busy one is left to its holder)
                until they cover max_scopes_per_query scopes or none is left
            _process_unit: the states of those scopes (one read, under the
                leases), each scope's reprocessing first (invariant 5: same
                lease), then its due periods: scopes due for the same
                periods go through batch.BatchRun together
            give the leases back

A lease partition costs one lock round trip per visit whatever its number
of scopes; the fenced commit (invariant 2) is what makes a lapsed lease
harmless, as with one lock per scope.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from cloudkitty_proc import leases
from cloudkitty_proc.batch import BatchRun
from cloudkitty_proc.log import mask_url
from cloudkitty_proc.pipeline import ScopeResult

if TYPE_CHECKING:  # annotations only
    from cloudkitty_proc.worker import PassResult


#: units (sets of leases taken at once) a worker's share of the leases is
#: cut into, at least
UNITS_PER_WORKER = 4


class BatchedPasses:
    """Mixed into worker.Worker, whose attributes it uses."""

    @property
    def batching(self) -> bool:
        """Whether passes lease partitions and collect scopes in batches
        (``[orchestrator] lease_partitions`` > 0 or ``[collect]
        max_scopes_per_query`` > 1); otherwise one scope at a time, each
        under its own lease, with the look-ahead across scopes."""
        return (leases.partitions_for(self.conf) > 0
                or self.conf.collect.max_scopes_per_query > 1)

    def _batched_pass(self, result: PassResult) -> None:
        """The pass's scopes worth a visit, by lease (their partition's, or
        their own with ``lease_partitions = 0``), in the pass order: the
        worker takes leases for a unit (bounded below), processes its
        scopes (``_process_unit``) and gives the leases back. A busy lease
        is left to its holder (the pass is then pending)."""
        p = self._pass
        units: dict[bytes, list[str]] = {}
        wanted = 0
        for scope_id in p.queue:
            if self._wants_visit(scope_id):
                units.setdefault(leases.lease_name(self.conf, scope_id), []).append(scope_id)
                wanted += 1
        # scopes at once: at most this worker's share of the pass, so that
        # the workers of this host split a small pass between them
        size = min(self.conf.collect.max_scopes_per_query,
                   max(1, -(-wanted // self.worker_count)))
        # leases at once: at most a quarter of this worker's share of the
        # leases (the partitions, or the scopes of the pass when leased one
        # by one), so that the workers of the other hosts too (whose number
        # is not known here) take turns, unit by unit, instead of the first
        # ones up holding a whole pass
        leases_per_unit = max(1, -(-(leases.partitions_for(self.conf) or len(units))
                                   // (UNITS_PER_WORKER * self.worker_count)))
        names = list(units)
        i = 0
        while i < len(names):
            if self.stop_event.is_set():
                result.pending = True
                return
            if self.safe_point is not None:
                self.safe_point()  # no lease held here
            with contextlib.ExitStack() as held:
                scope_ids: list[str] = []
                taken = 0
                while i < len(names) and len(scope_ids) < size and taken < leases_per_unit:
                    name = names[i]
                    i += 1
                    if held.enter_context(leases.scope_lease(
                            self.coordinator, units[name][0], self.log, name=name,
                            on_busy=self.telemetry.lock_busy)):
                        scope_ids.extend(units[name])
                        taken += 1
                    else:
                        result.pending = True
                if scope_ids:
                    self._process_unit(scope_ids, result)

    def _process_unit(self, scope_ids: list[str], result: PassResult) -> None:
        """The scopes of leases held: fresh states (one read), each scope's
        reprocessing first (invariant 5: under the same lease), then the
        due periods, in batches of scopes due for the same periods
        (batch.BatchRun)."""
        try:
            for scope_id in scope_ids:
                self.storage.scope_taken(scope_id)
            states = self.storage.get_states(scope_ids)  # fresh, under the leases
        except Exception as exc:
            for scope_id in scope_ids:
                self.failures.unrecorded(self.log.for_scope(scope_id), scope_id,
                                         f"cannot read the scope state: {mask_url(exc)}")
            result.errors += len(scope_ids)
            result.pending = True
            return
        limit = self.conf.orchestrator.max_periods_per_lock
        task_scopes = self._pass.task_scopes if self._pass is not None else set()
        visits: list[tuple[str, ScopeResult]] = []
        groups: dict[tuple, list] = {}
        for scope_id in scope_ids:
            state = states[scope_id]
            res = ScopeResult()
            visits.append((scope_id, res))
            if not state.active:
                continue
            log = self.log.for_scope(scope_id)
            used = 0
            if scope_id in task_scopes:
                used = self._reprocess(scope_id, log, res, limit)
                if res.error or res.more_due or self.stop_event.is_set():
                    continue
            starts, res.more_due = self._due_starts(state, limit - used)
            if starts:
                groups.setdefault((starts[0], len(starts)), []).append(
                    (scope_id, state.version, log, res, starts))
        size = self.conf.collect.max_scopes_per_query
        for members in groups.values():
            for at in range(0, len(members), size):
                chunk = members[at:at + size]
                if self.stop_event.is_set():
                    for member in chunk:
                        member[3].more_due = True
                    continue
                BatchRun(self.pipeline, self.storage, self.name,
                         [m[:4] for m in chunk], chunk[0][4]).run()
        for scope_id, res in visits:
            self._account(result, scope_id, res)

