"""What both halves of the ``prometheus`` collector share
(:mod:`~cloudkitty_proc.collectors.prometheus` and
:mod:`~cloudkitty_proc.collectors.prometheus_batch`): the path of instant
queries, :class:`Retryable` (a failure worth retrying) and the texts of the
server cut to a length fit for messages.

This is a private helper of the prometheus collector (not a plugin).
"""

from __future__ import annotations

import json
from typing import Any

QUERY_PATH = "/api/v1/query"

#: the most characters of a server's error text kept in a message
ERROR_TEXT_LIMIT = 300

#: the most characters of a query shown in a message (a batch of scopes
#: makes queries of 10 KB and more; a scope's own query is far shorter)
QUERY_TEXT_LIMIT = 1000


class Retryable(Exception):
    """A failed query worth asking again (timeout, connection, 5xx, 429,
    malformed or partial reply); ``kind`` is CollectError's."""

    def __init__(self, message: str, kind: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.retry_after = retry_after


def query_text(query: str) -> str:
    return cut_text(query, QUERY_TEXT_LIMIT)


def excerpt(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    if not text:
        return "(empty body)"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def error_detail(body: bytes) -> str:
    """Prometheus' {"errorType": ..., "error": ...} or the body itself."""
    try:
        data = json.loads(body)
    except ValueError:
        return excerpt(body)
    if isinstance(data, dict) and "error" in data:
        return f"{cut_text(data.get('errorType', 'error'), 40)}: {cut_text(data['error'])}"
    return excerpt(body)


def cut_text(value: Any, limit: int = ERROR_TEXT_LIMIT) -> str:
    """A text from the server, cut to ``limit`` characters for logs and the
    scope's state (a 300,000-character error cost ~100 s of CPU a period)."""
    text = value if isinstance(value, str) else repr(value)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"
