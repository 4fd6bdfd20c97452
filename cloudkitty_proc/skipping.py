"""``skip_datapoints_expression``: which rated datapoints are not stored.

Applied where CloudKitty applies it: after the rating chain, just before the
period is stored. A datapoint for which its metric's expression (metrics.yml)
is true, or, for a metric without one, ``[orchestrator]
skip_datapoints_expression`` (CloudKitty's option; ``[collect]
skip_datapoints_expression`` is read as a deprecated alias), is dropped from
the frame. An expression therefore sees the rated ``price``. A blank
metric expression turns the global one off for that metric. An expression
that fails on a datapoint (``'a' < 1``) keeps it, with a warning once per
usage type.

The expressions are in the safe language of :mod:`cloudkitty_proc.expressions`
(no ``eval``); CloudKitty's Python expressions over ``datapoint`` are refused
with the equivalent in that language.
"""

from __future__ import annotations

import logging
from typing import Any

from oslo_config import cfg

from cloudkitty_proc import expressions
from cloudkitty_proc.dataframe import DataFrame, DataPoint

LOG = logging.getLogger(__name__)

_GLOBAL = object()


class Skipper:
    """The skip expressions of one metrics configuration."""

    def __init__(self, conf: cfg.ConfigOpts, metrics: Any) -> None:
        source = conf.orchestrator.skip_datapoints_expression
        self.default: expressions.Expression | None = (
            expressions.compile_expression(
                source, where="[orchestrator] skip_datapoints_expression")
            if source and source.strip() else None)
        #: usage type -> its metric's expression (None: blank, nothing skipped)
        self._own: dict[str, expressions.Expression | None] = {
            m.usage_type: m.skip_expression for m in metrics
            if m.skip_datapoints_expression is not None}
        self._warned: set[str] = set()

    def expression_for(self, usage_type: str) -> expressions.Expression | None:
        """The usage type's metric expression, else the global one."""
        own = self._own.get(usage_type, _GLOBAL)
        return self.default if own is _GLOBAL else own  # type: ignore[return-value]

    def apply(self, frame: DataFrame) -> DataFrame:
        """``frame`` without the datapoints to skip (changed in place)."""
        for usage_type, points in list(frame.items()):
            expr = self.expression_for(usage_type)
            if expr is None:
                continue
            kept = [p for p in points if not self._skipped(expr, usage_type, p)]
            if len(kept) != len(points):
                frame.replace_points(usage_type, kept)
        return frame

    def _skipped(self, expr: expressions.Expression, usage_type: str,
                 point: DataPoint) -> bool:
        try:
            return expr.matches(point)
        except expressions.ExpressionEvalError as exc:
            if usage_type not in self._warned:
                self._warned.add(usage_type)
                LOG.warning("usage type %s: skip_datapoints_expression %r failed on a "
                            "datapoint (%s); such datapoints are kept (logged once per "
                            "usage type)", usage_type, expr.source, exc)
            return False
