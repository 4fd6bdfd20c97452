"""What both commands do before their real work: parse and validate config.

Validation errors are printed as one line naming the file and key, without a
traceback, and the command exits 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from oslo_config import cfg
from sqlalchemy import exc as sa_exc

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc import log as ckp_log
from cloudkitty_proc import config_check, plugins
from cloudkitty_proc.dropin import config_compat
from cloudkitty_proc.exceptions import ConfigError, StorageError

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
    config_compat.apply_cloudkitty_defaults(CONF)


def validate_options() -> None:
    """Read every registered option once so a bad value fails now, naming
    the file, the group and the option."""
    config_check.validate(CONF)


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
    except (ConfigError, StorageError) as exc:
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
    except sa_exc.SQLAlchemyError as exc:  # the database down, refusing us, …
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"error: [database] connection {ckp_log.mask_url(_database_url())}: "
              f"{ckp_log.mask_url(first)}", file=sys.stderr)
        return 1
    except OSError as exc:  # a state directory that cannot be created, …
        where = f"cannot create or open {exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


def _database_url() -> str:
    try:
        return str(CONF.database.connection)
    except Exception:  # noqa: BLE001
        return "?"
