"""Scope leases: the tooz coordinator and the lock that gives a worker a scope.

A worker processes a scope only while it holds the scope's lease: a tooz
lock (``[orchestrator] coordination_url``) named after the scope id hashed,
so that any scope id is a valid name on every backend. The lease is taken
without waiting: a scope held elsewhere is left to its holder and visited
again on a later pass.

A lease may lapse while held (a paused process, a cut network, a starved
heartbeat). It only keeps workers from doing the same work twice; what
makes a second commit impossible is the storage's fencing (the commit is a
compare-and-set on the scope's state version). A release that fails is
therefore logged and otherwise ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from oslo_config import cfg

from cloudkitty_proc.exceptions import CloudKittyProcError, ConfigError
from cloudkitty_proc.log import mask_url


class CoordinationError(CloudKittyProcError):
    """The coordination backend cannot be used (down, refusing the login …)."""


#: how long starting the coordinator may take (seconds)
START_TIMEOUT = 15.0


def start_coordinator(conf: cfg.ConfigOpts, member_id: str,
                      timeout: float = START_TIMEOUT) -> Any:
    """A started tooz coordinator (heartbeat thread running) for
    ``[orchestrator] coordination_url``; ``file://`` directories are created."""
    # tooz is imported in workers only: the master process never loads it
    from tooz import coordination

    url = conf.orchestrator.coordination_url
    check_url(url)
    if url.startswith("file://"):
        os.makedirs(url[len("file://"):].split("?", 1)[0], mode=0o700, exist_ok=True)
    box: dict[str, Any] = {}

    def start() -> None:
        try:
            coord = coordination.get_coordinator(url, member_id.encode())
            coord.start(start_heart=True)
            box["coordinator"] = coord
        except Exception as exc:  # noqa: BLE001 - the backend down, refusing us, …
            box["error"] = exc

    # some drivers retry a refused connection for a minute or more (redis-py
    # 8 does): a worker would then hang at start, and --oneshot with it
    thread = threading.Thread(target=start, daemon=True, name="tooz-start")
    thread.start()
    thread.join(timeout)
    where = f"[orchestrator] coordination_url {mask_url(url)}"
    if thread.is_alive():
        raise CoordinationError(f"{where}: no answer within {timeout:g} s")
    if "error" in box:
        exc = box["error"]
        raise CoordinationError(f"{where}: {type(exc).__name__}: {mask_url(exc)}")
    return box["coordinator"]


def check_url(url: str) -> None:
    """ConfigError unless ``url``'s scheme names an installed tooz driver
    (read from the package metadata: tooz itself is not imported)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    drivers = {e.name for e in importlib.metadata.entry_points(group="tooz.backends")}
    if scheme not in drivers:
        raise ConfigError(f"[orchestrator] coordination_url {mask_url(url)!r}: "
                          f"{'no scheme' if not scheme else f'unknown scheme {scheme!r}'} "
                          f"(tooz drivers installed: {', '.join(sorted(drivers))})")


def lock_name(scope_id: str) -> bytes:
    """tooz lock name of a scope: hashed, so any scope id is a safe name."""
    return ("ckp-scope-" + hashlib.sha256(scope_id.encode()).hexdigest()[:32]).encode()


def cloudkitty_lock_name(scope_id: str, collector: str, fetcher: str,
                         scope_key: str) -> bytes:
    """The lock name CloudKitty's processor takes for a scope
    (``cloudkitty/orchestrator.py`` ``get_lock``): a cloudkitty_proc worker
    and a CloudKitty processor running side by side (a rolling switch) then
    never hold the same scope at once."""
    text = f"cloudkitty-{scope_id}-{collector}-{fetcher}-{scope_key}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest().encode("ascii")


def lock_name_for(conf: Any, scope_id: str) -> bytes:
    """The lock name of a scope in the configured mode: CloudKitty's in the
    drop-in mode (``[cloudkitty_proc] mode = cloudkitty``), ours otherwise."""
    group = getattr(conf, "cloudkitty_proc", None)
    if group is not None and getattr(group, "mode", "native") == "cloudkitty":
        return cloudkitty_lock_name(scope_id, conf.collect.collector, conf.fetcher.backend,
                                    conf.collect.scope_key)
    return lock_name(scope_id)


def partitions_for(conf: Any) -> int:
    """How many lease partitions the scopes are spread over: ``[orchestrator]
    lease_partitions``, or 0 (one lease per scope) in the drop-in mode,
    whose leases are CloudKitty's per-scope locks."""
    group = getattr(conf, "cloudkitty_proc", None)
    if group is not None and getattr(group, "mode", "native") == "cloudkitty":
        return 0
    return conf.orchestrator.lease_partitions


def partition_of(scope_id: str, partitions: int) -> int:
    """The lease partition of a scope: a hash of its id, the same on every
    host and in every process (not Python's ``hash``, which is salted)."""
    digest = hashlib.sha256(scope_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def partition_lock_name(index: int, partitions: int) -> bytes:
    """tooz lock name of a lease partition. The partition count is in the
    name: hosts configured with different counts then never believe they
    hold the same partition with different scopes in it (the state fence
    still keeps their commits apart)."""
    return f"ckp-partition-{partitions}-{index}".encode()


def lease_name(conf: Any, scope_id: str) -> bytes:
    """The lock a worker holds while it processes ``scope_id``: its
    partition's (``lease_partitions`` > 0) or its own (lock_name_for)."""
    partitions = partitions_for(conf)
    if partitions:
        return partition_lock_name(partition_of(scope_id, partitions), partitions)
    return lock_name_for(conf, scope_id)


@contextlib.contextmanager
def scope_lease(coordinator: Any, scope_id: str, log: logging.LoggerAdapter, *,
                on_busy: Callable[[], None] | None = None,
                quiet: bool = False, name: bytes | None = None) -> Iterator[bool]:
    """Hold the lease of ``scope_id`` for the ``with`` block, if it is free.

    Yields True with the lease held, released when the block ends however
    it ends. Yields False when another member holds it (``on_busy`` is
    called) or when the backend cannot be reached (a warning, or a debug
    line with ``quiet``, for callers that leave the scope to a later try).
    ``name``: the lock name (default ``lock_name(scope_id)``).
    """
    lock = coordinator.get_lock(name or lock_name(scope_id))
    reachable = True
    try:
        acquired = lock.acquire(blocking=False)
    except Exception as exc:  # tooz backend unreachable
        log.log(logging.DEBUG if quiet else logging.WARNING,
                "cannot take the scope lock: %s", mask_url(exc))
        acquired = reachable = False
    if not acquired:
        if reachable and on_busy is not None:
            on_busy()
        yield False
        return
    try:
        yield True
    finally:
        try:
            lock.release()
        except Exception as exc:  # lease lost; the fenced commit protected us
            log.warning("releasing the scope lock failed: %s", mask_url(exc))
