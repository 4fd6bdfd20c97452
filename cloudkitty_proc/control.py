"""Control requests (reprocess, reset-state, quote): checked, then applied.

Transport-independent: the RPC endpoints (``messaging.py``) and the
``cloudkitty-proc-manage`` direct database path both call these functions,
so a request is validated the same way whichever way it came. Arguments
may come from JSON (RPC): every type is checked, and every refusal is an
InvalidRequestError whose message names the argument or the scope at fault.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from oslo_config import cfg

from cloudkitty_proc import schedule, utils
from cloudkitty_proc.exceptions import ConfigError, InvalidRequestError
from cloudkitty_proc.fetchers.base import FetchError
from cloudkitty_proc.log import mask_url
from cloudkitty_proc.storage.base import MAX_REQUEST_ID_LENGTH, ReprocessTask

#: scope_ids value meaning every scope the fetcher lists
ALL = "ALL"
MAX_REASON_LENGTH = 1000


def check_arguments(method: str, given: dict[str, Any], required: Sequence[str],
                    optional: Sequence[str] = ()) -> None:
    """Refuse missing and unknown keyword arguments, naming them."""
    missing = [k for k in required if k not in given]
    unknown = sorted(k for k in given if k not in required and k not in optional)
    problems = []
    if missing:
        problems.append(f"missing argument{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(k) for k in missing)}")
    if unknown:
        problems.append(f"unknown argument{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(repr(k) for k in unknown)}")
    if problems:
        expected = ", ".join([*required, *(f"[{k}]" for k in optional)])
        raise InvalidRequestError(f"{method}: {'; '.join(problems)} "
                                  f"(expected: {expected or 'none'})")


def parse_time(value: Any, name: str) -> datetime.datetime:
    if isinstance(value, datetime.datetime):
        return utils.parse_time(value)
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name}: expected an ISO 8601 string, got "
                                  f"{type(value).__name__} {value!r}")
    try:
        return utils.parse_time(value, what=name)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


def parse_scope_ids(value: Any, *, allow_all: bool) -> list[str] | str:
    """A non-empty list of scope ids, or ``"ALL"`` where allowed."""
    if allow_all and value == ALL:
        return ALL
    what = 'a list of scope ids or "ALL"' if allow_all else "a list of scope ids"
    if isinstance(value, str):
        raise InvalidRequestError(f"scope_ids: expected {what}, got the string {value!r}")
    if not isinstance(value, (list, tuple)):
        raise InvalidRequestError(f"scope_ids: expected {what}, got "
                                  f"{type(value).__name__} {value!r}")
    if not value:
        raise InvalidRequestError(f"scope_ids: expected {what}, got an empty list")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise InvalidRequestError(f"scope_ids: every scope id must be a non-empty "
                                      f"string, got {item!r}")
    return list(dict.fromkeys(value))


def _text(value: Any, name: str, max_length: int) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name}: expected a string, got "
                                  f"{type(value).__name__} {value!r}")
    if not value.strip():
        raise InvalidRequestError(f"{name}: must not be empty")
    if len(value) > max_length:
        raise InvalidRequestError(f"{name}: at most {max_length} characters")
    return value.strip()


def known_scopes(fetcher: Any) -> list[str]:
    try:
        return list(fetcher.get_scopes())
    except FetchError as exc:
        raise InvalidRequestError(f"cannot list the scopes to check the request: "
                                  f"{mask_url(exc)}") from None


def _check_known(scope_ids: list[str], known: list[str]) -> None:
    unknown = [s for s in scope_ids if s not in set(known)]
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" (and {len(unknown) - 10} more)"
                                          if len(unknown) > 10 else "")
        raise InvalidRequestError(f"unknown scope{'s' if len(unknown) > 1 else ''}: "
                                  f"{shown} (not in the scope list of the fetcher)")


def reprocess(conf: cfg.ConfigOpts, storage: Any, fetcher: Any, scope_ids: Any,
              begin: Any, end: Any, reason: Any, request_id: Any = None) -> list[int]:
    """Create (or find, idempotently) one reprocessing task per scope;
    return the task ids once committed. ``"ALL"``: every scope of the
    fetcher whose rated periods cover the window."""
    scopes = parse_scope_ids(scope_ids, allow_all=True)
    begin_t = parse_time(begin, "begin")
    end_t = parse_time(end, "end")
    reason_s = _text(reason, "reason", MAX_REASON_LENGTH)
    if request_id is not None:
        request_id = _text(request_id, "request_id", MAX_REQUEST_ID_LENGTH)
    known = known_scopes(fetcher)
    if scopes == ALL:
        if not known:
            raise InvalidRequestError("scope_ids ALL: the fetcher lists no scope")
        return storage.create_reprocess_tasks(known, begin_t, end_t, reason_s,
                                              conf.collect.period, request_id=request_id,
                                              skip_uncovered=True)
    _check_known(scopes, known)
    return storage.create_reprocess_tasks(scopes, begin_t, end_t, reason_s,
                                          conf.collect.period, request_id=request_id)


def next_period_to_rate(conf: cfg.ConfigOpts, state: Any) -> datetime.datetime:
    return schedule.next_start(state, conf.collect.period, schedule.first_period(conf))


def reset_state(conf: cfg.ConfigOpts, storage: Any, fetcher: Any, scope_ids: Any,
                to: Any) -> list[str]:
    """Make ``to`` the next period rated for every scope (its rows from
    ``to`` on deleted); ``to`` may not skip a period not rated yet.
    Returns the scope ids, once every reset is committed."""
    scopes = parse_scope_ids(scope_ids, allow_all=False)
    to_t = parse_time(to, "to")
    period = conf.collect.period
    if not utils.is_aligned(to_t, period):
        raise InvalidRequestError(f"to {utils.isoformat(to_t)} is not aligned to the "
                                  f"period ({period} s)")
    _check_known(scopes, known_scopes(fetcher))
    states = storage.get_states(scopes)
    problems = []
    for scope in scopes:
        nxt = next_period_to_rate(conf, states[scope])
        if to_t > nxt:
            problems.append(f"scope {scope}: to {utils.isoformat(to_t)} is after the next "
                            f"period to rate ({utils.isoformat(nxt)}): resetting forward "
                            "would skip periods")
    if problems:
        raise InvalidRequestError("; ".join(problems))
    for scope in scopes:
        storage.reset_state(scope, to_t, period)
    return scopes


def quote(conf: cfg.ConfigOpts, usage: Any, chain: Sequence[Any]) -> str:
    """The price of a usage description (CloudKitty's quote body, see
    ``cloudkitty_proc.quote``) with ``chain``, as a decimal string."""
    try:
        from cloudkitty_proc import quote as quote_mod
    except ImportError:  # pragma: no cover - shipped by the quote feature
        raise InvalidRequestError("quote is not available in this version") from None
    if not isinstance(usage, (dict, list, str)):
        raise InvalidRequestError(f"usage: expected a quote body (an object with "
                                  f"'resources', or a list), got {type(usage).__name__}")
    try:
        total = quote_mod.quote(conf, usage, source="usage", chain=chain)
    except ConfigError as exc:
        raise InvalidRequestError(str(exc)) from None
    return utils.decimal_str(total)


def task_record(task: ReprocessTask) -> dict[str, Any]:
    """A task as JSON (status --json, the status RPC)."""
    return {
        "id": task.id,
        "scope_id": task.scope_id,
        "begin": utils.isoformat(task.begin),
        "end": utils.isoformat(task.end),
        "state": task.state,
        "done_periods": task.done_periods,
        "total_periods": task.total_periods,
        "next_period": utils.isoformat(task.next_period),
        "reason": task.reason,
        "request_key": task.request_key,
        "created_at": utils.isoformat(task.created_at),
        "updated_at": utils.isoformat(task.updated_at),
        "last_error": task.last_error,
    }
