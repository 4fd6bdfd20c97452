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
import collections
import concurrent.futures
import time
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

    def sleep(self, seconds: float) -> None:
        """Pause the caller; calls in flight go on (green threads run)."""
        time.sleep(seconds)

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


class _GreenJob(Handle):
    """A queued call; ``result()`` waits (in the hub) for a runner to do it."""

    __slots__ = ("fn", "args", "done")

    def __init__(self, fn: Callable[..., Any], args: tuple, event: Any) -> None:
        self.fn = fn
        self.args = args
        self.done = event

    def result(self) -> Any:
        ok, value = self.done.wait()
        if ok:
            return value
        raise value


class GreenPoolExecutor(CollectExecutor):
    """``submit`` never blocks: calls join a FIFO queue that at most
    ``size`` green threads of an ``eventlet.GreenPool`` work through, each
    taking the next queued call as soon as its own is done. A freed slot is
    so refilled at once, whatever the caller is doing; with a pool that
    only ``spawn``ed per call (blocking when full), slots freed while the
    caller waited for an older period stayed empty until it submitted
    again."""

    name = "greenpool"

    def __init__(self, size: int) -> None:
        super().__init__(size)
        import eventlet  # imported here: the master process never loads it
        from eventlet import event

        self._pool = eventlet.GreenPool(size)
        self._queue: collections.deque[_GreenJob] = collections.deque()
        self._event = event.Event
        self._sleep = eventlet.sleep

    def submit(self, fn: Callable[..., Any], *args: Any) -> Handle:
        job = _GreenJob(fn, args, self._event())
        self._queue.append(job)
        if self._pool.free() > 0:
            self._pool.spawn_n(self._runner)
        return job

    def _runner(self) -> None:
        queue = self._queue
        while queue:
            job = queue.popleft()
            job.done.send(_green_call(job.fn, job.args))

    def sleep(self, seconds: float) -> None:
        self._sleep(seconds)

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
