"""Every option of the configuration files, classified once at start.

cloudkitty-proc reads CloudKitty's own ``cloudkitty.conf`` in the drop-in
mode, and such a file holds many options that mean nothing here (the API's,
keystonemiddleware's, the other plugins'). Each ``(section, key)`` of the
files actually read (``--config-file`` and the ``*.conf`` of the config
directories, parsed with oslo.config's own parser) is one of:

* **ours**: registered on our configuration, by cloudkitty-proc or by a
  library it runs (oslo.log, oslo.messaging: same versions as CloudKitty's,
  so their options come from the data file), deprecated names included:
  nothing to say;
* **CloudKitty's only**: an option CloudKitty 25.0.0 knows
  (``cloudkitty_options.json``, written by ``tools/cloudkitty_options.py``)
  that has no effect here: accepted, and listed on ONE log line at start
  (grouped by section, with the reason where there is a notable one);
* **unknown** to both: a WARNING per option naming the file, the section
  and the key ("unknown option, ignored"), with a close name when there is
  one: a typo no longer goes unnoticed.

The daemon logs this at start and ``cloudkitty-proc-manage check`` prints
it. It is done in both modes: a misspelt option is the same mistake in a
native configuration, and an option carried over from CloudKitty has no
effect there either.

``apply_cloudkitty_defaults`` gives the options whose CloudKitty default
differs from ours CloudKitty's default in the drop-in mode, so that a
``cloudkitty.conf`` which leaves them out means what it means to
CloudKitty (its lock directory, its metrics.yml, its plugins).
"""

from __future__ import annotations

import difflib
import functools
import glob
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources

from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf

LOG = logging.getLogger(__name__)

DATA_FILE = "cloudkitty_options.json"

#: options cloudkitty-proc reads through the libraries it shares with
#: CloudKitty (same versions), taken from the data file by origin, or by
#: group for those oslo.messaging registers when imported: the master
#: process must not import oslo.messaging (it loads eventlet) to list them
LIBRARY_ORIGINS = ("oslo.log", "oslo.messaging")
LIBRARY_GROUPS = ("oslo_messaging_metrics", "oslo_messaging_tracing")

#: CloudKitty's default where it differs from ours, applied in the drop-in
#: mode to the options a cloudkitty.conf leaves out
CLOUDKITTY_DEFAULTS = (
    ("orchestrator", "coordination_url", "file:///var/lib/cloudkitty/locks"),
    ("collect", "metrics_conf", "/etc/cloudkitty/metrics.yml"),
    ("collect", "collector", "gnocchi"),
    ("fetcher", "backend", "keystone"),
    ("storage", "backend", "influxdb"),
)

_API = "cloudkitty-api's"
#: why a CloudKitty option has no effect, where it is worth saying
REASONS = {
    ("orchestrator", "max_workers_reprocessing"): "reprocessing runs in the same workers",
    ("orchestrator", "collector_request_timeout"):
        "each query is bounded by [collector_prometheus] timeout",
    ("DEFAULT", "auth_strategy"): _API,
    ("DEFAULT", "api_paste_config"): _API,
    ("storage_influxdb", "token"): "InfluxDB 2 only",
    ("storage_influxdb", "org"): "InfluxDB 2 only",
    ("storage_influxdb", "bucket"): "InfluxDB 2 only",
    ("storage_influxdb", "url"): "InfluxDB 2 only",
    ("storage_influxdb", "query_timeout"): "InfluxDB 2 only",
}
SECTION_REASONS = {
    "api": _API, "keystone_authtoken": _API, "oslo_policy": _API, "cors": _API,
    "oslo_middleware": _API,
}


def _section(name: str) -> str:
    """A section name as oslo.config matches it to a group."""
    return name if name == "DEFAULT" else name.lower()


@functools.lru_cache(maxsize=1)
def _entries() -> tuple[dict, ...]:
    data = json.loads(resources.files(__package__).joinpath(DATA_FILE).read_text())
    return tuple(data["options"])


def _names(entry: dict) -> list[tuple[str, str]]:
    """An entry's own (group, name), then its deprecated ones."""
    return [(entry["group"], entry["name"]), *map(tuple, entry["deprecated"])]


@functools.lru_cache(maxsize=1)
def cloudkitty_options() -> dict[tuple[str, str], tuple[str, str]]:
    """``(group, name)`` of every CloudKitty 25.0.0 option and deprecated
    name → the option's own ``(group, name)``."""
    known: dict[tuple[str, str], tuple[str, str]] = {}
    for entry in _entries():
        own = (entry["group"], entry["name"])
        for pair in _names(entry):
            known.setdefault(pair, own)
    return known


def _registered(conf: cfg.ConfigOpts) -> Iterable[tuple[str | None, cfg.Opt]]:
    """What ``conf`` has registered (oslo.config offers no public walk)."""
    for info in getattr(conf, "_opts", {}).values():
        yield None, info["opt"]
    for group in getattr(conf, "_groups", {}).values():
        for info in group._opts.values():
            yield group.name, info["opt"]


