"""The gnocchi fetcher against a real Gnocchi 4.7.1 holding 20,000 resources
(issue 19, acceptance 3): the same scopes as CloudKitty 25.0.0's
GnocchiFetcher, in pages, with a peak RSS that does not grow with the
number of resources (only the set of scope ids is kept).

The resources are written straight into Gnocchi's indexer
(tests.gnocchi_server.bulk_generic_resources: one INSERT, about a second;
the API would take minutes). The fetcher runs in a subprocess of its own so
that its peak RSS (``ru_maxrss``) is its own, before and after
``get_scopes()``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from cloudkitty_proc.fetchers.base import FetchError
from cloudkitty_proc.fetchers.gnocchi import GnocchiFetcher
from tests.functional.test_collector_prometheus import make_conf
from tests.gnocchi_server import ROOT, bulk_generic_resources, run_cloudkitty_driver, \
    running_gnocchi

TOTAL = 20_000
BIG = 3_000          # resources of one scope: read in one page, the rest skipped
PAGE = 1000
#: bounds on the fetcher's peak RSS growth and Python heap peak while it
#: lists 20,000 resources (measured: see the report printed by the test)
RSS_BOUND_KIB = 16 * 1024
HEAP_BOUND_KIB = 4 * 1024


def project_ids() -> list[str | None]:
    """TOTAL resources: one scope with BIG, the others 1 to 16 each, plus 30
    with a null project_id (not a scope)."""
    out: list[str | None] = ["p-big"] * BIG
    i = 0
    while len(out) < TOTAL:
        out.extend([f"p-{i:05d}"] * min(1 + i % 16, TOTAL - len(out)))
        i += 1
    return out + [None] * 30


@pytest.fixture(scope="module")
def bulk(tmp_path_factory):
    with running_gnocchi(tmp_path_factory.mktemp("gnocchi"), metricd=False) as server:
        projects = project_ids()
        bulk_generic_resources(server, projects)
        yield server, sorted({p for p in projects if p})


#: peak memory of a call, in a subprocess: the kernel's peak RSS (VmHWM)
#: reset just before it (/proc/self/clear_refs), and tracemalloc's peak
MEASURE = textwrap.dedent("""
    import tracemalloc

    def _status(key):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])

    def measure(call):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")   # peak RSS := current RSS
        rss = _status("VmRSS")
        tracemalloc.start()
        started = time.monotonic()
        result = call()
        seconds = time.monotonic() - started
        peak_traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return result, {"rss_before_kib": rss, "rss_peak_kib": _status("VmHWM"),
                        "traced_peak_kib": peak_traced // 1024, "seconds": seconds}
""")

FETCH = MEASURE + textwrap.dedent("""
    import json, sys, time
    from oslo_config import cfg
    import cloudkitty_proc.conf as ckconf
    from cloudkitty_proc.fetchers.gnocchi import GnocchiFetcher
    conf = cfg.ConfigOpts()
    ckconf.register_opts(conf)
    conf([], project="cloudkitty-proc", default_config_files=[])
    for name, value in json.loads(sys.argv[1]).items():
        conf.set_override(name, value, "fetcher_gnocchi")
    fetcher = GnocchiFetcher(conf)
    scopes, figures = measure(fetcher.get_scopes)
    print(json.dumps({"scopes": scopes, "pages": fetcher.last_pages,
                      "resources": fetcher.last_resources, **figures}))
""")


def run_fetcher(server, **opts) -> dict:
    options = {"gnocchi_auth_type": "basic", "gnocchi_user": "admin",
               "gnocchi_endpoint": server.url, **opts}
    proc = subprocess.run([sys.executable, "-c", FETCH, json.dumps(options)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_lists_20000_resources_in_pages_with_bounded_memory(bulk, tmp_path, record_property):
    server, expected = bulk
    # Gnocchi sees them all (its search, in pages of its max_limit)
    assert len(server.call("POST", "/v1/search/resource/generic",
                           {"=": {"project_id": "p-big"}}, params={"attrs": "id"})) == PAGE
    theirs = run_cloudkitty_driver({"endpoint": server.url, "user": "admin",
                                    "fetcher": {"resource_types": ["generic"]}}, tmp_path)
    assert theirs["scopes"] == expected
    # Resources with an empty project_id: not scopes. (Added after
    # CloudKitty's run: its fetcher never returns then, as its "not in"
    # query keeps finding them and never adds "" to the scopes it excludes.)
    bulk_generic_resources(server, [""] * 30)
    ours = run_fetcher(server)
    assert ours["scopes"] == expected and len(expected) > 2000
    # in pages: no request got more than a page, the big scope's other
    # resources were skipped, and every request but the last was full
    assert ours["pages"] >= (TOTAL - BIG) // PAGE
    assert ours["resources"] <= ours["pages"] * PAGE
    assert ours["resources"] <= TOTAL + 30 - (BIG - PAGE)
    # smaller pages: more requests, the same scopes
    small = run_fetcher(server, page_size=250)
    assert small["scopes"] == expected and small["pages"] > 3 * ours["pages"]
    ck = theirs["fetcher"]
    growth = ours["rss_peak_kib"] - ours["rss_before_kib"]
    their_growth = ck["rss_peak_kib"] - ck["rss_before_kib"]
    for name, value in (("rss_growth_kib", growth), ("traced_peak_kib", ours["traced_peak_kib"]),
                        ("pages", ours["pages"]), ("resources_read", ours["resources"]),
                        ("seconds", ours["seconds"]), ("cloudkitty_rss_growth_kib", their_growth),
                        ("cloudkitty_traced_peak_kib", ck["traced_peak_kib"]),
                        ("cloudkitty_seconds", ck["seconds"])):
        record_property(name, value)
    print(f"\ngnocchi fetcher, {TOTAL} resources: ours {ours['pages']} requests, "
          f"{ours['resources']} resources read, {ours['seconds']:.2f} s, RSS "
          f"{ours['rss_before_kib']} KiB, peak +{growth} KiB, Python heap peak "
          f"{ours['traced_peak_kib']} KiB; pages of 250: {small['pages']} requests, peak +"
          f"{small['rss_peak_kib'] - small['rss_before_kib']} KiB, heap peak "
          f"{small['traced_peak_kib']} KiB; CloudKitty {ck['seconds']:.2f} s, RSS "
          f"{ck['rss_before_kib']} KiB, peak +{their_growth} KiB, heap peak "
          f"{ck['traced_peak_kib']} KiB")
    assert growth < RSS_BOUND_KIB, growth
    assert ours["traced_peak_kib"] < HEAP_BOUND_KIB, ours["traced_peak_kib"]


def test_resource_types_and_errors(bulk):
    server, expected = bulk
    conf = make_conf(fetcher_gnocchi={"gnocchi_auth_type": "basic", "gnocchi_user": "admin",
                                      "gnocchi_endpoint": server.url,
                                      "resource_types": ["generic", "nosuchtype"]})
    fetcher = GnocchiFetcher(conf)
    try:
        with pytest.raises(FetchError, match=r"HTTP 404 .*nosuchtype"):
            fetcher.get_scopes()
    finally:
        fetcher.close()
    # an empty list is every resource (generic), as CloudKitty's help says
    conf = make_conf(fetcher_gnocchi={"gnocchi_auth_type": "basic", "gnocchi_user": "admin",
                                      "gnocchi_endpoint": server.url, "resource_types": [],
                                      "scope_attribute": "user_id"})
    fetcher = GnocchiFetcher(conf)
    try:
        assert fetcher.get_scopes() == ["u-bulk"]
        # one scope for 20,060 resources: a page, then an empty one
        assert (fetcher.last_pages, fetcher.last_resources) == (2, PAGE)
    finally:
        fetcher.close()
