"""``gnocchi`` fetcher: the scopes are the values of a resource attribute in Gnocchi.

As CloudKitty's Gnocchi fetcher, the scope ids are the distinct non-empty
values of ``[fetcher_gnocchi] scope_attribute`` (``project_id``) among the
resources of each of ``resource_types`` (``generic``: every resource; an
empty list means the same, as CloudKitty's help says "All if left blank").
The other options are CloudKitty's (``gnocchi_auth_type``,
``gnocchi_user``, ``gnocchi_endpoint``, ``interface``, ``region_name``,
``auth_section``..., see cloudkitty_proc/gnocchi_client.py).

In pages, memory bounded: CloudKitty's loads every resource with all its
attributes, again and again with a growing "not in" list of the scopes
seen (users report "too much RAM" and "too long" with hundreds of
thousands of resources). Here each request asks for one page
(``page_size``, which Gnocchi clamps to its ``[api] max_limit``) of the
scope attribute alone, sorted by it, above the last scope id seen::

    POST /v1/search/resource/<type>?attrs=<scope_attribute>&limit=1000
         &sort=<scope_attribute>:asc
    {"and": [{"!=": {"project_id": null}}, {">": {"project_id": "<last id>"}}]}

so only the set of scope ids is kept, and the remaining resources of the
last scope of a page are skipped by the next request (a scope with 10,000
resources costs one page, not ten). The listing ends with a page that is not
full (Gnocchi sends no ``Link: rel="next"``).

Runs on the worker's main thread (never in the collect pool): plain (not
green) HTTP, no retry: a failure is a FetchError, and the worker goes on with
the scopes of its last successful listing.
"""

from __future__ import annotations

import logging
from typing import Any

from oslo_config import cfg

from cloudkitty_proc import gnocchi_client
from cloudkitty_proc.fetchers.base import BaseFetcher, FetchError
from cloudkitty_proc.gnocchi_client import GnocchiError

LOG = logging.getLogger(__name__)

GROUP = "fetcher_gnocchi"

fetcher_gnocchi_opts = [
    cfg.StrOpt(
        "scope_attribute",
        default="project_id",
        help="Attribute from which scope_ids should be collected.",
    ),
    cfg.ListOpt(
        "resource_types",
        default=["generic"],
        help="List of gnocchi resource types. All (generic) if left blank.",
    ),
    *gnocchi_client.common_opts(),
    cfg.IntOpt(
        "page_size",
        default=1000,
        min=1,
        help="Resources asked per request (Gnocchi answers at most its [api] "
        "max_limit, 1000 by default). Not in CloudKitty.",
    ),
]

OPTS = [(GROUP, fetcher_gnocchi_opts)]


class GnocchiFetcher(BaseFetcher):
    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        group = conf[GROUP]
        self.scope_attribute = group.scope_attribute
        self.resource_types = [t.strip() for t in group.resource_types if t.strip()] \
            or ["generic"]
        self.page_size = group.page_size
        self._client = gnocchi_client.GnocchiClient(
            gnocchi_client.auth_from_conf(conf, GROUP), group=GROUP, green=False,
            timeout=group.timeout, cafile=group.cafile, insecure=group.insecure, size=1)
        #: requests and resources read by the last get_scopes (for logs and tests)
        self.last_pages = 0
        self.last_resources = 0

    def get_scopes(self) -> list[str]:
        scopes: set[str] = set()
        self.last_pages = self.last_resources = 0
        for resource_type in self.resource_types:
            self._list(resource_type, scopes)
        LOG.debug("gnocchi fetcher: %d scopes from %d resources in %d requests",
                  len(scopes), self.last_resources, self.last_pages)
        return sorted(scopes)

    def _list(self, resource_type: str, scopes: set[str]) -> None:
        attr = self.scope_attribute
        path = f"/v1/search/resource/{resource_type}"
        params = {"attrs": [attr], "limit": str(self.page_size), "sort": f"{attr}:asc"}
        not_null = {"!=": {attr: None}}
        last: Any = None
        while True:
            query = not_null if last is None else {"and": [not_null, {">": {attr: last}}]}
            try:
                page, headers = self._client.request("POST", path, params, query)
            except GnocchiError as exc:
                raise FetchError(f"{exc.message} (listing the {attr} of {resource_type} "
                                 "resources)") from None
            if type(page) is not list:
                raise FetchError(f"POST {self._client.safe_url}{path}: expected a list of "
                                 f"resources, got {str(page)[:200]}")
            self.last_pages += 1
            self.last_resources += len(page)
            for resource in page:
                value = resource.get(attr) if type(resource) is dict else None
                if value is not None and value != "":
                    scopes.add(value if type(value) is str else str(value))
            if not page or not gnocchi_client.has_next_page(headers):
                return
            tail = page[-1].get(attr) if type(page[-1]) is dict else None
            if tail is None or tail == last:
                raise FetchError(f"POST {self._client.safe_url}{path}: the page did not move "
                                 f"past {attr} {last!r}: is {resource_type} sortable by it?")
            last = tail

    def close(self) -> None:
        self._client.close()
