"""The rating chain of the drop-in mode: CloudKitty's modules and rules, read live from its database.

With ``[cloudkitty_proc] mode = cloudkitty``,
:func:`cloudkitty_proc.plugins.load_rating_chain` returns
``[CloudKittyRatingChain(conf)]`` instead of ``[rating] processors`` (and
the rules file): one processor that runs CloudKitty's enabled rating
modules (``modules_state``: hashmap, pyscripts; noop does nothing) in
descending priority, with the rules cloudkitty-api keeps in
``[database] connection`` (what is read and how: :mod:`.rules_load`).

**Live.** The pipeline calls :meth:`CloudKittyRatingChain.process` once
per rated period (``Pipeline._rate``; no other hook). Each call first runs
one query, the rules fingerprint (:mod:`.rules_fingerprint`), and rebuilds
the rules only when it changed since they were built (or after
:meth:`~CloudKittyRatingChain.invalidate`, which the RPC notifications
``reload_modules``, ``reload_module``, ``enable_module`` and
``disable_module`` and SIGHUP call). So a change made through the API
applies from the next period rated, without a restart, at the cost of one
small SELECT per period where CloudKitty issues about 150. A period is
priced with the mappings valid at its start (reprocessing re-rates past
periods with the prices of their time).

**Failures.** Anything that prevents rating as CloudKitty would (database
unreachable, a rule row CloudKitty cannot rate with, a pyscript that does
not compile or raises, a module enabled that cloudkitty_proc does not have)
raises: the pipeline records the error on the scope, stores nothing of the
period and leaves the state where it is; the period is retried on a later
pass, and the rules are rebuilt then.

**pyscripts.** CloudKitty runs the scripts of ``pyscripts_scripts`` as
trusted code; cloudkitty_proc runs them only with ``[rating]
allow_pyscripts = true``. When ``modules_state`` enables pyscripts and
``allow_pyscripts`` is false, every period (and every quote) fails with
an error naming both settings: nothing is rated without the scripts, and
the scope's state does not move, until one of the two changes.

**Quotes.** :func:`quote` prices CloudKitty's RPC ``quote`` argument as
CloudKitty's ``RatingEndpoint.quote`` does: enabled modules, global rules
only (no scope), rules in force now, only ``desc.groupby`` and
``desc.metadata`` read (flat ``desc`` keys are ignored, as in CloudKitty).
"""

from __future__ import annotations

import datetime
import decimal
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from oslo_config import cfg

from cloudkitty_proc import utils
from cloudkitty_proc.dataframe import ZERO, DataFrame, DataPoint
from cloudkitty_proc.dropin.rules_fingerprint import read_fingerprint, register_sqlite_functions
from cloudkitty_proc.dropin.rules_load import LiveRules, load_live_rules
from cloudkitty_proc.exceptions import ConfigError, InvalidRequestError, RatingError
from cloudkitty_proc.log import mask_url
from cloudkitty_proc.rating.base import BaseRatingProcessor
from cloudkitty_proc.rating.hashmap_values import to_utc

__all__ = ["CloudKittyRatingChain", "PYSCRIPTS_NOT_ALLOWED", "invalidate_quote_chain", "quote",
           "quote_frame"]

LOG = logging.getLogger(__name__)
_T = TypeVar("_T")

PYSCRIPTS_NOT_ALLOWED = (
    "CloudKitty's modules_state enables the pyscripts rating module but [rating] "
    "allow_pyscripts = false: nothing is rated until pyscripts is disabled "
    "(PUT /v2/rating/modules/pyscripts {\"enabled\": false}) or [rating] allow_pyscripts "
    "= true is set (the scripts of pyscripts_scripts then run inside the workers as "
    "trusted code)")


