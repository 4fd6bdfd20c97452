"""sd_notify: datagrams to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket

from cloudkitty_proc.sdnotify import Notifier, watchdog_interval


def test_sends_fields_to_the_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        srv.settimeout(5)
        n = Notifier(path)
        assert n.enabled
        assert n.notify("READY=1", "STATUS=working")
        assert srv.recv(4096) == b"READY=1\nSTATUS=working"


def test_abstract_namespace_socket():
    name = f"ckp-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        srv.settimeout(5)
        assert Notifier("@" + name).notify("WATCHDOG=1")
        assert srv.recv(4096) == b"WATCHDOG=1"


def test_without_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().notify("READY=1")


def test_take_from_env_removes_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "s"))
    n = Notifier.take_from_env()
    assert n.address == str(tmp_path / "s")
    assert "NOTIFY_SOCKET" not in os.environ


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None
