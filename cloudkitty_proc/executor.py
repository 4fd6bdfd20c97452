"""Where a worker's concurrent collector queries run.

Two implementations behind one tiny interface, chosen by
``[orchestrator] collect_executor``:

``greenpool`` (default)
    An ``eventlet.GreenPool``. Green threads run on the hub of the thread
    that owns the pool (the worker's run thread) whenever that thread waits
    on a result. There is NO global monkey patching: collectors get green
    I/O from ``eventlet.import_patched`` (doc/source/design.rst explains
    why patching breaks cotyledon).
``threads``
    A ``concurrent.futures.ThreadPoolExecutor``; collectors then do
    ordinary blocking I/O. Kept so the eventlet dependency can be retired
    (OpenStack deprecates eventlet) by a configuration change.

Both are used from ONE thread only (the worker's run thread).
"""

from __future__ import annotations

import abc
import concurrent.futures
from collections.abc import Callable
from typing import Any


class Handle(abc.ABC):
    @abc.abstractmethod
    def result(self) -> Any:
        """Wait for and return the call's result (or raise its exception)."""


class CollectExecutor(abc.ABC):
    name: str = ""

    def __init__(self, size: int) -> None:
        self.size = size

    @abc.abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any) -> Handle:
        """Start ``fn(*args)``; may wait for a free slot."""

    def close(self) -> None:
        """Stop accepting work; running calls finish."""

    def yield_now(self) -> None:
        """Let calls just submitted start now (send their requests) before
        the caller does CPU work; a no-op where calls run on threads."""


def _green_call(fn: Callable[..., Any], args: tuple) -> tuple[bool, Any]:
    """Runs in the green thread. An exception is returned, not raised:
    eventlet's hub would print the traceback of every failed query on
    stderr; result() raises it in the caller, which logs it once."""
    try:
        return True, fn(*args)
    except Exception as exc:  # noqa: BLE001 - handed to result()
        return False, exc


class _GreenHandle(Handle):
    __slots__ = ("_gt",)

    def __init__(self, gt: Any) -> None:
        self._gt = gt

    def result(self) -> Any:
        ok, value = self._gt.wait()
        if ok:
            return value
        raise value


class GreenPoolExecutor(CollectExecutor):
    name = "greenpool"

    def __init__(self, size: int) -> None:
        super().__init__(size)
        import eventlet  # imported here: the master process never loads it

        self._pool = eventlet.GreenPool(size)
        self._sleep = eventlet.sleep

    def submit(self, fn: Callable[..., Any], *args: Any) -> Handle:
        return _GreenHandle(self._pool.spawn(_green_call, fn, args))

    def yield_now(self) -> None:
        # green threads only run when this thread waits; without this the
        # queries of the next period would wait for the rating and commit
        self._sleep(0)

    def close(self) -> None:
        self._pool.waitall()


class _FutureHandle(Handle):
    __slots__ = ("_fut",)

    def __init__(self, fut: concurrent.futures.Future) -> None:
        self._fut = fut

    def result(self) -> Any:
        return self._fut.result()


class ThreadExecutor(CollectExecutor):
    name = "threads"

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=size, thread_name_prefix="ckp-collect")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Handle:
        return _FutureHandle(self._pool.submit(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def make_executor(kind: str, size: int) -> CollectExecutor:
    if kind == "threads":
        return ThreadExecutor(size)
    return GreenPoolExecutor(size)
