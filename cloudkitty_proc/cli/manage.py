"""``cloudkitty-proc-manage``: operator commands (CONTRACTS §1)."""

from __future__ import annotations

import json
import sys

from oslo_config import cfg
from rich.console import Console
from rich.table import Table

from cloudkitty_proc import plugins, quote, report, utils
from cloudkitty_proc.cli import common
from cloudkitty_proc.exceptions import CollectError, ConfigError, RatingError, SchemaError
from cloudkitty_proc.rating import cloudkitty_import

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

    quote_p = subparsers.add_parser(
        "quote", help="price a usage description (CloudKitty quote JSON) "
        "with the current rating rules")
    quote_p.add_argument("--usage", required=True, metavar="FILE",
                         help="JSON file: {\"resources\": [{\"service\": ..., "
                         "\"desc\": {...}, \"volume\": ...}]} or the list alone; "
                         "- reads standard input")
    quote_p.add_argument("--verbose", action="store_true",
                         help="also print the price of every resource")

    rules = subparsers.add_parser("rules", help="rating rules tools")
    rules_sub = rules.add_subparsers(dest="rules_action")
    rules_sub.required = True
    imp = rules_sub.add_parser(
        "import-cloudkitty", help="write a rules file from a CloudKitty "
        "database's hashmap tables")
    imp.add_argument("--connection", required=True, metavar="URL",
                     help="SQLAlchemy URL of the CloudKitty database")
    imp.add_argument("--output", metavar="FILE",
                     help="rules file to write (default: standard output)")


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
    collector = plugins.load_collector(CONF)
    try:
        probe = getattr(collector, "check", None)
        if probe is not None:
            try:
                probe()  # one request: is the metrics backend reachable?
            except CollectError as exc:
                raise ConfigError(str(exc)) from None
    finally:
        collector.close()
    print(f"ok: {len(metrics)} metric definitions ({', '.join(metrics.usage_types())}), "
          f"rating: {', '.join(CONF.rating.processors)}")
    return 0


def cmd_quote() -> int:
    cmd = CONF.command
    path = cmd.usage
    try:
        if path == "-":
            text = sys.stdin.read()
            path = "<stdin>"
        else:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read usage file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8: {exc}") from None
    usage = quote.parse_usage(text, source=path)
    try:
        result = quote.rate_usage(CONF, usage, source=path)
    except RatingError as exc:
        raise ConfigError(f"rating failed: {exc}") from None
    if cmd.verbose:
        scope = result.scope if result.scope is not None else "(none: global rules)"
        print(f"scope: {scope}")
        print(f"period start: {utils.isoformat(result.period_start)}")
        for line in result.lines:
            where = f"[{line.index}]" if line.index is not None else "[*]"
            desc = json.dumps(line.desc, sort_keys=True, default=str) if line.desc else ""
            print(f"{where} {line.service} volume {utils.decimal_str(line.volume)}: "
                  f"{utils.decimal_str(line.price)} {desc}".rstrip())
        print(f"total: {utils.decimal_str(result.total)}")
    else:
        print(utils.decimal_str(result.total))
    return 0


def cmd_rules() -> int:
    cmd = CONF.command
    # only action so far: import-cloudkitty
    result = cloudkitty_import.import_cloudkitty(cmd.connection, cmd.output)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if cmd.output:
        print(f"{result.mappings} mappings and {result.thresholds} thresholds "
              f"for {result.services} services written to {cmd.output} "
              f"({result.deleted} soft-deleted rows left out)", file=sys.stderr)
    else:
        sys.stdout.write(result.text)
    return 0


COMMANDS = {
    "db": cmd_db,
    "status": cmd_status,
    "export": cmd_export,
    "reset-state": cmd_reset_state,
    "check": cmd_check,
    "quote": cmd_quote,
    "rules": cmd_rules,
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
