"""The fetcher contract: which scopes exist.

``get_scopes()`` is called by each worker at the start of every pass, on the
worker's main thread (never inside the collect pool). It returns scope ids
(strings). On failure it raises ``FetchError``; the worker logs it and keeps
processing the scopes it already knows.
"""

from __future__ import annotations

import abc

from oslo_config import cfg

from cloudkitty_proc.exceptions import CloudKittyProcError


class FetchError(CloudKittyProcError):
    """The scope list could not be obtained."""


class BaseFetcher(abc.ABC):
    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf

    @abc.abstractmethod
    def get_scopes(self) -> list[str]:
        """Return the scope ids to process (order does not matter)."""

    def close(self) -> None:
        """Release connections (called when the worker stops)."""
