"""CloudKitty's RPC target, served by every worker in the drop-in mode.

cloudkitty-api talks to its processors over oslo.messaging only (CLOUDKITTY-
DROPIN.md §4). In ``[cloudkitty_proc] mode = cloudkitty`` each worker serves
CloudKitty's target instead of ours (``messaging.py``): exchange
``cloudkitty`` (``[DEFAULT] control_exchange`` when the operator set it),
``Target(topic='cloudkitty', server=<[DEFAULT] host>, version='1.0')``, with
the messages the API sends, argument shapes as the API sends them:

``reset_state(res_data)`` (no namespace; a cast from ``PUT /v2/scope``)
    ``res_data = {"scopes": [{"scope_id", "scope_key", "fetcher",
    "collector"}, ...], "last_processed_timestamp": "<ISO 8601>"}``. See
    ``ScopeEndpoint.reset_state`` for how it differs from CloudKitty's.
``quote(res_data)`` (namespace ``rating``; a call from ``POST
/v1/rating/quote``) → the price, a decimal string
    ``res_data = {"usage": {"<service>": [{"desc": {...}, "vol": {"qty":
    "2", "unit": "undef"}}, ...]}}``.
``reload_modules()``, ``reload_module(name)``, ``enable_module(name)``,
``disable_module(name)`` (namespace ``rating``, fanout casts)
    "the rules changed": the worker re-reads them at its next safe point.
    The ``rating`` endpoint is at version 1.1, so it also takes the v1
    API's ``reload_modules`` (sent at 1.1, which CloudKitty's own 1.0
    server refuses with UnsupportedVersion).

A malformed message (missing or unknown keys, wrong types, a bad timestamp,
an unknown scope) gets an error reply when it is a call and one log line
when it is a cast; nothing a message carries stops the server or the
worker. Threads: as in ``messaging.py`` (handlers on oslo.messaging's
pool threads, objects of their own, the worker reached only through the
wake and reload callbacks).
"""

from __future__ import annotations

import contextlib
import decimal
import importlib
import importlib.util
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import oslo_messaging
from oslo_config import cfg

from cloudkitty_proc import control, leases, messaging, plugins, utils
from cloudkitty_proc.dropin.rpc_messages import (native_quote, parse_quote_request,
                                                 parse_reset_request)
from cloudkitty_proc.exceptions import ConfigError, InvalidRequestError
from cloudkitty_proc.log import mask_url

LOG = logging.getLogger(__name__)

#: CloudKitty's control exchange (``messaging.set_transport_defaults``) and topic
EXCHANGE = "cloudkitty"
#: oslo.messaging's default control_exchange
OSLO_DEFAULT_EXCHANGE = "openstack"
TOPIC = "cloudkitty"
#: the server's version, and the ``rating`` endpoint's (1.1 takes 1.0 too)
VERSION = "1.0"
RATING_VERSION = "1.1"
#: how long reset_state waits for a scope's lock (a worker rating the scope
#: holds it for at most [orchestrator] max_periods_per_lock periods)
RESET_LOCK_TIMEOUT = 300.0
#: the module CloudKitty-database rules come from, when it is installed
RULES_MODULE = "cloudkitty_proc.dropin.rules"

#: ``quote_fn(conf, res_data) -> Decimal``: prices CloudKitty's quote res_data
QuoteFn = Callable[[cfg.ConfigOpts, Any], decimal.Decimal]

_expected = oslo_messaging.expected_exceptions(InvalidRequestError,
                                               messaging.RemoteRequestError)


def control_exchange(conf: cfg.ConfigOpts) -> str:
    """``[DEFAULT] control_exchange`` when the operator set it (a file, the
    command line, the environment), else ``cloudkitty``, as CloudKitty does
    by changing that option's default. A value other than oslo.messaging's
    default counts as set too: oslo.config's ``get_location`` keeps
    answering ``set_override`` after ``clear_override``."""
    messaging.register_opts(conf)
    value = conf.control_exchange
    location = conf.get_location("control_exchange")
    if location is not None and location.location in (
            cfg.Locations.user, cfg.Locations.command_line, cfg.Locations.environment):
        return value
    return value if value != OSLO_DEFAULT_EXCHANGE else EXCHANGE


