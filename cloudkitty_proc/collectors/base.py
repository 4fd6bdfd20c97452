"""The collector contract.

:class:`Collector` says what a collector must provide and when each member
is called; :class:`BaseCollector` is the convenient base to implement one
(``fetch()`` to write; conversion and the I/O hooks done).

A collector answers one question: for one metric definition, one scope and
one period [begin, end), which series exist and what is their quantity?
Plugins implement :meth:`BaseCollector.fetch`; the base class turns the raw
series into :class:`~cloudkitty_proc.dataframe.DataPoint` objects (groupby /
metadata split, unit conversion and mutate exactly as CloudKitty does).

Threading: ``retrieve()`` is called concurrently from the worker's collect
executor (eventlet green threads by default, or real threads). A plugin must
therefore be safe to call concurrently, and its I/O must suit the executor
(``conf.orchestrator.collect_executor``): with ``greenpool``, *green* I/O
only (``eventlet.import_patched(...)`` or ``eventlet.green`` modules, never
global monkey patching, see doc/source/design.rst); with ``threads``, plain
blocking I/O (green sockets used from real threads can park a thread for
good). CPU-only plugins (the file collector) need nothing special.

Skipping is not the collector's: ``skip_datapoints_expression`` applies
after rating, as in CloudKitty (:mod:`cloudkitty_proc.skipping`).

Errors: any failure to obtain a *complete* answer raises
:class:`~cloudkitty_proc.exceptions.CollectError`; the period is then not
committed and the scope state does not move. An empty answer (no series)
is *not* an error: it is "no data" and is committed as an empty period.
"""

from __future__ import annotations

import abc
import datetime
import decimal
import logging
from collections.abc import Iterable, Mapping
from typing import Protocol

from oslo_config import cfg

from cloudkitty_proc.dataframe import DataPoint
from cloudkitty_proc.exceptions import CollectError
from cloudkitty_proc.metrics_conf import MetricDef, MetricsConf

LOG = logging.getLogger(__name__)
ZERO = decimal.Decimal(0)

RawSeries = tuple[Mapping[str, str], str]
"""(labels, raw value as the backend returned it, e.g. "12.5")."""


class Collector(Protocol):
    """What a collector provides (entry point namespace
    ``cloudkitty_proc.collectors``).

    Construction: ``cls(conf, metrics)`` with the global, registered
    options and the loaded metrics.yml (already validated against the
    class's ``extra_args_schema``); no network I/O. An invalid option
    raises :class:`~cloudkitty_proc.exceptions.ConfigError` (or ValueError,
    TypeError, OSError, turned into a ConfigError naming ``[collect]
    collector``). Built by each worker on its run thread at start (an error
    exits the worker process, status 2) and again on every reload (an error
    keeps the collector in force), and by ``cloudkitty-proc-manage check``.

    Optional members, looked up with ``getattr``:

    ``extra_args_schema``
        class attribute, a voluptuous schema (dict) of the ``extra_args``
        the collector accepts in metrics.yml; read by the master and the
        worker before construction; None or absent accepts anything.
    ``set_io_hooks(begin, done)``
        called on the run thread right after construction, before any
        :meth:`retrieve`, with the collect executor's hooks. Inside
        ``retrieve()`` the collector calls ``begin()`` before each network
        exchange and ``done()`` once its reply is read, before parsing it,
        so the executor can send the next query meanwhile (executor.py).
        :class:`BaseCollector` provides it.
    ``check()``
        ``cloudkitty-proc-manage check`` calls it once: one request to see
        that the backend answers; CollectError is printed as the error.
    """

    #: The metric definitions it was built with: the worker collects each
    #: of them for every period (read on the run thread).
    metrics: MetricsConf

    def retrieve(self, metric: MetricDef, scope_id: str,
                 begin: datetime.datetime, end: datetime.datetime) -> list[DataPoint]:
        """The datapoints of ``metric`` for ``scope_id`` in [begin, end),
        priced 0 (skip expressions apply after rating: skipping.py).

        Called in the collect executor (green threads of the run thread's
        hub, or pool threads with ``collect_executor = threads``), for
        several metrics and periods at once: it must be safe to call
        concurrently and its I/O must suit the executor (module docstring).
        An empty list is "no data": the period is committed empty. Raise
        CollectError when the answer is not complete: the period is not
        committed, the error is logged and recorded on the scope's state
        (its ``kind`` counted), the state does not move and the period is
        retried on a later pass. Any other exception is treated the same,
        logged with its traceback as a collector bug.
        """

    def close(self) -> None:
        """Release connections. Called on the run thread, with no
        :meth:`retrieve` running, when the worker stops (an exception is
        ignored) or when a reload has replaced this collector (it must not
        raise); the instance is not used again."""


