"""What the workers tell the master, through memory shared across the fork.

The master creates one ``RunStatus`` before cotyledon forks the workers;
each worker writes its own slots, the master's threads read them:

* **idle** (``--oneshot``): a worker's last pass found nothing due and
  nothing locked by another worker; when every worker is idle the run ends.
* **unrecorded**: periods whose error could not even be stored (the
  database full or refusing the scope): ``status`` cannot show them, so a
  ``--oneshot`` run counts them and exits 1.
* **start failures** (the crash-loop guard): a worker that cannot set itself
  up (a plugin, the coordinator, the database) reports it before exiting;
  after ``MAX_START_FAILURES`` failures in a row with no worker started in
  between, the master stops the daemon with that error instead of letting
  cotyledon respawn workers forever. Each failed worker waits a little
  longer than the previous one before it exits (``start_backoff``).
"""

from __future__ import annotations

import multiprocessing

#: worker slots (the most workers a daemon may run)
MAX_WORKERS = 4096
#: failed worker starts in a row that stop the daemon
MAX_START_FAILURES = 5
#: the longest a failed worker waits before exiting (seconds)
MAX_START_BACKOFF = 30.0
_MESSAGE_BYTES = 1024


class RunStatus:
    """Shared slots; create in the master, before the fork."""

    def __init__(self, size: int = MAX_WORKERS) -> None:
        self.size = size
        self._idle = multiprocessing.RawArray("b", size)
        self._unrecorded = multiprocessing.RawArray("i", size)
        self._start_failures = multiprocessing.RawValue("i", 0)
        self._last_error = multiprocessing.RawArray("c", _MESSAGE_BYTES)

    # -- idle (oneshot) ----------------------------------------------------
    def set_idle(self, worker_id: int, idle: bool) -> None:
        self._idle[worker_id] = 1 if idle else 0

    def all_idle(self, workers: int) -> bool:
        return workers > 0 and all(self._idle[i] == 1 for i in range(min(workers, self.size)))

    # -- errors that could not be stored -------------------------------------
    def add_unrecorded(self, worker_id: int) -> None:
        self._unrecorded[worker_id] += 1

    def unrecorded(self) -> int:
        return sum(self._unrecorded)

    # -- worker starts -------------------------------------------------------
    def start_failed(self, message: str) -> int:
        """A worker could not start: remember why; returns the failures in
        a row so far."""
        data = message.encode("utf-8", "replace")[:_MESSAGE_BYTES - 1]
        self._last_error.value = data
        self._start_failures.value += 1
        return self._start_failures.value

    def started(self) -> None:
        self._start_failures.value = 0

    def start_failures(self) -> int:
        return self._start_failures.value

    def last_start_error(self) -> str:
        return self._last_error.value.decode("utf-8", "replace")


def start_backoff(failures: int) -> float:
    """How long a worker that failed to start waits before exiting: 1, 2, 4
    … seconds, at most ``MAX_START_BACKOFF`` (cotyledon respawns it at once)."""
    return min(2.0 ** max(failures - 1, 0), MAX_START_BACKOFF)