class CloudKittyRatingChain(BaseRatingProcessor):
    """CloudKitty's enabled rating modules with the rules of its database
    (module docstring). One instance is used by one thread at a time
    (:mod:`cloudkitty_proc.rating.base`); :meth:`invalidate` may be called
    from any thread."""

    def __init__(self, conf: cfg.ConfigOpts, *, url: str | sa.URL | None = None) -> None:
        super().__init__(conf)
        raw = conf.database.connection if url is None else url
        try:
            self.url: sa.URL = sa.make_url(raw)
        except (sa.exc.ArgumentError, TypeError):
            raise ConfigError(f"[database] connection {mask_url(str(raw))!r}: not a "
                              "database URL (CloudKitty's database, whose rating rules "
                              "the drop-in mode reads)") from None
        self._engine: sa.Engine | None = None
        self._pid: int | None = None
        self.rules: LiveRules | None = None
        self._stale = False
        #: rule builds so far (tests, status)
        self.builds = 0

    def __repr__(self) -> str:
        return f"CloudKittyRatingChain({self.url.render_as_string(hide_password=True)!r})"

    # -- the database ----------------------------------------------------------
    @property
    def engine(self) -> sa.Engine:
        """The engine (created on first use, again in a forked child)."""
        if self._engine is not None and self._pid != os.getpid():
            self._engine.dispose(close=False)  # the parent's connections stay its own
            self._engine = None
        if self._engine is None:
            self._engine = _make_engine(self.url)
            self._pid = os.getpid()
        return self._engine

    def close(self) -> None:
        if self._engine is not None and self._pid == os.getpid():
            self._engine.dispose()
        self._engine = None

    # -- rules -----------------------------------------------------------------
    def invalidate(self) -> None:
        """Rebuild the rules before the next period (RPC notifications)."""
        self._stale = True

    def current(self) -> LiveRules:
        """The rules as the database holds them now: one fingerprint query,
        and a rebuild when it changed (or after :meth:`invalidate`)."""
        fingerprint = self._on_connection(read_fingerprint)
        rules = self.rules
        if rules is not None and not self._stale and rules.fingerprint == fingerprint:
            return rules
        self._stale = False
        try:
            rules = self._on_connection(self._load, snapshot=True)
        except BaseException:
            self._stale = True  # built again at the next call
            raise
        self.builds += 1
        LOG.info("CloudKitty rating rules %s from %s: %s",
                 "reloaded" if self.rules is not None else "loaded",
                 self.url.render_as_string(hide_password=True), rules.describe())
        for warning in rules.warnings:
            LOG.warning("CloudKitty rating rules: %s", warning)
        self.rules = rules
        return rules

    def _load(self, conn: sa.Connection) -> LiveRules:
        """Every rule, and the fingerprint they were read with (one snapshot)."""
        return load_live_rules(conn, read_fingerprint(conn),
                               allow_pyscripts=self.conf.rating.allow_pyscripts)

    def _on_connection(self, read: Callable[[sa.Connection], _T], *,
                       snapshot: bool = False) -> _T:
        """``read(connection)``; ``snapshot``: in one REPEATABLE READ
        transaction (the rebuilds), else in autocommit. A pooled connection
        the server closed meanwhile is replaced once."""
        for attempt in (1, 2):
            try:
                with self.engine.connect() as conn:
                    if not snapshot:
                        return read(conn)
                    conn.execution_options(isolation_level=self._snapshot_level)
                    result = read(conn)
                    conn.commit()  # the transaction only read
                    return result
            except sa.exc.DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise
                LOG.info("CloudKitty rating rules: reconnecting to %s (%s)",
                         self.url.render_as_string(hide_password=True),
                         str(exc.orig).strip().splitlines()[0] if exc.orig else exc)
        raise AssertionError("unreachable")

    @property
    def _snapshot_level(self) -> str:
        return "SERIALIZABLE" if self.url.get_backend_name() == "sqlite" else "REPEATABLE READ"

    def process(self, frame: DataFrame) -> DataFrame:
        """Rate ``frame`` with the modules and rules in force now, the
        mappings and scripts filtered by the period's start."""
        rules = self.current()
        if "pyscripts" in rules.modules and not self.conf.rating.allow_pyscripts:
            raise RatingError(PYSCRIPTS_NOT_ALLOWED)
        begin = to_utc(frame.begin)
        for module in rules.modules:
            if module == "hashmap":
                frame = rules.rate_hashmap(frame, begin)
            elif module == "pyscripts":
                for script in rules.scripts_at(begin):
                    try:
                        result = script.run(frame)
                    except Exception as exc:
                        raise RatingError(f"pyscript {script.name!r} (pyscripts_scripts id "
                                          f"{script.id}): {type(exc).__name__}: "
                                          f"{exc}") from exc
                    frame = result
        return frame

    def reload(self) -> None:
        """SIGHUP / ``reload-rules``: rebuild at the next period."""
        self.invalidate()

    def check(self) -> None:
        """The URL parsed in ``__init__``; nothing else to check without I/O."""


