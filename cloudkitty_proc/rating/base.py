"""The rating processor contract.

:class:`RatingProcessor` says what a processor must provide and when each
member is called; :class:`BaseRatingProcessor` is the convenient base to
implement one (``process()`` to write, no-op ``reload()`` and ``check()``).

Processors run in ``[rating] processors`` order; each receives the frame the
previous one returned and returns a frame (the same object, mutated with
``frame.replace_points``, or a new one). Prices are Decimals. A processor
must not do I/O per frame: rules are loaded once (``__init__``) and again
only on ``reload()``.

Who builds a processor (``cls(conf)``, through
:func:`cloudkitty_proc.plugins.load_rating_chain`): the master once, to
validate the configuration before it forks (then calls ``check()``); each
worker, on its run thread, at start; the worker's RPC endpoint, for quotes,
again after each reload of the worker; the ``quote``, ``check`` and
``reload-rules`` commands. Each of them owns its instances: one instance is
only ever used by one thread at a time.
"""

from __future__ import annotations

import abc
from typing import Protocol

from oslo_config import cfg

from cloudkitty_proc.dataframe import DataFrame

__all__ = ["BaseRatingProcessor", "RatingProcessor"]


class RatingProcessor(Protocol):
    """What a rating processor provides (entry point namespace
    ``cloudkitty_proc.rating``).

    Construction: ``cls(conf)`` with the global, registered options. It
    loads and compiles the rules; invalid rules or options raise
    :class:`~cloudkitty_proc.exceptions.ConfigError` (or ValueError,
    TypeError, OSError, turned into a ConfigError naming ``[rating]
    processors``). In the master this stops the daemon before any worker
    starts; in a worker it exits the worker process (status 2).
    """

    def process(self, frame: DataFrame) -> DataFrame:
        """Price every point of ``frame`` (one scope, one period) and return
        the frame.

        Called on the worker's run thread, once per period, after the
        processors listed before this one, never concurrently with another
        call on the same instance nor with :meth:`reload`. Any exception
        fails the rating of that period: it is logged with its traceback
        and recorded on the scope's state, nothing of the period is stored,
        the state does not move and the period is retried on a later pass.
        Also called by quotes (RPC endpoint, ``quote`` command) on frames
        that are never stored.
        """

    def reload(self) -> None:
        """Re-read the rules (SIGHUP, or the ``reload-rules`` command).

        Called on the worker's run thread at a safe point between passes
        (the signal or RPC thread only sets a flag), after the configuration
        files were re-read. On invalid rules raise ConfigError and keep the
        rules in force: the worker logs the error and goes on with them; a
        processor is never left without rules. Swap the compiled rules in
        one attribute assignment, read once per frame by :meth:`process`,
        so a frame is never rated half with old and half with new rules.
        """

    def check(self) -> None:
        """Validate the configuration and rules without changing the rules
        in force; raise ConfigError naming the file or option at fault.

        Called by the master before it forks (a ConfigError stops the
        daemon with that one line) and by ``cloudkitty-proc-manage check``
        and ``reload-rules`` (refusing to send rules the workers would
        refuse). No network I/O.
        """


class BaseRatingProcessor(abc.ABC):
    """Implementation base of :class:`RatingProcessor`: keeps ``conf``;
    ``reload()`` and ``check()`` do nothing unless overridden."""

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf

    @abc.abstractmethod
    def process(self, frame: DataFrame) -> DataFrame:
        """Price every point of ``frame`` and return the frame."""

    def reload(self) -> None:
        """Re-read rules. On invalid rules, raise ConfigError and keep the
        rules in force (never leave the processor without rules)."""

    def check(self) -> None:
        """Validate the processor's configuration; raise ConfigError."""
