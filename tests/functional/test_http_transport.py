"""The HTTP transport against peers that misbehave (raw sockets).

Each peer is a real local server (tests/fakes/http_peers.py) sending what
some servers and proxies do: a second, unsolicited reply; a 408 on an idle
keep-alive connection; a reply dripping a byte at a time; interim replies;
multi-member gzip; a decompression bomb; a connection closed as the next
request arrives. Both I/O modes are exercised where the transport's code
differs (green sockets or plain ones).
"""

from __future__ import annotations

import gzip
import json
import time
import urllib.parse
import warnings

import pytest

from cloudkitty_proc import http
from cloudkitty_proc.http import connection
from tests.fakes.http_peers import RawPeer, chunked, gzip_members, reply, serve_each

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

MODES = pytest.mark.parametrize("green", [True, False], ids=["green", "plain"])


def answer_of(request) -> bytes:
    """The reply to ``GET /q?n=<n>``: ``{"n": <n>}``."""
    n = urllib.parse.parse_qs(urllib.parse.urlsplit(request.target).query)["n"][0]
    return reply(200, json.dumps({"n": n}).encode())


def ask(transport, n) -> str:
    got = transport.get("/q", {"n": str(n)})
    assert got.status == 200
    return json.loads(got.body)["n"]


def transport_for(url, green, **kw):
    return http.Transport(url, option="[test] url", green=green, timeout=kw.pop("timeout", 5),
                          **kw)


@MODES
def test_a_second_reply_in_the_same_read_is_not_taken_for_the_next_request(green):
    """The peer sends its answer and a second, unsolicited reply at once:
    the connection is dropped, the next request gets its own answer."""

    def serve(conn):
        while (request := conn.read_request()) is not None:
            extra = reply(200, b'{"n": "unsolicited"}') if conn.number == 1 else b""
            conn.send(answer_of(request) + extra)

    with RawPeer(serve) as peer:
        transport = transport_for(peer.url, green)
        assert [ask(transport, n) for n in range(3)] == ["0", "1", "2"]
        transport.close()
    assert [r.connection for r in peer.requests] == [1, 2, 2]


@MODES
def test_a_reply_arriving_on_an_idle_connection_retires_it(green):
    """A reply nobody asked for, arriving while the connection is idle, is
    never read as the answer to the next request."""

    def serve(conn):
        while (request := conn.read_request()) is not None:
            conn.send(answer_of(request))
            if conn.number == 1:
                time.sleep(0.05)
                conn.send(reply(200, b'{"n": "unsolicited"}'))

    with RawPeer(serve) as peer:
        transport = transport_for(peer.url, green)
        assert ask(transport, 0) == "0"
        time.sleep(0.3)   # the unsolicited reply arrives meanwhile
        assert ask(transport, 1) == "1"
        assert ask(transport, 2) == "2"
        transport.close()
    assert [r.connection for r in peer.requests] == [1, 2, 2]


@MODES
@pytest.mark.parametrize("when", ["as the reply", "while idle"])
def test_408_on_an_idle_keep_alive_connection_is_retried_on_a_new_one(green, when):
    timeout_reply = reply(408, b"", {"Connection": "close"}, reason="Request Timeout")

    def serve(conn):
        request = conn.read_request()
        conn.send(answer_of(request))
        if conn.number == 1:
            if when == "while idle":
                time.sleep(0.05)
                conn.send(timeout_reply)
                return
            conn.read_request()
            conn.send(timeout_reply)
            return
        while (request := conn.read_request()) is not None:
            conn.send(answer_of(request))

    with RawPeer(serve) as peer:
        transport = transport_for(peer.url, green)
        assert ask(transport, 0) == "0"
        time.sleep(0.3)
        assert ask(transport, 1) == "1"
        assert ask(transport, 2) == "2"
        transport.close()
    expected = [1, 1, 2, 2] if when == "as the reply" else [1, 2, 2]
    assert [r.connection for r in peer.requests] == expected


@MODES
@pytest.mark.parametrize("part", ["head", "body"])
def test_a_reply_dripping_a_byte_at_a_time_times_out(green, part):
    """``timeout`` bounds the whole reply, not each read."""
    body = b'{"n": "' + b"x" * 200 + b'"}'
    raw = reply(200, body)
    split = 10 if part == "head" else raw.index(b"\r\n\r\n") + 4

    def serve(conn):
        conn.read_request()
        conn.send(raw[:split])
        for i in range(split, len(raw)):
            time.sleep(0.1)
            conn.send(raw[i:i + 1])

    with RawPeer(serve) as peer:
        transport = transport_for(peer.url, green, timeout=0.8)
        with pytest.raises(http.Timeout) as err:
            ask(transport, 0)
        transport.close()
    assert err.value.kind == "timeout" and "timed out after 0.8 s" in err.value.message


