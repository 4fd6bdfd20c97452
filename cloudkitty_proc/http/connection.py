"""Connections of :mod:`cloudkitty_proc.http`: urllib3's, with a deadline.

* :func:`tree`: urllib3, plain or imported through
  ``eventlet.import_patched`` (green sockets for it alone);
* urllib3's connection classes, whose replies are read through a
  :class:`_DeadlineIO` (every read bounded by what is left until the
  request's deadline) and parsed by ``http.client``, interim (1xx)
  replies skipped;
* :class:`Origin`: the idle keep-alive connections to one scheme://host:port;
* :func:`read_body` and :func:`decode`: a body within :data:`MAX_BODY`
  bytes, as sent and once decompressed.
"""

from __future__ import annotations

import http.client
import io
import select
import sys
import threading
import time
import zlib
from typing import Any

from cloudkitty_proc.http.environ import environ_proxy
from cloudkitty_proc.http.errors import BadReply, connect_error

#: bound on a reply body, as sent and once decompressed
MAX_BODY = 256 * 1024 * 1024
#: bytes read from a socket at a time
RECV_SIZE = 16 * 1024
_monotonic = time.monotonic


class Tree:
    """The urllib3 modules in use (green or plain) and our connection classes."""

    def __init__(self, urllib3: Any) -> None:
        self.urllib3 = urllib3
        self.exceptions = urllib3.exceptions
        self.create_context = urllib3.util.ssl_.create_urllib3_context
        self.HTTP = type("HTTPConnection", (_Connection, urllib3.connection.HTTPConnection), {})
        self.HTTPS = type("HTTPSConnection", (_Connection, urllib3.connection.HTTPSConnection),
                          {})


_TREES: dict[bool, Tree] = {}
_TREES_LOCK = threading.Lock()


def tree(green: bool) -> Tree:
    """The green or the plain urllib3 (each imported once per process)."""
    found = _TREES.get(green)
    if found is None:
        with _TREES_LOCK:
            found = _TREES.get(green)
            if found is None:
                found = _TREES[green] = Tree(_green_urllib3() if green else _plain_urllib3())
    return found


def _plain_urllib3() -> Any:
    import urllib3
    import urllib3.connection
    import urllib3.util.ssl_

    return urllib3


def _is_urllib3(name: str) -> bool:
    return name == "urllib3" or name.startswith("urllib3.")


def _green_urllib3() -> Any:
    """urllib3 imported once more with green socket, ssl, select and time.

    ``import_patched`` leaves the green submodules in ``sys.modules``
    under their plain names: they are put back as they were, so that the
    rest of the process keeps (or later imports) the plain ones.
    """
    import warnings

    warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
    import eventlet

    saved = {name: mod for name, mod in sys.modules.items() if _is_urllib3(name)}
    try:
        green = eventlet.import_patched("urllib3")
    finally:
        for name in [name for name in sys.modules if _is_urllib3(name)]:
            if name not in saved:
                del sys.modules[name]
        sys.modules.update(saved)
    return green


class _Connection:
    """Mixed into urllib3's connection classes: each reply is read through
    a :class:`_DeadlineIO` that ends at ``deadline`` (monotonic)."""

    deadline = 0.0
    last_io: _DeadlineIO | None = None

    def response_class(self, sock: Any, method: str | None = None) -> http.client.HTTPResponse:
        raw = self.last_io = _DeadlineIO(sock, self.deadline)
        return _Response(raw, method)


class _DeadlineIO(io.RawIOBase):
    """The socket's reads, each bounded by what is left until the deadline;
    counts the bytes received, and at close those never consumed."""

    def __init__(self, sock: Any, deadline: float) -> None:
        super().__init__()
        self._sio = sock.makefile("rb", buffering=0)   # holds the socket open
        self._sock = sock
        self.deadline = deadline
        self.received = 0
        self.eof = False
        self.leftover = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        left = self.deadline - _monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self._sock.settimeout(left)
        n = self._sio.readinto(buffer)
        if n:
            self.received += n
        elif n == 0:
            self.eof = True
        return n

    def tell(self) -> int:
        return self.received

    def close(self) -> None:
        if not self.closed:
            self._sio.close()
        super().close()


class _Buffer(io.BufferedReader):
    def close(self) -> None:
        if not self.closed:
            self.raw.leftover = self.raw.received - self.tell()
        super().close()


class _FileOf:
    __slots__ = ("fp",)

    def __init__(self, fp: Any) -> None:
        self.fp = fp

    def makefile(self, mode: str) -> Any:
        return self.fp


class _Response(http.client.HTTPResponse):
    def __init__(self, raw: _DeadlineIO, method: str | None) -> None:
        super().__init__(_FileOf(_Buffer(raw, RECV_SIZE)), method=method)

    def begin(self) -> None:
        # http.client skips 100 Continue only: skip every interim reply
        while True:
            super().begin()
            if not 100 <= self.status < 200:
                return
            if self.status == 101:
                raise http.client.HTTPException("unexpected 101 Switching Protocols")
            self.headers = self.msg = None


_putheader = http.client.HTTPConnection.putheader


