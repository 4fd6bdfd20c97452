"""Logging: oslo.log setup and a context prefix for processing lines.

Every processing log line carries the worker and, where there is one, the
scope: ``[worker host-0 scope p1] committed 2026-01-01T00:00:00+00:00 …``.
"""

from __future__ import annotations

import logging
import re

from oslo_config import cfg
from oslo_log import log as oslo_log

_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
#: characters that end a URL inside free text (log lines, error messages)
_TOKEN_END = re.compile(r"[\s\"'<>`]")


def _userinfo_end(rest: str) -> int:
    """Where the user-info of the URL text ``rest`` (what follows ``://``)
    ends: its last ``@`` (-1 when there is none).

    From the right, because a password may hold ``@``, ``/``, ``:``, ``#``
    or ``?`` unencoded (oslo.messaging accepts some of those). A path or
    query holding ``@`` is then masked too: more is hidden, never a
    password. A list of hosts (``u:p@h1,u2:p2@h2``) shows the last host.
    """
    return rest.rfind("@")


def _mask_one(scheme: str, rest: str, replacement: str | None) -> str:
    at = _userinfo_end(rest)
    if at < 0:
        return scheme + rest
    user, colon, _password = rest[:at].partition(":")
    if replacement is None:  # drop the user-info altogether
        return scheme + rest[at + 1:]
    if not colon:
        return scheme + rest
    return f"{scheme}{user}:{replacement}@{rest[at + 1:]}"


def _rewrite_urls(text: str, replacement: str | None) -> str:
    """Every ``scheme://…`` of ``text`` with its password replaced (or its
    user-info dropped, ``replacement`` None). Linear in ``len(text)``."""
    out = []
    pos = 0
    find = text.find
    i = find("://")
    while i != -1:
        j = i
        while j > pos and text[j - 1] in _SCHEME_CHARS:
            j -= 1
        while j < i and not text[j].isalpha():  # a scheme starts with a letter
            j += 1
        if j == i:
            i = find("://", i + 3)
            continue
        stop = _TOKEN_END.search(text, i + 3)
        end = stop.start() if stop else len(text)
        out.append(text[pos:j])
        out.append(_mask_one(text[j:i + 3], text[i + 3:end], replacement))
        pos = end
        i = find("://", end)
    out.append(text[pos:])
    return "".join(out)


def mask_url(text) -> str:
    """Hide passwords in URLs: ``redis://u:secret@h`` → ``redis://u:***@h``.

    Works on free text (exception messages that quote URLs) in linear time;
    a password holding ``@ / : # ?`` is hidden whole.
    """
    return _rewrite_urls(str(text), "***")


def safe_url(url: str) -> str:
    """``url`` without its user:password@ part (for logs and errors)."""
    return _rewrite_urls(url, None)


def register(conf: cfg.ConfigOpts) -> None:
    try:
        oslo_log.register_options(conf)
    except cfg.ArgsAlreadyParsedError:  # pragma: no cover - tests re-register
        pass
    except cfg.DuplicateOptError:
        pass


def setup(conf: cfg.ConfigOpts, name: str = "cloudkitty-proc") -> None:
    oslo_log.set_defaults(default_log_levels=[
        "amqp=WARN", "amqplib=WARN", "oslo.messaging=INFO", "oslo_messaging=INFO",
        "stevedore=WARN", "tooz=WARN", "urllib3=WARN", "requests=WARN", "keystoneauth=WARN",
        "cotyledon=INFO", "alembic=WARN", "sqlalchemy=WARN", "kombu=WARN",
    ])
    oslo_log.setup(conf, name)


class ContextLogger(logging.LoggerAdapter):
    """Prefixes every message with ``[worker W scope S]``."""

    def __init__(self, logger: logging.Logger, worker: str, scope: str | None = None) -> None:
        prefix = f"worker {worker}" + (f" scope {scope}" if scope is not None else "")
        super().__init__(logger, {"prefix": prefix})

    def process(self, msg, kwargs):
        return f"[{self.extra['prefix']}] {msg}", kwargs

    def for_scope(self, scope: str) -> "ContextLogger":
        worker = self.extra["prefix"].split(" scope ", 1)[0][len("worker "):]
        return ContextLogger(self.logger, worker, scope)