def _make_engine(url: sa.URL) -> sa.Engine:
    """An engine whose periodic check is one round trip: autocommit (no
    BEGIN), no ROLLBACK when a connection is closed or returns to the pool
    (these connections only read; PyMySQL would send one even in
    autocommit), no pre-ping (the chain reconnects once instead when the
    server closed a pooled connection). Rebuilds read in one REPEATABLE
    READ transaction, which they commit."""
    kwargs: dict[str, Any] = {"isolation_level": "AUTOCOMMIT", "pool_reset_on_return": None}
    sqlite = url.get_backend_name() == "sqlite"
    if sqlite and url.database in (None, "", ":memory:"):
        kwargs.update(poolclass=sa.pool.StaticPool,
                      connect_args={"check_same_thread": False})
    try:
        engine = sa.create_engine(url, **kwargs)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"[database] connection {url.render_as_string(hide_password=True)}: "
                          f"its driver is not installed (no module {exc.name!r})") from None
    # this engine's own dialect instance: nothing else is affected
    engine.dialect.do_rollback = _no_rollback  # type: ignore[method-assign]
    if sqlite:
        sa.event.listen(engine, "connect",
                        lambda dbapi_connection, record: register_sqlite_functions(
                            dbapi_connection))
    return engine


def _no_rollback(dbapi_connection: Any) -> None:
    """Autocommit connections have no transaction to roll back."""


# -- quotes ---------------------------------------------------------------------
def _shape_error(what: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"quote: {what} (expected CloudKitty's res_data {{\"usage\": {{\"<service>\": "
        "[{\"desc\": {\"groupby\": {...}, \"metadata\": {...}}, \"vol\": {\"qty\": \"2\", "
        "\"unit\": \"undef\"}}]}})")


def quote_frame(res_data: Any, begin: datetime.datetime, period: int) -> DataFrame:
    """CloudKitty's quote argument as a frame without scope starting at
    ``begin``: one point (price 0) per entry, groupby and metadata taken
    from ``desc.groupby`` and ``desc.metadata`` only. InvalidRequestError
    naming the entry for anything CloudKitty would fail on."""
    usage = res_data.get("usage") if isinstance(res_data, dict) else None
    if not isinstance(usage, dict):
        raise _shape_error("no 'usage' mapping")
    frame = DataFrame(None, begin, begin + datetime.timedelta(seconds=period))  # type: ignore[arg-type]
    for service, entries in usage.items():
        if not isinstance(entries, list):
            raise _shape_error(f"usage[{service!r}] is not a list")
        points = []
        for n, entry in enumerate(entries):
            where = f"usage[{service!r}][{n}]"
            try:
                vol = entry["vol"]
                desc = entry.get("desc") or {}
                groupby, metadata = desc.get("groupby") or {}, desc.get("metadata") or {}
                points.append(DataPoint(vol["unit"], vol["qty"], ZERO, dict(groupby),
                                        dict(metadata)))
            except (KeyError, TypeError, AttributeError, ValueError,
                    decimal.InvalidOperation) as exc:
                raise _shape_error(f"{where}: {type(exc).__name__}: {exc}") from None
            if not points[-1].qty.is_finite():
                raise _shape_error(f"{where}: qty is not a finite number")
        frame.add_points(str(service), points)
    return frame


_quote_lock = threading.Lock()
_quote_chain: dict[str, Any] = {}


def quote(conf: cfg.ConfigOpts, res_data: Any, *, chain: CloudKittyRatingChain | None = None,
          now: datetime.datetime | None = None) -> decimal.Decimal:
    """The price of CloudKitty's RPC ``quote`` argument ``res_data``
    (``{"usage": {"<service>": [{"desc": {...}, "vol": {"qty": "2", "unit":
    "undef"}}]}}``): the sum of the prices after the enabled modules, the
    global rules in force at ``now`` (default: the current time, as
    CloudKitty's ``localized_now``). CloudKitty's RPC answers ``str()`` of it.

    ``chain``: the rating chain to use; by default one kept per process
    for quotes (calls are serialised on it). InvalidRequestError for a
    malformed ``res_data``; rating errors propagate.
    """
    frame = quote_frame(res_data, to_utc(now) if now is not None else utils.utcnow(),
                        conf.collect.period)
    if chain is not None:
        return chain.process(frame).total_price()
    # one chain per configuration and database: a reload (or a test) may
    # point the same ConfigOpts at another database
    key = (id(conf), str(conf.database.connection))
    with _quote_lock:
        cached = _quote_chain.get("chain")
        if cached is None or _quote_chain.get("key") != key:
            if cached is not None:
                cached.close()
            cached = CloudKittyRatingChain(conf)
            _quote_chain.update(chain=cached, key=key)
        return cached.process(frame).total_price()


def invalidate_quote_chain() -> None:
    """Rebuild the rules of :func:`quote`'s own chain at the next quote
    (the RPC notifications; changes are also seen without it)."""
    cached = _quote_chain.get("chain")
    if cached is not None:
        cached.invalidate()
