"""cloudkitty_proc.http without a network: no_proxy matching, Retry-After,
the backoff that honours it, body decoding and its bound, host names, URLs."""

from __future__ import annotations

import datetime
import email.utils
import gzip
import zlib

import pytest
import tenacity

from cloudkitty_proc import http
from cloudkitty_proc.http.environ import bypass_proxy, environ_proxy, idna_host


@pytest.mark.parametrize("host, port, no_proxy, bypass", [
    ("127.0.0.1", 9090, "127.0.0.0/8", True),
    ("127.9.8.7", 9090, "localhost,127.0.0.0/8", True),
    ("10.1.2.3", 9090, "localhost,127.0.0.0/8", False),
    ("10.1.2.3", 9090, "10.0.0.0/8", True),
    ("10.1.2.3", 9090, "10.1.2.3", True),
    ("::1", 9090, "::1", True),
    ("::1", 9090, "[::1]:9090", True),
    ("::1", 9090, "fe80::/10", False),
    ("prom.example.org", 9090, "example.org", True),
    ("prom.example.org", 9090, ".example.org", True),
    ("prom.example.org", 9090, "*.example.org", True),
    ("notexample.org", 9090, "example.org", False),
    ("prom.example.org", 9090, "prom.example.org:9091", False),
    ("prom.example.org", 9090, "prom.example.org:9090", True),
    ("anything", 1, "*", True),
    ("anything", 1, "", False),
    ("anything", 1, " a , anything ", True),
])
def test_no_proxy(host, port, no_proxy, bypass):
    assert bypass_proxy(host, port, no_proxy) is bypass


def test_proxies_from_the_environment(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("https_proxy", "http://u:s3cret@proxy.example:3128")
    monkeypatch.setenv("no_proxy", "127.0.0.0/8")
    proxy = environ_proxy("https", "prom.example", 443)
    assert (proxy.host, proxy.port, proxy.url) == ("proxy.example", 3128,
                                                   "http://proxy.example:3128")
    assert proxy.headers == {"Proxy-Authorization": http.basic_auth("u", "s3cret")}
    assert environ_proxy("https", "127.0.0.5", 443) is None
    assert environ_proxy("http", "prom.example", 80) is None
    monkeypatch.setenv("all_proxy", "socks5://proxy.example:1080")
    with pytest.raises(ValueError, match="only http:// proxies"):
        environ_proxy("http", "prom.example", 80)


def _reply(**headers):
    return http.Reply(503, "Service Unavailable", headers, b"", "http://x")


def test_retry_after():
    assert _reply(**{"Retry-After": "7"}).retry_after == 7.0
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=30)
    after = _reply(**{"Retry-After": email.utils.format_datetime(later, usegmt=True)})
    assert 25 <= after.retry_after <= 31
    past = email.utils.format_datetime(later - datetime.timedelta(days=1), usegmt=True)
    assert _reply(**{"Retry-After": past}).retry_after == 0.0
    assert _reply(**{"Retry-After": "soon"}).retry_after is None
    assert _reply().retry_after is None


class _Slow(Exception):
    def __init__(self, retry_after):
        self.retry_after = retry_after


@pytest.mark.parametrize("retry_after, expected", [(None, 0.5), (3.0, 3.0), (60.0, 5.0)])
def test_backoff_honours_retry_after_within_max_backoff(retry_after, expected):
    waits = []
    calls = []

    def fail():
        calls.append(1)
        if len(calls) == 1:
            raise _Slow(retry_after)
        return "ok"

    retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(2), wait=http.backoff(5.0),
                                 sleep=waits.append, reraise=True)
    assert retrying(fail) == "ok"
    assert waits == [expected]


def test_decode_gzip_members_deflate_and_the_bound():
    body = b'{"status": "success"}' * 50
    assert http.decode(gzip.compress(body), "gzip") == body
    assert http.decode(gzip.compress(body[:7]) + gzip.compress(body[7:]), "x-gzip") == body
    assert http.decode(zlib.compress(body), "deflate") == body
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert http.decode(raw.compress(body) + raw.flush(), "deflate") == body
    assert http.decode(gzip.compress(zlib.compress(body)), "deflate, gzip") == body
    assert http.decode(body, "identity") == body
    with pytest.raises(http.BadReply, match="decodes to more than 100 bytes"):
        http.decode(gzip.compress(body), "gzip", limit=100)
    with pytest.raises(http.BadReply, match="cut short"):
        http.decode(gzip.compress(body)[:-10], "gzip")
    with pytest.raises(http.BadReply, match="cannot decode the gzip reply"):
        http.decode(gzip.compress(body) + b"garbage", "gzip")
    with pytest.raises(http.BadReply, match="unsupported Content-Encoding 'br'"):
        http.decode(body, "br")


def test_idna_host_names():
    assert idna_host("Bücher.example") == "xn--bcher-kva.example"
    assert idna_host("PROM.example") == "prom.example"
    transport = http.Transport("http://bücher.example:9090/p", option="[g] url", green=False,
                               timeout=1)
    assert (transport.origin.host, transport.origin.url) == (
        "xn--bcher-kva.example", "http://xn--bcher-kva.example:9090")


@pytest.mark.parametrize("url", ["ftp://example.org", "127.0.0.1:9090", "http://",
                                 "http://host:notaport"])
def test_bad_urls_are_refused_naming_the_option(url):
    with pytest.raises(ValueError, match=r"^\[g\] url "):
        http.Transport(url, option="[g] url", green=False, timeout=1)
