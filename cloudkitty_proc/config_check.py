"""The configuration as a whole: every option read once (a bad value fails
with the file, the group and the option), the checks that span options, and
a reload candidate validated on a copy before anything is applied.

The options themselves are declared in ``conf.py`` (core groups) and in each
plugin module (``OPTS``).
"""

from __future__ import annotations

import re

from oslo_config import cfg

from cloudkitty_proc import utils
from cloudkitty_proc.conf import CONF, list_opts, register_opts
from cloudkitty_proc.dropin import config_compat
from cloudkitty_proc.exceptions import ConfigError


def _location(conf: cfg.ConfigOpts, name: str, group: str | None) -> str:
    try:
        loc = conf.get_location(name, group)
    except Exception:  # noqa: BLE001
        loc = None
    detail = getattr(loc, "detail", None) if loc else None
    return f"{detail}: " if detail else ""


def validate(conf: cfg.ConfigOpts = CONF) -> None:
    """Read every option once so a bad value fails now (ConfigError naming
    the file, the group and the option), and check what spans options."""
    for group, opts in list_opts():
        for opt in opts:
            try:
                getattr(conf if group is None else conf[group], opt.dest)
            except (cfg.ConfigFileValueError, ValueError) as exc:
                msg = str(exc)
                found = re.search(r"detail='([^']*)'", msg)
                where = f"{found.group(1)}: " if found else _location(conf, opt.dest, group)
                if "is not valid:" in msg:
                    msg = msg.split("is not valid:", 1)[1].strip()
                raise ConfigError(f"{where}[{group or 'DEFAULT'}] {opt.dest}: "
                                  f"invalid value: {msg}") from None
    if conf.storage.version != 2:
        raise ConfigError(f"{_location(conf, 'version', 'storage')}[storage] version = "
                          f"{conf.storage.version}: v1 storage is not supported (only "
                          "CloudKitty's v2 storage, version = 2)")
    period = conf.collect.period
    bounds = {}
    for key in ("begin", "end"):
        value = conf.collect[key]
        if not value:
            continue
        try:
            dt = utils.parse_time(value, what=f"[collect] {key}")
        except ValueError as exc:
            raise ConfigError(f"{_location(conf, key, 'collect')}[collect] {key}: "
                              f"{exc}") from None
        if not utils.is_aligned(dt, period):
            raise ConfigError(f"{_location(conf, key, 'collect')}[collect] {key}: {value} "
                              f"is not aligned to the period ({period} s)")
        bounds[key] = dt
    if len(bounds) == 2 and bounds["end"] < bounds["begin"]:
        raise ConfigError(f"{_location(conf, 'end', 'collect')}[collect] end: "
                          f"{conf.collect.end} is before [collect] begin ({conf.collect.begin})")


def check_files(conf: cfg.ConfigOpts = CONF) -> None:
    """Validate the configuration files ``conf`` was started with as they
    are now, on a copy (``conf`` is left as it is): ConfigError naming the
    file and the option when a reload would bring a bad value in. Call it
    before ``conf.reload_config_files()``: a refused reload then leaves
    every process on the configuration in force."""
    from oslo_log import log as oslo_log

    args = [arg for path in conf.config_file or () for arg in ("--config-file", path)]
    args += [arg for path in conf.config_dir and [conf.config_dir] or ()
             for arg in ("--config-dir", path)]
    copy = cfg.ConfigOpts()
    register_opts(copy)
    oslo_log.register_options(copy)
    try:
        copy(args, project=conf.project, prog=conf.prog, validate_default_values=True,
             default_config_files=[], default_config_dirs=[])
    except cfg.ConfigFileParseError as exc:
        raise ConfigError(f"{exc.config_file}: {exc.msg}") from None
    except cfg.Error as exc:
        raise ConfigError(str(exc).strip()) from None
    config_compat.apply_cloudkitty_defaults(copy)
    validate(copy)
    if copy.collect.period != conf.collect.period:
        raise ConfigError(f"{_location(copy, 'period', 'collect')}[collect] period: "
                          f"{copy.collect.period} cannot replace {conf.collect.period} on a "
                          "reload (the stored data is aligned to it; see `db set-period`)")
