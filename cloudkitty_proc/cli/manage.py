"""``cloudkitty-proc-manage``: operator commands (CONTRACTS §1)."""

from __future__ import annotations

import json
import sys

from oslo_config import cfg
from rich.console import Console
from rich.table import Table

from cloudkitty_proc import plugins, report, utils
from cloudkitty_proc.cli import common
from cloudkitty_proc.exceptions import ConfigError, SchemaError

CONF = cfg.CONF


def _add_parsers(subparsers) -> None:
    db = subparsers.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_action")
    db_sub.required = True
    db_sub.add_parser("upgrade", help="create or migrate the schema")
    db_sub.add_parser("version", help="print the schema revision")

    status = subparsers.add_parser("status", help="scopes and their progress")
    status.add_argument("--json", action="store_true", dest="as_json")

    export = subparsers.add_parser("export", help="rated data (JSON lines or CSV)")
    export.add_argument("--scope", dest="scope_ids", action="append", default=None)
    export.add_argument("--begin")
    export.add_argument("--end")
    export.add_argument("--format", dest="fmt", choices=["jsonl", "csv"], default="jsonl")
    export.add_argument("--output")

    reset = subparsers.add_parser("reset-state",
                                  help="re-rate a scope from a given period on")
    reset.add_argument("--scope", dest="scope_ids", action="append", required=True)
    reset.add_argument("--to", required=True)

    subparsers.add_parser("check", help="validate config files, metrics.yml and rules")


CLI_OPTS = [cfg.SubCommandOpt("command", handler=_add_parsers)]


def _storage():
    return plugins.load_storage(CONF)


def _checked_storage():
    storage = _storage()
    try:
        storage.check_schema()
    except SchemaError as exc:
        storage.close()
        raise ConfigError(str(exc)) from None
    return storage


def cmd_db() -> int:
    storage = _storage()
    try:
        if CONF.command.db_action == "upgrade":
            storage.upgrade()
            print(f"database schema at revision {storage.current_revision()}")
        else:
            print(storage.current_revision() or "none")
        return 0
    finally:
        storage.close()


def cmd_status() -> int:
    storage = _checked_storage()
    try:
        states = storage.get_states(None)
        records = report.state_records(states, CONF.collect.period)
        if CONF.command.as_json:
            print(json.dumps({"scopes": records}, indent=2))
            return 0
        console = Console(soft_wrap=True)
        table = Table(title=f"{len(records)} scopes")
        for col in ("scope", "last period start", "lag", "active", "last error"):
            table.add_column(col)
        for rec in records:
            lag = rec["lag_seconds"]
            table.add_row(rec["scope_id"], rec["last_processed"] or "-",
                          "-" if lag is None else f"{lag} s", "yes" if rec["active"] else "no",
                          rec["last_error"] or "")
        console.print(table)
        return 0
    finally:
        storage.close()


def _time_arg(value: str | None, name: str):
    if value is None:
        return None
    try:
        return utils.parse_time(value, what=name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def cmd_export() -> int:
    cmd = CONF.command
    begin = _time_arg(cmd.begin, "--begin")
    end = _time_arg(cmd.end, "--end")
    storage = _checked_storage()
    try:
        out = open(cmd.output, "w", encoding="utf-8", newline="") if cmd.output else sys.stdout
        try:
            scopes = cmd.scope_ids or [None]
            count = 0

            def rows():
                for scope in sorted(scopes, key=lambda s: s or ""):
                    yield from storage.iter_rated(scope, begin, end)
            count = report.write_export(rows(), out, cmd.fmt)
        finally:
            if cmd.output:
                out.close()
        if cmd.output:
            print(f"{count} rows written to {cmd.output}", file=sys.stderr)
        return 0
    finally:
        storage.close()


def cmd_reset_state() -> int:
    cmd = CONF.command
    to = _time_arg(cmd.to, "--to")
    if not utils.is_aligned(to, CONF.collect.period):
        raise ConfigError(f"--to {cmd.to} is not aligned to the period ({CONF.collect.period} s)")
    storage = _checked_storage()
    try:
        for scope in cmd.scope_ids:
            storage.reset_state(scope, to, CONF.collect.period)
            print(f"scope {scope}: next period rated is {utils.isoformat(to)}")
        return 0
    finally:
        storage.close()


def cmd_check() -> int:
    common.validate_all()
    collector_cls, metrics = plugins.load_metrics(CONF)
    print(f"ok: {len(metrics)} metric definitions ({', '.join(metrics.usage_types())}), "
          f"rating: {', '.join(CONF.rating.processors)}")
    return 0


COMMANDS = {
    "db": cmd_db,
    "status": cmd_status,
    "export": cmd_export,
    "reset-state": cmd_reset_state,
    "check": cmd_check,
}


def run(argv: list[str] | None = None) -> int:
    common.parse_args(argv, "cloudkitty-proc-manage", CLI_OPTS)
    if CONF.command.name != "check":
        common.validate_options()
    return COMMANDS[CONF.command.name]()


def main(argv: list[str] | None = None) -> None:
    sys.exit(common.run_cli(lambda: run(argv)))


if __name__ == "__main__":
    main()
