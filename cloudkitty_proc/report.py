"""Human and machine views of the store: oneshot summary, status, export."""

from __future__ import annotations

import csv
import datetime
import decimal
import json
from collections.abc import Iterable
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from cloudkitty_proc import utils
from cloudkitty_proc.storage.base import RatedRow, ScopeState

EXPORT_COLUMNS = ("scope_id", "begin", "end", "type", "unit", "qty", "price",
                  "groupby", "metadata")
MAX_SUMMARY_ROWS = 24


def row_record(row: RatedRow) -> dict[str, Any]:
    """The export record of CONTRACTS §5."""
    return {
        "scope_id": row.scope_id,
        "begin": utils.isoformat(row.begin),
        "end": utils.isoformat(row.end),
        "type": row.type,
        "unit": row.unit,
        "qty": utils.decimal_str(row.qty),
        "price": utils.decimal_str(row.price),
        "groupby": row.groupby,
        "metadata": row.metadata,
    }


def write_export(rows: Iterable[RatedRow], out: IO[str], fmt: str = "jsonl") -> int:
    count = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(EXPORT_COLUMNS)
        for row in rows:
            rec = row_record(row)
            rec["groupby"] = json.dumps(rec["groupby"], sort_keys=True, separators=(",", ":"))
            rec["metadata"] = json.dumps(rec["metadata"], sort_keys=True, separators=(",", ":"))
            writer.writerow([rec[c] for c in EXPORT_COLUMNS])
            count += 1
        return count
    dumps = json.JSONEncoder(sort_keys=False, separators=(", ", ": ")).encode
    for row in rows:
        out.write(dumps(row_record(row)))
        out.write("\n")
        count += 1
    return count


def human_duration(seconds: float | None) -> str:
    """12 s, 5 min, 3 h 20 min, 4 d 2 h."""
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    s = int(abs(seconds))
    if s < 120:
        return f"{sign}{s} s"
    if s < 7200:
        return f"{sign}{s // 60} min"
    if s < 3 * 86400:
        return f"{sign}{s // 3600} h {s % 3600 // 60} min"
    return f"{sign}{s // 86400} d {s % 86400 // 3600} h"


def task_eta(task: Any, now: datetime.datetime) -> float | None:
    """Seconds left for a running task, from its pace so far."""
    if task.state not in ("running", "pending") or not task.done_periods:
        return None
    elapsed = (now - task.created_at).total_seconds()
    if elapsed <= 0:
        return None
    return elapsed / task.done_periods * (task.total_periods - task.done_periods)


def print_status(console: Console, records: list[dict[str, Any]], tasks: list[Any],
                 due: set[str] | None = None, recent_done: int = 10,
                 now: datetime.datetime | None = None) -> None:
    """``cloudkitty-proc-manage status``: scopes, totals, tasks."""
    from rich.progress_bar import ProgressBar

    now = now or utils.utcnow()
    due = due or set()
    errors = [r for r in records if r["last_error"]]
    table = Table(title=f"{len(records)} scopes")
    table.add_column("scope", overflow="fold")
    table.add_column("last period start")
    table.add_column("lag", justify="right")
    table.add_column("state")
    table.add_column("last error", overflow="fold", max_width=60)
    for rec in records:
        if not rec["active"]:
            state = "[dim]inactive[/dim]"
        elif rec["last_error"]:
            state = f"[red]error ({rec['last_error_kind'] or 'error'})[/red]"
        elif rec["scope_id"] in due:
            state = "[yellow]due[/yellow]"
        else:
            state = "[green]up to date[/green]"
        table.add_row(rec["scope_id"], (rec["last_processed"] or "-").replace("+00:00", "Z"),
                      human_duration(rec["lag_seconds"]), state, rec["last_error"] or "")
    console.print(table)
    lags = [r["lag_seconds"] for r in records if r["lag_seconds"] is not None]
    console.print(f"totals: {len(records)} scopes, {len(records) - len(errors)} ok, "
                  f"{len(errors)} in error, {len(due)} with work due; "
                  f"max lag {human_duration(max(lags) if lags else None)}")
    done = [t for t in tasks if t.state == "done"][-recent_done:]
    shown = [t for t in tasks if t.state != "done" or t in done]
    if not shown:
        return
    ttable = Table(title=f"{len(tasks)} reprocessing tasks"
                   + (f" ({len(shown)} shown)" if len(shown) < len(tasks) else ""))
    for col in ("task", "scope", "window", "state", "progress", "", "ETA", "reason",
                "last error"):
        ttable.add_column(col, overflow="fold")

    def short(dt) -> str:
        return utils.isoformat(dt).replace("+00:00", "Z")
    for t in shown:
        bar = ProgressBar(total=max(t.total_periods, 1), completed=t.done_periods, width=20)
        ttable.add_row(str(t.id), t.scope_id, f"{short(t.begin)} → {short(t.end)}", t.state,
                       bar, f"{t.done_periods}/{t.total_periods}",
                       human_duration(task_eta(t, now)), t.reason, t.last_error or "")
    console.print(ttable)