def send_request(conn: Any, method: str, target: str, body: bytes | None,
                 headers: Any) -> None:
    """Write a request on ``conn`` with ``http.client``'s request methods
    (urllib3's ``request()`` adds per-call work we do not need: its
    response options, header-name sets, body chunking): the request line
    and Host, ``headers`` as given, Content-Length with a body."""
    conn.putrequest(method, target, skip_accept_encoding=True)
    for name, value in headers.items():
        _putheader(conn, name, value)
    if body is not None:
        _putheader(conn, "Content-Length", str(len(body)))
    conn.endheaders(body)


# -- the idle connections of one origin ------------------------------------------

class Origin:
    """Keep-alive connections to one scheme://host:port, direct or through
    a proxy (a forward proxy for http, a CONNECT tunnel for https)."""

    def __init__(self, transport: Any, scheme: str, host: str, port: int) -> None:
        self.tree = transport.tree
        self.size = transport.size
        self.scheme, self.host, self.port = scheme, host, port
        netloc = f"[{host}]" if ":" in host else host
        if port != (443 if scheme == "https" else 80):
            netloc = f"{netloc}:{port}"
        self.url = f"{scheme}://{netloc}"
        self.proxy = environ_proxy(scheme, host, port)
        #: what a request target starts with: the absolute form for a
        #: forward proxy, else nothing (origin form)
        self.absolute = self.url if self.proxy and scheme == "http" else ""
        self.proxy_headers = self.proxy.headers if self.absolute else {}
        self.context = transport.context if scheme == "https" else None
        self.insecure = transport.insecure
        self.idle: list[Any] = []
        self.closed = False

    def take(self) -> Any:
        """An idle connection on which nothing arrived since, or None."""
        idle = self.idle
        while idle:
            try:
                conn = idle.pop()
            except IndexError:
                return None
            sock = conn.sock
            if sock is not None and not _readable(sock):
                return conn
            conn.close()   # closed by the server, or something unsolicited
        return None

    def give(self, conn: Any) -> None:
        if not self.closed and len(self.idle) < self.size:
            self.idle.append(conn)
        else:
            conn.close()

    def connect(self, deadline: float, timeout: float) -> Any:
        """A new connection (TLS and tunnel included); TransportError."""
        classes = self.tree
        proxy = self.proxy
        host, port = (proxy.host, proxy.port) if proxy else (self.host, self.port)
        left = max(deadline - _monotonic(), 0.001)
        if self.scheme == "https":
            conn = classes.HTTPS(host, port, timeout=left, ssl_context=self.context,
                              assert_hostname=False if self.insecure else None)
            if proxy:
                conn.set_tunnel(self.host, self.port, headers=proxy.headers)
        else:
            conn = classes.HTTP(host, port, timeout=left)
        conn.deadline = deadline
        try:
            conn.connect()
        except Exception as exc:  # noqa: BLE001 - classified below
            conn.close()
            raise connect_error(exc, classes, timeout, proxy) from None
        return conn

    def close(self) -> None:
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


def _readable(sock: Any) -> bool:
    try:
        return bool(select.select([sock], (), (), 0)[0])
    except (OSError, ValueError):
        return True


class Stale(Exception):
    """A reused connection failed before any byte of its reply."""



def read_body(resp: http.client.HTTPResponse) -> bytes:
    """The body of ``resp``, within :data:`MAX_BODY` bytes (BadReply)."""
    length = resp.length
    if length is not None and not resp.chunked:
        if length > MAX_BODY:
            raise BadReply(f"reply of {length} bytes, over the limit of {MAX_BODY}")
        return resp.read()
    parts = []
    size = 0
    while True:
        part = resp.read(RECV_SIZE)
        if not part:
            break
        size += len(part)
        if size > MAX_BODY:
            raise BadReply(f"reply over the limit of {MAX_BODY} bytes")
        parts.append(part)
    return b"".join(parts)


def decode(body: bytes, encoding: str, limit: int | None = None) -> bytes:
    """``body`` decoded per its Content-Encoding (gzip, deflate, identity),
    at most ``limit`` (default :data:`MAX_BODY`) bytes; BadReply otherwise."""
    if limit is None:
        limit = MAX_BODY
    for coding in reversed([c.strip().lower() for c in encoding.split(",")]):
        if coding in ("gzip", "x-gzip"):
            body = _inflate(body, 16 + zlib.MAX_WBITS, limit, coding, True)
        elif coding == "deflate":
            try:
                body = _inflate(body, zlib.MAX_WBITS, limit, coding, False)
            except BadReply:   # raw deflate, without the zlib wrapper
                body = _inflate(body, -zlib.MAX_WBITS, limit, coding, False)
        elif coding not in ("identity", ""):
            raise BadReply(f"unsupported Content-Encoding {encoding!r}")
    return body


def _inflate(data: bytes, wbits: int, limit: int, name: str, members: bool) -> bytes:
    out = []
    size = 0
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(data, limit - size + 1)
        except zlib.error as exc:
            raise BadReply(f"cannot decode the {name} reply: {exc}") from None
        size += len(part)
        if size > limit or inflater.unconsumed_tail:
            raise BadReply(f"the {name} reply decodes to more than {limit} bytes")
        if not inflater.eof:
            raise BadReply(f"cannot decode the {name} reply: it is cut short")
        out.append(part)
        data = inflater.unused_data
        if not (members and data):
            return b"".join(out) if len(out) > 1 else part


