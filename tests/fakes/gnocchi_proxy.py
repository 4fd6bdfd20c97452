"""A proxy in front of a real Gnocchi that breaks chosen requests.

``FaultProxy(upstream, fault)`` listens on 127.0.0.1 and forwards every
request to ``upstream`` (method, path, query, body, Authorization and
Content-Type), returning Gnocchi's reply (status, body, Content-Type, Link).
Before that it calls ``fault(request)`` with a :class:`Seen` (method, path,
query, the JSON body, and for ``POST /v1/aggregates`` the scope id found in
its search filter and the ``start`` parameter); ``fault`` returns None
(forward), ``("reply", status, body)`` (answer that instead) or
``("sleep", seconds)`` (wait, then forward: a client with a shorter timeout
gives up first). Every request is appended to ``proxy.seen``;
``proxy.max_active`` is the most requests it held at once. Use it as a
context manager (``proxy.url``).
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

FORWARDED = ("Authorization", "Content-Type", "Accept")
RETURNED = ("Content-Type", "Link")


@dataclasses.dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    scope: str | None = None
    start: str | None = None
    at: float = 0.0


def _scope_of(search: Any, scope_key: str) -> str | None:
    """The value compared to ``scope_key`` with "=" anywhere in a filter."""
    if isinstance(search, dict):
        for op, arg in search.items():
            if op == "=" and isinstance(arg, dict) and scope_key in arg:
                return arg[scope_key]
            found = _scope_of(arg, scope_key)
            if found is not None:
                return found
    elif isinstance(search, list):
        for item in search:
            found = _scope_of(item, scope_key)
            if found is not None:
                return found
    return None


class FaultProxy:
    def __init__(self, upstream: str, fault: Callable[[Seen], Any] | None = None,
                 scope_key: str = "project_id") -> None:
        self.upstream = upstream.rstrip("/")
        self.fault = fault or (lambda seen: None)
        self.scope_key = scope_key
        self.seen: list[Seen] = []
        self.active = self.max_active = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                with proxy._lock:
                    proxy.active += 1
                    proxy.max_active = max(proxy.max_active, proxy.active)
                try:
                    self._forward()
                finally:
                    with proxy._lock:
                        proxy.active -= 1

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urllib.parse.urlsplit(self.path)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                query = urllib.parse.parse_qs(parts.query)
                seen = Seen(self.command, parts.path, query, body, at=time.monotonic())
                if parts.path.endswith("/v1/aggregates") and isinstance(body, dict):
                    seen.scope = _scope_of(body.get("search"), proxy.scope_key)
                    seen.start = (query.get("start") or [None])[0]
                proxy.seen.append(seen)
                action = proxy.fault(seen)
                if action and action[0] == "reply":
                    _, status, payload = action
                    if not isinstance(payload, bytes):
                        payload = json.dumps(payload).encode()
                    self._send(status, payload, {"Content-Type": "application/json"})
                    return
                if action and action[0] == "sleep":
                    time.sleep(action[1])
                req = urllib.request.Request(proxy.upstream + self.path, data=raw or None,
                                             method=self.command)
                for name in FORWARDED:
                    if self.headers.get(name):
                        req.add_header(name, self.headers[name])
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        status, payload, headers = resp.status, resp.read(), resp.headers
                except urllib.error.HTTPError as exc:
                    status, payload, headers = exc.code, exc.read(), exc.headers
                self._send(status, payload, {n: headers[n] for n in RETURNED if headers.get(n)})

            def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:   # the client gave up (a timeout)
                    pass

            do_GET = do_POST = do_PATCH = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def aggregates(self, scope: str, start: str | None = None) -> list[Seen]:
        """The aggregates requests seen for ``scope`` (and ``start``)."""
        return [s for s in self.seen if s.scope == scope
                and (start is None or s.start == start)]
