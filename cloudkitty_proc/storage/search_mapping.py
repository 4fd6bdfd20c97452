"""The index mappings of the Elasticsearch and OpenSearch point stores, and
the check that an existing index lets them find a scope's points.

``MAPPING`` is CloudKitty 25.0.0's (``CLOUDKITTY_INDEX_MAPPING``);
``MAPPING_WITH_KEYWORDS`` adds a ``.keyword`` sub-field to every keyword,
for OpenSearch (``storage/opensearch.py`` says why).
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

__all__ = ["DEFAULT_STRING", "MAPPING", "MAPPING_WITH_KEYWORDS", "mapping_problem",
           "string_template"]

MAPPING: dict[str, Any] = {
    "dynamic_templates": [
        {"strings_as_keywords": {"match_mapping_type": "string",
                                 "mapping": {"type": "keyword"}}},
    ],
    "dynamic": False,
    "properties": {
        "start": {"type": "date"},
        "end": {"type": "date"},
        "type": {"type": "keyword"},
        "unit": {"type": "keyword"},
        "qty": {"type": "double"},
        "price": {"type": "double"},
        "groupby": {"dynamic": True, "type": "object"},
        "metadata": {"dynamic": True, "type": "object"},
    },
}

_KEYWORD = {"type": "keyword", "fields": {"keyword": {"type": "keyword"}}}
MAPPING_WITH_KEYWORDS = copy.deepcopy(MAPPING)
MAPPING_WITH_KEYWORDS["dynamic_templates"][0]["strings_as_keywords"]["mapping"] = \
    copy.deepcopy(_KEYWORD)
MAPPING_WITH_KEYWORDS["properties"]["type"] = copy.deepcopy(_KEYWORD)
MAPPING_WITH_KEYWORDS["properties"]["unit"] = copy.deepcopy(_KEYWORD)

#: how Elasticsearch and OpenSearch map a new string field without a template
DEFAULT_STRING = {"type": "text", "fields": {"keyword": {"type": "keyword",
                                                         "ignore_above": 256}}}


def _exact(field: Any, suffix: str) -> bool:
    """Whether ``<field><suffix>`` is a keyword (an exact term)."""
    if not isinstance(field, dict):
        return False
    if suffix:
        field = (field.get("fields") or {}).get(suffix.lstrip("."))
        if not isinstance(field, dict):
            return False
    return field.get("type") == "keyword"


def string_template(mappings: dict[str, Any], path: str) -> dict[str, Any]:
    """The mapping a new string field at ``path`` gets."""
    for template in mappings.get("dynamic_templates") or []:
        for body in (template or {}).values():
            if not isinstance(body, dict) or body.get("match_mapping_type", "*") not in (
                    "string", "*"):
                continue
            leaf = path.rsplit(".", 1)[-1]
            if "match" in body and not fnmatch.fnmatchcase(leaf, body["match"]):
                continue
            if "path_match" in body and not fnmatch.fnmatchcase(path, body["path_match"]):
                continue
            return body.get("mapping") or {}
    return DEFAULT_STRING


def mapping_problem(mappings: dict[str, Any], scope_key: str, suffix: str) -> str | None:
    """Why the term query on ``groupby.<scope_key><suffix>`` would not find
    a scope's points exactly under ``mappings`` (an index's, as ``GET
    /<index>/_mapping`` gives it), or None when it would."""
    queried = f"groupby.{scope_key}{suffix}"
    groupby = (mappings.get("properties") or {}).get("groupby")
    if groupby is not None and not isinstance(groupby, dict):
        return "groupby is not an object"
    field = ((groupby or {}).get("properties") or {}).get(scope_key)
    if field is not None:
        if _exact(field, suffix):
            return None
        return (f"the scope is looked up as {queried}, but groupby.{scope_key} is "
                f"mapped as {field}")
    if groupby is not None and str(groupby.get("dynamic", True)).lower() in ("false",
                                                                             "strict"):
        return f"groupby is not dynamic: groupby.{scope_key} would never be mapped"
    template = string_template(mappings, f"groupby.{scope_key}")
    if _exact(template, suffix):
        return None
    return (f"the scope is looked up as {queried}, but new strings in groupby are "
            f"mapped as {template}")
