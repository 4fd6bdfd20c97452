"""Period arithmetic: which periods of a scope exist and which are due.

Periods are ``[collect] period`` seconds long, aligned to the first period
(``[collect] begin``, or the start of the current month). A scope's state
holds the start of its last committed period; the next one starts a period
later. A period is due once ``wait_periods`` periods have passed since its
start, and never before it has ended; ``[collect] end`` bounds the work.

Pure functions of their arguments (and of ``conf`` for the two bounds): the
worker, the control requests, ``cloudkitty-proc-manage status`` and the
metrics service all reason about due work the same way.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

from oslo_config import cfg

from cloudkitty_proc import utils

if TYPE_CHECKING:  # annotations only
    from cloudkitty_proc.storage.base import ScopeState


def first_period(conf: cfg.ConfigOpts) -> datetime.datetime:
    """Start of the first period of every scope: ``[collect] begin``, or
    the start of the current month."""
    if conf.collect.begin:
        return utils.parse_time(conf.collect.begin, what="[collect] begin")
    return utils.month_start()


def end_bound(conf: cfg.ConfigOpts) -> datetime.datetime | None:
    """``[collect] end``: no period starting at or after it is processed."""
    if conf.collect.end:
        return utils.parse_time(conf.collect.end, what="[collect] end")
    return None


def next_start(state: ScopeState | None, period: int,
               begin: datetime.datetime) -> datetime.datetime:
    """Start of the scope's next period to rate."""
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


def due_starts(start: datetime.datetime, now: datetime.datetime, period: int,
               wait_periods: int, end: datetime.datetime | None,
               limit: int) -> tuple[list[datetime.datetime], bool]:
    """The due periods from ``start`` on, at most ``limit`` of them, and
    whether more are due after those."""
    starts: list[datetime.datetime] = []
    delta = datetime.timedelta(seconds=period)
    while is_due(start, now, period, wait_periods, end):
        if len(starts) >= limit:
            return starts, True
        starts.append(start)
        start += delta
    return starts, False


def starts_between(start: datetime.datetime, end: datetime.datetime, period: int,
                   limit: int) -> list[datetime.datetime]:
    """The periods in ``[start, end)`` (a reprocessing task's range), at
    most ``limit`` of them."""
    starts: list[datetime.datetime] = []
    delta = datetime.timedelta(seconds=period)
    while start < end and len(starts) < limit:
        starts.append(start)
        start += delta
    return starts
