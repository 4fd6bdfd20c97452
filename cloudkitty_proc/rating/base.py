"""The rating processor contract.

Processors run in ``[rating] processors`` order; each receives the frame the
previous one returned and returns a frame (the same object, mutated with
``frame.replace_points``, or a new one). Prices are Decimals. A processor
must not do I/O per frame: rules are loaded once (``__init__``) and again
only on ``reload()``.

Threading: ``process()`` runs on the worker's main thread, one frame at a
time; ``reload()`` is called from a signal-handling thread, so a processor
swaps its compiled rules atomically (one attribute assignment) and
``process()`` reads that attribute once per frame, so a frame is never rated
half with old rules and half with new ones.
"""

from __future__ import annotations

import abc

from oslo_config import cfg

from cloudkitty_proc.dataframe import DataFrame


class BaseRatingProcessor(abc.ABC):
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