def _rounded(value: decimal.Decimal) -> str:
    return f"{value.quantize(decimal.Decimal('0.0001'), rounding=decimal.ROUND_HALF_UP):,}"


def _fmt_time(dt: datetime.datetime | None) -> str:
    return utils.isoformat(dt) if dt else "-"


def state_records(states: dict[str, ScopeState], period: int,
                  now: datetime.datetime | None = None) -> list[dict[str, Any]]:
    now = now or utils.utcnow()
    out = []
    for scope_id in sorted(states):
        st = states[scope_id]
        lag = None
        if st.last_processed is not None:
            lag = int((now - (st.last_processed + datetime.timedelta(seconds=period)))
                      .total_seconds())
        out.append({
            "scope_id": scope_id,
            "last_processed": _fmt_time(st.last_processed) if st.last_processed else None,
            "lag_seconds": lag,
            "active": st.active,
            "last_error": st.last_error,
            "last_error_kind": st.last_error_kind,
            "last_error_at": _fmt_time(st.last_error_at) if st.last_error_at else None,
            "last_commit_at": _fmt_time(st.last_commit_at) if st.last_commit_at else None,
        })
    return out


def print_oneshot_summary(storage: Any, run_started: datetime.datetime,
                          elapsed: float, console: Console | None = None) -> int:
    """Print what the store holds after a --oneshot run; return the exit
    code: 1 if a scope failed during this run, else 0."""
    console = console or Console(soft_wrap=True)
    states = storage.get_states(None)
    summary = storage.summary()
    failed = {sid: st for sid, st in states.items()
              if st.last_error and st.last_error_at and st.last_error_at >= run_started}
    table = Table(title=f"cloudkitty-proc --oneshot: {len(states)} scopes, {elapsed:.1f} s",
                  caption="qty and price rounded to 4 decimals; export for exact values")
    for col in ("scope", "type", "periods", "datapoints", "qty", "price"):
        table.add_column(col, justify="right" if col not in ("scope", "type") else "left")
    total = decimal.Decimal(0)
    for item in summary[:MAX_SUMMARY_ROWS]:
        table.add_row(item.scope_id, item.type, str(item.periods), str(item.points),
                      _rounded(item.qty), _rounded(item.price))
    for item in summary:
        total += item.price
    if len(summary) > MAX_SUMMARY_ROWS:
        table.add_row(f"… {len(summary) - MAX_SUMMARY_ROWS} more rows", "", "", "", "", "")
    console.print(table)
    last = [st.last_processed for st in states.values() if st.last_processed]
    console.print(f"total price: {utils.decimal_str(total)}; "
                  f"last period start: {_fmt_time(max(last)) if last else '-'}")
    for sid, st in sorted(failed.items())[:10]:
        console.print(f"[red]scope {sid} failed[/red]: {st.last_error}")
    if len(failed) > 10:
        console.print(f"[red]… and {len(failed) - 10} more failed scopes[/red]")
    return 1 if failed else 0
