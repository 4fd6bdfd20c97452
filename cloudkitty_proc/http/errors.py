"""The errors of :mod:`cloudkitty_proc.http`, and their messages.

A message never names a URL or a credential: the caller adds what it
asked for.
"""

from __future__ import annotations

import errno
import http.client
import os
from typing import Any


class TransportError(Exception):
    """No usable reply. ``kind``: the CollectError kind it usually maps to."""

    kind = "connection"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Timeout(TransportError):
    kind = "timeout"


class ConnectionFailed(TransportError):
    """Connection, TLS, proxy, or a reply cut short or not HTTP."""


class BadReply(TransportError):
    """A body that cannot be decoded, or over :data:`MAX_BODY`."""

    kind = "malformed"


class TooManyRedirects(TransportError):
    kind = "http"



# -- messages ------------------------------------------------------------------

def errno_text(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0 and exc.strerror == errno.errorcode.get(code):
        # eventlet's green sockets say "[Errno 111] ECONNREFUSED"
        return f"[Errno {code}] {os.strerror(code)}"
    return str(exc)


def connect_error(exc: BaseException, tree: Any, timeout: float,
                   proxy: Any) -> TransportError:
    cause = exc.__cause__ or exc
    via = f"proxy {proxy.url}: " if proxy else ""
    if isinstance(cause, TimeoutError) or isinstance(exc, TimeoutError):
        through = f", through proxy {proxy.url}" if proxy else ""
        return Timeout(f"timed out after {timeout:g} s (ConnectTimeout{through})")
    name = type(cause).__name__
    if name.startswith("SSL") or name == "CertificateError":
        return ConnectionFailed(f"connection failed: {via}TLS: {cause}")
    if isinstance(exc, tree.exceptions.NameResolutionError):
        return ConnectionFailed(f"connection failed: {via}cannot resolve {exc.conn.host!r}: "
                                f"{errno_text(cause)}")
    if isinstance(cause, OSError) and str(cause).startswith("Tunnel connection failed"):
        return ConnectionFailed(f"connection failed: {via}{cause}")
    return ConnectionFailed(f"connection failed: {via}Failed to establish a new connection: "
                            f"{errno_text(cause)}")


def read_error(exc: BaseException, raw: Any, timeout: float) -> TransportError:
    if isinstance(exc, TimeoutError):
        return Timeout(f"timed out after {timeout:g} s (ReadTimeout)")
    name = type(exc).__name__
    if isinstance(exc, http.client.IncompleteRead):
        if raw is not None and raw.eof:
            return ConnectionFailed("connection failed: Connection aborted: the reply was cut "
                                    "short")
        return ConnectionFailed("connection failed: malformed HTTP reply: bad chunked framing")
    if isinstance(exc, (http.client.BadStatusLine, http.client.LineTooLong,
                        http.client.HTTPException)) and not isinstance(exc, ConnectionError):
        detail = str(exc).strip()
        return ConnectionFailed(f"connection failed: malformed HTTP reply: {name}: {detail!r}"
                                if detail else f"connection failed: malformed HTTP reply: {name}")
    if name.startswith("SSL"):
        return ConnectionFailed(f"connection failed: TLS: {exc}")
    text = errno_text(exc)
    return ConnectionFailed(f"connection failed: Connection aborted: {name}: {text}"
                            if text else f"connection failed: Connection aborted: {name}")