def our_options(conf: cfg.ConfigOpts) -> set[tuple[str, str]]:
    """``(group, key)`` of every option cloudkitty-proc reads, deprecated
    names included."""
    pairs = [(g, o) for g, opts in ckp_conf.list_opts() for o in opts]
    ours = {pair for entry in _entries() for pair in _names(entry)
            if entry["origin"] in LIBRARY_ORIGINS or entry["group"] in LIBRARY_GROUPS}
    for group, opt in [*pairs, *_registered(conf)]:
        group = group or "DEFAULT"
        ours.add((group, opt.dest))
        for dep in opt.deprecated_opts:
            if dep.name:
                ours.add((_section(dep.group or group), dep.name.replace("-", "_")))
    return ours


def config_files(conf: cfg.ConfigOpts) -> list[str]:
    """The files ``conf`` was read from, in order."""
    files = list(conf.config_file or ())
    for directory in conf.config_dirs or ():
        files += sorted(glob.glob(os.path.join(directory, "*.conf")))
    return files


def read_keys(path: str) -> list[tuple[str, str]]:
    """``(section, key)`` of one file, parsed as oslo.config parses it (an
    unreadable file gives nothing: oslo.config has said so already)."""
    sections: dict[str, dict] = {}
    try:
        cfg.ConfigParser(path, sections).parse()
    except (OSError, cfg.ParseError):
        return []
    return [(s, k) for s, keys in sections.items() for k in keys]


@dataclass
class Classification:
    """What the files hold besides our own options."""

    #: (section, key) of the CloudKitty options with no effect here, unique
    no_effect: list[tuple[str, str]] = field(default_factory=list)
    #: (file, section, key, hint) of the options neither knows
    unknown: list[tuple[str, str, str, str]] = field(default_factory=list)

    def no_effect_line(self) -> str | None:
        """The one line listing ``no_effect`` grouped by section."""
        if not self.no_effect:
            return None
        by_section: dict[str, list[str]] = {}
        for section, key in self.no_effect:
            why = REASONS.get((section, key))
            by_section.setdefault(section, []).append(f"{key} ({why})" if why else key)
        parts = []
        for section in sorted(by_section, key=lambda s: (s != "DEFAULT", s)):
            why = SECTION_REASONS.get(section)
            head = f"[{section}] ({why})" if why else f"[{section}]"
            parts.append(f"{head} {', '.join(sorted(by_section[section]))}")
        return ("CloudKitty 25.0.0 options accepted, no effect in cloudkitty-proc: "
                + "; ".join(parts))

    def unknown_lines(self) -> list[str]:
        """One line per unknown option."""
        return [f"{path}: [{section}] {key}: unknown option, ignored{hint}"
                for path, section, key, hint in self.unknown]


def _hint(section: str, key: str, known: set[tuple[str, str]]) -> str:
    keys = [k for s, k in known if s == section]
    if keys:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.8)
        return f" (did you mean {close[0]}?)" if close else ""
    sections = sorted({s for s, k in known if k == key})
    close = difflib.get_close_matches(section, sections, n=1, cutoff=0.8)
    return f" (did you mean [{close[0]}] {key}?)" if close else ""


def classify(conf: cfg.ConfigOpts, files: list[str] | None = None) -> Classification:
    """Classify every (section, key) of ``files`` (default: the files
    ``conf`` was read from)."""
    ours = our_options(conf)
    cloudkitty = cloudkitty_options()
    result = Classification()
    seen = set()
    for path in config_files(conf) if files is None else files:
        for raw_section, key in read_keys(path):
            section = _section(raw_section)
            if (section, key) in ours:
                continue
            if (section, key) in cloudkitty:
                if (section, key) not in seen:
                    seen.add((section, key))
                    result.no_effect.append((section, key))
                continue
            hint = _hint(section, key, ours | set(cloudkitty))
            result.unknown.append((path, raw_section, key, hint))
    return result


def log_at_start(conf: cfg.ConfigOpts) -> Classification:
    """The daemon's start: one INFO line, a WARNING per unknown option."""
    result = classify(conf)
    line = result.no_effect_line()
    if line:
        LOG.info("%s", line)
    for warning in result.unknown_lines():
        LOG.warning("%s", warning)
    return result


def apply_cloudkitty_defaults(conf: cfg.ConfigOpts) -> None:
    """In the drop-in mode, CloudKitty's defaults where ours differ
    (CLOUDKITTY_DEFAULTS): what a cloudkitty.conf leaves out means what it
    means to CloudKitty. Nothing in the native mode."""
    try:
        mode = conf.cloudkitty_proc.mode
    except (cfg.Error, ValueError):
        return  # the validation names the bad value
    if mode != "cloudkitty":
        return
    for group, name, value in CLOUDKITTY_DEFAULTS:
        conf.set_default(name, value, group=group)
