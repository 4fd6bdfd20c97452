"""The AMQP control plane: oslo.messaging RPC endpoints, server and client.

CONTRACTS §6: topic ``cloudkitty_proc`` (``[DEFAULT] rpc_topic``), version
``1.0``; when ``[DEFAULT]
transport_url`` is set every Orchestrator worker is a server named
``<host>-<worker_id>``. Methods (keyword arguments, JSON values):

``reprocess(scope_ids, begin, end, reason[, request_id])`` → task ids
    ``scope_ids``: a list or ``"ALL"``; replies once the tasks are committed.
``reset_state(scope_ids, to)`` → the scope ids, once the resets are committed.
``reload_rules()`` → None; sent as a fanout cast: every worker re-reads its
    configuration, rules and metrics at its next safe point.
``quote(usage)`` → the price, a decimal string.
``status()`` → a dict: the worker, its pid and the active tasks.

Every argument is validated (``cloudkitty_proc.control``); a refused request
raises InvalidRequestError, which the caller receives as a RemoteError whose
value names the problem. Nothing a request carries can stop a worker.

Threads (DESIGN.md): oslo.messaging picks its threading executor (no
executor is passed), so the endpoint methods run on pool threads while the
worker rates on its own thread. The endpoint therefore owns its storage,
fetcher and rating chain, serialises its requests with one lock, and
reaches the worker only through events (wake, reload).

Options: oslo.messaging's own ``[DEFAULT]`` options (``transport_url``,
``rpc_response_timeout``, ``control_exchange``, ...) are registered on the
global ``cfg.CONF`` (a private ConfigOpts breaks oslo.messaging 18.3), with
``transport_url`` defaulting to unset: no AMQP.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import oslo_messaging
import oslo_messaging.opts
from oslo_config import cfg

from cloudkitty_proc import control, plugins
from cloudkitty_proc.exceptions import (CloudKittyProcError, ConfigError,
                                        InvalidRequestError)
from cloudkitty_proc.log import mask_url
from cloudkitty_proc.storage.base import ACTIVE_TASK_STATES

LOG = logging.getLogger(__name__)

#: the default of [DEFAULT] rpc_topic
TOPIC = "cloudkitty_proc"
VERSION = "1.0"
#: how long a worker waits for its RPC server to stop
STOP_TIMEOUT = 10.0


class NoServerError(CloudKittyProcError):
    """No worker answered a call in time (or the broker is unreachable)."""


class RemoteRequestError(CloudKittyProcError):
    """A worker refused a request or failed running it; the message is the
    worker's."""


#: refusals are replies, not server errors: logged by us at INFO, not as
#: oslo.messaging's "Exception during message handling" tracebacks
_expected = oslo_messaging.expected_exceptions(InvalidRequestError, RemoteRequestError)


_registered = False


def register_opts(conf: cfg.ConfigOpts = cfg.CONF) -> None:
    """Register oslo.messaging's [DEFAULT] options, transport_url unset by
    default (idempotent)."""
    global _registered
    if _registered:
        return
    for group, opts in oslo_messaging.opts.list_opts():
        if group is None:
            conf.register_opts(opts)
    conf.set_default("transport_url", None)
    _registered = True


def transport_url(conf: cfg.ConfigOpts = cfg.CONF) -> str | None:
    """The configured transport URL, None when unset (no AMQP)."""
    register_opts(conf)
    return conf.transport_url or None


# -- the server side ------------------------------------------------------