def _rules_module() -> Any:
    """``RULES_MODULE`` when installed, else None (found by name: this
    module does not depend on it)."""
    if importlib.util.find_spec(RULES_MODULE) is None:
        return None
    return importlib.import_module(RULES_MODULE)


def default_quote_fn() -> QuoteFn:
    """The rules module's ``quote(conf, res_data)``, else ``native_quote``."""
    fn = getattr(_rules_module(), "quote", None)
    if fn is None:
        LOG.warning("quotes use [rating] processors: %s is not installed", RULES_MODULE)
        return native_quote
    return fn


# -- endpoints -------------------------------------------------------------

class ScopeLocks:
    """CloudKitty's scope locks (``leases.lock_name_for``), on a tooz
    coordinator of this endpoint's own (started at first use): held while a
    scope is reset, as CloudKitty's ScopeEndpoint does, so a CloudKitty
    processor still running during a rolling switch is not rating the
    scope meanwhile. Our own workers are fenced by the state anyway."""

    def __init__(self, conf: cfg.ConfigOpts, member_id: str,
                 timeout: float = RESET_LOCK_TIMEOUT) -> None:
        self.conf = conf
        self.member_id = member_id
        self.timeout = timeout
        self._coordinator = None

    @contextlib.contextmanager
    def hold(self, scope_id: str) -> Iterator[bool]:
        """Yield whether the lock was acquired within ``timeout``."""
        if self._coordinator is None:
            self._coordinator = leases.start_coordinator(self.conf, self.member_id)
        lock = self._coordinator.get_lock(leases.lock_name_for(self.conf, scope_id))
        acquired = lock.acquire(blocking=self.timeout)
        try:
            yield acquired
        finally:
            if acquired:
                try:
                    lock.release()
                except Exception as exc:  # noqa: BLE001 - the lease lapsed: nothing to free
                    LOG.warning("scope %s: releasing its lock failed: %s", scope_id,
                                mask_url(exc))

    def close(self) -> None:
        coordinator, self._coordinator = self._coordinator, None
        if coordinator is not None:
            with contextlib.suppress(Exception):
                coordinator.stop()


class _KnownScopes:
    """A fetcher answering one listing (read once per message)."""

    def __init__(self, scopes: list[str]) -> None:
        self.scopes = scopes

    def get_scopes(self) -> list[str]:
        return self.scopes


