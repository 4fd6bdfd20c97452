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
authenticates; ``keystone`` (CloudKitty's default, :func:`keystone_auth`):
a keystoneauth1 session loaded from the group (``auth_section`` or the
group's own ``auth_type``, ``auth_url``, credentials...:
cloudkitty_proc/keystone_auth.py), each request carrying its token as
``X-Auth-Token``, the token fetched again after a 401 from Gnocchi, Gnocchi's
URL taken from the token's catalog (service type ``metric``, ``interface``,
``region_name``) at the first request, or ``gnocchi_endpoint`` when set (an
override CloudKitty does not have). Keystone's failures become GnocchiErrors
(one line, credentials masked); green callers get the keystoneauth1 calls
run through ``eventlet.tpool`` (KeystoneSession(green=True)).
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
            help="Gnocchi auth type: keystone (a Keystone token from the "
            "credentials of auth_section, or of auth_type and its options in this "
            "group; Gnocchi's URL from the catalog), basic (gnocchi_user, no "
            "password, to gnocchi_endpoint) or noauth (no credentials sent to "
            "gnocchi_endpoint; not in CloudKitty).",
        ),
        cfg.StrOpt("gnocchi_user", default="",
                   help="Gnocchi user (for basic auth only)."),
        cfg.StrOpt("gnocchi_endpoint", default="",
                   help="Gnocchi endpoint, e.g. http://gnocchi:8041 (required for "
                   "basic and noauth; with keystone, overrides the catalog's)."),
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

    ``endpoint``: the API's base URL (``/v1/...`` is appended), or "" when
    ``resolve()`` finds it at the first request (a catalog lookup: no I/O
    at start-up); ``headers()``: the headers of each request (called per
    request: a token may be renewed); ``invalidate``: called after a 401,
    before the request is sent once more (None: a 401 is an error at once);
    ``resolve``, ``headers`` raise GnocchiError. ``label``: what to call
    Gnocchi in messages while its URL is unknown; ``close``: releases the
    auth's own connections."""

    endpoint: str
    headers: Callable[[], Mapping[str, str]] = dict
    invalidate: Callable[[], None] | None = None
    resolve: Callable[[], str] | None = None
    label: str = ""
    close: Callable[[], None] | None = None


def auth_from_conf(conf: cfg.ConfigOpts, group: str, *, green: bool = False) -> GnocchiAuth:
    """The :class:`GnocchiAuth` of the options of ``[group]``. ConfigError
    naming the option when they cannot work. ``green``: the caller runs on
    a GreenPool (keystone's blocking calls then go through tpool)."""
    opts = conf[group]
    kind = opts.gnocchi_auth_type
    if kind == "keystone":
        return keystone_auth(conf, group, green=green)
    endpoint = (opts.gnocchi_endpoint or "").strip()
    if not endpoint:
        raise ConfigError(f"[{group}] gnocchi_endpoint is not set (required with "
                          f"gnocchi_auth_type = {kind})")
    if kind == "basic":
        header = {"Authorization": http.basic_auth(opts.gnocchi_user or "", "")}
        return GnocchiAuth(endpoint, lambda: header)
    return GnocchiAuth(endpoint)


def keystone_auth(conf: cfg.ConfigOpts, group: str, *, green: bool) -> GnocchiAuth:
    """``gnocchi_auth_type = keystone``: a keystoneauth1 session from the
    group's options (ConfigError naming the group when they are incomplete;
    no network I/O here), its token in ``X-Auth-Token``, Gnocchi's URL from
    ``gnocchi_endpoint`` or else the catalog (service type ``metric``)."""
    from keystoneauth1 import exceptions as ksa_exc

    from cloudkitty_proc import keystone_auth as ks_auth

    opts = conf[group]
    ks = ks_auth.KeystoneSession(conf, group, green=green)
    where = f"Keystone ({ks.where} auth_type = {ks.auth_type})"
    interface, region = opts.interface, opts.region_name

    def error(exc: Exception, doing: str) -> GnocchiError:
        if isinstance(exc, ksa_exc.ConnectTimeout):
            kind, retryable = "timeout", True
        elif isinstance(exc, ksa_exc.ConnectionError):
            kind, retryable = "connection", True
        else:
            status = getattr(exc, "http_status", None) or 0
            kind, retryable = "http", status >= 500 or status in (408, 429)
        return GnocchiError(f"{where}: {doing}: {ks.describe(exc)}", kind, retryable=retryable)

    def headers() -> Mapping[str, str]:
        try:
            return ks.auth_headers()
        except ksa_exc.ClientException as exc:
            raise error(exc, "no token") from None

    def resolve() -> str:
        try:
            return ks.endpoint(service_type="metric", interface=interface, region_name=region)
        except ksa_exc.ClientException as exc:
            raise error(exc, f"no Gnocchi (metric) endpoint of interface {interface} in "
                        f"region {region}") from None

    endpoint = (opts.gnocchi_endpoint or "").strip()
    return GnocchiAuth(endpoint, headers, ks.invalidate,
                       resolve=None if endpoint else resolve,
                       label=f"Gnocchi (the {interface} metric endpoint of region {region} "
                       "in the Keystone catalog)", close=ks.close)


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
                 size: int, cafile: str | None, insecure: bool,
                 compress: bool = True) -> None:
        self.auth = auth
        self.timeout = timeout or DEFAULT_TIMEOUT
        self._group = group
        self._transport_args = dict(green=green, timeout=self.timeout, size=size,
                                    cafile=cafile, insecure=insecure, compress=compress,
                                    headers={"Content-Type": "application/json"})
        self._http: http.Transport | None = None
        if auth.endpoint or auth.resolve is None:
            self._http = self._transport(auth.endpoint, f"[{group}] gnocchi_endpoint")

    def _transport(self, url: str, option: str) -> http.Transport:
        return http.Transport(url, option=option, **self._transport_args)

    @property
    def safe_url(self) -> str:
        """Gnocchi's URL without credentials (for messages)."""
        return self._http.safe_url if self._http is not None else self.auth.label or "Gnocchi"

    def transport(self) -> http.Transport:
        """The transport to Gnocchi, built at the first call when the URL
        comes from ``auth.resolve`` (GnocchiError if it cannot be found)."""
        if self._http is None:
            url = self.auth.resolve()
            try:
                transport = self._transport(url, f"[{self._group}] the catalog's Gnocchi "
                                            "endpoint")
            except ValueError as exc:
                raise GnocchiError(str(exc), "http", retryable=False) from None
            if self._http is None:   # another green thread may have been first
                self._http = transport
                LOG.info("[%s] Gnocchi at %s (from the Keystone catalog)", self._group,
                         transport.safe_url)
            else:
                transport.close()
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        if self.auth.close is not None:
            self.auth.close()

    def target(self, path: str, params: Mapping[str, Any] | None) -> str:
        """The request target of ``path`` and ``params`` (lists repeat the
        key; encoded as gnocchiclient does)."""
        query = urllib.parse.urlencode(params, doseq=True, quote_via=urllib.parse.quote) \
            if params else None
        return self.transport().target(path, query)

    def request(self, method: str, path: str, params: Mapping[str, Any] | None = None,
                body: Any = None, *, hooks: tuple[Callable[[], None], Callable[[], None]]
                | None = None) -> tuple[Any, Any]:
        """``method path`` with a JSON ``body``; (decoded JSON reply, reply
        headers). Raises GnocchiError. ``hooks``: (begin, done) called around
        each exchange (the collect executor's io hooks)."""
        target = self.target(path, params)   # the URL first: ``where`` names it
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
            return self.transport().request(method, target=target, body=data,
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