class ControlEndpoint:
    """The RPC methods of one worker (see the module docstring)."""

    def __init__(self, conf: cfg.ConfigOpts, worker_name: str, *,
                 wake: Callable[[], None], request_reload: Callable[[], None],
                 rules_generation: Callable[[], int]) -> None:
        self.target = oslo_messaging.Target(version=VERSION)
        self.conf = conf
        self.worker_name = worker_name
        self._wake = wake
        self._request_reload = request_reload
        self._rules_generation = rules_generation
        self._lock = threading.Lock()
        # own objects: never the worker's (see the module docstring)
        self.storage = plugins.load_storage(conf)
        self.fetcher = plugins.load_fetcher(conf)
        self._chain: list | None = None
        self._chain_generation: int | None = None

    def close(self) -> None:
        for obj in (self.fetcher, self.storage):
            try:
                obj.close()
            except Exception:  # noqa: S110
                pass

    def _run(self, method: str, fn: Callable[[], Any]) -> Any:
        with self._lock:
            try:
                return fn()
            except InvalidRequestError as exc:
                LOG.info("worker %s: %s refused: %s", self.worker_name, method,
                         mask_url(exc))
                raise InvalidRequestError(mask_url(exc)) from None
            except Exception as exc:
                LOG.error("worker %s: %s failed: %s", self.worker_name, method,
                          mask_url(exc))
                raise RemoteRequestError(f"{method} failed: {mask_url(exc)}") from None

    # oslo.messaging calls method(ctxt, **kwargs): every method takes
    # **kwargs and checks them itself, so a missing or unknown key is
    # named in the reply instead of a TypeError.

    @_expected
    def reprocess(self, ctxt, **kwargs):
        def run():
            control.check_arguments("reprocess", kwargs,
                                    ("scope_ids", "begin", "end", "reason"), ("request_id",))
            ids = control.reprocess(self.conf, self.storage, self.fetcher, kwargs["scope_ids"],
                                    kwargs["begin"], kwargs["end"], kwargs["reason"],
                                    kwargs.get("request_id"))
            LOG.info("worker %s: reprocess %s [%s, %s) (%s): tasks %s", self.worker_name,
                     kwargs["scope_ids"], kwargs["begin"], kwargs["end"], kwargs["reason"], ids)
            return ids
        ids = self._run("reprocess", run)
        self._wake()
        return ids

    @_expected
    def reset_state(self, ctxt, **kwargs):
        def run():
            control.check_arguments("reset_state", kwargs, ("scope_ids", "to"))
            scopes = control.reset_state(self.conf, self.storage, self.fetcher,
                                         kwargs["scope_ids"], kwargs["to"])
            LOG.info("worker %s: reset_state %s to %s", self.worker_name, scopes,
                     kwargs["to"])
            return scopes
        scopes = self._run("reset_state", run)
        self._wake()
        return scopes

    @_expected
    def reload_rules(self, ctxt, **kwargs):
        def run():
            control.check_arguments("reload_rules", kwargs, ())
            LOG.info("worker %s: reload_rules requested", self.worker_name)
        self._run("reload_rules", run)
        self._request_reload()

    @_expected
    def quote(self, ctxt, **kwargs):
        def run():
            control.check_arguments("quote", kwargs, ("usage",))
            return control.quote(self.conf, kwargs["usage"], self._current_chain())
        return self._run("quote", run)

    @_expected
    def status(self, ctxt, **kwargs):
        def run():
            control.check_arguments("status", kwargs, ())
            tasks = self.storage.list_tasks(states=ACTIVE_TASK_STATES)
            return {
                "worker": self.worker_name,
                "host": self.conf.host,
                "pid": os.getpid(),
                "topic": self.conf.rpc_topic,
                "rules_generation": self._rules_generation(),
                "tasks": [control.task_record(t) for t in tasks],
            }
        return self._run("status", run)

    def _current_chain(self) -> list:
        """The rating chain quotes use: loaded like the worker's, again
        after each reload of the worker (an invalid new one keeps the
        previous)."""
        generation = self._rules_generation()
        if self._chain is None or generation != self._chain_generation:
            try:
                chain = plugins.load_rating_chain(self.conf)
            except ConfigError as exc:
                if self._chain is None:
                    raise InvalidRequestError(f"no valid rating rules: {exc}") from None
                LOG.error("worker %s: quote keeps its rules: %s", self.worker_name, exc)
            else:
                self._chain = chain
            self._chain_generation = generation
        return self._chain


