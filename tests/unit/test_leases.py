"""The scope lease (leases.scope_lease): taken without waiting, released on
every path, a busy or unreachable backend told apart, a failed release
logged and otherwise ignored. Real tooz file locks where a real lock is
needed; test doubles for a backend that fails."""

from __future__ import annotations

import logging

import pytest
from oslo_config import cfg

from cloudkitty_proc import conf as ckp_conf
from cloudkitty_proc.leases import lock_name, scope_lease, start_coordinator
from cloudkitty_proc.log import ContextLogger

LOG = ContextLogger(logging.getLogger("tests.leases"), "w0", "s1")


@pytest.fixture
def coordinator(tmp_path):
    c = cfg.ConfigOpts()
    ckp_conf.register_opts(c)
    c([], project="cloudkitty-proc-test")
    c.set_override("coordination_url", f"file://{tmp_path}/locks", group="orchestrator")
    coords = []

    def make(member):
        coords.append(start_coordinator(c, member))
        return coords[-1]
    yield make
    for coord in coords:
        coord.stop()


def is_free(coord, scope_id):
    lock = coord.get_lock(lock_name(scope_id))
    if lock.acquire(blocking=False):
        lock.release()
        return True
    return False


def test_lock_names_are_hashed_and_distinct():
    assert lock_name("a") != lock_name("b")
    odd = lock_name("p/../x y:\n" * 20)
    assert odd.startswith(b"ckp-scope-") and len(odd) == len(lock_name("a"))


def test_lease_is_held_in_the_block_and_released_even_on_error(coordinator):
    mine, other = coordinator("mine"), coordinator("other")
    busy = []
    with pytest.raises(RuntimeError):
        with scope_lease(mine, "s1", LOG, on_busy=lambda: busy.append(1)) as held:
            assert held is True
            assert not is_free(other, "s1")
            raise RuntimeError("a bug in the body")
    assert is_free(other, "s1")
    assert busy == []


def test_busy_lease_is_left_to_its_holder(coordinator):
    holder, mine = coordinator("holder"), coordinator("mine")
    lock = holder.get_lock(lock_name("s1"))
    assert lock.acquire(blocking=False)
    try:
        busy = []
        with scope_lease(mine, "s1", LOG, on_busy=lambda: busy.append(1)) as held:
            assert held is False
        assert busy == [1]
        assert not is_free(mine, "s1")  # the holder's lock was not touched
    finally:
        lock.release()


class _Lock:
    def __init__(self, acquire_error=None, release_error=None):
        self.acquire_error, self.release_error = acquire_error, release_error
        self.released = 0

    def acquire(self, blocking=True):
        if self.acquire_error:
            raise self.acquire_error
        return True

    def release(self):
        self.released += 1
        if self.release_error:
            raise self.release_error


class _Coordinator:
    def __init__(self, lock):
        self.lock = lock

    def get_lock(self, name):
        assert name == lock_name("s1")
        return self.lock


@pytest.mark.parametrize("quiet, level", [(False, logging.WARNING), (True, logging.DEBUG)])
def test_unreachable_backend_is_logged_not_counted_as_busy(caplog, quiet, level):
    lock = _Lock(acquire_error=ConnectionError("redis://u:secret@h down"))
    busy = []
    with caplog.at_level(logging.DEBUG, logger="tests.leases"):
        with scope_lease(_Coordinator(lock), "s1", LOG, on_busy=lambda: busy.append(1),
                         quiet=quiet) as held:
            assert held is False
    assert busy == [] and lock.released == 0
    [record] = caplog.records
    assert record.levelno == level
    assert "cannot take the scope lock" in record.getMessage()
    assert "secret" not in record.getMessage()


def test_failed_release_is_logged_and_ignored(caplog):
    lock = _Lock(release_error=ConnectionError("lease lost"))
    with caplog.at_level(logging.WARNING, logger="tests.leases"):
        with scope_lease(_Coordinator(lock), "s1", LOG) as held:
            assert held is True
    assert lock.released == 1
    assert any("releasing the scope lock failed: lease lost" in r.getMessage()
               for r in caplog.records)


def test_cloudkitty_lock_name_is_cloudkitty_processors():
    """The name cloudkitty/orchestrator.py's get_lock builds (25.0.0):
    sha256("cloudkitty-" + id + "-" + collector + "-" + fetcher + "-" +
    scope_key), hex, for a rolling switch beside CloudKitty processors."""
    import hashlib
    from types import SimpleNamespace

    from cloudkitty_proc import leases
    expected = hashlib.sha256(b"cloudkitty-p1-prometheus-source-project_id").hexdigest()
    assert leases.cloudkitty_lock_name("p1", "prometheus", "source",
                                       "project_id") == expected.encode()
    conf = SimpleNamespace(
        collect=SimpleNamespace(collector="prometheus", scope_key="project_id"),
        fetcher=SimpleNamespace(backend="source"),
        cloudkitty_proc=SimpleNamespace(mode="cloudkitty"))
    assert leases.lock_name_for(conf, "p1") == expected.encode()
    conf.cloudkitty_proc.mode = "native"
    assert leases.lock_name_for(conf, "p1") == leases.lock_name("p1")
