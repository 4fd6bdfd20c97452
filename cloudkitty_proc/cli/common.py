"""What both commands do before their real work: parse and validate config.

Validation errors are printed as one line naming the file and key, without a
traceback, and the command exits 1.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc import log as ckp_log
from cloudkitty_proc import plugins, utils
from cloudkitty_proc.exceptions import ConfigError

CONF = cfg.CONF


def parse_args(argv: list[str] | None, prog: str, extra_cli_opts: list | None = None) -> None:
    ckp_conf.register_opts(CONF)
    ckp_log.register(CONF)
    if extra_cli_opts:
        CONF.register_cli_opts(extra_cli_opts)
    try:
        CONF(argv if argv is not None else sys.argv[1:], project="cloudkitty-proc",
             prog=prog, validate_default_values=True)
    except cfg.ConfigFilesNotFoundError as exc:
        raise ConfigError(f"config file not found: {', '.join(exc.config_files)}") from None
    except cfg.ConfigFileParseError as exc:
        raise ConfigError(f"{exc.config_file}: {exc.msg}") from None
    except cfg.Error as exc:
        raise ConfigError(str(exc).strip()) from None


def _location(name: str, group: str | None) -> str:
    try:
        loc = CONF.get_location(name, group)
    except Exception:  # noqa: BLE001
        loc = None
    detail = getattr(loc, "detail", None) if loc else None
    return f"{detail}: " if detail else ""


def validate_options() -> None:
    """Read every registered option once so a bad value fails now, naming
    the file, the group and the option."""
    for group, opts in ckp_conf.list_opts():
        for opt in opts:
            try:
                getattr(CONF if group is None else CONF[group], opt.dest)
            except (cfg.ConfigFileValueError, ValueError) as exc:
                msg = str(exc)
                found = re.search(r"detail='([^']*)'", msg)
                where = f"{found.group(1)}: " if found else _location(opt.dest, group)
                if "is not valid:" in msg:
                    msg = msg.split("is not valid:", 1)[1].strip()
                raise ConfigError(f"{where}[{group or 'DEFAULT'}] {opt.dest}: "
                                  f"invalid value: {msg}") from None
    period = CONF.collect.period
    bounds = {}
    for key in ("begin", "end"):
        value = CONF.collect[key]
        if not value:
            continue
        try:
            dt = utils.parse_time(value, what=f"[collect] {key}")
        except ValueError as exc:
            raise ConfigError(f"{_location(key, 'collect')}[collect] {key}: {exc}") from None
        if not utils.is_aligned(dt, period):
            raise ConfigError(f"{_location(key, 'collect')}[collect] {key}: {value} is not "
                              f"aligned to the period ({period} s)")
        bounds[key] = dt
    if len(bounds) == 2 and bounds["end"] < bounds["begin"]:
        raise ConfigError(f"{_location('end', 'collect')}[collect] end: {CONF.collect.end} is "
                          f"before [collect] begin ({CONF.collect.begin})")


def validate_all(check_rating: bool = True) -> None:
    """Options, metrics.yml, plugin names and rating rules (no network)."""
    validate_options()
    plugins.load_metrics(CONF)
    plugins._plugin_class(plugins.NS_FETCHERS, CONF.fetcher.backend, "[fetcher] backend")
    plugins._plugin_class(plugins.NS_STORAGE, CONF.storage.backend, "[storage] backend")
    if check_rating:
        for processor in plugins.load_rating_chain(CONF):
            processor.check()


def run_cli(fn: Callable[[], int]) -> int:
    """Run ``fn``; turn ConfigError into one line on stderr and exit 1."""
    try:
        return fn()
    except ConfigError as exc:
        print(f"error: {ckp_log.mask_url(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `… | head`: the reader left, not an error
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 0
