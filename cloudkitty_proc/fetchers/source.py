"""``source`` fetcher: the static list ``[fetcher_source] sources``."""

from __future__ import annotations

from cloudkitty_proc.fetchers.base import BaseFetcher


class SourceFetcher(BaseFetcher):
    def get_scopes(self) -> list[str]:
        return [s for s in dict.fromkeys(x.strip() for x in self.conf.fetcher_source.sources) if s]
