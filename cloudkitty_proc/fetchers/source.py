"""``source`` fetcher: the static list ``[fetcher_source] sources``."""

from __future__ import annotations

from oslo_config import cfg

from cloudkitty_proc.fetchers.base import BaseFetcher

fetcher_source_opts = [
    cfg.ListOpt(
        "sources",
        default=[],
        help="Static list of scope ids to process.",
    ),
]

OPTS = [("fetcher_source", fetcher_source_opts)]



class SourceFetcher(BaseFetcher):
    def get_scopes(self) -> list[str]:
        return [s for s in dict.fromkeys(x.strip() for x in self.conf.fetcher_source.sources) if s]