class BaseCollector(abc.ABC):
    """Implementation base of :class:`Collector`: subclasses implement
    :meth:`fetch`; :meth:`retrieve` turns its series into DataPoints."""

    #: voluptuous schema (a dict) of the ``extra_args`` this collector
    #: accepts in metrics.yml; None accepts anything.
    extra_args_schema: dict | None = None

    def __init__(self, conf: cfg.ConfigOpts, metrics: MetricsConf) -> None:
        self.conf = conf
        self.metrics = metrics
        self.scope_key: str = conf.collect.scope_key

    @staticmethod
    def io_begin() -> None:
        """Called by a collector before each network exchange; the worker
        sets it (with io_done) to its executor's hooks (set_io_hooks)."""

    @staticmethod
    def io_done() -> None:
        """Called by a collector once an exchange is over (the reply read),
        before parsing it: the executor can start the next query then."""

    def set_io_hooks(self, begin, done) -> None:
        """Install the executor's io_begin/io_done (see executor.py)."""
        self.io_begin = begin
        self.io_done = done

    @abc.abstractmethod
    def fetch(self, metric: MetricDef, scope_id: str,
              begin: datetime.datetime, end: datetime.datetime) -> Iterable[RawSeries]:
        """Return every series of ``metric`` for ``scope_id`` in [begin, end).

        One item per distinct combination of the metric's groupby+metadata
        labels, already aggregated over the period (CloudKitty's
        ``<agg>(<agg>_over_time(...)) by (...)``). Raise CollectError on any
        failure. Called concurrently; see the module docstring.
        """

    def retrieve(self, metric: MetricDef, scope_id: str,
                 begin: datetime.datetime, end: datetime.datetime) -> list[DataPoint]:
        """fetch() + conversion into DataPoints (price 0)."""
        return self.to_points(metric, scope_id, self.fetch(metric, scope_id, begin, end))

    def to_points(self, metric: MetricDef, scope_id: str,
                  series: Iterable[RawSeries]) -> list[DataPoint]:
        """The DataPoints of fetched series (see retrieve).

        Per series: :meth:`quantity` (CollectError "malformed" when it
        refuses the value), ``groupby`` = the metric's groupby labels (""
        when absent, values through ``str``) with the scope key set to
        ``scope_id``, ``metadata`` likewise. (The skip expressions apply
        after rating: skipping.py.)
        """
        points: list[DataPoint] = []
        append = points.append
        unit = metric.unit
        # quantity() inlined, unless a plugin overrides it
        convert = metric.convert if self.quantity is BaseCollector.quantity else None
        range_function = bool(metric.extra_args.get("range_function"))
        scope_key = self.scope_key
        # The keys once per call; the scope key keeps its place in groupby.
        gkeys = metric.groupby
        mkeys = metric.metadata
        new = tuple.__new__
        for labels, raw in series:
            try:
                if convert is None:
                    raise ValueError
                qty = convert(raw)
                if qty < ZERO and not range_function:
                    raise ValueError
            except ValueError:
                try:
                    qty = self.quantity(metric, raw)   # the message
                except ValueError as exc:
                    raise CollectError(str(exc), metric=metric.label, scope_id=scope_id,
                                       kind="malformed") from None
            get = labels.get
            groupby = {key: str(get(key, "")) for key in gkeys}
            groupby[scope_key] = scope_id
            metadata = {key: str(get(key, "")) for key in mkeys} if mkeys else {}
            append(new(DataPoint, (unit, qty, ZERO, groupby, metadata)))
        return points

    @staticmethod
    def quantity(metric: MetricDef, raw: str) -> decimal.Decimal:
        """The quantity of a raw value (``metric.convert``); ValueError
        naming the problem for a value that is not a finite number or is
        negative. Plugins may call it on their replies to retry them."""
        try:
            qty = metric.convert(raw)
        except ValueError as exc:
            raise ValueError(f"malformed value in reply: {exc}") from None
        if qty < 0 and not metric.extra_args.get("range_function"):
            # Usage is never negative; a negative value is a broken
            # exporter or backend, not something to bill.
            raise ValueError(f"negative quantity {raw!r} in reply")
        return qty

    def close(self) -> None:
        """Release connections (called when the worker stops)."""
