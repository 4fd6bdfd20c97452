"""The core configuration options, and the registry of every plugin's.

All options live on the global ``oslo_config.cfg.CONF`` (oslo.messaging
misbehaves with a private ``ConfigOpts``, see doc/source/design.rst).
``list_opts()`` is the ``oslo.config.opts`` entry point used by
``oslo-config-generator --namespace cloudkitty_proc``.

Option names follow CloudKitty's wherever CloudKitty has the same option, so
an operator can carry a ``cloudkitty.conf`` section over unchanged.
"""

from __future__ import annotations

import os
import socket

from oslo_config import cfg, types

from cloudkitty_proc import expressions
from cloudkitty_proc.collectors import file as collector_file
from cloudkitty_proc.collectors import gnocchi as collector_gnocchi
from cloudkitty_proc.collectors import prometheus as collector_prometheus
from cloudkitty_proc.fetchers import keystone as fetcher_keystone
from cloudkitty_proc.fetchers import gnocchi as fetcher_gnocchi
from cloudkitty_proc.fetchers import prometheus as fetcher_prometheus
from cloudkitty_proc.fetchers import source as fetcher_source
from cloudkitty_proc.rating import hashmap as rating_hashmap
from cloudkitty_proc.rating import pyscripts as rating_pyscripts
from cloudkitty_proc.storage import elasticsearch as storage_elasticsearch
from cloudkitty_proc.storage import influx as storage_influx
from cloudkitty_proc.storage import opensearch as storage_opensearch
from cloudkitty_proc.storage import sql as storage_sql

CONF = cfg.CONF


class DirectoryType(types.String):
    """A directory path, normalised (``/var/lib/ckp/`` → ``/var/lib/ckp``).

    Options built on it by interpolation (``file://$state_path/locks``) then
    never hold ``//``: tooz refused every lock name under such a path.
    """

    def __init__(self) -> None:
        super().__init__(type_name="directory value")

    def __call__(self, value):
        value = super().__call__(value)
        return os.path.normpath(value) if value else value


