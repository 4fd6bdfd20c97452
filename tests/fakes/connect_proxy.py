"""A small HTTP proxy on loopback: CONNECT tunnels and forwarded requests.

``ConnectProxy(auth=None, route=None)`` (a context manager; ``url``):

* ``CONNECT host:port`` opens a tunnel (``200 Connection established``);
* a request in absolute form (``GET http://host:port/... HTTP/1.1``) is
  passed on as it is to host:port, and the connection becomes a tunnel to
  it (the client's next requests on it go there too);
* ``auth=(user, password)``: 407 without that ``Proxy-Authorization``;
* ``route``: {"host:port": port on 127.0.0.1} for names that resolve
  nowhere (internationalised or example names); other targets are
  connected to as asked.

``requests`` keeps (request line, headers with lower-case names) of each
first request of a client connection.
"""

from __future__ import annotations

import base64
import select
import socket
import threading
import urllib.parse


class ConnectProxy:
    def __init__(self, auth: tuple[str, str] | None = None,
                 route: dict[str, int] | None = None) -> None:
        self.auth = auth
        self.route = dict(route or {})
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> ConnectProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()
        for sock in list(self._open):
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self._open.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = client.recv(65536)
                if not data:
                    return
                buf += data
            head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            line, *lines = head.split("\r\n")
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (item.partition(":") for item in lines)}
            self.requests.append((line, headers))
            method, target, _ = line.split(" ", 2)
            if self.auth is not None:
                expected = "Basic " + base64.b64encode(":".join(self.auth).encode()).decode()
                if headers.get("proxy-authorization") != expected:
                    client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                   b"Proxy-Authenticate: Basic realm=\"test\"\r\n"
                                   b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                    return
            hostport = target if method == "CONNECT" else urllib.parse.urlsplit(target).netloc
            upstream = self._connect(hostport)
            if upstream is None:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
                               b"Connection: close\r\n\r\n")
                return
            if method == "CONNECT":
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream.sendall(buf)
            self._pipe(client, upstream)
        except OSError:
            pass
        finally:
            client.close()

    def _connect(self, hostport: str) -> socket.socket | None:
        host, _, port = hostport.rpartition(":")
        address = ("127.0.0.1", self.route[hostport]) if hostport in self.route else (
            host.strip("[]"), int(port))
        try:
            sock = socket.create_connection(address, timeout=10)
        except OSError:
            return None
        sock.settimeout(None)
        self._open.append(sock)
        return sock

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 60)
                if not ready:
                    return
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        finally:
            b.close()
