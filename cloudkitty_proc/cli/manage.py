"""``cloudkitty-proc-manage``: operator commands (CONTRACTS §1)."""

from __future__ import annotations

import json
import os
import sys

from oslo_config import cfg
from rich.console import Console

from cloudkitty_proc import (control, data_period, leases, plugins, quote, report, schedule,
                             utils)
from cloudkitty_proc.cli import common
from cloudkitty_proc.cli.manage_schema import (checked_storage, cmd_db, cmd_storage,
                                               open_storage)
from cloudkitty_proc.dropin import config_compat
from cloudkitty_proc.exceptions import (CollectError, ConfigError, InvalidRequestError,
                                        RatingError, SchemaError)
from cloudkitty_proc.rating import cloudkitty_import

CONF = cfg.CONF


def _add_parsers(subparsers) -> None:
    db = subparsers.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_action")
    db_sub.required = True
    db_sub.add_parser("upgrade", help="create or migrate the schema")
    db_sub.add_parser("version", help="print the schema revision")
    db_sub.add_parser("set-period", help="record [collect] period as the period of the "
                      "stored data (every scope's next period must start on a boundary)")

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

    storage = subparsers.add_parser("storage", help="the rated-data store")
    storage_sub = storage.add_subparsers(dest="storage_action")
    storage_sub.required = True
    storage_sub.add_parser("init", help="create the InfluxDB database or the Elasticsearch/"
                           "OpenSearch index and mapping (cloudkitty-storage-init)")

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

    _add_control_parsers(subparsers)


def _add_control_parsers(subparsers) -> None:
    """reprocess, reload-rules, and the RPC options of reset-state and quote
    (doc/source/reprocessing.rst)."""
    def rpc_options(parser, direct_help: str) -> None:
        parser.add_argument("--direct", action="store_true", help=direct_help)
        parser.add_argument("--timeout", type=float, metavar="SECONDS",
                            help="how long to wait for a worker's reply "
                            "(default: [DEFAULT] rpc_response_timeout)")

    direct_db = ("write into the database even when [DEFAULT] transport_url is "
                 "set (the daemon runs it at its next pass, or when it starts)")
    reprocess = subparsers.add_parser(
        "reprocess", help="re-rate a window of periods with the current rules")
    which = reprocess.add_mutually_exclusive_group(required=True)
    which.add_argument("--scope", dest="scope_ids", action="append", metavar="ID")
    which.add_argument("--all", action="store_true",
                       help="every scope whose rated periods cover the window")
    reprocess.add_argument("--begin", required=True, help="first period start (inclusive)")
    reprocess.add_argument("--end", required=True, help="end of the window (exclusive)")
    reprocess.add_argument("--reason", required=True)
    reprocess.add_argument("--request-id", dest="request_id", metavar="ID",
                           help="idempotency key (default: a hash of scope, window "
                           "and reason)")
    rpc_options(reprocess, direct_db)

    rpc_options(subparsers.choices["reset-state"], direct_db)
    rpc_options(subparsers.choices["quote"],
                "price with the rules file here, not with the rules in force in "
                "the daemon (the default when [DEFAULT] transport_url is set)")

    reload_rules = subparsers.add_parser(
        "reload-rules", help="make every worker re-read its configuration and rules "
        "(needs [DEFAULT] transport_url; else send SIGHUP to the daemon)")
    reload_rules.add_argument("--timeout", type=float, metavar="SECONDS",
                              help="how long to wait for a worker to answer")


CLI_OPTS = [cfg.SubCommandOpt("command", handler=_add_parsers)]


def _due_scopes(states) -> set[str]:
    period = CONF.collect.period
    now = utils.utcnow()
    begin, end = schedule.first_period(CONF), schedule.end_bound(CONF)
    return {sid for sid, st in states.items()
            if st.active and schedule.is_due(schedule.next_start(st, period, begin), now,
                                             period, CONF.collect.wait_periods, end)}


def cmd_status() -> int:
    storage = checked_storage()
    try:
        states = storage.get_states(None)
        records = report.state_records(states, CONF.collect.period)
        tasks = storage.list_tasks()
        due = _due_scopes(states)
        for rec in records:
            rec["due"] = rec["scope_id"] in due
        if CONF.command.as_json:
            now = utils.utcnow()
            task_records = []
            for t in tasks:
                rec = control.task_record(t)
                eta = report.task_eta(t, now)
                rec["eta_seconds"] = None if eta is None else round(eta, 1)
                task_records.append(rec)
            print(json.dumps({
                "scopes": records,
                "totals": {"scopes": len(records),
                           "in_error": sum(1 for r in records if r["last_error"]),
                           "due": len(due),
                           "tasks_active": sum(1 for t in tasks if t.active)},
                "tasks": task_records}, indent=2))
            return 0
        console = Console(soft_wrap=True) if sys.stdout.isatty() else Console(width=160)
        report.print_status(console, records, tasks, due)
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


