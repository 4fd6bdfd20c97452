"""``noop`` processor: passes every point through, prices unchanged."""

from __future__ import annotations

from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.rating.base import BaseRatingProcessor


class NoopProcessor(BaseRatingProcessor):
    def process(self, frame: DataFrame) -> DataFrame:
        return frame
