"""Loading the plugins named in the configuration through stevedore.

Every loader turns "no such plugin" and "plugin refused its configuration"
into a ConfigError naming the option, so the daemon and ``check`` print one
clear line instead of a stevedore traceback.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from oslo_config import cfg
from stevedore import driver

from cloudkitty_proc.dropin import storage as dropin_storage
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.metrics_conf import MetricsConf, load_metrics_conf

NS_FETCHERS = "cloudkitty_proc.fetchers"
NS_COLLECTORS = "cloudkitty_proc.collectors"
NS_RATING = "cloudkitty_proc.rating"
NS_STORAGE = "cloudkitty_proc.storage"


def _plugin_class(namespace: str, name: str, option: str) -> type:
    names = known_plugins(namespace)
    if name not in names:
        raise ConfigError(f"{option} = {name}: no such plugin "
                          f"(known: {', '.join(names) or 'none installed'})")
    try:
        return driver.DriverManager(namespace, name, invoke_on_load=False).driver
    except Exception as exc:  # import error inside the plugin module
        raise ConfigError(f"{option} = {name}: cannot load plugin: {exc}") from None


def known_plugins(namespace: str) -> list[str]:
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=namespace)})


def _invoke(cls: type, option: str, *args: Any) -> Any:
    try:
        return cls(*args)
    except ConfigError:
        raise
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"{option}: {exc}") from None


def load_metrics(conf: cfg.ConfigOpts) -> tuple[type, MetricsConf]:
    cls = _plugin_class(NS_COLLECTORS, conf.collect.collector, "[collect] collector")
    metrics = load_metrics_conf(conf.collect.metrics_conf,
                                scope_key=conf.collect.scope_key,
                                extra_args_schema=getattr(cls, "extra_args_schema", None))
    return cls, metrics


def load_collector(conf: cfg.ConfigOpts):
    cls, metrics = load_metrics(conf)
    return _invoke(cls, f"[collect] collector = {conf.collect.collector}", conf, metrics)


def load_fetcher(conf: cfg.ConfigOpts):
    cls = _plugin_class(NS_FETCHERS, conf.fetcher.backend, "[fetcher] backend")
    return _invoke(cls, f"[fetcher] backend = {conf.fetcher.backend}", conf)


def load_rating_chain(conf: cfg.ConfigOpts) -> list:
    """The rating processors, in order: ``[rating] processors``; with
    ``[cloudkitty_proc] mode = cloudkitty``, CloudKitty's modules and rules
    read live from its database instead (cloudkitty_proc/dropin/rules.py;
    ``[rating] processors`` and the rules file are not used)."""
    if conf.cloudkitty_proc.mode == "cloudkitty":
        from cloudkitty_proc.dropin.rules import CloudKittyRatingChain  # drop-in mode only

        return [CloudKittyRatingChain(conf)]
    names = [n.strip() for n in conf.rating.processors if n.strip()]
    if not names:
        raise ConfigError("[rating] processors: at least one processor is required "
                          "(use noop to store unpriced data)")
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"[rating] processors: listed twice: {', '.join(sorted(dupes))}")
    chain = []
    for name in names:
        cls = _plugin_class(NS_RATING, name, "[rating] processors")
        chain.append(_invoke(cls, f"[rating] processors: {name}", conf))
    return chain


def load_storage(conf: cfg.ConfigOpts, **kwargs: Any):
    """The ``[storage] backend``; with ``[cloudkitty_proc] mode = cloudkitty``,
    its drop-in variant (cloudkitty_proc/dropin/storage.py), for the
    point-store backends only."""
    cloudkitty_mode = conf.cloudkitty_proc.mode == "cloudkitty"
    if cloudkitty_mode:
        dropin_storage.check_backend(conf.storage.backend)
    cls = _plugin_class(NS_STORAGE, conf.storage.backend, "[storage] backend")
    if cloudkitty_mode:
        cls = dropin_storage.storage_class(cls)
    return cls(conf, **kwargs)


