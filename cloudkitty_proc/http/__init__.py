"""The HTTP client of every plugin that talks HTTP (collectors, fetchers).

One :class:`Transport` per plugin and base URL::

    transport = http.Transport("https://prom:9090/prefix", option="[g] url",
                               green=True, timeout=60, user=..., password=...)
    reply = transport.request("GET", "/api/v1/query", params={"query": "up"})
    reply.status, reply.reason, reply.headers, reply.body   # body: bytes

Errors are :class:`TransportError` subclasses (:class:`Timeout`,
:class:`ConnectionFailed`, :class:`BadReply`, :class:`TooManyRedirects`),
whose ``message`` never names a URL or a credential: callers add what they
asked for and map each class to their own error kinds. Any HTTP status is a
reply, not an error.

urllib3 does the protocol work: its connection classes connect (TLS,
tunnels through proxies with CONNECT), write the requests, and the
standard library's ``http.client`` under them parses the replies. Around
them this module keeps its own list of idle keep-alive connections per
origin, and reads each reply itself, for what urllib3's pools do not give:

* a deadline: ``timeout`` bounds the whole exchange (connection, request,
  reply, redirects), not each read; a reply dripping a byte a second ends;
* a connection is reused only when its reply was read whole, asked to be
  kept, and nothing else came with it or since (a second, unsolicited
  reply is never taken for the next request's);
* a request that finds its idle connection closed by the server, or
  answered 408, is sent once more on a new connection;
* interim replies (1xx) are skipped, redirects (301, 302, 303, 307, 308,
  to another scheme or host too) followed, credentials kept only on the
  same host, ``gzip`` / ``deflate`` bodies (multi-member gzip included)
  decoded within :data:`MAX_BODY` bytes;
* proxies from the environment (``http_proxy``, ``https_proxy``,
  ``all_proxy``, ``no_proxy`` with host names, suffixes, IP addresses and
  CIDR ranges), CA bundles from ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE``,
  internationalised host names.

Green or not: ``green=True`` uses urllib3 imported through
``eventlet.import_patched`` (green sockets for it alone, no monkey
patching; eventlet is imported only then, never in the master process),
for the worker's GreenPool; ``green=False`` the plain urllib3, for real
threads.

Modules: this one (the transport and its replies), :mod:`.connection`
(urllib3 green or plain, connections with a deadline, bodies),
:mod:`.environ` (proxies, TLS trust, host names), :mod:`.errors`.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from cloudkitty_proc import __version__
from cloudkitty_proc.http.connection import (MAX_BODY, Origin, Stale, decode, read_body,
                                             send_request, tree)
from cloudkitty_proc.http.environ import basic_auth, idna_host, tls_context
from cloudkitty_proc.http.errors import (BadReply, ConnectionFailed, Timeout,
                                         TooManyRedirects, TransportError, read_error)
from cloudkitty_proc.log import safe_url

__all__ = ["MAX_BODY", "MAX_REDIRECTS", "BadReply", "ConnectionFailed", "Reply", "Timeout",
           "TooManyRedirects", "Transport", "TransportError", "backoff", "basic_auth",
           "decode", "sleeper"]

LOG = logging.getLogger(__name__)

#: redirects followed for one request
MAX_REDIRECTS = 5
REDIRECTS = frozenset((301, 302, 303, 307, 308))
_BAD_TARGET = re.compile("[\x00-\x20\x7f]")
_IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE"))
_monotonic = time.monotonic


class Reply:
    """One final reply: ``status``, ``reason``, ``headers`` (case-insensitive
    ``get``), ``body`` (bytes, decoded) and the ``url`` that answered (no
    credentials)."""

    __slots__ = ("status", "reason", "headers", "body", "url")

    def __init__(self, status: int, reason: str, headers: Any, body: bytes, url: str) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.url = url

    @property
    def retry_after(self) -> float | None:
        """Seconds asked by ``Retry-After`` (delay or HTTP date), or None."""
        value = self.headers.get("Retry-After")
        if not value:
            return None
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None or when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - time.time())


def backoff(max_backoff: float, multiplier: float = 0.5) -> Callable[[Any], float]:
    """A tenacity ``wait``: exponential, at least the failed attempt's
    ``retry_after`` (an attribute of its exception), at most ``max_backoff``."""
    import tenacity

    exponential = tenacity.wait_exponential(multiplier=multiplier, max=max_backoff)

    def wait(state: Any) -> float:
        delay = exponential(state)
        exc = state.outcome.exception() if state.outcome else None
        after = getattr(exc, "retry_after", None)
        if after is not None:
            delay = max(delay, after)
        return min(delay, max_backoff)

    return wait


def sleeper(green: bool) -> Callable[[float], None]:
    """``eventlet.sleep`` for green callers, else ``time.sleep``."""
    if not green:
        return time.sleep
    import eventlet

    return eventlet.sleep


# -- the transport ---------------------------------------------------------------

class Transport:
    """HTTP(S) requests to one base URL (see the module docstring).

    ``option`` names the setting the URL came from, for errors about it.
    ``compress``: ask for gzip replies (``Accept-Encoding: gzip``), else
    ``identity``; a ``headers`` entry overrides either.
    ``size`` idle keep-alive connections are kept per origin; more
    concurrent requests open more connections, closed after use. Safe to
    use from many green threads, or from many real threads (``green=False``).
    """

    def __init__(self, url: str, *, option: str, green: bool, timeout: float, size: int = 10,
                 user: str | None = None, password: str | None = None,
                 cafile: str | None = None, insecure: bool = False,
                 headers: Mapping[str, str] | None = None, compress: bool = True) -> None:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        self.safe_url = safe_url(url.rstrip("/"))
        try:
            hostname, port = parts.hostname, parts.port
        except ValueError:
            hostname = port = None
        if scheme not in ("http", "https") or not hostname:
            raise ValueError(f"{option} {self.safe_url!r}: expected "
                             "http(s)://host[:port][/path]")
        self.prefix = parts.path.rstrip("/")
        if _BAD_TARGET.search(self.prefix) or not self.prefix.isascii():
            raise ValueError(f"{option} {self.safe_url!r}: the path has spaces, control or "
                             "non-ASCII characters; percent-encode them")
        self.option = option
        self.green = green
        self.tree = tree(green)
        self.timeout = timeout
        self.size = size
        self.insecure = insecure
        self._tls = (cafile, insecure)
        self._context = None
        if scheme == "https" or cafile:
            self._context = tls_context(self.tree, cafile, insecure, option)
        self.headers = {
            "Accept": "application/json",
            # compress=False: "identity", so that no server compresses (an
            # absent header would allow any coding)
            "Accept-Encoding": "gzip" if compress else "identity",
            "User-Agent": f"cloudkitty-proc/{__version__}",
        }
        if user:
            self.headers["Authorization"] = basic_auth(user, password or "")
        elif parts.username is not None:
            self.headers["Authorization"] = basic_auth(
                urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        self.headers.update(headers or {})
        host = idna_host(hostname)
        self.origin = Origin(self, scheme, host, port or (443 if scheme == "https" else 80))
        self._origins = {(scheme, host, self.origin.port): self.origin}
        self._base_headers = {**self.headers, **self.origin.proxy_headers}
        self._warned_permanent = False

    @property
    def context(self) -> Any:
        """The TLS context of https origins (built on first use for an
        http base URL, which may redirect to https)."""
        if self._context is None:
            try:
                self._context = tls_context(self.tree, *self._tls, self.option)
            except OSError as exc:
                raise ConnectionFailed(f"connection failed: TLS: {exc}") from None
        return self._context

    def target(self, path: str, query: str | None = None) -> str:
        """The request target of ``path`` (below the base URL) and an
        encoded query string, as :meth:`request` takes it."""
        target = self.origin.absolute + self.prefix + path
        return f"{target}?{query}" if query else target

    def request(self, method: str, path: str = "", *, params: Mapping[str, str] | None = None,
                target: str | None = None, body: bytes | str | None = None,
                headers: Mapping[str, str] | None = None,
                idempotent: bool | None = None) -> Reply:
        """One request (``target`` from :meth:`target`, or ``path`` and
        ``params``), redirects followed; the final reply, whatever its
        status. Raises TransportError."""
        if target is None:
            target = self.target(path, urllib.parse.urlencode(params) if params else None)
        if idempotent is None:
            idempotent = method in _IDEMPOTENT
        deadline = _monotonic() + self.timeout
        origin = self.origin
        send = self._base_headers if not headers else {**self._base_headers, **headers}
        if isinstance(body, str):
            body = body.encode("utf-8")
        for _ in range(MAX_REDIRECTS + 1):
            reply = self._exchange(origin, method, target, body, send, deadline, idempotent)
            location = reply.headers.get("Location") if reply.status in REDIRECTS else None
            if not location:
                return reply
            origin, target, url = self._redirect(origin, target, location, reply.status)
            if reply.status == 303 or (reply.status in (301, 302) and method == "POST"):
                method, body = "GET", None
            send = {**send}
            send.pop("Proxy-Authorization", None)
            send.update(origin.proxy_headers)
            if "Authorization" in send and not _same_site(self.origin, origin):
                del send["Authorization"]
        raise TooManyRedirects(f"more than {MAX_REDIRECTS} redirects (the last to {url})")

    def get(self, path: str = "", params: Mapping[str, str] | None = None, **kw: Any) -> Reply:
        return self.request("GET", path, params=params, **kw)

    def post(self, path: str = "", body: bytes | str | None = None, **kw: Any) -> Reply:
        return self.request("POST", path, body=body, **kw)

    def close(self) -> None:
        for origin in list(self._origins.values()):
            origin.close()

    # -- one exchange --------------------------------------------------------------

    def _exchange(self, origin: Origin, method: str, target: str, body: bytes | None,
                  headers: Mapping[str, str], deadline: float, idempotent: bool) -> Reply:
        conn = origin.take()
        if conn is not None:
            try:
                reply = self._send(origin, conn, deadline, method, target, body, headers, True)
            except Stale as exc:
                # the server closed the idle connection: a new one, once
                LOG.debug("%s: keep-alive connection lost (%s), reconnecting", origin.url, exc)
                if not idempotent:
                    raise ConnectionFailed(f"connection failed: Connection aborted: {exc}") \
                        from None
            else:
                if reply.status != 408:
                    return reply
                # 408 on an idle connection: the server timed it out
                LOG.debug("%s: 408 on a keep-alive connection, reconnecting", origin.url)
        conn = origin.connect(deadline, self.timeout)
        return self._send(origin, conn, deadline, method, target, body, headers, False)

    def _send(self, origin: Origin, conn: Any, deadline: float, method: str, target: str,
              body: bytes | None, headers: Mapping[str, str], reused: bool) -> Reply:
        """``method target`` on ``conn``, which goes back to ``origin`` when
        its reply allows, and is closed otherwise."""
        keep = False
        conn.last_io = None
        conn.deadline = deadline
        try:
            conn.sock.settimeout(max(deadline - _monotonic(), 0.001))   # sending
            send_request(conn, method, target, body, headers)
            resp = http.client.HTTPConnection.getresponse(conn)
            status = resp.status
            body_bytes = read_body(resp)
            raw = conn.last_io
            keep = (not resp.will_close and status != 408 and raw is not None
                    and raw.leftover == 0)
        except TransportError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            raw = conn.last_io
            if reused and (raw is None or raw.received == 0) and isinstance(
                    exc, (ConnectionError, http.client.BadStatusLine)):
                raise Stale(f"{type(exc).__name__}: {exc}") from None
            raise read_error(exc, raw, self.timeout) from None
        finally:
            if keep:
                origin.give(conn)
            else:
                conn.close()
        encoding = resp.headers.get("Content-Encoding")
        if encoding:
            body_bytes = decode(body_bytes, encoding)
        return Reply(status, resp.reason, resp.headers, body_bytes, origin.url)

    def _redirect(self, origin: Origin, target: str, location: str,
                  status: int) -> tuple[Origin, str, str]:
        here = target if target.startswith(("http://", "https://")) else origin.url + target
        url = urllib.parse.urljoin(here, location.strip())
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ConnectionFailed(f"redirected ({status}) to {safe_url(url)!r}, "
                                   "which is not an http(s) URL")
        host = idna_host(parts.hostname)
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        new = self._origins.get(key)
        if new is None:
            if len(self._origins) > 8:
                for other in [o for k, o in self._origins.items() if o is not self.origin]:
                    other.close()
                self._origins = {k: o for k, o in self._origins.items() if o is self.origin}
            new = self._origins[key] = Origin(self, scheme, host, port)
        path = parts.path or "/"
        if not path.isascii() or _BAD_TARGET.search(path):
            path = urllib.parse.quote(path, safe="/%:@!$&'()*+,;=-._~")
        new_target = new.absolute + path + (f"?{parts.query}" if parts.query else "")
        shown = safe_url(new.url + path)
        if status in (301, 308) and origin is self.origin and not self._warned_permanent:
            self._warned_permanent = True
            LOG.warning("%s: %s redirects permanently (%d) to %s: setting it to the new "
                        "URL saves a round trip per request", self.option, self.safe_url,
                        status, shown)
        return new, new_target, shown


def _same_site(first: Origin, then: Origin) -> bool:
    """Credentials follow a redirect to the same host only: same scheme and
    port, or http to https on the default ports."""
    if first.host != then.host:
        return False
    if first.scheme == then.scheme:
        return first.port == then.port
    return (first.scheme, first.port, then.scheme, then.port) == ("http", 80, "https", 443)