def split_host_port(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9100``; an empty host is 127.0.0.1) → (host,
    port). ValueError unless the port is a number from 1 to 65535."""
    host, colon, port = value.strip().rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected host:port with a port from 1 to 65535, got {value!r}")
    return host, int(port)


class ListenType(types.String):
    """``host:port`` to listen on, checked when read."""

    def __init__(self) -> None:
        super().__init__(type_name="host:port value")

    def __call__(self, value):
        value = super().__call__(value)
        if value:
            split_host_port(value)
        return value


class LabelNameType(types.String):
    """A string option naming a label: not empty, no white space.

    An empty ``[collect] scope_key`` used to be accepted, and every period
    then committed with 0 rows (no datapoint carries an empty label).
    """

    def __init__(self) -> None:
        super().__init__(type_name="label name value")

    def __call__(self, value):
        value = super().__call__(value)
        if not value or any(c.isspace() for c in value):
            raise ValueError(f"{value!r} is not a label name (not empty, no white space)")
        return value


class ExpressionType(types.String):
    """A string option holding a skip expression, checked when read.

    An expression the safe language refuses makes reading the option fail
    (a ValueError naming the problem), so ``check`` and the start-up
    validation report it with the file and the option.
    """

    def __init__(self) -> None:
        super().__init__(type_name="expression value")

    def __call__(self, value):
        value = super().__call__(value)
        if value.strip():
            expressions.parse_expression(value)
        return value

default_opts = [
    cfg.StrOpt(
        "host",
        default=socket.gethostname(),
        sample_default="<hostname>",
        help="Name of this host. Used as the RPC server name prefix "
        "(<host>-<worker_id>) and as the coordination member id.",
    ),
    cfg.IntOpt(
        "graceful_shutdown_timeout",
        default=60,
        min=0,
        help="Seconds a worker may take to finish the period in flight "
        "after SIGTERM before it is killed. 0 waits forever.",
    ),
    cfg.StrOpt(
        "rpc_topic",
        default="cloudkitty_proc",
        help="RPC topic the workers serve when transport_url is set "
        "(doc/source/reprocessing.rst). Keep the default; change it only "
        "to run two independent deployments on one message broker virtual "
        "host.",
    ),
    cfg.Opt(
        "state_path",
        type=DirectoryType(),
        default="/var/lib/cloudkitty-proc",
        help="Directory where the daemon keeps its local state (SQLite "
        "database and file locks with the default settings).",
    ),
]

orchestrator_opts = [
    cfg.StrOpt(
        "coordination_url",
        default="file://$state_path/locks",
        secret=True,
        help="tooz coordination backend URL used for the per-scope locks. "
        "file:// works on one host only; use redis://, etcd3+http:// or "
        "zookeeper:// when several hosts process the same scopes. The lease "
        "of a lock is the URL's lock_timeout (seconds, default 30, e.g. "
        "redis://host:6379?lock_timeout=30): a worker killed with SIGKILL "
        "keeps its scope locked that long.",
    ),
    cfg.IntOpt(
        "max_workers",
        default=os.cpu_count() or 1,
        sample_default="<number of CPUs>",
        min=0,
        help="Number of Orchestrator worker processes. 0 runs no worker "
        "(useful to keep only the other services of the daemon).",
    ),
    cfg.IntOpt(
        "max_threads",
        default=16,
        min=1,
        deprecated_name="max_greenthreads",
        help="Concurrent collector queries per worker (green threads or "
        "threads, see collect_executor). CloudKitty's name; the former "
        "max_greenthreads (CloudKitty's former name too) still works.",
    ),
    cfg.IntOpt(
        "max_host_queries",
        default=0,
        min=0,
        help="Cap on the collector queries in flight from this host, shared "
        "evenly by its workers (each gets max(1, max_host_queries // "
        "max_workers), at most max_threads), to protect the metrics "
        "backend. 0: no cap beyond max_threads per worker.",
    ),
    cfg.StrOpt(
        "collect_executor",
        default="greenpool",
        choices=[
            ("greenpool", "eventlet GreenPool with green HTTP (no monkey "
             "patching)"),
            ("threads", "a ThreadPoolExecutor of max_threads threads"),
        ],
        help="How a worker runs its concurrent collector queries.",
    ),
    cfg.IntOpt(
        "max_periods_per_lock",
        default=48,
        min=1,
        help="How many periods a worker processes for one scope before it "
        "releases the scope lock and moves on, so that a scope with months "
        "to catch up does not starve the others.",
    ),
    cfg.IntOpt(
        "lease_partitions",
        default=64,
        min=0,
        help="Scopes are leased by partition (a hash of the scope id), one "
        "tooz lock each; the same value on every host. 0: one lock per scope "
        "(always in the drop-in mode, with CloudKitty's lock names).",
    ),
    cfg.FloatOpt(
        "poll_interval",
        default=30.0,
        min=0.1,
        help="Seconds a worker sleeps between two passes over the scopes "
        "when it found nothing to do.",
    ),
    cfg.IntOpt(
        "lookahead_periods",
        default=4,
        min=1,
        help="Periods collected ahead while earlier ones are rated and "
        "committed (always in time order); per-scope passes raise it to "
        "2 x max_threads / metrics when that is more.",
    ),
    cfg.BoolOpt(
        "lookahead_scopes",
        default=True,
        help="Per-scope passes (lease_partitions = 0, max_scopes_per_query "
        "= 1): lock the next due scope and start collecting it while the "
        "current one's last periods are rated and committed (a scope with "
        "reprocessing to do is never taken ahead).",
    ),
    cfg.Opt(
        "skip_datapoints_expression",
        type=ExpressionType(),
        default="",
        deprecated_opts=[cfg.DeprecatedOpt("skip_datapoints_expression", group="collect")],
        help="Rated datapoints for which this expression is true are not "
        "stored (after the rating chain, just before storage, as CloudKitty "
        "does), for every metric without a skip_datapoints_expression of its "
        "own in metrics.yml. A safe expression language (no Python "
        "evaluation): the names qty, price, unit, groupby and metadata, "
        "groupby['key'] / metadata['key'], comparisons, in, and/or/not, "
        "+ - * / % on numbers, string and number literals, True/False. "
        "Example: qty == 0 or metadata['flavor_name'] == 'm1.tiny'. "
        "CloudKitty's Python form (datapoint.get(\"vol\", {}).get(\"qty\", 0) "
        "== 0) is refused with its equivalent. Empty or False: keep every "
        "datapoint. Formerly in [collect].",
    ),
]

collect_opts = [
    cfg.StrOpt(
        "collector",
        default="prometheus",
        help="Collector plugin (stevedore namespace "
        "cloudkitty_proc.collectors): prometheus or file.",
    ),
    cfg.IntOpt(
        "period",
        default=3600,
        min=1,
        help="Rating period in seconds.",
    ),
    cfg.IntOpt(
        "wait_periods",
        default=2,
        min=0,
        help="Number of periods to wait before a period is collected, so "
        "that late data has arrived in the metrics backend.",
    ),
    cfg.StrOpt(
        "metrics_conf",
        default="/etc/cloudkitty-proc/metrics.yml",
        help="Metrics definition file (CloudKitty's metrics.yml format).",
    ),
    cfg.Opt(
        "scope_key",
        type=LabelNameType(),
        default="project_id",
        help="Label that identifies a scope in the collected data.",
    ),
    cfg.IntOpt(
        "max_scopes_per_query",
        default=200,
        min=1,
        help="Scopes due for the same period are collected with one query "
        "per metric and period (prometheus), the reply split by scope_key; "
        "this bounds a reply's size (a worker's memory). 1: one query per "
        "scope, metric and period, as CloudKitty.",
    ),
    cfg.IntOpt(
        "max_periods_per_query",
        default=6,
        min=1,
        help="Periods of a batch asked by one range query (prometheus; "
        "at 6, 4x less Prometheus CPU). 1: one instant query per period.",
    ),
    cfg.StrOpt(
        "begin",
        help="ISO 8601 time of the first period of a scope seen for the "
        "first time. Unset: the start of the current month (UTC), as "
        "CloudKitty does.",
    ),
    cfg.StrOpt(
        "end",
        help="ISO 8601 time; periods starting at or after it are never "
        "processed. Unset: no bound (the normal daemon behaviour). Useful "
        "to rate a fixed window of history.",
    ),
]

fetcher_opts = [
    cfg.StrOpt(
        "backend",
        default="source",
        help="Scope fetcher plugin (stevedore namespace "
        "cloudkitty_proc.fetchers): source, prometheus or keystone.",
    ),
]


storage_opts = [
    cfg.StrOpt(
        "backend",
        default="sql",
        help="Storage plugin (stevedore namespace cloudkitty_proc.storage): sql "
        "(everything in [database]), influxdb, elasticsearch or opensearch "
        "(rated points there in CloudKitty's v2 layout, states in [database]).",
    ),
    cfg.IntOpt(
        "version",
        default=2,
        min=1,
        max=2,
        help="CloudKitty's storage version. Only 2 (CloudKitty's default) is "
        "supported: 1 is refused at start.",
    ),
]

cloudkitty_proc_opts = [
    cfg.StrOpt(
        "mode",
        default="native",
        choices=[
            ("native", "states, reprocessing tasks and rules in cloudkitty_proc's "
             "own tables and files"),
            ("cloudkitty", "a drop-in for cloudkitty-processor: scope states and "
             "reprocessing tasks in CloudKitty's own tables (cloudkitty_storage_states, "
             "storage_scope_reprocessing_schedule) of [database] connection, "
             "rated points in [storage] backend influxdb, elasticsearch or opensearch"),
        ],
        help="Where the processing state lives. cloudkitty: run in place of "
        "cloudkitty-processor against an existing CloudKitty 25.0.0 deployment, whose "
        "API, dashboard and CLI keep working (its scope lock names too); its tables are "
        "never created or migrated by cloudkitty_proc (their alembic heads are checked "
        "at start).",
    ),
]

rating_opts = [
    cfg.ListOpt(
        "processors",
        default=["hashmap"],
        help="Rating processors (stevedore namespace "
        "cloudkitty_proc.rating), applied in this order.",
    ),
    cfg.BoolOpt(
        "allow_pyscripts",
        default=False,
        help="Allow the pyscripts rating processor. Its scripts are Python "
        "code run inside the workers with their full privileges (database "
        "credentials included): only enable it for scripts the operator "
        "wrote or reviewed.",
    ),
]


metrics_opts = [
    cfg.Opt(
        "listen",
        type=ListenType(),
        help="host:port where /metrics and /healthz are served (use a "
        "loopback address unless a firewall protects the port). Unset: no "
        "HTTP endpoint.",
    ),
    cfg.IntOpt(
        "stall_timeout",
        default=900,
        min=1,
        help="/healthz answers 503 when work is due but no worker committed "
        "a period for this many seconds.",
    ),
]

#: The core groups; each plugin module declares its own (``OPTS``).
_GROUPS = [
    ("DEFAULT", default_opts),
    ("orchestrator", orchestrator_opts),
    ("collect", collect_opts),
    ("fetcher", fetcher_opts),
    ("storage", storage_opts),
    ("cloudkitty_proc", cloudkitty_proc_opts),
    ("rating", rating_opts),
    ("metrics", metrics_opts),
]

#: Modules whose ``OPTS`` (a list of ``(group, [options])``) are registered
#: with the core ones: every plugin shipped with cloudkitty_proc. A new
#: plugin adds its module here (see "Adding a plugin" in doc/source/design.rst).
PLUGIN_OPT_MODULES = (
    fetcher_source,
    fetcher_prometheus,
    fetcher_keystone,
    fetcher_gnocchi,
    collector_prometheus,
    collector_file,
    collector_gnocchi,
    storage_sql,
    storage_influx,
    storage_elasticsearch,
    storage_opensearch,
    rating_hashmap,
    rating_pyscripts,
)

_registered = False


def all_groups() -> list[tuple[str, list[cfg.Opt]]]:
    """Every ``(group, options)`` pair: the core groups, then the plugins'."""
    groups = list(_GROUPS)
    for module in PLUGIN_OPT_MODULES:
        groups.extend(module.OPTS)
    return groups


def register_opts(conf: cfg.ConfigOpts = CONF) -> None:
    """Register every option on ``conf`` (idempotent)."""
    global _registered
    if _registered and conf is CONF:
        return
    for group, opts in all_groups():
        conf.register_opts(opts, group=None if group == "DEFAULT" else group)
    if conf is CONF:
        _registered = True


def list_opts():
    """Entry point for oslo-config-generator."""
    return [(None if g == "DEFAULT" else g, list(opts)) for g, opts in all_groups()]


register_opts()
