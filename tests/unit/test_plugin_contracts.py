"""Every installed plugin provides the methods of its family's protocol.

The protocols (collectors/base.py, fetchers/base.py, rating/base.py) say
what the worker calls; this checks each class registered under the entry
point namespaces has those methods, with the same parameter names (the
worker passes some of them by keyword).
"""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest

from cloudkitty_proc import plugins
from cloudkitty_proc.collectors.base import BaseCollector, Collector
from cloudkitty_proc.fetchers.base import BaseFetcher, Fetcher
from cloudkitty_proc.rating.base import BaseRatingProcessor, RatingProcessor

FAMILIES = {
    plugins.NS_COLLECTORS: (Collector, BaseCollector),
    plugins.NS_FETCHERS: (Fetcher, BaseFetcher),
    plugins.NS_RATING: (RatingProcessor, BaseRatingProcessor),
}
# what setup.cfg ships: the check must not pass on an empty namespace
SHIPPED = {
    plugins.NS_COLLECTORS: {"prometheus", "file", "gnocchi"},
    plugins.NS_FETCHERS: {"source", "prometheus", "keystone", "gnocchi"},
    plugins.NS_RATING: {"noop", "hashmap", "pyscripts"},
}


def _methods(protocol: type) -> dict[str, list[str]]:
    """Public methods of a protocol and their parameter names (no self)."""
    return {name: list(inspect.signature(fn).parameters)[1:]
            for name, fn in vars(protocol).items()
            if inspect.isfunction(fn) and not name.startswith("_")}


def _entry_points():
    for namespace in FAMILIES:
        for ep in importlib.metadata.entry_points(group=namespace):
            yield pytest.param(namespace, ep, id=f"{namespace}:{ep.name}")


def test_every_shipped_plugin_is_registered():
    for namespace, names in SHIPPED.items():
        assert names <= set(plugins.known_plugins(namespace)), namespace


@pytest.mark.parametrize("protocol, expected", [
    pytest.param(Collector, {"retrieve", "close"}, id="Collector"),
    pytest.param(Fetcher, {"get_scopes", "close"}, id="Fetcher"),
    pytest.param(RatingProcessor, {"process", "reload", "check"}, id="RatingProcessor"),
])
def test_protocols_declare_documented_methods(protocol, expected):
    assert set(_methods(protocol)) == expected
    for name in expected:
        assert inspect.getdoc(getattr(protocol, name)), f"{protocol.__name__}.{name}"


@pytest.mark.parametrize("namespace, ep", list(_entry_points()))
def test_plugin_provides_its_protocol(namespace, ep):
    protocol, base = FAMILIES[namespace]
    cls = ep.load()
    assert inspect.isclass(cls), ep.value
    for name, params in _methods(protocol).items():
        method = getattr(cls, name, None)
        assert callable(method), f"{ep.value} has no {name}()"
        got = list(inspect.signature(method).parameters)[1:]
        assert got == params, f"{ep.value}.{name}{tuple(got)}: expected {tuple(params)}"
    assert not inspect.isabstract(cls), f"{ep.value} leaves abstract methods"
    # the shipped plugins use the implementation base
    if ep.name in SHIPPED[namespace]:
        assert issubclass(cls, base), ep.value