class ScopeEndpoint:
    """``reset_state``, CloudKitty's no-namespace endpoint (version 1.0)."""

    target = oslo_messaging.Target(version=VERSION)

    def __init__(self, conf: cfg.ConfigOpts, worker_name: str, *,
                 wake: Callable[[], None],
                 storage_factory: Callable[[cfg.ConfigOpts], Any] = plugins.load_storage,
                 fetcher_factory: Callable[[cfg.ConfigOpts], Any] = plugins.load_fetcher,
                 locks: Any = None) -> None:
        self.conf = conf
        self.worker_name = worker_name
        self._wake = wake
        self._storage_factory = storage_factory
        self._fetcher_factory = fetcher_factory
        self.locks = locks if locks is not None else ScopeLocks(conf, f"{worker_name}-rpc")
        self._lock = threading.Lock()
        # own objects, made at first use: a database down at start costs
        # one failed reset, not the server
        self.storage = None
        self.fetcher = None

    def close(self) -> None:
        for obj in (self.fetcher, self.storage, self.locks):
            with contextlib.suppress(Exception):
                if obj is not None:
                    obj.close()

    def _foreign(self, scope: dict[str, Any]) -> str | None:
        """Why a scope row is not this processor's, or None. A row whose
        three columns are null is a legacy one: CloudKitty adopts it."""
        ours = {"scope_key": self.conf.collect.scope_key,
                "fetcher": self.conf.fetcher.backend,
                "collector": self.conf.collect.collector}
        if all(scope[k] is None for k in ours):
            return None
        diff = [f"{k} {scope[k]!r} (ours: {v!r})" for k, v in ours.items() if scope[k] != v]
        return ", ".join(diff) or None

    def reset_state(self, ctxt, **kwargs) -> None:
        """Make period T (``last_processed_timestamp``) the next one rated
        for every scope of the message: its rated data from T on deleted,
        its state set to T - period (``storage.reset_state`` through
        ``control.reset_state``, as the native reset-state).

        Differences from CloudKitty 25's: CloudKitty deletes from T and
        sets the state to T, so period T is left empty (it resumes at T +
        period); here T is rated again, and ``GET /v2/scope`` shows T -
        period afterwards. T must be period-aligned; a T after the next
        period to rate is refused (it would skip periods), as are scopes
        the fetcher does not list and rows of another scope_key, fetcher or
        collector. Each refusal is logged (a cast has no reply); the other
        scopes of the message are reset."""
        method = "reset_state"
        try:
            control.check_arguments(method, kwargs, ("res_data",))
            scopes, raw_time = parse_reset_request(kwargs["res_data"])
            when = control.parse_time(raw_time, "last_processed_timestamp")
            period = self.conf.collect.period
            if not utils.is_aligned(when, period):
                raise InvalidRequestError(f"last_processed_timestamp {utils.isoformat(when)} "
                                          f"is not aligned to [collect] period ({period} s)")
        except InvalidRequestError as exc:
            LOG.warning("worker %s: reset_state ignored: %s", self.worker_name, exc)
            return
        with self._lock:
            done, refused = self._reset(scopes, when)
        if done:
            LOG.info("worker %s: reset_state: %s rated again from %s", self.worker_name,
                     ", ".join(done), utils.isoformat(when))
            self._wake()
        if refused:
            LOG.warning("worker %s: reset_state to %s not done for: %s", self.worker_name,
                        utils.isoformat(when), "; ".join(refused))

    def _reset(self, scopes: list[dict[str, Any]], when: Any) -> tuple[list[str], list[str]]:
        done: list[str] = []
        refused: list[str] = []
        try:
            if self.storage is None:
                self.storage = self._storage_factory(self.conf)
            if self.fetcher is None:
                self.fetcher = self._fetcher_factory(self.conf)
            known = _KnownScopes(control.known_scopes(self.fetcher))
        except Exception as exc:  # noqa: BLE001 - the message is lost; say why
            return [], [f"every scope ({mask_url(exc)})"]
        for scope in scopes:
            sid = scope["scope_id"]
            foreign = self._foreign(scope)
            if foreign:
                refused.append(f"{sid}: not this processor's scope row: {foreign}")
                continue
            try:
                with self.locks.hold(sid) as acquired:
                    if not acquired:
                        refused.append(f"{sid}: its lock stayed busy for "
                                       f"{RESET_LOCK_TIMEOUT:g} s; send the reset again")
                        continue
                    control.reset_state(self.conf, self.storage, known, [sid], when)
            except InvalidRequestError as exc:  # its message names the scope
                refused.append(mask_url(exc))
            except Exception as exc:  # noqa: BLE001 - one scope's failure is not the others'
                refused.append(f"{sid}: {type(exc).__name__}: {mask_url(exc)}")
            else:
                done.append(sid)
        return done, refused


