"""The ``opensearch`` storage: rated points in OpenSearch, CloudKitty's v2 layout.

Documents, mapping and queries: ``storage/search.py``. What is particular to
OpenSearch (CloudKitty 25.0.0's ``cloudkitty/storage/v2/opensearch/``):

* documents have no ``description``, as CloudKitty's;
* CloudKitty's ``init`` never maps the index: it ``POST``\\s the mapping to
  ``/<index>/_doc``, which stores it as a document. Its indices therefore
  have OpenSearch's default dynamic mapping, where strings are ``text``
  with a ``.keyword`` sub-field, and its queries aggregate on
  ``type.keyword`` and ``groupby.<k>.keyword``;
* ``init`` here creates a missing index with a mapping (``PUT /<index>``)
  that is CloudKitty's with a ``.keyword`` sub-field on every keyword
  (``type``, ``unit``, the strings of groupby and metadata): CloudKitty's
  filters (``groupby.<k>``) and aggregations (``….keyword``) both work on
  it. An index that exists is left as it is once checked
  (``groupby.<scope_key>.keyword`` must be a keyword, as under both);
* queries use ``groupby.<scope_key>.keyword``: an exact keyword under
  either mapping (``groupby.<k>`` is analysed text under the default one);
* bulk writes go to ``/<index>/_bulk``, as CloudKitty's.

``[storage_opensearch]`` options: ``host``, ``index_name``, ``insecure``,
``cafile``, ``scroll_duration`` as CloudKitty's; ``use_datastream`` must
stay False; ``timeout`` and ``write_batch_size`` are cloudkitty_proc's.
"""

from __future__ import annotations

import logging

from cloudkitty_proc.storage.external import ExternalStorage
from cloudkitty_proc.storage.search import SearchPointStore, search_opts
from cloudkitty_proc.storage.search_mapping import MAPPING_WITH_KEYWORDS

__all__ = ["OPTS", "OpenSearchPointStore", "OpenSearchStorage"]

LOG = logging.getLogger(__name__)

GROUP = "storage_opensearch"
opensearch_opts = search_opts("OpenSearch")
OPTS = [(GROUP, opensearch_opts)]


class OpenSearchPointStore(SearchPointStore):
    """Rated points in an OpenSearch index."""

    name = "OpenSearch"
    group = GROUP
    opts = opensearch_opts
    with_description = False
    keyword_suffix = ".keyword"
    mapping = MAPPING_WITH_KEYWORDS

    def init_existing(self) -> None:
        """Leave the index's mapping as it is (CloudKitty's indices have the
        default one, under which the layout works too); check it."""
        LOG.info("%s: index %s exists: its mapping is left as it is", self.name, self.index)
        self.check_mapping()


class OpenSearchStorage(ExternalStorage):
    """The ``opensearch`` backend: points in OpenSearch, states in SQL."""

    point_store_class = OpenSearchPointStore