class RPCServer:
    """One worker's RPC server. ``start()`` returns at once: connecting to
    the broker happens on a thread (oslo.messaging retries for ever while
    the broker is down, and rating must not wait for it)."""

    def __init__(self, conf: cfg.ConfigOpts, server_name: str, endpoint: Any) -> None:
        self.conf = conf
        self.server_name = server_name
        self.endpoint = endpoint
        self._transport = None
        self._server = None
        self._starter: threading.Thread | None = None
        self._stopped = False
        self._stop_lock = threading.Lock()
        self._listening = threading.Event()

    def target(self) -> oslo_messaging.Target:
        """The target served: ours (a subclass serves another one)."""
        return oslo_messaging.Target(topic=self.conf.rpc_topic, server=self.server_name,
                                     version=VERSION)

    def endpoints(self) -> list[Any]:
        """The endpoint objects; those with a ``close()`` are closed at stop."""
        return [self.endpoint]

    def start(self) -> None:
        om = oslo_messaging
        self._transport = om.get_rpc_transport(self.conf)
        target = self.target()
        self._server = om.get_rpc_server(
            self._transport, target, self.endpoints(),
            access_policy=om.DefaultRPCAccessPolicy)
        where = f"topic {target.topic}" + (f" in exchange {target.exchange}"
                                           if target.exchange else "")

        def run() -> None:
            try:
                self._server.start()
            except Exception as exc:  # noqa: BLE001
                LOG.error("RPC server %s did not start: %s", self.server_name, mask_url(exc))
                return
            self._listening.set()
            LOG.info("RPC server %s listening on %s (%s)", self.server_name, where,
                     mask_url(self.conf.transport_url))

        self._starter = threading.Thread(target=run, daemon=True,
                                         name=f"rpc-start-{self.server_name}")
        self._starter.start()

    def wait_listening(self, timeout: float | None = None) -> bool:
        """Whether the server listens (its queues declared: a message sent
        from now on reaches it), waiting at most ``timeout`` s."""
        return self._listening.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop listening, let the requests in flight finish (at most
        ``timeout`` s), release the connections. Idempotent."""
        with self._stop_lock:
            if self._stopped or self._server is None:
                return
            self._stopped = True
            self._stop(timeout)

    def _stop(self, timeout: float) -> None:
        if self._starter is not None and self._starter.is_alive():
            LOG.warning("RPC server %s never connected to the broker; not waiting for it",
                        self.server_name)
            self._close_endpoints()
            return

        def run() -> None:
            try:
                self._server.stop()
                self._server.wait()
                self._transport.cleanup()
            except Exception as exc:  # noqa: BLE001
                LOG.warning("RPC server %s: stop failed: %s", self.server_name, mask_url(exc))

        stopper = threading.Thread(target=run, daemon=True, name=f"rpc-stop-{self.server_name}")
        stopper.start()
        stopper.join(timeout)
        self._close_endpoints()

    def _close_endpoints(self) -> None:
        for endpoint in self.endpoints():
            close = getattr(endpoint, "close", None)
            if close is not None:
                close()


def start_server(conf: cfg.ConfigOpts, worker_name: str, **hooks: Any) -> RPCServer | None:
    """The worker's RPC server, started; None when transport_url is unset."""
    if transport_url(conf) is None:
        return None
    endpoint = ControlEndpoint(conf, worker_name, **hooks)
    server = RPCServer(conf, worker_name, endpoint)
    server.start()
    return server


# -- the client side ------------------------------------------------------

