"""Period arithmetic (schedule.py): the due periods of a scope within a
budget, and the periods of a reprocessing task's range. The due rule
itself is tested in test_orchestrator.py (test_due_rule)."""

from __future__ import annotations

import datetime

from cloudkitty_proc.schedule import due_starts, next_start, starts_between
from cloudkitty_proc.storage.base import ScopeState

UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
HOUR = datetime.timedelta(hours=1)
NOW = T0 + 10 * HOUR + datetime.timedelta(minutes=30)


def test_next_start_follows_the_last_committed_period():
    assert next_start(None, 3600, T0) == T0
    state = ScopeState("a", last_processed=T0 + 2 * HOUR)
    assert next_start(state, 3600, T0) == T0 + 3 * HOUR


def test_due_starts_stop_at_the_budget_and_say_more_is_due():
    # wait_periods=2: periods starting up to 08:00 are due at 10:30
    assert due_starts(T0, NOW, 3600, 2, None, 100) == (
        [T0 + i * HOUR for i in range(9)], False)
    assert due_starts(T0, NOW, 3600, 2, None, 4) == ([T0 + i * HOUR for i in range(4)], True)
    # exactly the budget left: nothing more is due
    assert due_starts(T0 + 5 * HOUR, NOW, 3600, 2, None, 4) == (
        [T0 + i * HOUR for i in range(5, 9)], False)
    assert due_starts(T0, NOW, 3600, 2, T0 + 3 * HOUR, 100) == (
        [T0, T0 + HOUR, T0 + 2 * HOUR], False)
    assert due_starts(T0 + 9 * HOUR, NOW, 3600, 2, None, 100) == ([], False)


def test_starts_between_cover_a_task_range_within_the_budget():
    assert starts_between(T0, T0 + 3 * HOUR, 3600, 10) == [T0, T0 + HOUR, T0 + 2 * HOUR]
    assert starts_between(T0, T0 + 3 * HOUR, 3600, 2) == [T0, T0 + HOUR]
    assert starts_between(T0 + 3 * HOUR, T0 + 3 * HOUR, 3600, 2) == []
