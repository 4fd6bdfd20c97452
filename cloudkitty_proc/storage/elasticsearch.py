"""The ``elasticsearch`` storage: rated points in Elasticsearch, CloudKitty's v2 layout.

Documents, mapping and queries: ``storage/search.py``. What is particular to
Elasticsearch (CloudKitty 25.0.0's ``cloudkitty/storage/v2/elasticsearch/``):

* documents carry ``description`` (always None), as CloudKitty's do;
* ``init`` creates a missing index with CloudKitty's mapping (``PUT
  /<index>`` with ``{"mappings": …}``); on an index that exists it puts
  the mapping (``PUT /<index>/_mapping``), as ``cloudkitty-storage-init``
  does (CloudKitty's requires the index to exist and uses the typed
  ``/_mapping/_doc?include_type_name=true`` of Elasticsearch 6/7), then
  checks that ``groupby.<scope_key>`` is a keyword (an index whose
  groupby strings were mapped as text before is refused);
* queries use ``groupby.<scope_key>``: a keyword under that mapping;
* bulk writes go to ``/<index>/_bulk`` (CloudKitty's to the typed
  ``/<index>/_doc/_bulk``, which Elasticsearch 8 no longer has; the
  documents are the same, of type ``_doc`` on 7.x).

Elasticsearch 7 or later (typeless mappings). ``[storage_elasticsearch]``
options: ``host``, ``index_name``, ``insecure``, ``cafile``,
``scroll_duration`` as CloudKitty's; ``use_datastream`` must stay False;
``timeout`` and ``write_batch_size`` are cloudkitty_proc's.
"""

from __future__ import annotations

import logging

from cloudkitty_proc.storage.external import ExternalStorage
from cloudkitty_proc.storage.search import SearchPointStore, search_opts
from cloudkitty_proc.storage.search_mapping import MAPPING

__all__ = ["ElasticsearchPointStore", "ElasticsearchStorage", "OPTS"]

LOG = logging.getLogger(__name__)

GROUP = "storage_elasticsearch"
elasticsearch_opts = search_opts("Elasticsearch")
OPTS = [(GROUP, elasticsearch_opts)]


class ElasticsearchPointStore(SearchPointStore):
    """Rated points in an Elasticsearch index."""

    name = "Elasticsearch"
    group = GROUP
    opts = elasticsearch_opts
    with_description = True
    keyword_suffix = ""
    mapping = MAPPING

    def init_existing(self) -> None:
        """Put CloudKitty's mapping on the index (a no-op when it has it;
        refused, naming the conflicting field, when a field is mapped
        otherwise)."""
        self.call(f"putting the mapping on index {self.index}", "PUT",
                  f"{self.index_path}/_mapping", self.mapping)
        LOG.info("%s: mapping put on index %s", self.name, self.index)
        self.check_mapping()


class ElasticsearchStorage(ExternalStorage):
    """The ``elasticsearch`` backend: points in Elasticsearch, states in SQL."""

    point_store_class = ElasticsearchPointStore
