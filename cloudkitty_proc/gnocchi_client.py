"""Gnocchi's REST API as the gnocchi collector and fetcher use it.

What both plugins share:

* their options (:func:`common_opts`): CloudKitty's ``[collector_gnocchi]``
  and ``[fetcher_gnocchi]`` ones, under the same names (``gnocchi_auth_type``,
  ``gnocchi_user``, ``gnocchi_endpoint``, ``interface``, ``region_name``,
  ``http_pool_maxsize``, keystoneauth's ``auth_type`` / ``auth_section`` and
  session options ``cafile``, ``insecure``, ``timeout``...), so a
  ``cloudkitty.conf`` section is carried over unchanged;
* the authentication seam, :func:`auth_from_conf`: conf + group -> a
  :class:`GnocchiAuth` (base URL and the headers of each request);
* :class:`GnocchiClient`: JSON requests through the one HTTP transport
  (:mod:`cloudkitty_proc.http`, green or not), every failure a
  :class:`GnocchiError` with a CollectError kind and whether a retry may
  help, and :func:`with_retries` (exponential backoff, as the Prometheus
  collector retries).

Authentication (``gnocchi_auth_type``): ``basic`` sends CloudKitty's
``Authorization: basic base64(<gnocchi_user>:)`` (Gnocchi's ``basic``
auth mode: the user name, no password) to ``gnocchi_endpoint``; ``noauth``
(not in CloudKitty) sends no credentials, for a Gnocchi behind a proxy that
authenticates; ``keystone`` (CloudKitty's default: a keystoneauth session
from ``auth_section``, the endpoint from the catalog by ``interface`` and
``region_name``) is plugged into :func:`auth_from_conf` by the Keystone
work; until then it is refused with a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import tenacity
from oslo_config import cfg

from cloudkitty_proc import http
from cloudkitty_proc.exceptions import ConfigError

LOG = logging.getLogger(__name__)

AUTH_TYPES = ("keystone", "basic", "noauth")
#: seconds of one request when keystoneauth's ``timeout`` is not set
#: (CloudKitty waits forever then)
DEFAULT_TIMEOUT = 60.0
#: the most characters of a server's text kept in a message
TEXT_LIMIT = 300


def _keystone_opts() -> list[cfg.Opt]:
    """keystoneauth's ``auth_type``/``auth_section`` and session options,
    its own definitions (registering them again through
    ``keystoneauth1.loading``, as the keystone support will, is harmless)."""
    from keystoneauth1 import loading

    return [*loading.get_auth_common_conf_options(), *loading.get_session_conf_options()]


def common_opts() -> list[cfg.Opt]:
    """The options CloudKitty's ``[collector_gnocchi]`` and
    ``[fetcher_gnocchi]`` have in common (fresh objects per call)."""
    return [
        cfg.StrOpt(
            "gnocchi_auth_type",
            default="keystone",
            choices=AUTH_TYPES,
            help="Gnocchi auth type: keystone (credentials through auth_section; "
            "plugged in with the Keystone support), basic (gnocchi_user, no "
            "password, to gnocchi_endpoint) or noauth (no credentials sent to "
            "gnocchi_endpoint; not in CloudKitty).",
        ),
        cfg.StrOpt("gnocchi_user", default="",
                   help="Gnocchi user (for basic auth only)."),
        cfg.StrOpt("gnocchi_endpoint", default="",
                   help="Gnocchi endpoint, e.g. http://gnocchi:8041 (for basic and "
                   "noauth)."),
        cfg.StrOpt("interface", default="internalURL",
                   help="Endpoint URL type (for keystone auth only)."),
        cfg.StrOpt("region_name", default="RegionOne", help="Region Name."),
        cfg.IntOpt("http_pool_maxsize", default=10, min=1,
                   help="Keep-alive connections kept to Gnocchi (at least "
                   "[orchestrator] max_threads for the collector)."),
        *_keystone_opts(),
    ]


# -- authentication ------------------------------------------------------------

@dataclasses.dataclass
class GnocchiAuth:
    """Where Gnocchi is and how to authenticate to it.

    ``endpoint``: the API's base URL (``/v1/...`` is appended);
    ``headers()``: the headers of each request (called per request: a token
    may be renewed); ``invalidate``: called after a 401, before the request
    is sent once more (None: a 401 is an error at once)."""

    endpoint: str
    headers: Callable[[], Mapping[str, str]] = dict
    invalidate: Callable[[], None] | None = None


def auth_from_conf(conf: cfg.ConfigOpts, group: str) -> GnocchiAuth:
    """The :class:`GnocchiAuth` of the options of ``[group]``. ConfigError
    naming the option when they cannot work."""
    opts = conf[group]
    kind = opts.gnocchi_auth_type
    if kind == "keystone":
        # The seam for keystoneauth sessions: a GnocchiAuth whose endpoint
        # comes from the catalog (interface, region_name) and whose headers()
        # return a valid X-Auth-Token.
        raise ConfigError(f"[{group}] gnocchi_auth_type = keystone is not supported yet: "
                          "set it to basic (with gnocchi_user and gnocchi_endpoint) or noauth")
    endpoint = (opts.gnocchi_endpoint or "").strip()
    if not endpoint:
        raise ConfigError(f"[{group}] gnocchi_endpoint is not set (required with "
                          f"gnocchi_auth_type = {kind})")
    if kind == "basic":
        header = {"Authorization": http.basic_auth(opts.gnocchi_user or "", "")}
        return GnocchiAuth(endpoint, lambda: header)
    return GnocchiAuth(endpoint)


# -- requests ------------------------------------------------------------------

class GnocchiError(Exception):
    """A request that got no usable answer. ``kind`` (a CollectError kind),
    ``retryable``, and for an HTTP error ``status`` and ``description``
    (Gnocchi's error description: a string or a JSON object)."""

    def __init__(self, message: str, kind: str, *, retryable: bool, status: int | None = None,
                 description: Any = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.retryable = retryable
        self.status = status
        self.description = description
        self.retry_after = retry_after


class GnocchiClient:
    """JSON requests to one Gnocchi (safe to share between green threads or
    threads, as its transport is)."""

    def __init__(self, auth: GnocchiAuth, *, group: str, green: bool, timeout: float | None,
                 size: int, cafile: str | None, insecure: bool) -> None:
        self.auth = auth
        self.timeout = timeout or DEFAULT_TIMEOUT
        self._http = http.Transport(auth.endpoint, option=f"[{group}] gnocchi_endpoint",
                                    green=green, timeout=self.timeout, size=size,
                                    cafile=cafile, insecure=insecure,
                                    headers={"Content-Type": "application/json"})
        self.safe_url = self._http.safe_url

    def close(self) -> None:
        self._http.close()

    def target(self, path: str, params: Mapping[str, Any] | None) -> str:
        """The request target of ``path`` and ``params`` (lists repeat the
        key; encoded as gnocchiclient does)."""
        query = urllib.parse.urlencode(params, doseq=True, quote_via=urllib.parse.quote) \
            if params else None
        return self._http.target(path, query)

    def request(self, method: str, path: str, params: Mapping[str, Any] | None = None,
                body: Any = None, *, hooks: tuple[Callable[[], None], Callable[[], None]]
                | None = None) -> tuple[Any, Any]:
        """``method path`` with a JSON ``body``; (decoded JSON reply, reply
        headers). Raises GnocchiError. ``hooks``: (begin, done) called around
        each exchange (the collect executor's io hooks)."""
        target = self.target(path, params)
        where = f"{method} {self.safe_url}{path}"
        data = orjson.dumps(body) if body is not None else None
        for attempt in (1, 2):
            reply = self._exchange(method, target, data, where, hooks)
            if reply.status == 401 and attempt == 1 and self.auth.invalidate is not None:
                self.auth.invalidate()
                continue
            break
        status = reply.status
        if status >= 400:
            description = _description(reply.body)
            text = _text(description if isinstance(description, str)
                         else orjson.dumps(description).decode())
            raise GnocchiError(f"{where}: HTTP {status} {reply.reason}: {text}", "http",
                               retryable=status >= 500 or status == 429, status=status,
                               description=description, retry_after=reply.retry_after)
        try:
            return orjson.loads(reply.body) if reply.body else None, reply.headers
        except ValueError:   # orjson.JSONDecodeError is one
            raise GnocchiError(f"{where}: reply is not JSON: {_text(_decode(reply.body), 200)}",
                               "malformed", retryable=True) from None

    def _exchange(self, method: str, target: str, data: bytes | None, where: str,
                  hooks: Any) -> http.Reply:
        if hooks:
            hooks[0]()
        try:
            # a POST to /v1/aggregates or /v1/search is a read: safe to send
            # again on a fresh connection when a kept-alive one was closed
            return self._http.request(method, target=target, body=data,
                                      headers=self.auth.headers(), idempotent=True)
        except http.TooManyRedirects as exc:
            raise GnocchiError(f"{where}: {exc.message}", exc.kind, retryable=False) from None
        except http.TransportError as exc:
            raise GnocchiError(f"{where}: {exc.message}", exc.kind, retryable=True) from None
        finally:
            if hooks:
                hooks[1]()


def has_next_page(headers: Any) -> bool:
    """True when Gnocchi's reply says more items follow (a ``Link`` header
    with ``rel="next"``, sent when the page is full)."""
    link = headers.get("Link") if headers is not None else None
    return bool(link) and 'rel="next"' in link


def with_retries(fn: Callable[[], Any], *, retries: int, max_backoff: float,
                 sleep: Callable[[float], None], context: str) -> Any:
    """``fn()``, called again on a retryable GnocchiError at most ``retries``
    times with exponential backoff (at least the reply's Retry-After, at most
    ``max_backoff`` seconds); the last error gets " (after N attempts)"."""
    attempts = retries + 1
    try:
        return fn()   # the first attempt outside tenacity: nearly all succeed
    except GnocchiError as exc:
        if attempts == 1 or not exc.retryable:
            raise
        first = [exc]

    def attempt() -> Any:
        if first:
            raise first.pop()
        return fn()

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        LOG.warning("%s: %s; retry %d/%d in %.1f s", context, exc, state.attempt_number,
                    retries, state.next_action.sleep if state.next_action else 0)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=http.backoff(max_backoff),
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, GnocchiError)
                                          and e.retryable),
        sleep=sleep, before_sleep=before_sleep, reraise=True)
    try:
        return retrying(attempt)
    except GnocchiError as exc:
        if exc.retryable:
            exc.message += f" (after {attempts} attempts)"
        raise


def _decode(body: bytes) -> str:
    return body.decode("utf-8", "replace").strip().replace("\n", " ") or "(empty body)"


def _description(body: bytes) -> Any:
    """Gnocchi's error ``description`` (a string or an object), else the
    body's text."""
    try:
        data = orjson.loads(body)
    except ValueError:
        return _decode(body)
    if isinstance(data, dict) and "description" in data:
        return data["description"]
    return data


def _text(text: str, limit: int = TEXT_LIMIT) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"
