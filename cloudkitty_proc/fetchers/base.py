"""The fetcher contract: which scopes exist.

:class:`Fetcher` says what a fetcher must provide and when each member is
called; :class:`BaseFetcher` is the convenient base to implement one
(``get_scopes()`` to write, a no-op ``close()``).

Who builds a fetcher (``cls(conf)``, through
:func:`cloudkitty_proc.plugins.load_fetcher`): each worker, on its run
thread, at start; the worker's RPC endpoint (to check the scopes named in
requests); the metrics service (``/metrics``); the ``reset-state`` and
``reprocess`` commands when they work on the database directly. Each owns
its instance, used by one thread at a time: a fetcher needs no locking, and
its I/O is plain blocking I/O (it never runs in the collect pool).
"""

from __future__ import annotations

import abc
from typing import Protocol

from oslo_config import cfg

from cloudkitty_proc.exceptions import CloudKittyProcError

__all__ = ["BaseFetcher", "FetchError", "Fetcher", "MAX_SCOPE_ID_LENGTH", "usable_scopes"]

#: the longest scope id (characters): the width of the storage's scope
#: columns (CloudKitty's too). A longer id is left out of every pass with an
#: error naming it, once per process, instead of failing every commit.
MAX_SCOPE_ID_LENGTH = 255


class FetchError(CloudKittyProcError):
    """The scope list could not be obtained."""


class Fetcher(Protocol):
    """What a fetcher provides (entry point namespace
    ``cloudkitty_proc.fetchers``).

    Construction: ``cls(conf)`` with the global, registered options; no
    network I/O. An invalid option raises
    :class:`~cloudkitty_proc.exceptions.ConfigError` (or ValueError,
    TypeError, OSError, turned into a ConfigError naming ``[fetcher]
    backend``); in a worker this exits the worker process (status 2).
    """

    def get_scopes(self) -> list[str]:
        """The scope ids to process (strings, no duplicates; order does
        not matter).

        Called by the worker on its run thread at the start of every pass
        (never inside the collect pool), and on request by the other users
        listed in the module docstring. On failure raise :class:`FetchError`
        (its message is logged with URL credentials masked): the worker
        processes the scopes of its last successful call and marks the
        pass as pending. Any other exception fails the whole pass: logged,
        retried after a short wait.
        """

    def close(self) -> None:
        """Release connections. Called once by the owner when it is done
        with the instance (a worker: on its run thread when it stops, and
        an exception is ignored); the instance is not used again."""


class BaseFetcher(abc.ABC):
    """Implementation base of :class:`Fetcher`: keeps ``conf``; ``close()``
    does nothing unless overridden."""

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf

    @abc.abstractmethod
    def get_scopes(self) -> list[str]:
        """Return the scope ids to process (order does not matter)."""

    def close(self) -> None:
        """Release connections (called when the worker stops)."""


def usable_scopes(scopes: list[str], refused: set[str], log) -> list[str]:
    """``scopes`` without the ids longer than ``MAX_SCOPE_ID_LENGTH``; each
    one left out is logged once (``refused`` remembers them)."""
    out = []
    for scope in scopes:
        if len(scope) <= MAX_SCOPE_ID_LENGTH:
            out.append(scope)
        elif scope not in refused:
            refused.add(scope)
            log.error("scope id %r… (%d characters) is longer than %d: left out",
                      scope[:40], len(scope), MAX_SCOPE_ID_LENGTH)
    return out
