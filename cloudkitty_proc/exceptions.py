"""Exceptions that cross module boundaries."""

from __future__ import annotations


class CloudKittyProcError(Exception):
    """Base class of every error raised on purpose by cloudkitty_proc."""


class ConfigError(CloudKittyProcError):
    """A configuration file, metrics.yml or rules file is invalid.

    The message names the file and the key at fault; the CLI prints it on
    one line without a traceback.
    """


class CollectError(CloudKittyProcError):
    """A collector query failed (network, HTTP status, malformed reply).

    The period is not committed and the scope state does not move.
    """

    def __init__(self, message: str, *, metric: str | None = None,
                 scope_id: str | None = None, kind: str = "error") -> None:
        self.metric = metric
        self.scope_id = scope_id
        self.kind = kind
        parts = []
        if scope_id is not None:
            parts.append(f"scope {scope_id}")
        if metric is not None:
            parts.append(f"metric {metric}")
        prefix = (", ".join(parts) + ": ") if parts else ""
        super().__init__(prefix + message)


class StaleStateError(CloudKittyProcError):
    """A commit was refused: the scope state is not the one the worker read.

    Another worker (or an operator reset) moved the scope on; the caller must
    drop the frame and re-read the state.
    """


class SchemaError(CloudKittyProcError):
    """The database schema is missing or older than this code expects."""


class RatingError(CloudKittyProcError):
    """A rating processor could not rate a frame."""


class InvalidRequestError(CloudKittyProcError, ValueError):
    """A control request (reprocess, reset-state, quote) was refused.

    The message names the argument or the conflict at fault. Over RPC the
    caller receives it as a RemoteError; the worker keeps serving.
    """


class TaskCancelledError(CloudKittyProcError):
    """A reprocessing task can no longer run (e.g. a reset-state moved the
    scope's processed frontier below its window); it was marked failed."""


class StorageError(CloudKittyProcError):
    """A point store (InfluxDB, Elasticsearch, OpenSearch) refused a request
    or could not be reached. The message names the store and what failed;
    the period is not committed and the scope state does not move."""


class StoreUnreachableError(StorageError):
    """A point store gave no reply (connection refused or cut, timeout):
    every item of a batched commit would meet it, so a failed batch is not
    committed again item by item."""
