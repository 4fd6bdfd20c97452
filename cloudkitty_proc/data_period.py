"""The period of the stored data: recorded once, checked at every start,
changed only by ``cloudkitty-proc-manage set-period``.

Every scope state and rated period is aligned to ``[collect] period``. Had
the period changed under stored data (a restart with a new value, or a
worker respawned after a reload), a new period would overlap one already
stored or leave a gap: 23:30-00:00 rated inside the hour 23:00-00:00 and
again on its own, for every scope. So the storage records the period the
first time a daemon starts on it, and a daemon, a worker or ``check`` with
another period refuses to go on, naming both values and the way out.
"""

from __future__ import annotations

import datetime
from typing import Any

from cloudkitty_proc import utils
from cloudkitty_proc.exceptions import ConfigError, StaleStateError
from cloudkitty_proc.storage.base import ACTIVE_TASK_STATES


def check(storage: Any, period: int) -> None:
    """ConfigError if the stored data has a period other than ``period``."""
    stored = storage.rating_period()
    if stored is not None and stored != period:
        raise ConfigError(
            f"[collect] period = {period} but the stored data is rated in {stored} s "
            f"periods: rating on would store overlapping periods or leave gaps. Set "
            f"period = {stored} back, or change it with `cloudkitty-proc-manage db "
            f"set-period` (doc/source/operations.rst, \"Changing the period\")")


def ensure(storage: Any, period: int) -> None:
    """Record ``period`` if none is recorded yet; ConfigError if the stored
    data has another one."""
    if storage.rating_period() is None:
        try:
            storage.set_rating_period(period, expected=None)
        except StaleStateError:  # another daemon recorded one meanwhile
            pass
    check(storage, period)


def misaligned_scopes(storage: Any, old: int, new: int) -> list[tuple[str, datetime.datetime]]:
    """Scopes whose next period (after their last rated one, ``old`` s long)
    does not start on a boundary of ``new``: (scope, next start)."""
    out = []
    for scope_id, state in sorted(storage.get_states().items()):
        if state.last_processed is None:
            continue
        following = state.last_processed + datetime.timedelta(seconds=old)
        if not utils.is_aligned(following, new):
            out.append((scope_id, following))
    return out


def change(storage: Any, new: int) -> int:
    """Record ``new`` as the period of the stored data; returns the old one.

    Refused (ConfigError, nothing changed) while a scope's next period does
    not start on a boundary of ``new`` (``reset-state`` it to one first) or a
    reprocessing task is active (its periods are ``old`` s long)."""
    old = storage.rating_period()
    if old == new:
        return old
    if old is not None:
        bad = misaligned_scopes(storage, old, new)
        if bad:
            shown = ", ".join(f"{sid} (next period {utils.isoformat(start)})"
                              for sid, start in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise ConfigError(
                f"period {new} s refused: {len(bad)} scope(s) would not start on a "
                f"{new} s boundary: {shown}{more}; reset-state them to a time "
                f"aligned to {new} s first")
        if storage.list_tasks(states=ACTIVE_TASK_STATES):
            raise ConfigError(f"period {new} s refused: reprocessing tasks are active; "
                              "let them finish (or reset-state their scopes) first")
    try:
        storage.set_rating_period(new, expected=old)
    except StaleStateError as exc:
        raise ConfigError(f"period {new} s refused: {exc} (changed meanwhile)") from None
    return old