@MODES
def test_interim_replies_are_skipped(green):
    """102 and 103 (Early Hints) come before the final reply; http.client
    alone would return the first of them."""
    interim = (b"HTTP/1.1 102 Processing\r\n\r\n"
               b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
    with RawPeer(serve_each(lambda r: interim + answer_of(r))) as peer:
        transport = transport_for(peer.url, green)
        assert [ask(transport, n) for n in range(2)] == ["0", "1"]
        transport.close()
    assert [r.connection for r in peer.requests] == [1, 1]


def test_an_unexpected_101_is_an_error():
    with RawPeer(serve_each(lambda r: b"HTTP/1.1 101 Switching Protocols\r\n\r\n")) as peer:
        transport = transport_for(peer.url, False)
        with pytest.raises(http.ConnectionFailed, match="101"):
            ask(transport, 0)


@MODES
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_multi_member_gzip_is_decoded_whole(green, framing):
    body = json.dumps({"n": "0", "pad": "y" * 5000}).encode()
    encoded = gzip_members(body[:1000], body[1000:4000], body[4000:])
    if framing == "length":
        raw = reply(200, encoded, {"Content-Encoding": "gzip"})
    else:
        raw = reply(200, chunked(encoded, 999), {"Content-Encoding": "gzip",
                                                 "Transfer-Encoding": "chunked"}, length=False)
    with RawPeer(serve_each(lambda r: raw)) as peer:
        transport = transport_for(peer.url, green)
        got = transport.get("/q", {"n": "0"})
        transport.close()
    assert got.body == body


def test_a_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(connection, "MAX_BODY", 1 << 20)
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    assert len(bomb) < 1 << 20       # under the bound as sent
    with RawPeer(serve_each(lambda r: reply(200, bomb, {"Content-Encoding": "gzip"}))) as peer:
        transport = transport_for(peer.url, False)
        with pytest.raises(http.BadReply) as err:
            transport.get("/q", {"n": "0"})
        # and a body over the bound as sent
        monkeypatch.setattr(connection, "MAX_BODY", len(bomb) - 1)
        with pytest.raises(http.BadReply, match="over the limit"):
            transport.get("/q", {"n": "0"})
    assert err.value.kind == "malformed"
    assert f"decodes to more than {1 << 20} bytes" in err.value.message


@MODES
def test_a_connection_closed_as_the_next_request_arrives_is_replaced_once(green):
    """The server closed the idle connection just as the request was sent
    (no byte of a reply): a GET goes again on a new connection; a POST,
    which may have been acted on, fails."""

    def serve(conn):
        while (request := conn.read_request()) is not None:
            if conn.number % 2 == 1 and len([r for r in peer.requests
                                             if r.connection == conn.number]) == 2:
                return   # close with no reply
            conn.send(answer_of(request))

    with RawPeer(serve) as peer:
        transport = transport_for(peer.url, green)
        assert ask(transport, 0) == "0"
        assert ask(transport, 1) == "1"
        assert [r.connection for r in peer.requests] == [1, 1, 2]
        transport.close()
        transport = transport_for(peer.url, green)
        assert transport.post("/q?n=3", b"{}").status == 200
        with pytest.raises(http.ConnectionFailed, match="Connection aborted"):
            transport.post("/q?n=4", b"{}")
        transport.close()
    assert [r.method for r in peer.requests[3:]] == ["POST", "POST"]


def test_redirects_keep_the_method_and_credentials_where_they_should():
    """307/308 repeat the request, body included; 303 (and 301/302 of a
    POST) turn it into a GET; credentials go to the same host only."""

    def other(conn):
        while (request := conn.read_request()) is not None:
            conn.send(reply(200, json.dumps({"auth": request.headers.get("authorization"),
                                             "method": request.method}).encode()))

    with RawPeer(other) as elsewhere:
        def serve(conn):
            while (request := conn.read_request()) is not None:
                path = urllib.parse.urlsplit(request.target).path
                code = path.strip("/").split("/")[0]
                if code.isdigit():
                    target = "/echo" if code != "away" else ""
                    conn.send(reply(int(code), b"moved", {"Location": target + "?x=1"},
                                    reason="Redirect"))
                elif code == "away":
                    location = elsewhere.url.replace("127.0.0.1", "localhost") + "/echo"
                    conn.send(reply(302, b"", {"Location": location}, reason="Found"))
                elif code == "loop":
                    conn.send(reply(302, b"", {"Location": "/loop"}, reason="Found"))
                else:
                    conn.send(reply(200, json.dumps({
                        "auth": request.headers.get("authorization"), "method": request.method,
                        "body": request.body.decode(), "target": request.target}).encode()))

        with RawPeer(serve) as peer:
            transport = transport_for(peer.url.replace("http://", "http://u:p@"), False)
            seen = {code: json.loads(transport.post(f"/{code}/x", b"data").body)
                    for code in (301, 302, 303, 307, 308)}
            away = json.loads(transport.get("/away").body)
            with pytest.raises(http.TooManyRedirects) as err:
                transport.get("/loop")
            transport.close()
    auth = http.basic_auth("u", "p")
    for code in (301, 302, 303):
        assert seen[code] == {"auth": auth, "method": "GET", "body": "", "target": "/echo?x=1"}
    for code in (307, 308):
        assert seen[code] == {"auth": auth, "method": "POST", "body": "data",
                              "target": "/echo?x=1"}
    assert away == {"auth": None, "method": "GET"}
    assert err.value.kind == "http" and "more than 5 redirects" in err.value.message
    assert "u:p" not in err.value.message


def test_errors_never_name_credentials():
    transport = transport_for("http://admin:hunter2@127.0.0.1:9", False, timeout=1)
    with pytest.raises(http.ConnectionFailed) as err:
        transport.get("/q")
    assert "hunter2" not in str(err.value) and "refused" in str(err.value).lower()
    assert "hunter2" not in transport.safe_url
