"""The systemd notification protocol (sd_notify), in a few lines.

A datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading
``@`` means the abstract namespace). Without the variable every call is a
no-op, so the daemon behaves the same outside systemd.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")

    @classmethod
    def take_from_env(cls) -> "Notifier":
        """Take ``$NOTIFY_SOCKET`` out of the environment (so that libraries
        and children do not notify on our behalf) and keep it here."""
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (e.g. "READY=1", "STATUS=…"); False if not sent."""
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(addr)
                sock.sendall("\n".join(fields).encode())
            return True
        except OSError:
            return False


def watchdog_interval() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds when the watchdog is on for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