def _broker_reachable(conf: cfg.ConfigOpts, url: str, timeout: float) -> str | None:
    """None if one broker host of ``url`` accepts a TCP connection, else why
    not (oslo.messaging itself would retry for ever)."""
    om = oslo_messaging
    try:
        parsed = om.TransportURL.parse(conf, url)
    except Exception as exc:  # noqa: BLE001
        return f"invalid transport_url: {mask_url(exc)}"
    errors = []
    for host in parsed.hosts:
        if not host.hostname:
            continue
        port = host.port or 5672
        try:
            with socket.create_connection((host.hostname, port), timeout=min(timeout, 5.0)):
                return None
        except OSError as exc:
            errors.append(f"{host.hostname}:{port}: {exc.strerror or exc}")
    return "; ".join(errors) if errors else None


def _no_server(conf: cfg.ConfigOpts, timeout: float, url: str,
               detail: str = "") -> NoServerError:
    return NoServerError(
        f"no cloudkitty-proc worker answered on topic {conf.rpc_topic} within {timeout:g} s "
        f"(is the daemon running? transport_url={mask_url(url)}){detail}")


def _in_thread(fn: Callable[[], Any], timeout: float) -> tuple[bool, Any, BaseException | None]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="rpc-client")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None, None
    return True, box.get("result"), box.get("error")


def call(conf: cfg.ConfigOpts, method: str, *, timeout: float | None = None,
         **kwargs: Any) -> Any:
    """Call ``method`` on one worker and return its reply.

    NoServerError when no worker answers within ``timeout`` (default
    ``[DEFAULT] rpc_response_timeout``) or the broker cannot be reached;
    RemoteRequestError with the worker's message when it refused."""
    url = transport_url(conf)
    if url is None:
        raise ConfigError("[DEFAULT] transport_url is not set: no AMQP")
    if timeout is None:
        timeout = float(conf.rpc_response_timeout)
    problem = _broker_reachable(conf, url, timeout)
    if problem is not None:
        raise _no_server(conf, timeout, url, f": cannot reach the message broker: {problem}")
    om = oslo_messaging
    transport = om.get_rpc_transport(conf)

    def run():
        client = om.get_rpc_client(transport, om.Target(topic=conf.rpc_topic,
                                                        version=VERSION),
                                   timeout=timeout, retry=3)
        return client.call({}, method, **kwargs)

    try:
        # the thread bounds what oslo.messaging's own timeout does not
        # (a broker that accepts TCP but never completes the handshake)
        finished, result, error = _in_thread(run, timeout + 5.0)
    finally:
        _in_thread(transport.cleanup, 5.0)
    if not finished or isinstance(error, om.MessagingTimeout):
        raise _no_server(conf, timeout, url)
    if isinstance(error, om.RemoteError):
        raise RemoteRequestError(mask_url(error.value or error.exc_type)) from None
    if isinstance(error, om.MessageDeliveryFailure):
        raise _no_server(conf, timeout, url, f": {mask_url(error)}") from None
    if error is not None:  # the broker refused us (credentials, vhost, TLS …)
        raise NoServerError(f"the message broker at {mask_url(url)} failed: "
                            f"{type(error).__name__}: {mask_url(error)}") from None
    return result


def fanout_cast(conf: cfg.ConfigOpts, method: str, *, timeout: float = 10.0,
                **kwargs: Any) -> None:
    """Cast ``method`` to every worker listening now (a fanout cast reaches
    no one when no worker runs: callers check with a ``status`` call)."""
    url = transport_url(conf)
    if url is None:
        raise ConfigError("[DEFAULT] transport_url is not set: no AMQP")
    om = oslo_messaging
    transport = om.get_rpc_transport(conf)

    def run():
        client = om.get_rpc_client(transport, om.Target(topic=conf.rpc_topic,
                                                        version=VERSION),
                                   retry=3)
        client.prepare(fanout=True).cast({}, method, **kwargs)

    try:
        finished, _result, error = _in_thread(run, timeout)
    finally:
        _in_thread(transport.cleanup, 5.0)
    if not finished:
        raise _no_server(conf, timeout, url, ": the fanout cast was not sent")
    if error is not None:
        raise NoServerError(f"fanout cast {method} failed: {mask_url(error)}") from None