def _export_with_progress(rows, out, fmt: str, output: str) -> int:
    """Export with a live row counter on the terminal (stderr)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("exporting to {task.description}"),
                  TextColumn("{task.completed:,} rows"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(output, total=None)

        def counted():
            for i, row in enumerate(rows, 1):
                if i % 5000 == 0:
                    progress.update(task, completed=i)
                yield row
        return report.write_export(counted(), out, fmt)


def cmd_export() -> int:
    cmd = CONF.command
    begin = _time_arg(cmd.begin, "--begin")
    end = _time_arg(cmd.end, "--end")
    storage = checked_storage()
    try:
        out = open(cmd.output, "w", encoding="utf-8", newline="") if cmd.output else sys.stdout
        try:
            scopes = cmd.scope_ids or [None]
            count = 0

            def rows():
                for scope in sorted(scopes, key=lambda s: s or ""):
                    yield from storage.iter_rated(scope, begin, end)
            if cmd.output and sys.stderr.isatty():
                count = _export_with_progress(rows(), out, cmd.fmt, cmd.output)
            else:
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
    if _use_rpc():
        scopes = _rpc_call("reset_state", direct_hint=_WRITE_DIRECT, scope_ids=cmd.scope_ids,
                           to=utils.isoformat(to))
    else:
        scopes = _direct(lambda storage, fetcher: control.reset_state(
            CONF, storage, fetcher, cmd.scope_ids, to))
    for scope in scopes:
        print(f"scope {scope}: next period rated is {utils.isoformat(to)}")
    return 0


# -- control commands: over RPC when [DEFAULT] transport_url is set ---------

def _use_rpc() -> bool:
    from cloudkitty_proc import messaging
    return messaging.transport_url(CONF) is not None and not getattr(
        CONF.command, "direct", False)


_WRITE_DIRECT = ("--direct writes the request into the database instead (the daemon runs "
                 "it when it starts)")


def _rpc_call(method: str, *, direct_hint: str | None, **kwargs):
    from cloudkitty_proc import messaging
    try:
        return messaging.call(CONF, method, timeout=CONF.command.timeout, **kwargs)
    except messaging.NoServerError as exc:
        raise ConfigError(f"{exc}; {direct_hint}" if direct_hint else str(exc)) from None
    except messaging.RemoteRequestError as exc:
        raise ConfigError(f"refused by the daemon: {exc}") from None


def _direct(fn):
    """``fn(storage, fetcher)`` on the database; refusals as one line."""
    storage = checked_storage()
    fetcher = plugins.load_fetcher(CONF)
    try:
        return fn(storage, fetcher)
    except InvalidRequestError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        fetcher.close()
        storage.close()


def cmd_reprocess() -> int:
    cmd = CONF.command
    begin = _time_arg(cmd.begin, "--begin")
    end = _time_arg(cmd.end, "--end")
    scope_ids = control.ALL if cmd.all else cmd.scope_ids
    if _use_rpc():
        kwargs = {"request_id": cmd.request_id} if cmd.request_id else {}
        ids = _rpc_call("reprocess", direct_hint=_WRITE_DIRECT, scope_ids=scope_ids,
                        begin=utils.isoformat(begin), end=utils.isoformat(end),
                        reason=cmd.reason, **kwargs)
        print(f"reprocessing tasks committed: {', '.join(map(str, ids))}")
        print("follow their progress with `cloudkitty-proc-manage status`")
        return 0

    def create(storage, fetcher):
        ids = control.reprocess(CONF, storage, fetcher, scope_ids, begin, end, cmd.reason,
                                cmd.request_id)
        return ids, storage.list_tasks(ids=ids)

    ids, tasks = _direct(create)
    print(f"reprocessing tasks committed: {', '.join(map(str, ids))}")
    for t in tasks:
        print(f"task {t.id}: scope {t.scope_id} [{utils.isoformat(t.begin)}, "
              f"{utils.isoformat(t.end)}) {t.state}, {t.done_periods}/{t.total_periods} "
              "periods")
    print("the daemon runs them at its next pass; follow with `cloudkitty-proc-manage status`")
    return 0


def cmd_reload_rules() -> int:
    from cloudkitty_proc import messaging

    # refuse to send rules the workers would refuse anyway
    for processor in plugins.load_rating_chain(CONF):
        processor.check()
    if messaging.transport_url(CONF) is None:
        raise ConfigError("reload-rules sends a message to the workers and [DEFAULT] "
                          "transport_url is not set: send SIGHUP to the cloudkitty-proc "
                          "master process instead (it reloads every worker)")
    status = _rpc_call("status", direct_hint=None)  # is anyone listening?
    try:
        messaging.fanout_cast(CONF, "reload_rules")
    except messaging.NoServerError as exc:
        raise ConfigError(str(exc)) from None
    print(f"reload_rules sent to every worker on topic {CONF.rpc_topic} "
          f"({status['worker']} answered); each reloads at its next safe point")
    return 0


def cmd_check() -> int:
    options = config_compat.classify(CONF)
    if options.no_effect_line():
        print(options.no_effect_line())
    for line in options.unknown_lines():
        print(f"warning: {line}", file=sys.stderr)
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
    plugins.load_fetcher(CONF).close()
    storage = open_storage()
    try:
        storage.check_schema()
        data_period.check(storage, CONF.collect.period)
    except SchemaError:
        pass  # `db upgrade` first: the daemon says so
    finally:
        storage.close()
    try:  # what a worker does at start: a backend down or refusing us shows here
        leases.start_coordinator(CONF, f"check-{os.getpid()}").stop()
    except leases.CoordinationError as exc:
        raise ConfigError(str(exc)) from None
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
    if _use_rpc() and not cmd.verbose:  # the rules in force in the daemon
        print(_rpc_call("quote", usage=json.loads(text), direct_hint=(
            "--direct prices with the rules file here instead")))
        return 0
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
    "storage": cmd_storage,
    "status": cmd_status,
    "export": cmd_export,
    "reset-state": cmd_reset_state,
    "check": cmd_check,
    "quote": cmd_quote,
    "rules": cmd_rules,
    "reprocess": cmd_reprocess,
    "reload-rules": cmd_reload_rules,
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
