"""``hashmap`` rating processor: CloudKitty's HashMap, rules from a YAML file.

The rules file is ``[hashmap] rules_file`` (format and semantics:
CONTRACTS.md §4, doc/source/rating.rst). It is read and compiled when the
processor is built and again on :meth:`HashMapProcessor.reload`; rating a
frame does no I/O. The file is read and validated by
:mod:`cloudkitty_proc.rating.hashmap_schema`, compiled and priced by
:mod:`cloudkitty_proc.rating.hashmap_engine`; this module re-exports their
public names (``load_rules``, ``price_point``, ``RuleSet``, ...).
"""

from __future__ import annotations

import datetime
import logging

from oslo_config import cfg

from cloudkitty_proc.dataframe import DataFrame
from cloudkitty_proc.exceptions import ConfigError
from cloudkitty_proc.rating.base import BaseRatingProcessor
from cloudkitty_proc.rating.hashmap_engine import (  # noqa: F401  (re-exports)
    RuleSet,
    load_rules,
    price_point,
    to_utc,
)
from cloudkitty_proc.rating.hashmap_schema import DEFAULT_GROUP  # noqa: F401

hashmap_opts = [
    cfg.StrOpt(
        "rules_file",
        default="/etc/cloudkitty-proc/rating.yml",
        help="YAML file holding the hashmap rating rules.",
    ),
]

OPTS = [("hashmap", hashmap_opts)]


LOG = logging.getLogger(__name__)

__all__ = ["HashMapProcessor", "RuleSet", "load_rules", "price_point"]


class HashMapProcessor(BaseRatingProcessor):
    """Prices every datapoint whose usage type has hashmap rules.

    Points of a usage type without rules keep their price. The compiled
    rules are one attribute (``rules``): :meth:`process` reads it once per
    frame and :meth:`reload` replaces it in one assignment, so a frame is
    always rated with one version of the rules.
    """

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        self.rules: RuleSet = load_rules(self.rules_file)
        LOG.info("hashmap: loaded %d rules for %d usage types from %s",
                 self.rules.rule_count, len(self.rules.services),
                 self.rules_file)

    @property
    def rules_file(self) -> str:
        return self.conf.hashmap.rules_file

    def process(self, frame: DataFrame) -> DataFrame:
        rules = self.rules  # once per frame: see the class docstring
        begin = frame.begin
        if begin.tzinfo is not datetime.timezone.utc:
            begin = to_utc(begin)
        scope = frame.scope_id
        for usage_type, points in list(frame.items()):
            if not points:
                continue
            plan = rules.plan(usage_type, scope, begin)
            if plan is None:
                continue
            frame.replace_points(usage_type, plan.rate_points(points))
        return frame

    def reload(self) -> None:
        """Re-read the rules file; on error keep the rules in force."""
        path = self.rules_file
        try:
            rules = load_rules(path)
        except ConfigError as exc:
            LOG.error("hashmap: rules not reloaded, keeping the %d rules "
                      "loaded from %s: %s", self.rules.rule_count,
                      self.rules.path, exc)
            raise
        self.rules = rules
        LOG.info("hashmap: reloaded %d rules for %d usage types from %s",
                 rules.rule_count, len(rules.services), path)

    def check(self) -> None:
        """Validate ``[hashmap] rules_file``; raise ConfigError."""
        load_rules(self.rules_file)
