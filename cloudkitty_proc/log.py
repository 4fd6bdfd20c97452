"""Logging: oslo.log setup and a context prefix for processing lines.

Every processing log line carries the worker and, where there is one, the
scope: ``[worker host-0 scope p1] committed 2026-01-01T00:00:00+00:00 …``.
"""

from __future__ import annotations

import logging
import re
import urllib.parse

from oslo_config import cfg
from oslo_log import log as oslo_log

_SECRET_RE = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")


def mask_url(text: str) -> str:
    """Hide passwords in URLs: ``redis://u:secret@h`` → ``redis://u:***@h``."""
    return _SECRET_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))


def safe_url(url: str) -> str:
    """``url`` without its user:password@ part (for logs and errors)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


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
        "stevedore=WARN", "tooz=WARN", "urllib3=WARN", "requests=WARN",
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
