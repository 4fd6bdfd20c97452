"""HTTP peers on raw sockets, for replies no well-behaved server sends.

``RawPeer(serve)`` listens on 127.0.0.1 and runs ``serve(conn)`` in a
thread for each connection it accepts; ``conn`` is a :class:`PeerConn`:
``number`` (1, 2, ... in accept order), ``read_request()`` (the next
request, or None once the client closed), ``send(data)``, ``close()``.
Every request read is appended to ``peer.requests``. Use it as a context
manager (``peer.url``); leaving it closes the listening socket and every
connection.

``reply()``, ``chunked()`` and ``gzip_members()`` build raw replies.
"""

from __future__ import annotations

import dataclasses
import gzip
import socket
import threading
from collections.abc import Callable


@dataclasses.dataclass
class Request:
    connection: int
    method: str
    target: str
    headers: dict[str, str]     # names in lower case
    body: bytes


class PeerConn:
    def __init__(self, sock: socket.socket, number: int, peer: RawPeer) -> None:
        self.sock = sock
        self.number = number
        self.peer = peer
        self._buf = b""

    def read_request(self) -> Request | None:
        while b"\r\n\r\n" not in self._buf:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            self._buf += data
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = line.split(" ", 2)
        headers = {}
        for item in lines:
            name, _, value = item.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", 0))
        while len(self._buf) < length:
            data = self.sock.recv(65536)
            if not data:
                return None
            self._buf += data
        body, self._buf = self._buf[:length], self._buf[length:]
        request = Request(self.number, method, target, headers, body)
        with self.peer.lock:
            self.peer.requests.append(request)
        return request

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class RawPeer:
    def __init__(self, serve: Callable[[PeerConn], None]) -> None:
        self.serve = serve
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.connections: list[PeerConn] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                conn = PeerConn(sock, len(self.connections) + 1, self)
                self.connections.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: PeerConn) -> None:
        try:
            self.serve(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def __enter__(self) -> RawPeer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()
        for conn in list(self.connections):
            conn.close()


def reply(status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None,
          reason: str = "OK", length: bool = True) -> bytes:
    """A raw HTTP/1.1 reply (Content-Length added unless ``length`` is False)."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    head = dict(headers or {})
    if length:
        head.setdefault("Content-Length", str(len(body)))
    lines += [f"{name}: {value}" for name, value in head.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes, size: int = 7) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
             for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def gzip_members(*parts: bytes) -> bytes:
    """One gzip member per part, concatenated (RFC 1952 allows it)."""
    return b"".join(gzip.compress(part) for part in parts)


def serve_each(answer: Callable[[Request], bytes]) -> Callable[[PeerConn], None]:
    """A ``serve`` that answers every request of a connection with ``answer``."""

    def serve(conn: PeerConn) -> None:
        while (request := conn.read_request()) is not None:
            conn.send(answer(request))

    return serve
