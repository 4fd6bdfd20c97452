"""The HTTP transport against real servers: nginx (Debian's) in front of a
real Prometheus, and a CONNECT proxy (tests/fakes/connect_proxy.py).

nginx adds what operators' endpoints do: a path prefix, gzip, keep-alive
limits, redirects (301, 302, 307, 308, http -> https, to another host),
basic authentication, TLS, and 503 / 429 with ``Retry-After``. Every
answer is compared with the same query sent to Prometheus directly.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cloudkitty_proc.collectors.prometheus import PrometheusCollector
from cloudkitty_proc.exceptions import CollectError
from cloudkitty_proc.fetchers.prometheus import PrometheusFetcher
from cloudkitty_proc.metrics_conf import PROMQL_EXTRA_ARGS, load_metrics_conf
from tests.fakes.connect_proxy import ConnectProxy
from tests.fakes.nginx import access_log, free_port, running_nginx
from tests.functional.test_collector_prometheus import make_conf
from tests.prometheus_server import running_prometheus

ROOT = Path(__file__).resolve().parents[2]
UTC = datetime.timezone.utc
BEGIN = datetime.datetime(2026, 1, 1, tzinfo=UTC)
HOURS = 3
PROJECTS = ["p-alpha", "p-beta"]
USER, PASSWORD = "rating", "s3cret"
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "REQUESTS_CA_BUNDLE",
               "SSL_CERT_FILE")


def hour(n):
    return BEGIN + datetime.timedelta(hours=n), BEGIN + datetime.timedelta(hours=n + 1)


def metrics():
    return load_metrics_conf(str(ROOT / "etc" / "cloudkitty-proc" / "metrics.yml"),
                             scope_key="project_id", extra_args_schema=PROMQL_EXTRA_ARGS)


def collector(url, executor="greenpool", **options):
    conf = make_conf(collector_prometheus={"prometheus_url": url, "retries": 0,
                                           "max_backoff": 0, "timeout": 10, **options},
                     orchestrator={"collect_executor": executor})
    return PrometheusCollector(conf, metrics())


def answers(coll, queries=None):
    """(metric, scope, hour) -> sorted points, or the error kind and text."""
    out = {}
    for metric in metrics():
        for scope in PROJECTS:
            for n in range(HOURS) if queries is None else queries:
                try:
                    points = coll.retrieve(metric, scope, *hour(n))
                    out[metric.label, scope, n] = sorted(
                        (str(p.qty), sorted(p.groupby.items()), sorted(p.metadata.items()))
                        for p in points)
                except CollectError as exc:
                    out[metric.label, scope, n] = (exc.kind, str(exc))
    return out


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(scope="module")
def prom_url(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("gen_openmetrics",
                                                  ROOT / "tools" / "gen_openmetrics.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    path = tmp_path_factory.mktemp("usage") / "usage.om"
    with open(path, "w", encoding="utf-8") as fh:
        gen.generate(fh, projects=len(PROJECTS), begin=BEGIN, hours=HOURS, step=300)
    with running_prometheus(path, tmp_path_factory.mktemp("prometheus")) as url:
        yield url


@pytest.fixture(scope="module")
def expected(prom_url):
    coll = collector(prom_url)
    try:
        got = answers(coll)
    finally:
        coll.close()
    assert any(isinstance(v, list) and v for v in got.values())
    return got


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    openssl = shutil.which("openssl")
    assert openssl, "openssl not on PATH"
    d = tmp_path_factory.mktemp("tls")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2",
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


class Site:
    """The nginx in front of Prometheus: ``http``, ``https``, ``short``
    (base URLs), ``work`` (its directory), ``flag(name)`` (a file whose
    presence makes /busy/ answer 503 and /limited/ 429)."""


@pytest.fixture(scope="module")
def site(prom_url, cert, tmp_path_factory):
    work = tmp_path_factory.mktemp("nginx")
    (work / "htpasswd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    http_port, https_port, short_port = free_port(), free_port(), free_port()
    upstream = prom_url.split("//", 1)[1]
    proxy = ('proxy_pass http://prom/; proxy_http_version 1.1; '
             'proxy_set_header Connection "";')
    gzip = "gzip on; gzip_types application/json; gzip_min_length 0; gzip_proxied any;"
    servers = f"""
    upstream prom {{ server {upstream}; keepalive 4; }}
    server {{
        listen 127.0.0.1:{http_port};
        keepalive_timeout 60s;
        {gzip}
        location /prom/ {{ {proxy} }}
        location /auth/ {{
            auth_basic "prometheus"; auth_basic_user_file {work}/htpasswd; {proxy} }}
        location ~ ^/r301/(.*)$ {{ return 301 /prom/$1$is_args$args; }}
        location ~ ^/r302/(.*)$ {{ return 302 /prom/$1$is_args$args; }}
        location ~ ^/r307/(.*)$ {{ return 307 /auth/$1$is_args$args; }}
        location ~ ^/r308/(.*)$ {{ return 308 /prom/$1$is_args$args; }}
        location ~ ^/tls/(.*)$ {{ return 301 https://localhost:{https_port}/prom/$1$is_args$args; }}
        location ~ ^/elsewhere/(.*)$ {{
            return 302 http://localhost:{http_port}/auth/$1$is_args$args; }}
        location /busy/ {{
            if (-f {work}/busy) {{ add_header Retry-After 3 always; return 503; }}
            {proxy} }}
        location /limited/ {{
            if (-f {work}/limited) {{ add_header Retry-After 3 always; return 429; }}
            {proxy} }}
    }}
    server {{
        listen 127.0.0.1:{short_port};
        keepalive_requests 2;
        keepalive_timeout 1s;
        location /prom/ {{ {proxy} }}
    }}
    server {{
        listen 127.0.0.1:{https_port} ssl;
        ssl_certificate {cert[0]};
        ssl_certificate_key {cert[1]};
        {gzip}
        location /prom/ {{ {proxy} }}
    }}
"""
    with running_nginx(work, servers, [http_port, https_port, short_port]):
        s = Site()
        s.work = work
        s.http_port, s.https_port = http_port, https_port
        s.http = f"http://127.0.0.1:{http_port}"
        s.https = f"https://localhost:{https_port}"
        s.short = f"http://127.0.0.1:{short_port}"
        yield s


def log_since(site, mark, count):
    """The access log lines after the first ``mark``, once there are
    ``count`` of them (nginx logs a request after its reply is sent)."""
    deadline = time.monotonic() + 10
    while True:
        log = access_log(site.work)[mark:]
        if len(log) >= count or time.monotonic() > deadline:
            return log
        time.sleep(0.02)


@pytest.mark.parametrize("executor", ["greenpool", "threads"])
def test_through_nginx_gzip_keep_alive_and_path_prefix(site, expected, executor):
    mark = len(access_log(site.work))
    # replies gzipped when the collector asks for it ([collector_prometheus]
    # compress_replies; off by default: test_collector_prometheus.py)
    coll = collector(site.http + "/prom/", executor, compress_replies=True)
    try:
        assert answers(coll) == expected
    finally:
        coll.close()
    log = log_since(site, mark, len(expected))
    assert len(log) == len(expected)
    assert {status for _, _, status, _, _ in log} == {200}
    assert {encoding for _, _, _, encoding, _ in log} == {"gzip"}
    # keep-alive: one connection, its requests numbered 1, 2, 3, ...
    assert len({conn for conn, _, _, _, _ in log}) == 1
    assert [number for _, number, _, _, _ in log] == list(range(1, len(log) + 1))
    assert all(line.startswith("GET /prom/api/v1/query?query=") for *_, line in log)


def test_the_fetcher_through_nginx(site):
    """gzip and a redirect, for the fetcher's own (plain) transport."""
    at = BEGIN + datetime.timedelta(hours=1)
    fetcher = PrometheusFetcher(make_conf(
        fetcher_prometheus={"prometheus_url": site.http + "/r308", "metric": "instance_up"},
        collect={"end": at.isoformat()}))
    try:
        assert fetcher.get_scopes() == PROJECTS
    finally:
        fetcher.close()


@pytest.mark.parametrize("path, codes", [("/r301", [301]), ("/r302", [302]),
                                         ("/r307", [307]), ("/r308", [308]),
                                         ("/tls", [301])])
def test_redirects_are_followed(site, expected, cert, path, codes, caplog):
    """Same origin (credentials kept: /r307 goes to a location that needs
    them), and http -> https on another port."""
    mark = len(access_log(site.work))
    caplog.set_level(logging.WARNING, "cloudkitty_proc.http")
    coll = collector(site.http + path, prometheus_user=USER, prometheus_password=PASSWORD,
                     cafile=str(cert[0]))
    want = {k: v for k, v in expected.items() if k[2] == 1}
    try:
        assert answers(coll, queries=[1]) == want
    finally:
        coll.close()
    log = log_since(site, mark, 2 * len(want))
    statuses = [status for _, _, status, _, _ in log]
    if path == "/tls":   # the https server's log shows the redirected requests
        assert statuses.count(301) == len(statuses) // 2 and statuses.count(200) == len(
            statuses) // 2
    else:
        assert statuses == [codes[0], 200] * (len(statuses) // 2)
    permanent = [r for r in caplog.records if "redirects permanently" in r.getMessage()]
    assert len(permanent) == (1 if codes[0] in (301, 308) else 0)


def test_credentials_do_not_follow_a_redirect_to_another_host(site):
    mark = len(access_log(site.work))
    coll = collector(site.http + "/elsewhere", prometheus_user=USER,
                     prometheus_password=PASSWORD)
    try:
        with pytest.raises(CollectError) as err:
            coll.retrieve(metrics().metrics[0], PROJECTS[0], *hour(1))
    finally:
        coll.close()
    assert err.value.kind == "http" and "HTTP 401" in str(err.value)
    assert PASSWORD not in str(err.value)
    assert [status for _, _, status, _, _ in log_since(site, mark, 2)] == [302, 401]


@pytest.mark.parametrize("where, status", [("busy", 503), ("limited", 429)])
@pytest.mark.parametrize("max_backoff, wait", [(5.0, 3.0), (1.0, 1.0)])
def test_retry_after_is_honoured_within_max_backoff(site, expected, where, status,
                                                    max_backoff, wait):
    flag = site.work / where
    flag.touch()
    mark = len(access_log(site.work))
    coll = collector(f"{site.http}/{where}", retries=2, max_backoff=max_backoff)
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        flag.unlink()      # the server recovers while the collector waits

    coll._sleep = sleep
    metric = metrics().metrics[0]
    try:
        points = answers(coll, queries=[1])
    finally:
        coll.close()
        flag.unlink(missing_ok=True)
    assert waits == [wait]
    assert points[metric.label, PROJECTS[0], 1] == expected[metric.label, PROJECTS[0], 1]
    statuses = [s for _, _, s, _, _ in log_since(site, mark, len(points) + 1)]
    assert statuses[:2] == [status, 200] and set(statuses[2:]) == {200}


def test_keep_alive_limits_of_the_server(site, expected):
    """keepalive_requests 2 (nginx closes each connection after its second
    reply) and keepalive_timeout 1s (an idle connection is closed): every
    query is answered, with no error and no retry."""
    mark = len(access_log(site.work))
    coll = collector(site.short + "/prom")
    metric = metrics().metrics[0]
    try:
        for n in range(HOURS):
            key = (metric.label, PROJECTS[0], n)
            points = coll.retrieve(metric, PROJECTS[0], *hour(n))
            assert sorted((str(p.qty), sorted(p.groupby.items()), sorted(p.metadata.items()))
                          for p in points) == expected[key]
        time.sleep(1.5)    # nginx closes the idle connection
        assert len(coll.retrieve(metric, PROJECTS[0], *hour(0))) == len(
            expected[metric.label, PROJECTS[0], 0])
    finally:
        coll.close()
    log = log_since(site, mark, HOURS + 1)
    assert [status for _, _, status, _, _ in log] == [200] * (HOURS + 1)
    assert [number for _, number, _, _, _ in log] == [1, 2, 1, 1]


def test_https_through_a_connect_proxy_with_credentials(site, expected, cert, monkeypatch):
    metric = metrics().metrics[0]
    key = (metric.label, PROJECTS[0], 1)
    with ConnectProxy(auth=("pu", "pp")) as proxy:
        monkeypatch.setenv("https_proxy", proxy.url.replace("http://", "http://pu:pp@"))
        coll = collector(site.https + "/prom", cafile=str(cert[0]))
        try:
            assert answers(coll, queries=[1])[key] == expected[key]
        finally:
            coll.close()
        line, headers = proxy.requests[0]
        assert line.startswith(f"CONNECT localhost:{site.https_port} HTTP/1.")
        assert headers["proxy-authorization"].startswith("Basic ")
        # wrong credentials: the proxy's refusal, the proxy named
        monkeypatch.setenv("https_proxy", proxy.url.replace("http://", "http://pu:nope@"))
        coll = collector(site.https + "/prom", cafile=str(cert[0]))
        with pytest.raises(CollectError) as err:
            coll.retrieve(metric, PROJECTS[0], *hour(1))
        coll.close()
    assert err.value.kind == "connection" and "407" in str(err.value)
    assert f"proxy {proxy.url}" in str(err.value) and "nope" not in str(err.value)


def test_an_internationalised_host_name_through_a_forward_proxy(site, expected, monkeypatch):
    metric = metrics().metrics[0]
    key = (metric.label, PROJECTS[0], 1)
    name = f"xn--bcher-kva.example:{site.http_port}"
    with ConnectProxy(route={name: site.http_port}) as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        coll = collector(f"http://Bücher.example:{site.http_port}/prom")
        try:
            assert answers(coll, queries=[1])[key] == expected[key]
        finally:
            coll.close()
    line, headers = proxy.requests[0]
    assert line.startswith(f"GET http://{name}/prom/api/v1/query?query=")
    assert headers["host"] == name


def test_no_proxy_cidr_and_a_dead_proxy(site, expected, monkeypatch):
    metric = metrics().metrics[0]
    key = (metric.label, PROJECTS[0], 1)
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("http_proxy", dead.replace("http://", "http://pu:secret@"))
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.0/8")
    coll = collector(site.http + "/prom")
    try:
        assert answers(coll, queries=[1])[key] == expected[key]
    finally:
        coll.close()
    monkeypatch.setenv("no_proxy", "10.0.0.0/8")
    coll = collector(site.http + "/prom")
    with pytest.raises(CollectError) as err:
        coll.retrieve(metric, PROJECTS[0], *hour(1))
    coll.close()
    assert err.value.kind == "connection"
    assert f"proxy {dead}" in str(err.value) and "refused" in str(err.value).lower()
    assert "secret" not in str(err.value)


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", None])
def test_ca_bundle_from_the_environment(site, expected, cert, variable, monkeypatch):
    metric = metrics().metrics[0]
    key = (metric.label, PROJECTS[0], 1)
    if variable:
        monkeypatch.setenv(variable, str(cert[0]))
    coll = collector(site.https + "/prom")
    try:
        if variable:
            assert answers(coll, queries=[1])[key] == expected[key]
        else:
            with pytest.raises(CollectError) as err:
                coll.retrieve(metric, PROJECTS[0], *hour(1))
            assert err.value.kind == "connection"
            assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
    finally:
        coll.close()
