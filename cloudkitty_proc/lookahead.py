"""Look-ahead across scopes (``[orchestrator] lookahead_scopes``).

Without it, the collect executor drains at every scope change: the last
periods of a scope are rated and committed while nothing new is queued.
With it, once the scope in hand has no period left to queue, the pipeline
asks the ``LookAhead`` to ``top_up``: it takes the lease of the next scope
of the pass that has due periods, reads its state under that lease and
queues its first periods. When the pass reaches that scope, the worker
``pop``s it and continues it with its lease, state and queued queries as
they are (``with ahead:`` releases it at the end); at the end of the pass
(or on stop) a scope still held ahead is given back unrated (``drop``).

``LookAhead._take`` is the one place a lease is taken ahead, and
``AheadScope.close`` the one place it is released. Each scope still commits
in time order under its own lease, and a scope held ahead is never taken
by another worker meanwhile. What the worker decides (which scope comes
next, whether it can be taken ahead at all) is passed in as two functions:
a scope with reprocessing to do, a pending reload or a stop is left to the
usual path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloudkitty_proc import leases
from cloudkitty_proc.log import ContextLogger, mask_url
from cloudkitty_proc.pipeline import Feed
from cloudkitty_proc.storage.base import ScopeState


@dataclass
class AheadPlan:
    """A scope's visit planned under its lease: its fresh state and its
    first due periods, not queued yet."""

    state: ScopeState
    feed: Feed
    more_due: bool


class AheadScope:
    """A scope whose lease is held and whose first periods are queued ahead.

    A context manager: leaving the ``with`` block drains the queries still
    queued and releases the lease."""

    def __init__(self, scope_id: str, log: ContextLogger) -> None:
        self.scope_id = scope_id
        self.log = log
        self.lease = contextlib.ExitStack()
        self.plan: AheadPlan | None = None

    def __enter__(self) -> AheadScope:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Give the scope up: its queries drained, its lease released."""
        try:
            if self.plan is not None:
                self.plan.feed.drain()
        finally:
            self.lease.close()


class LookAhead:
    """Holds at most one scope ahead of the worker's main loop.

    ``next_scope()`` names the scope to try (None: none may be taken now);
    ``plan(scope_id, log)`` is called with its lease held and returns its
    ``AheadPlan``, or None to give it back (nothing due, reprocessing to do).
    """

    def __init__(self, coordinator: Any, log: ContextLogger, *,
                 next_scope: Callable[[], str | None],
                 plan: Callable[[str, ContextLogger], AheadPlan | None],
                 lock_name: Callable[[str], bytes] | None = None) -> None:
        self.coordinator = coordinator
        #: the scope's lock name (leases.lock_name_for); None: leases.lock_name
        self._lock_name = lock_name
        self.log = log
        self._next_scope = next_scope
        self._plan = plan
        self._ahead: AheadScope | None = None

    def top_up(self, room: int) -> None:
        """The scope in hand has no period left to queue: take the next
        scope ahead if none is held, and queue its periods up to ``room``."""
        ahead = self._ahead
        if ahead is None:
            ahead = self._ahead = self._take()
            if ahead is None:
                return
        feed = ahead.plan.feed
        while len(feed.pending) < room and feed.submit_next():
            pass

    def pop(self, scope_id: str) -> AheadScope | None:
        """The scope held ahead if it is ``scope_id``; the caller then owns
        it (and releases it with ``with``)."""
        ahead = self._ahead
        if ahead is None or ahead.scope_id != scope_id:
            return None
        self._ahead = None
        return ahead

    def drop(self) -> None:
        """End of the pass (or stop): give up the scope held ahead, unrated."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.close()

    def _take(self) -> AheadScope | None:
        """Take the lease of the next scope and plan its visit; None (the
        lease given back) when it is busy, has nothing to queue, or on any
        error: the main loop then visits it the usual way, and logs."""
        scope_id = self._next_scope()
        if scope_id is None:
            return None
        ahead = AheadScope(scope_id, self.log.for_scope(scope_id))
        try:
            name = self._lock_name(scope_id) if self._lock_name is not None else None
            if ahead.lease.enter_context(leases.scope_lease(
                    self.coordinator, scope_id, ahead.log, quiet=True, name=name)):
                ahead.plan = self._plan(scope_id, ahead.log)
        except Exception as exc:  # noqa: BLE001 - the main loop retries and logs
            ahead.log.debug("no look-ahead: %s", mask_url(exc))
        if ahead.plan is None:
            ahead.close()
            return None
        return ahead
