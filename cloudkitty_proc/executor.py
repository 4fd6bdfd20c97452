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

    def io_begin(self) -> None:
        """A call is about to use the network (see GreenPoolExecutor)."""

    def io_done(self) -> None:
        """A call is done with the network and goes on with CPU work."""


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
    """``submit`` never blocks: calls join a FIFO queue worked by green
    threads, at most ``size`` of them holding a *slot* at a time; a runner
    takes the next queued call as soon as its own is done, so a freed slot
    is refilled at once, whatever the caller is doing.

    A slot stands for a query in flight, not for a whole call: a call that
    tells the executor its I/O is over (``io_done``, which the collector
    calls once the reply is read) gives its slot to a new runner, which
    sends the next queued query at once; the reply is then parsed and
    converted while that query is in flight. A call that needs the network
    again (a retry) takes a slot back first (``io_begin``), ahead of the
    queued calls. So at most ``size`` queries are in flight, and a slot's
    connection is idle only for the time it takes to read a reply and send
    the next request, not to parse and convert it."""

    name = "greenpool"

    def __init__(self, size: int) -> None:
        super().__init__(size)
        # imported here: the master process never loads eventlet
        import eventlet
        import greenlet
        from eventlet import event

        self._queue: collections.deque[_GreenJob] = collections.deque()
        self._event = event.Event
        self._sleep = eventlet.sleep
        self._spawn_n = eventlet.spawn_n
        self._current = greenlet.getcurrent
        self._free = size                       # slots nobody holds
        self._holders: set[Any] = set()         # runners holding a slot
        self._runners: set[Any] = set()         # every live runner
        self._waiting: collections.deque[Any] = collections.deque()  # io_begin
        self._drained: Any = None               # close() waits on it

    def submit(self, fn: Callable[..., Any], *args: Any) -> Handle:
        job = _GreenJob(fn, args, self._event())
        self._queue.append(job)
        if self._take():
            self._spawn_n(self._runner)
        return job

    # -- slots ---------------------------------------------------------------
    def _take(self) -> bool:
        """A free slot, if any (calls waiting in io_begin come first)."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return True
        return False

    def _give(self) -> None:
        """Free a slot: straight to the oldest call waiting in io_begin."""
        if self._waiting:
            self._waiting.popleft().send()
        else:
            self._free += 1

    def _runner(self) -> None:
        """Holds the slot taken for it; works the queue while it holds one."""
        me = self._current()
        holders, queue = self._holders, self._queue
        holders.add(me)
        self._runners.add(me)
        try:
            while queue and me in holders:
                job = queue.popleft()
                job.done.send(_green_call(job.fn, job.args))
        finally:
            if me in holders:
                holders.discard(me)
                self._give()
            self._runners.discard(me)
            if not self._runners and self._drained is not None:
                self._drained.send()
                self._drained = None

    def io_done(self) -> None:
        """Called by a call whose network exchange is over: its slot goes
        to the next queued call, which starts (sends its query) before this
        one goes on. A no-op outside a runner."""
        me = self._current()
        if me not in self._holders:
            return
        self._holders.discard(me)
        self._give()
        if self._queue and self._take():
            self._spawn_n(self._runner)
            self._sleep(0)

    def io_begin(self) -> None:
        """Called before a network exchange: a call that gave its slot away
        (io_done) waits for one again. A no-op for a slot holder and
        outside a runner."""
        me = self._current()
        if me in self._holders or me not in self._runners:
            return
        if not self._take():
            ready = self._event()
            self._waiting.append(ready)
            ready.wait()                 # _give handed us its slot
        self._holders.add(me)

    def sleep(self, seconds: float) -> None:
        self._sleep(seconds)

    def yield_now(self) -> None:
        # green threads only run when this thread waits; without this the
        # queries of the next period would wait for the rating and commit
        self._sleep(0)

    def close(self) -> None:
        if self._runners:
            self._drained = self._event()
            self._drained.wait()


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