class RatingEndpoint:
    """CloudKitty's ``rating`` endpoint: quotes and module notifications."""

    target = oslo_messaging.Target(namespace="rating", version=RATING_VERSION)

    def __init__(self, conf: cfg.ConfigOpts, worker_name: str, *,
                 quote_fn: QuoteFn, on_reload: Callable[[], None]) -> None:
        self.conf = conf
        self.worker_name = worker_name
        self._quote_fn = quote_fn
        self._on_reload = on_reload
        self._lock = threading.Lock()

    @_expected
    def quote(self, ctxt, **kwargs) -> str:
        """The price of ``res_data`` with the rules in force: ``str()`` of
        the Decimal, as CloudKitty's (the API passes the string through
        as the JSON answer)."""
        try:
            control.check_arguments("quote", kwargs, ("res_data",))
            resources = parse_quote_request(kwargs["res_data"])
        except InvalidRequestError as exc:
            LOG.info("worker %s: quote refused: %s", self.worker_name, exc)
            raise
        if not resources:
            return "0"
        try:
            with self._lock:
                total = self._quote_fn(self.conf, kwargs["res_data"])
            if not isinstance(total, decimal.Decimal):
                total = decimal.Decimal(str(total))
        except (InvalidRequestError, ConfigError, ValueError) as exc:
            LOG.info("worker %s: quote refused: %s", self.worker_name, mask_url(exc))
            raise InvalidRequestError(f"quote: {mask_url(exc)}") from None
        except Exception as exc:
            LOG.error("worker %s: quote failed: %s: %s", self.worker_name,
                      type(exc).__name__, mask_url(exc))
            raise messaging.RemoteRequestError(
                f"quote failed: {type(exc).__name__}: {mask_url(exc)}") from None
        return str(total)

    def reload_modules(self, ctxt, **kwargs) -> None:
        self._notified("reload_modules", kwargs, ())

    def reload_module(self, ctxt, **kwargs) -> None:
        self._notified("reload_module", kwargs, ("name",))

    def enable_module(self, ctxt, **kwargs) -> None:
        self._notified("enable_module", kwargs, ("name",))

    def disable_module(self, ctxt, **kwargs) -> None:
        self._notified("disable_module", kwargs, ("name",))

    def _notified(self, method: str, kwargs: dict[str, Any], required: tuple[str, ...]) -> None:
        """A module notification (a cast): the rules are re-read; CloudKitty
        reads the module state from its database, so the name only goes to
        the log. A malformed one is logged and ignored."""
        try:
            control.check_arguments(method, kwargs, required)
            name = kwargs.get("name")
            if required and (not isinstance(name, str) or not name.strip()):
                raise InvalidRequestError(f"{method}: name: expected a module name, "
                                          f"got {name!r}")
        except InvalidRequestError as exc:
            LOG.warning("worker %s: %s ignored: %s", self.worker_name, method, exc)
            return
        LOG.info("worker %s: %s%s: the rating rules will be re-read", self.worker_name,
                 method, f" {name}" if required else "")
        try:
            self._on_reload()
        except Exception as exc:  # noqa: BLE001
            LOG.error("worker %s: %s: reload failed: %s", self.worker_name, method,
                      mask_url(exc))


# -- the server ------------------------------------------------------------

class CloudKittyRPCServer(messaging.RPCServer):
    """``messaging.RPCServer`` on CloudKitty's target and endpoints."""

    def __init__(self, conf: cfg.ConfigOpts, scope: ScopeEndpoint,
                 rating: RatingEndpoint) -> None:
        super().__init__(conf, conf.host, scope)
        self.scope = scope
        self.rating = rating

    def target(self) -> oslo_messaging.Target:
        return oslo_messaging.Target(exchange=control_exchange(self.conf), topic=TOPIC,
                                     server=self.conf.host, version=VERSION)

    def endpoints(self) -> list[Any]:
        return [self.rating, self.scope]


def _reload_hook(request_reload: Callable[[], None]) -> Callable[[], None]:
    """The worker's reload (its rating chain rebuilt at the next period),
    and the rules module's ``invalidate_quote_chain()``: the rules cached for
    quotes are dropped at once."""
    def reload() -> None:
        invalidate = getattr(_rules_module(), "invalidate_quote_chain", None)
        if invalidate is not None:
            invalidate()
        request_reload()
    return reload


def start_server(conf: cfg.ConfigOpts, worker_name: str, *, wake: Callable[[], None],
                 request_reload: Callable[[], None], quote_fn: QuoteFn | None = None,
                 **scope_options: Any) -> CloudKittyRPCServer | None:
    """The worker's server on CloudKitty's target, started (connecting
    happens on a thread); None when ``[DEFAULT] transport_url`` is unset.
    ``scope_options``: ScopeEndpoint's factories and locks (tests)."""
    if messaging.transport_url(conf) is None:
        LOG.warning("worker %s: [DEFAULT] transport_url is not set: cloudkitty-api's "
                    "PUT /v2/scope and quotes cannot reach this processor", worker_name)
        return None
    scope = ScopeEndpoint(conf, worker_name, wake=wake, **scope_options)
    rating = RatingEndpoint(conf, worker_name, quote_fn=quote_fn or default_quote_fn(),
                            on_reload=_reload_hook(request_reload))
    server = CloudKittyRPCServer(conf, scope, rating)
    server.start()
    return server
